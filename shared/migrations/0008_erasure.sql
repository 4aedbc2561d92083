-- Erasure leaves nothing (promise 12). Ownership as restated in 0004: erasure
-- (services/history/erasure.py) is the one writer across owners' tables.

-- A browser bound to an erased contact is made unusable: erased_at records why, and its token
-- hash is dropped (by session resolution, once its cache entries for that token are buried),
-- so the browser's old visitor token resolves as unknown and it starts over.
ALTER TABLE visitors
    ADD COLUMN erased_at timestamptz,
    ALTER COLUMN token_hash DROP NOT NULL;

-- Owner: history (erasure). Where Redis still holds the person's events after the erasure
-- committed, written in the erasure's transaction: the stream ids of the outbox rows it deleted
-- (captured by the delete itself), and, per stream, the newest id any published row had then:
-- an entry after it was published by a relay batch still in flight, or later. The history
-- consumer, handling the erasure's contact.erased event (retried until Redis answers),
-- deletes the recorded entries, every entry after that mark naming one of ``subjects``, and
-- every dead letter naming one; then this row. Ids only.
CREATE TABLE erasure_scrubs (
    receipt_id   uuid PRIMARY KEY,
    org_id       uuid NOT NULL,
    -- The contact id and the bound visitors' ids: a stream entry naming one is the person's.
    subjects     text[] NOT NULL,
    -- Parallel arrays: stream and entry id ('<ms>-<seq>') of each deleted published row.
    streams      text[] NOT NULL DEFAULT '{}',
    entry_ids    text[] NOT NULL DEFAULT '{}',
    -- Parallel arrays: each stream's newest published entry id when the erasure ran.
    tail_streams text[] NOT NULL DEFAULT '{}',
    tail_after   text[] NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now()
);
