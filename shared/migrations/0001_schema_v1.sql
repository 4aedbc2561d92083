-- Schema v1 for the whole product. Ownership: token issuance writes orgs, api_keys,
-- widget_tokens, signing_keys, contacts; session resolution writes visitors, device_bindings,
-- sessions; history writes conversations, messages, merges. The bus tables are shared.
-- Every table that holds org data carries org_id and every
-- lookup key is unique *per org* (promise 8). Unique columns are NOT NULL (an empty string
-- stands for "none") so no NULL can slip past a unique constraint.

CREATE TABLE orgs (
    id          uuid PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    policy      jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(policy) = 'object'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- API keys: only a SHA-256 of the whole key is stored; the display prefix lets people tell
-- keys apart in listings without making the stored value usable.
CREATE TABLE api_keys (
    id              uuid PRIMARY KEY,
    org_id          uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    key_hash        bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    display_prefix  text NOT NULL,
    scopes          text[] NOT NULL CHECK (cardinality(scopes) > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz,
    revoked_at      timestamptz
);
CREATE INDEX api_keys_org ON api_keys (org_id);

-- Widget tokens are public (they sit in page source) but still looked up by hash, so a
-- database dump does not list every customer's embed code.
CREATE TABLE widget_tokens (
    id               uuid PRIMARY KEY,
    org_id           uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    token_hash       bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    display_prefix   text NOT NULL,
    allowed_origins  text[] NOT NULL DEFAULT '{}',
    settings         jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(settings) = 'object'),
    created_at       timestamptz NOT NULL DEFAULT now(),
    revoked_at       timestamptz
);
CREATE INDEX widget_tokens_org ON widget_tokens (org_id);

-- Signing keys: several live per org so rotation never breaks a signed-in user. The private
-- key is stored only encrypted under the operator's key-encryption key.
CREATE TABLE signing_keys (
    kid               text PRIMARY KEY CHECK (kid ~ '^[A-Za-z0-9_-]{8,64}$'),
    org_id            uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    alg               text NOT NULL CHECK (alg IN ('EdDSA', 'ES256')),
    public_jwk        jsonb NOT NULL,
    private_key_enc   bytea NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    deleted_at        timestamptz
);
CREATE INDEX signing_keys_org_live ON signing_keys (org_id, created_at DESC) WHERE deleted_at IS NULL;

-- Contacts: people the org's backend vouched for. contact_key is 'user:<userId>' or
-- 'email:<normalised email>' (userId wins when given). An erased contact keeps a tombstone
-- row (no PII, contact_key 'erased:<id>') so replays cannot resurrect it.
CREATE TABLE contacts (
    id                 uuid PRIMARY KEY,
    org_id             uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    contact_key        text NOT NULL CHECK (length(contact_key) BETWEEN 3 AND 400),
    user_id            text,
    verified_email     text,
    attributes         jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(attributes) = 'object'),
    -- Tokens issued before this instant are rejected ("log out everywhere", erasure).
    tokens_not_before  timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    erased_at          timestamptz,
    UNIQUE (org_id, contact_key),
    UNIQUE (org_id, id)
);
-- One verified email belongs to one live contact per org (the 409 identity_conflict rule).
CREATE UNIQUE INDEX contacts_verified_email ON contacts (org_id, verified_email)
    WHERE verified_email IS NOT NULL AND erased_at IS NULL;

-- Visitors: one browser, known only by a server-issued random token stored as a hash.
CREATE TABLE visitors (
    id            uuid PRIMARY KEY,
    org_id        uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    token_hash    bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    attributes    jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(attributes) = 'object'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    -- Set on logout: the token stops resolving; the browser gets a new visitor.
    unbound_at    timestamptz,
    UNIQUE (org_id, id)
);

-- Which browsers a contact has verified on (per externalId), so devices can be listed and
-- revoked. external_id '' means "no externalId".
CREATE TABLE device_bindings (
    org_id       uuid NOT NULL,
    contact_id   uuid NOT NULL,
    visitor_id   uuid NOT NULL,
    external_id  text NOT NULL DEFAULT '',
    bound_at     timestamptz NOT NULL DEFAULT now(),
    unbound_at   timestamptz,
    PRIMARY KEY (contact_id, visitor_id, external_id),
    FOREIGN KEY (org_id, contact_id) REFERENCES contacts (org_id, id) ON DELETE CASCADE,
    FOREIGN KEY (org_id, visitor_id) REFERENCES visitors (org_id, id) ON DELETE CASCADE
);
CREATE INDEX device_bindings_visitor ON device_bindings (visitor_id);

