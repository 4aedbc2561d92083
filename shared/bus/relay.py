"""The outbox relay: moves committed outbox rows to their Redis streams, in order, and puts
them there again when Redis loses them.

One relay publishes each stream partition at a time (it owns the partition by an advisory
lock, and is woken by NOTIFY): that keeps per-subject order without any other coordination
between replicas. Every replica runs a relay; each takes the partitions nobody holds, checks
again every few seconds, and a replica that dies frees its partitions with its connection,
so the others take them over. A crash between XADD and the "published" mark publishes a row
twice; consumers are idempotent by event id.

**Redis losing data** (a failover to a lagging replica, a restart without persistence, a
lost volume) must not lose a promised event: Postgres is the source of truth. So:

- every published row keeps the stream id Redis gave it (``outbox.stream_ms/stream_seq``);
- a *checkpoint* per stream (``stream_checkpoints``) holds the highest outbox id that every
  consumer group has acknowledged, refreshed from the groups' pending lists every few
  seconds — Postgres knows what is safely behind everyone;
- a *mark* beside each stream (``<stream>:published``, in the stream's hash slot when the
  stream carries a tag, as it always does on a Redis Cluster) holds the highest outbox id
  published there, written in the same pipeline as every batch. It is read back before every
  batch (same pipeline) and about once a second when idle: missing, or lower than what this
  leader wrote, means Redis lost writes. Then every row after the checkpoint is marked
  unpublished and published again, in id order, before anything newer.

Consumers that had applied a re-driven event find its ``processed_events`` row and only
acknowledge it, so a re-drive has no double effect.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from aiohttp import web

from shared import db
from shared.bus.events import EVENT_FIELD
from shared.bus.retention import acknowledged_bound, parse_id
from shared.config import SETTINGS, Settings
from shared.lifecycle import Worker, add_worker, sleep_or_stop
from shared.observability import EVENTS_PUBLISHED, EVENTS_REDRIVEN, OUTBOX_BACKLOG
from shared.redis import TRANSIENT_REDIS_ERRORS, WORKER_REDIS, Redis
from shared.tracing import publishing

log = logging.getLogger(__name__)

# One partition: the one lock every version took (a rolling upgrade keeps one leader).
# Several: the pair (_RELAY_LOCK_KEY, partition), a different lock space in Postgres.
_RELAY_LOCK_KEY = 0x5749_5245  # "WIRE"
_NOTIFY_CHANNEL = "wi_outbox"


def mark_key(stream: str) -> str:
    """Where the relay notes the highest outbox id it published to ``stream``. On a cluster
    the stream's name carries its hash tag, so the mark lies on the stream's slot, on the
    same node: a failover that loses part of the stream loses the mark's update with it
    rather than leaving it to vouch for entries that are gone."""
    return f"{stream}:published"


class StreamLost(Exception):
    """Redis no longer holds what the relay published to a stream."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.stream = stream


