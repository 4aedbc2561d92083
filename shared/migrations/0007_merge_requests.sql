-- Promise 13, a promised merge exists: the login merge a session response hands out is
-- recorded in the same transaction as that session, so its id is readable the instant the
-- response is, and a history worker can apply it from here when its event never arrives.
--
-- Owner: session resolution writes merge_requests (with the session and the
-- history.merge_requested event, never afterwards) and publishes the view
-- login_merge_requests; history reads requests only through that view and keeps writing the
-- merges table, which a request turns into when it is applied (same id).

CREATE TABLE merge_requests (
    id            uuid PRIMARY KEY,
    org_id        uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    visitor_id    uuid NOT NULL,
    contact_id    uuid NOT NULL,
    external_id   text NOT NULL DEFAULT '',
    -- clock_timestamp(): the moment of the request, late in the session's transaction, so
    -- it commits soon after this instant (history's worker relies on that).
    requested_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- History's worker walks requests oldest first from where its last walk stopped.
CREATE INDEX merge_requests_requested ON merge_requests (requested_at, id);

-- Session resolution's published read model of login merge requests: what history may know
-- about one before (and after) it applies it.
CREATE VIEW login_merge_requests AS
    SELECT id AS merge_id, org_id, visitor_id, contact_id, external_id, requested_at
    FROM merge_requests;

-- History's: merges recorded pending (explicit contact merges) that wait too long are found
-- by age without a scan of every merge.
CREATE INDEX merges_pending ON merges (requested_at) WHERE status = 'pending';
