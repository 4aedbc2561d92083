"""Partition leases: with several stream partitions, the consumer processes of a group share
them, each partition owned by one process at a time (tables in migration 0012).

- Every process of the group writes its ``consumer_members`` row about once a second; the
  live members are those seen within ``CONSUMER_LEASE_SECONDS``, and each takes its share of
  the partitions dealt out over them (``fair_share``): a new process makes the others give partitions back, a
  process that stops hands its partitions over at once, one that dies loses them when its
  lease runs out.
- A partition changes owner only by an UPDATE that bumps its ``epoch``. Every transaction that
  applies an event first locks the partition's row (FOR SHARE) and checks owner and epoch
  (``Lease.fence``): a process that lost the partition cannot apply anything more of it, and a
  takeover waits for the applies already running.
- A process reads a partition only while its last heartbeat is recent enough that nobody can
  have taken the partition yet (``Lease.fresh``), so a process cut off from Postgres stops
  taking entries that another will own.
"""

from __future__ import annotations

import time

import asyncpg


class LeaseLost(Exception):
    """This process no longer owns the partition: stop reading it, apply nothing more of it."""


class PartitionLeases:
    """One consumer process's membership in a group, and the partitions it owns."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        group: str,
        member: str,
        partitions: int,
        lease_seconds: float,
        read_margin: float,
    ) -> None:
        self._pool = pool
        self.group = group
        self.member = member
        self.partitions = partitions
        self.lease_seconds = lease_seconds
        # How long before the lease could run out this process stops reading: a blocking
        # read's longest wait, plus slack for the clock rates of two machines.
        self._read_margin = read_margin
        self._fresh_until = 0.0

    def fresh(self) -> bool:
        """True while no other process can have taken this one's partitions."""
        return time.monotonic() < self._fresh_until

    async def heartbeat(self) -> list[str]:
        """Show this process alive; the live members' names, itself included, sorted."""
        sent = time.monotonic()
        rows = await self._pool.fetch(
            """WITH me AS (
                   INSERT INTO consumer_members (consumer_group, member) VALUES ($1, $2)
                   ON CONFLICT (consumer_group, member) DO UPDATE SET seen_at = now()
                   RETURNING member)
               SELECT member FROM me
               UNION
               SELECT member FROM consumer_members
               WHERE consumer_group = $1 AND member <> $2
                 AND seen_at > now() - make_interval(secs => $3)""",
            self.group,
            self.member,
            self.lease_seconds,
        )
        # Postgres wrote seen_at no earlier than ``sent``: nobody takes over before
        # sent + lease (durations agree between machines even when clocks do not).
        self._fresh_until = sent + self.lease_seconds - self._read_margin
        return sorted(row["member"] for row in rows)

    def fair_share(self, live_members: list[str]) -> int:
        """How many partitions this member should own: the partitions dealt out over the
        live members in name order, so the shares add up to exactly the partition count
        and every member computes the same split (4 over 3: 2, 1, 1)."""
        count = max(1, len(live_members))
        index = live_members.index(self.member) if self.member in live_members else 0
        return self.partitions // count + (1 if index < self.partitions % count else 0)

    async def owned(self) -> dict[int, int]:
        """The partitions this process owns, with their epochs."""
        rows = await self._pool.fetch(
            """SELECT partition, epoch FROM partition_leases
               WHERE consumer_group = $1 AND owner = $2 AND partition < $3""",
            self.group,
            self.member,
            self.partitions,
        )
        return {row["partition"]: row["epoch"] for row in rows}

    async def acquire(self, wanted: int) -> dict[int, int]:
        """Take up to ``wanted`` partitions that nobody live owns; the ones taken, with their
        new epochs. A row locked by the applies of a process losing it is skipped for now."""
        if wanted <= 0:
            return {}
        # Every partition has its row first (its own statement: rows a CTE inserts are not
        # visible to the rest of the statement). Members long dead (a pod that crashed and
        # never came back under its name) are forgotten here, where the survivors look.
        await self._pool.execute(
            """WITH gone AS (
                   DELETE FROM consumer_members
                   WHERE consumer_group = $1 AND seen_at < now() - interval '1 day')
               INSERT INTO partition_leases (consumer_group, partition)
               SELECT $1, p FROM generate_series(0, $2 - 1) AS p
               ON CONFLICT DO NOTHING""",
            self.group,
            self.partitions,
        )
        rows = await self._pool.fetch(
            """WITH free AS (
                   SELECT l.partition FROM partition_leases AS l
                   WHERE l.consumer_group = $1 AND l.partition < $4
                     AND l.owner IS DISTINCT FROM $2
                     AND (l.owner IS NULL OR NOT EXISTS (
                           SELECT 1 FROM consumer_members AS m
                           WHERE m.consumer_group = $1 AND m.member = l.owner
                             AND m.seen_at > now() - make_interval(secs => $3)))
                   ORDER BY l.partition LIMIT $5
                   FOR UPDATE SKIP LOCKED)
               UPDATE partition_leases AS l SET owner = $2, epoch = l.epoch + 1
               FROM free WHERE l.consumer_group = $1 AND l.partition = free.partition
               RETURNING l.partition, l.epoch""",
            self.group,
            self.member,
            self.lease_seconds,
            self.partitions,
            wanted,
        )
        return {row["partition"]: row["epoch"] for row in rows}

    async def release(self, partitions: list[int]) -> None:
        """Give partitions back (their readers stopped and acked first)."""
        await self._pool.execute(
            """UPDATE partition_leases SET owner = NULL
               WHERE consumer_group = $1 AND owner = $2 AND partition = ANY($3::int[])""",
            self.group,
            self.member,
            partitions,
        )

    async def leave(self) -> None:
        """Stop being a member: every partition goes back, and the others' share grows now
        rather than when this lease would have run out."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE partition_leases SET owner = NULL WHERE consumer_group = $1 AND owner = $2",
                self.group,
                self.member,
            )
            await conn.execute(
                "DELETE FROM consumer_members WHERE consumer_group = $1 AND member = $2",
                self.group,
                self.member,
            )
        self._fresh_until = 0.0

    def lease(self, partition: int, epoch: int) -> Lease:
        return Lease(self, partition, epoch)


class Lease:
    """One owned partition, as its reader and its applies see it."""

    def __init__(self, leases: PartitionLeases, partition: int, epoch: int) -> None:
        self._leases = leases
        self.partition = partition
        self.epoch = epoch

    def fresh(self) -> bool:
        return self._leases.fresh()

    async def fence(self, conn: asyncpg.Connection) -> None:
        """First statement of every apply transaction: still the owner, under the same epoch,
        and the row stays so until this transaction ends."""
        still = await conn.fetchval(
            """SELECT true FROM partition_leases
               WHERE consumer_group = $1 AND partition = $2 AND owner = $3 AND epoch = $4
               FOR SHARE""",
            self._leases.group,
            self.partition,
            self._leases.member,
            self.epoch,
        )
        if not still:
            raise LeaseLost(f"partition {self.partition} of group {self._leases.group}")
