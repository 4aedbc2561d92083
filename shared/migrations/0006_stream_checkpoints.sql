-- Redis may lose what the relay published (a failover to a lagging replica, a restart
-- without persistence); Postgres stays the source of truth, and these let the relay put back
-- exactly what no consumer group had acknowledged yet (shared/bus/relay.py).
-- Owner: the bus (every service's relay).

-- The stream id Redis gave each published row: maps a consumer group's position back to
-- outbox ids.
ALTER TABLE outbox
    ADD COLUMN stream_ms bigint,
    ADD COLUMN stream_seq bigint;

-- Per stream, the highest outbox id every consumer group has acknowledged. Rows after it are
-- published again when Redis turns out to have lost them, and are never pruned.
CREATE TABLE stream_checkpoints (
    stream      text PRIMARY KEY,
    outbox_id   bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
