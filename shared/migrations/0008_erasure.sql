-- Erasure leaves nothing (promise 12). Ownership as restated in 0004: erasure
-- (services/history/erasure.py) is the one writer across owners' tables.

-- A browser bound to an erased contact is made unusable: erased_at records why, and its token
-- hash is dropped (by session resolution, once its cache entries for that token are buried),
-- so the browser's old visitor token resolves as unknown and it starts over.
ALTER TABLE visitors
    ADD COLUMN erased_at timestamptz,
    ALTER COLUMN token_hash DROP NOT NULL;

-- Owner: history (erasure). Where Redis still holds the person's events after the erasure
-- committed: the stream ids of the outbox rows the erasure deleted (captured before the
-- delete), and the ids (contact and bound visitors) that name them. Written in the erasure's
-- transaction; the history consumer removes those entries (and any other naming them, in the
-- event stream's recent tail and in every dead-letter stream) when it handles the erasure's
-- contact.erased event, retried until Redis answers, then deletes the row. Ids only.
CREATE TABLE erasure_scrubs (
    receipt_id  uuid PRIMARY KEY,
    org_id      uuid NOT NULL,
    -- The contact id and the bound visitors' ids: a stream entry naming one is the person's.
    subjects    text[] NOT NULL,
    -- Parallel arrays: stream name and entry id ('<ms>-<seq>') of each deleted outbox row
    -- that had been published.
    streams     text[] NOT NULL DEFAULT '{}',
    entry_ids   text[] NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);
