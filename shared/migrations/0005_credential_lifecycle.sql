-- Credential lifecycle: disabling an org, when an API key was last used, and keyset indexes
-- for the admin lists (ordered by created_at, id within an org).

-- A disabled org keeps all its data; while disabled_at is set its API keys, widget tokens and
-- contact tokens are refused. Enabling clears it.
ALTER TABLE orgs ADD COLUMN disabled_at timestamptz;

-- Written at most about once a minute per key per process (never once per request).
ALTER TABLE api_keys ADD COLUMN last_used_at timestamptz;

CREATE INDEX orgs_listing ON orgs (created_at, id);
-- These lead with org_id, so they also serve every lookup the org_id-only indexes served.
CREATE INDEX api_keys_org_listing ON api_keys (org_id, created_at, id);
DROP INDEX api_keys_org;
CREATE INDEX widget_tokens_org_listing ON widget_tokens (org_id, created_at, id);
DROP INDEX widget_tokens_org;
CREATE INDEX signing_keys_org_listing ON signing_keys (org_id, created_at, kid)
    WHERE deleted_at IS NULL;
