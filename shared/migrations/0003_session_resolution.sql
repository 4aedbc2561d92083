-- Session resolution (issue 4): what sessions and device bindings need beyond schema v1.

-- A session token is a bearer secret: only its SHA-256 is stored (lookup by hash). The token
-- is also kept *wrapped* (AES-GCM under a key derived from the visitor token, which is never
-- stored) so a returning visitor with nothing new gets its live session back without a write.
-- fingerprint identifies what the session recorded (level, scope, attributes) to tell "nothing
-- new". contact_token_issued_at is the iat of the contact token that verified the session, so
-- a later "log out everywhere" (contacts.tokens_not_before) also ends the session.
ALTER TABLE sessions
    ADD COLUMN token_hash bytea CHECK (length(token_hash) = 32),
    ADD COLUMN token_wrapped bytea,
    ADD COLUMN fingerprint text NOT NULL DEFAULT '',
    ADD COLUMN contact_token_issued_at timestamptz,
    ADD COLUMN end_reason text
        CHECK (end_reason IN ('logout', 'device_revoked', 'tokens_revoked', 'erased'));
CREATE UNIQUE INDEX sessions_token_hash ON sessions (token_hash) WHERE token_hash IS NOT NULL;
-- A returning visitor's current session: the newest live one.
CREATE INDEX sessions_visitor_live ON sessions (visitor_id, created_at DESC) WHERE ended_at IS NULL;

-- When a login on this device last asked for the browser's history to be merged. A merge is
-- requested again only for browser-bound sessions newer than the visitor's latest request.
ALTER TABLE device_bindings ADD COLUMN last_merge_requested_at timestamptz;
CREATE INDEX device_bindings_contact ON device_bindings (org_id, contact_id) WHERE unbound_at IS NULL;
