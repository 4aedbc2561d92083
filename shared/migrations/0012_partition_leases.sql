-- With STREAM_PARTITIONS > 1 the consumers of a group share the partitions: each partition
-- is owned by one consumer process at a time, so a subject's events are applied by one
-- process, in stream order (shared/bus/leases.py).
-- Owner: the bus (every service's consumers).

-- Who is alive in a group: each consumer process writes seen_at about once a second. A
-- member not seen for CONSUMER_LEASE_SECONDS is taken for dead, and its partitions are free.
CREATE TABLE consumer_members (
    consumer_group  text NOT NULL,
    member          text NOT NULL,
    seen_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, member)
);

-- A partition's owner in a group. ``epoch`` grows with every change of owner: the owner's
-- every apply transaction locks this row (FOR SHARE) and checks owner and epoch, so a
-- process that lost the partition (stalled past its lease, cut off) cannot apply anything
-- more of it, and a takeover waits for the transactions already running.
CREATE TABLE partition_leases (
    consumer_group  text NOT NULL,
    partition       int NOT NULL,
    owner           text,
    epoch           bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (consumer_group, partition)
);