class OutboxRelay:
    """Publishes committed outbox rows to their streams; one leader per partition among all
    replicas."""

    # Retry pauses, capped well below 10 s: events flow again within seconds of Postgres and
    # Redis coming back after an outage of any length (see tests/test_faults.py).
    _MIN_BACKOFF = 0.5
    _MAX_BACKOFF = 4.0

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        *,
        poll_interval: float = 1.0,
        retention_hours: int = 24,
        checkpoint_interval: float = 5.0,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._batch = settings.relay_batch
        self._poll_interval = poll_interval
        self._retention_hours = retention_hours
        self._checkpoint_interval = checkpoint_interval
        self._wake = asyncio.Event()
        # Pause before retrying after an outage; reset by every batch that goes through, so
        # it only grows within one outage (it used to grow for the process's lifetime).
        self._backoff = self._MIN_BACKOFF
        # Per stream: the highest outbox id this leader knows Redis was given (0: nothing
        # known, so nothing to miss). Read from Postgres on first sight of a stream.
        self._published: dict[str, int] = {}
        self._streams = settings.event_streams
        # The partitions (their streams) this relay holds the lock of, on its connection.
        self.owned: list[str] = []

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._lead_while_possible(stop)
                self._backoff = self._MIN_BACKOFF
            except (*db.TRANSIENT_DB_ERRORS, *TRANSIENT_REDIS_ERRORS) as exc:
                log.warning("outbox relay interrupted; retrying", extra={"error": repr(exc)})
                await sleep_or_stop(stop, self._backoff)
                self._backoff = min(self._backoff * 2, self._MAX_BACKOFF)

    async def _lead_while_possible(self, stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(self._settings.database_session_url, timeout=10)
        self.owned = []
        try:
            while not await self._take_free_partitions(conn):
                # Others hold every partition; check again later (a holder's connection dying
                # frees its locks).
                if await sleep_or_stop(stop, 5 * self._poll_interval):
                    return
            await conn.add_listener(_NOTIFY_CHANNEL, self._on_notify)
            # A new leader trusts nothing a previous one remembered.
            self._published.clear()
            loop = asyncio.get_running_loop()
            pruned_at = checkpointed_at = 0.0
            claimed_at = loop.time()
            while not stop.is_set():
                if len(self.owned) < len(self._streams) and (
                    loop.time() - claimed_at > 5 * self._poll_interval
                ):
                    await self._take_free_partitions(conn)
                    claimed_at = loop.time()
                published = await self._publish_or_redrive(conn)
                self._backoff = self._MIN_BACKOFF
                if loop.time() - checkpointed_at > self._checkpoint_interval:
                    await self.checkpoint(conn)
                    checkpointed_at = loop.time()
                if loop.time() - pruned_at > 60:
                    await self._prune(conn)
                    pruned_at = loop.time()
                if published == 0:
                    await self._watch(conn)  # a batch reads the mark itself
                if published < self._batch:
                    await self._idle(stop)
        finally:
            self.owned = []
            await conn.close(timeout=5)

    async def _take_free_partitions(self, conn: asyncpg.Connection) -> bool:
        """Lock every partition nobody holds (on ``conn``, for as long as it lives); True if
        this relay now holds any."""
        taken: list[str] = []
        if len(self._streams) == 1:
            if not self.owned and await conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", _RELAY_LOCK_KEY
            ):
                taken = list(self._streams)
        else:
            free = [p for p, stream in enumerate(self._streams) if stream not in self.owned]
            # One round trip for all of them (each lock tried once, per row).
            locked = await conn.fetch(
                """SELECT p FROM unnest($2::int[]) AS p
                   WHERE pg_try_advisory_lock($1::int, p)""",
                _RELAY_LOCK_KEY,
                free,
            )
            taken = [self._streams[row["p"]] for row in locked]
        if taken:
            self.owned = [s for s in self._streams if s in self.owned or s in taken]
            log.info("outbox relay leads partitions", extra={"streams": taken})
        return bool(self.owned)

    async def _idle(self, stop: asyncio.Event) -> None:
        self._wake.clear()
        waiter = asyncio.ensure_future(self._wake.wait())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait(
                {waiter, stopper}, timeout=self._poll_interval, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
            stopper.cancel()

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _publish_or_redrive(self, conn: asyncpg.Connection) -> int:
        try:
            return await self.publish_batch(conn)
        except StreamLost as lost:
            await self.redrive(conn, lost.stream)
            return self._batch  # go round again at once: the re-driven rows wait

    async def publish_batch(self, conn: asyncpg.Connection) -> int:
        """Publish the oldest unpublished rows; raise ``StreamLost`` (publishing nothing as
        far as Postgres is concerned) when Redis turns out to have lost earlier writes."""
        async with conn.transaction():
            if len(self._streams) == 1:
                rows = await conn.fetch(
                    """SELECT id, stream, payload FROM outbox
                       WHERE published_at IS NULL ORDER BY id LIMIT $1""",
                    self._batch,
                )
            else:
                # Only this relay's partitions (few rows wait unpublished: the partial
                # index's short tail is filtered); every configured one when called without
                # leading (a tool, a test). Rows of a stream outside the configured
                # partitions wait for the relay of a deployment that has it (changing the
                # partition count: docs/architecture.md, "Partitions").
                rows = await conn.fetch(
                    """SELECT id, stream, payload FROM outbox
                       WHERE published_at IS NULL AND stream = ANY($2::text[])
                       ORDER BY id LIMIT $1""",
                    self._batch,
                    self.owned or list(self._streams),
                )
            if not rows:
                OUTBOX_BACKLOG.set(0)
                return 0
            streams = list(dict.fromkeys(row["stream"] for row in rows))
            for stream in streams:
                await self._remember(conn, stream)
            pipe = self._redis.pipeline(transaction=False)
            for stream in streams:
                pipe.get(mark_key(stream))
            for row in rows:
                pipe.xadd(row["stream"], {EVENT_FIELD: row["payload"]})
            highest = {row["stream"]: row["id"] for row in rows}  # rows come in id order
            for stream, outbox_id in highest.items():
                pipe.set(mark_key(stream), outbox_id)
            with publishing([(row["stream"], row["payload"]) for row in rows]):
                replies = await pipe.execute()
            for stream, mark in zip(streams, replies[: len(streams)], strict=True):
                self._check_mark(stream, mark)
            ids = replies[len(streams) : len(streams) + len(rows)]
            positions = [parse_id(stream_id) for stream_id in ids]
            await conn.execute(
                """UPDATE outbox AS o
                   SET published_at = now(), stream_ms = p.ms, stream_seq = p.seq
                   FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS p (id, ms, seq)
                   WHERE o.id = p.id""",
                [row["id"] for row in rows],
                [ms for ms, _ in positions],
                [seq for _, seq in positions],
            )
        self._published.update(highest)
        EVENTS_PUBLISHED.inc(len(rows))
        OUTBOX_BACKLOG.set(len(rows))
        return len(rows)

    async def _remember(self, conn: asyncpg.Connection, stream: str) -> None:
        if stream not in self._published:
            # Walks the primary key down from the newest row; only the unpublished tail is
            # skipped.
            last = await conn.fetchval(
                """SELECT id FROM outbox WHERE stream = $1 AND published_at IS NOT NULL
                   ORDER BY id DESC LIMIT 1""",
                stream,
            )
            self._published[stream] = last or 0
            if last:
                # First sight of a stream published before checkpoints existed (an
                # upgrade): take what was published as acknowledged, as the relay always
                # did, rather than re-publish a day of events at once.
                await conn.execute(
                    """INSERT INTO stream_checkpoints (stream, outbox_id) VALUES ($1, $2)
                       ON CONFLICT (stream) DO NOTHING""",
                    stream,
                    last,
                )

    def _check_mark(self, stream: str, mark: Any) -> None:
        expected = self._published.get(stream, 0)
        if expected and (mark is None or int(mark) < expected):
            raise StreamLost(stream)

    async def _watch(self, conn: asyncpg.Connection) -> None:
        """With nothing to publish, still notice a Redis that lost what it was given: the
        events waiting in it for a slow consumer are exactly what would be lost."""
        streams = [stream for stream, last in self._published.items() if last]
        if not streams:
            return
        pipe = self._redis.pipeline(transaction=False)
        for stream in streams:
            pipe.get(mark_key(stream))
        for stream, mark in zip(streams, await pipe.execute(), strict=True):
            try:
                self._check_mark(stream, mark)
            except StreamLost:
                await self.redrive(conn, stream)

    async def redrive(self, conn: asyncpg.Connection, stream: str) -> int:
        """Mark every row after the stream's checkpoint unpublished, so it is published
        again in order; returns how many."""
        async with conn.transaction():
            checkpoint = await conn.fetchval(
                "SELECT outbox_id FROM stream_checkpoints WHERE stream = $1", stream
            )
            redriven = await conn.fetchval(
                """WITH again AS (
                       UPDATE outbox SET published_at = NULL, stream_ms = NULL, stream_seq = NULL
                       WHERE stream = $1 AND id > $2 AND published_at IS NOT NULL
                       RETURNING 1)
                   SELECT count(*) FROM again""",
                stream,
                checkpoint or 0,
            )
            oldest = await conn.fetchval("SELECT min(id) FROM outbox WHERE stream = $1", stream)
        self._published[stream] = 0
        EVENTS_REDRIVEN.inc(redriven)
        log.warning(
            "redis lost published events; publishing them again from postgres",
            extra={"stream": stream, "checkpoint": checkpoint or 0, "redriven": redriven},
        )
        if checkpoint is not None and oldest is not None and oldest > checkpoint + 1:
            # Rows between the checkpoint and the oldest kept row were pruned: consumers that
            # far behind (longer than the outbox keeps published rows) cannot be made whole.
            log.error(
                "re-drive incomplete: outbox rows after the checkpoint were already pruned",
                extra={"stream": stream, "checkpoint": checkpoint, "oldest_kept": oldest},
            )
        return int(redriven)

    async def checkpoint(self, conn: asyncpg.Connection) -> None:
        """Record, per stream, the highest outbox id every consumer group acknowledged."""
        for stream, last in list(self._published.items()):
            if not last:
                continue
            bound = await acknowledged_bound(self._redis, stream)
            if bound is None:
                continue  # no stream: nothing to learn (a loss is the watch's business)
            # Stream ids grow with outbox ids (one leader publishes in id order), so the
            # answer is the newest row below the bound: a short walk down the primary key,
            # about as long as the consumers' lag.
            await conn.execute(
                """INSERT INTO stream_checkpoints (stream, outbox_id)
                   SELECT $1, id FROM outbox
                   WHERE stream = $1 AND published_at IS NOT NULL
                     AND (stream_ms, stream_seq) < ($2, $3)
                   ORDER BY id DESC LIMIT 1
                   ON CONFLICT (stream) DO UPDATE
                   SET outbox_id = GREATEST(stream_checkpoints.outbox_id, EXCLUDED.outbox_id),
                       updated_at = now()""",
                stream,
                bound[0],
                bound[1],
            )

    async def _prune(self, conn: asyncpg.Connection) -> None:
        # Published rows are kept a while for audit, debugging and re-drives, then removed in
        # small batches from the oldest end (cheap: they sit at the start of the primary key).
        # Never past a stream's checkpoint: a row no group has acknowledged may be needed
        # again if Redis loses it.
        await conn.execute(
            """DELETE FROM outbox WHERE id IN (
                   SELECT o.id FROM outbox AS o
                   LEFT JOIN stream_checkpoints AS c ON c.stream = o.stream
                   WHERE o.published_at IS NOT NULL
                     AND o.created_at < now() - make_interval(hours => $1)
                     AND o.id <= COALESCE(c.outbox_id, o.id)
                   ORDER BY o.id LIMIT 5000)""",
            self._retention_hours,
        )


def add_relay(app: web.Application) -> None:
    """Run the outbox relay in this process (it publishes the partitions whose lock it holds)."""

    def factory(app: web.Application) -> Worker:
        return OutboxRelay(app[SETTINGS], app[WORKER_REDIS]).run

    add_worker(app, "outbox-relay", factory)
