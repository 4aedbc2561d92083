-- Credentials end cleanly (promise 11): a session knows the credentials it stands on, so it
-- ends when any of them does — the widget token that opened it, its org, and for a verified
-- session the signing key that verified its contact token and the API key that minted it.
-- Owner: session resolution (sessions, and the session_scopes view it publishes).

ALTER TABLE sessions
    ADD COLUMN verified_kid text,
    ADD COLUMN minted_by_key uuid;

-- What other services read about a session. ended_at now also says when a credential the
-- session stands on ended (revoked widget token, disabled org, deleted signing key, revoked
-- minting API key, contact tokens revoked after its token was issued), so a reader such as
-- the history service refuses it at once, with no event to wait for. end_reason says which.
CREATE OR REPLACE VIEW session_scopes AS
    SELECT s.id AS session_id, s.org_id, s.visitor_id, s.level, s.contact_id, s.external_id,
           s.external_id_verified, s.created_at, s.expires_at,
           COALESCE(s.ended_at, credentials.ended_at) AS ended_at,
           CASE WHEN s.ended_at IS NOT NULL THEN s.end_reason ELSE credentials.reason END
               AS end_reason
    FROM sessions AS s
    JOIN widget_tokens AS w ON w.id = s.widget_token_id
    JOIN orgs AS o ON o.id = s.org_id
    LEFT JOIN signing_keys AS k ON k.kid = s.verified_kid
    LEFT JOIN api_keys AS a ON a.id = s.minted_by_key
    LEFT JOIN contacts AS c ON c.id = s.contact_id
    LEFT JOIN LATERAL (
        SELECT ended.at AS ended_at, ended.reason
        FROM (VALUES
                  (w.revoked_at, 'widget_token_revoked'),
                  (o.disabled_at, 'org_disabled'),
                  (k.deleted_at, 'signing_key_deleted'),
                  (a.revoked_at, 'api_key_revoked'),
                  (CASE WHEN c.tokens_not_before > s.contact_token_issued_at
                        THEN c.tokens_not_before END, 'tokens_revoked'),
                  (c.erased_at, 'erased')) AS ended (at, reason)
        WHERE ended.at IS NOT NULL
        ORDER BY ended.at
        LIMIT 1
    ) AS credentials ON true;