CREATE TABLE sessions (
    id               uuid PRIMARY KEY,
    org_id           uuid NOT NULL,
    visitor_id       uuid NOT NULL,
    widget_token_id  uuid NOT NULL REFERENCES widget_tokens (id) ON DELETE CASCADE,
    level            text NOT NULL CHECK (level IN ('anonymous', 'unverified', 'verified')),
    contact_id       uuid,
    external_id      text NOT NULL DEFAULT '',
    external_id_verified boolean NOT NULL DEFAULT false,
    attributes       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    ended_at         timestamptz,
    CHECK ((level = 'verified') = (contact_id IS NOT NULL)),
    FOREIGN KEY (org_id, visitor_id) REFERENCES visitors (org_id, id) ON DELETE CASCADE,
    FOREIGN KEY (org_id, contact_id) REFERENCES contacts (org_id, id) ON DELETE CASCADE
);
CREATE INDEX sessions_visitor ON sessions (visitor_id);
CREATE INDEX sessions_contact ON sessions (contact_id) WHERE contact_id IS NOT NULL;

-- The session service's published read model: what other services (history) may read about
-- a session. They depend on this view, never on the table's columns directly.
CREATE VIEW session_scopes AS
    SELECT id AS session_id, org_id, visitor_id, level, contact_id, external_id,
           external_id_verified, created_at, expires_at, ended_at
    FROM sessions;

-- A conversation belongs to exactly one scope at a time: a visitor (browser-bound) or a
-- contact + externalId (verified). Merges re-point the scope; nothing is copied.
CREATE TABLE conversations (
    id                 uuid PRIMARY KEY,
    org_id             uuid NOT NULL,
    visitor_id         uuid,
    contact_id         uuid,
    external_id        text NOT NULL DEFAULT '',
    origin_visitor_id  uuid NOT NULL,
    last_merge_id      uuid,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK ((visitor_id IS NULL) <> (contact_id IS NULL)),
    CHECK (contact_id IS NOT NULL OR external_id = ''),
    FOREIGN KEY (org_id, visitor_id) REFERENCES visitors (org_id, id) ON DELETE CASCADE,
    FOREIGN KEY (org_id, contact_id) REFERENCES contacts (org_id, id) ON DELETE CASCADE
);
CREATE INDEX conversations_visitor_scope ON conversations (org_id, visitor_id, created_at, id)
    WHERE visitor_id IS NOT NULL;
CREATE INDEX conversations_contact_scope ON conversations (org_id, contact_id, external_id, created_at, id)
    WHERE contact_id IS NOT NULL;

CREATE TABLE messages (
    id               uuid PRIMARY KEY,
    org_id           uuid NOT NULL,
    conversation_id  uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    author           text NOT NULL CHECK (author IN ('visitor', 'agent', 'bot', 'system')),
    -- Was the sender a verified identity when this was written? Kept forever, even after a
    -- later merge or logout, so agents can tell what was said under which trust level.
    sender_verified  boolean NOT NULL,
    body             text NOT NULL,
    data             jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_conversation ON messages (conversation_id, created_at, id);

-- Merges: every history move is recorded (who, why, what moved) and can be undone.
CREATE TABLE merges (
    id                  uuid PRIMARY KEY,
    org_id              uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    reason              text NOT NULL CHECK (reason IN ('login', 'admin')),
    status              text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'done', 'failed', 'undone')),
    source_visitor_id   uuid,
    source_contact_id   uuid,
    source_external_id  text NOT NULL DEFAULT '',
    target_contact_id   uuid NOT NULL,
    target_external_id  text NOT NULL DEFAULT '',
    conversation_ids    uuid[] NOT NULL DEFAULT '{}',
    error               text,
    requested_at        timestamptz NOT NULL DEFAULT now(),
    completed_at        timestamptz,
    undone_at           timestamptz,
    CHECK ((source_visitor_id IS NULL) <> (source_contact_id IS NULL)),
    CHECK (reason = 'login' OR source_contact_id IS NOT NULL)
);
CREATE INDEX merges_target ON merges (org_id, target_contact_id);
CREATE INDEX merges_source_visitor ON merges (source_visitor_id) WHERE source_visitor_id IS NOT NULL;

-- Transactional outbox: the event row commits with the state change; the relay publishes it.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    event_id      uuid NOT NULL UNIQUE,
    stream        text NOT NULL,
    event_type    text NOT NULL,
    payload       bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Wake the relay as soon as events commit (NOTIFY is delivered at commit), instead of polling.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('wi_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Per-subject event sequence numbers; bumping the row also serialises writers per subject.
CREATE TABLE subject_seqs (
    subject  text PRIMARY KEY,
    seq      bigint NOT NULL
);

-- Consumer idempotency: an event's effect and this row commit together.
CREATE TABLE processed_events (
    consumer      text NOT NULL,
    event_id      uuid NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
