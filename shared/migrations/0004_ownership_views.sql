-- Ownership of the schema, restated here because applied migrations never change (0001's
-- header was the first statement of it):
--
--   token issuance      writes orgs, api_keys, widget_tokens, signing_keys, contacts
--   session resolution  writes visitors, device_bindings, sessions; publishes the views
--                       session_scopes and visitor_scopes for other services to read
--   history             writes conversations, messages, merges; publishes the read model
--                       of a scope's history, shared/scope_history.py
--   the event bus       outbox, subject_seqs, processed_events (shared/bus/, every service)
--
-- A service writes only its own tables, and reads another's only through shared/ or a view
-- that owner publishes. The one exception is erasure (DELETE /v1/contacts/{id}): one legal
-- act that must commit as a whole, so services/history/erasure.py, and nothing else, also
-- ends sessions and drops their copies of the contact's attributes, deletes device_bindings,
-- tombstones the contacts row, and scrubs published outbox rows that mention the contact.

-- Session resolution's published read model of visitors: what history may know about one
-- (that it exists in the org, logged out or not). Others depend on this view, never on the
-- table's columns directly.
CREATE VIEW visitor_scopes AS
    SELECT id AS visitor_id, org_id, created_at, unbound_at
    FROM visitors;
