"""Publishing through a transactional outbox, and the relay that moves it to Redis Streams.

A service never writes to Redis when it changes state: it calls ``Outbox.emit`` inside the
same Postgres transaction, so the event exists if and only if the change committed. The relay
then publishes committed rows in order and marks them published. A crash between XADD and
the mark publishes the row again: consumers are idempotent by event id, so that is safe.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import msgspec
import redis.asyncio as aioredis
from aiohttp import web

from shared import db
from shared.config import Settings
from shared.events import EVENT_FIELD, Event, encode_event
from shared.http import SETTINGS
from shared.lifecycle import Worker, add_worker, sleep_or_stop
from shared.observability import EVENTS_PUBLISHED, OUTBOX_BACKLOG, traceparent_var
from shared.redis import REDIS, TRANSIENT_REDIS_ERRORS

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)

# One relay publishes at a time (leader by advisory lock): that keeps per-subject order
# without any coordination between replicas.
_RELAY_LOCK_KEY = 0x5749_5245  # "WIRE"
_NOTIFY_CHANNEL = "wi_outbox"
# How the envelope's placeholder seq (0) appears in an encoded event (see Outbox.emit).
_SEQ_MARK = b'"seq":0,"occurredAt":'
_SEQ_PREFIX_LEN = len(b'"seq":')


class Outbox:
    """Writes events into the outbox table of the caller's open transaction."""

    def __init__(self, stream: str) -> None:
        self.stream = stream

    async def emit(
        self,
        conn: asyncpg.Connection,
        event_type: type[E],
        *,
        org_id: str,
        subject: str,
        data: Any,
    ) -> E:
        if not conn.is_in_transaction():
            # Outside a transaction the event could outlive a rolled-back change.
            raise RuntimeError("Outbox.emit must run inside the state change's transaction")
        # Every concrete event type has a ``data`` field; the envelope base does not.
        make: Any = event_type
        event: E = make(
            id=str(uuid.uuid4()),
            org_id=org_id,
            subject=subject,
            seq=0,  # placeholder: the real seq is spliced in by the statement below
            occurred_at=datetime.now(UTC),
            traceparent=traceparent_var.get(),
            data=data,
        )
        payload = encode_event(event)
        # The envelope's seq is followed only by occurredAt and traceparent, and a quote inside
        # a JSON string is always escaped, so the last match is the envelope's own seq field.
        cut = payload.rfind(_SEQ_MARK)
        if cut < 0:  # cannot happen with msgspec's encoding of the envelope
            raise RuntimeError("event payload has no envelope seq field")
        head, tail = payload[: cut + _SEQ_PREFIX_LEN], payload[cut + _SEQ_PREFIX_LEN + 1 :]
        # One round trip: the subject_seqs row lock taken by the upsert also serialises
        # concurrent writers for this subject, so sequence order is commit order.
        seq: int = await conn.fetchval(
            """WITH s AS (
                   INSERT INTO subject_seqs (subject, seq) VALUES ($1, 1)
                   ON CONFLICT (subject) DO UPDATE SET seq = subject_seqs.seq + 1
                   RETURNING seq),
               o AS (
                   INSERT INTO outbox (event_id, stream, event_type, payload)
                   SELECT $2, $3, $4, $5::bytea || convert_to(s.seq::text, 'UTF8') || $6::bytea
                   FROM s)
               SELECT seq FROM s""",
            subject,
            uuid.UUID(event.id),
            self.stream,
            event_type.type_name(),
            head,
            tail,
        )
        return msgspec.structs.replace(event, seq=seq)


class OutboxRelay:
    """Publishes committed outbox rows to their streams; one leader among all replicas."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        *,
        poll_interval: float = 1.0,
        retention_hours: int = 24,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._batch = settings.relay_batch
        self._poll_interval = poll_interval
        self._retention_hours = retention_hours
        self._wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                await self._lead_while_possible(stop)
                backoff = 0.5
            except (*db.TRANSIENT_DB_ERRORS, *TRANSIENT_REDIS_ERRORS) as exc:
                log.warning("outbox relay interrupted; retrying", extra={"error": repr(exc)})
                await sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, 10.0)

    async def _lead_while_possible(self, stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(self._settings.database_url, timeout=10)
        try:
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _RELAY_LOCK_KEY):
                # Someone else leads; check again later (their connection dying frees the lock).
                if await sleep_or_stop(stop, 5 * self._poll_interval):
                    return
            await conn.add_listener(_NOTIFY_CHANNEL, self._on_notify)
            log.info("outbox relay is leader")
            pruned_at = 0.0
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                published = await self.publish_batch(conn)
                if loop.time() - pruned_at > 60:
                    await self._prune(conn)
                    pruned_at = loop.time()
                if published < self._batch:
                    self._wake.clear()
                    waiter = asyncio.ensure_future(self._wake.wait())
                    stopper = asyncio.ensure_future(stop.wait())
                    try:
                        await asyncio.wait(
                            {waiter, stopper},
                            timeout=self._poll_interval,
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                    finally:
                        waiter.cancel()
                        stopper.cancel()
        finally:
            await conn.close(timeout=5)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def publish_batch(self, conn: asyncpg.Connection) -> int:
        async with conn.transaction():
            rows = await conn.fetch(
                """SELECT id, stream, payload FROM outbox
                   WHERE published_at IS NULL ORDER BY id LIMIT $1""",
                self._batch,
            )
            if not rows:
                OUTBOX_BACKLOG.set(0)
                return 0
            pipe = self._redis.pipeline(transaction=False)
            for row in rows:
                pipe.xadd(row["stream"], {EVENT_FIELD: row["payload"]})
            await pipe.execute()
            await conn.execute(
                "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])",
                [row["id"] for row in rows],
            )
        EVENTS_PUBLISHED.inc(len(rows))
        OUTBOX_BACKLOG.set(len(rows))
        return len(rows)

    async def _prune(self, conn: asyncpg.Connection) -> None:
        # Published rows are kept a while for audit and debugging, then removed in small
        # batches from the oldest end (cheap: they sit at the start of the primary key).
        await conn.execute(
            """DELETE FROM outbox WHERE id IN (
                   SELECT id FROM outbox
                   WHERE published_at IS NOT NULL
                     AND created_at < now() - make_interval(hours => $1)
                   ORDER BY id LIMIT 5000)""",
            self._retention_hours,
        )


OUTBOX: web.AppKey[Outbox] = web.AppKey("outbox", Outbox)


def add_relay(app: web.Application) -> None:
    """Run the outbox relay in this process (it only publishes while it holds the lock)."""

    def factory(app: web.Application) -> Worker:
        return OutboxRelay(app[SETTINGS], app[REDIS]).run

    add_worker(app, "outbox-relay", factory)
