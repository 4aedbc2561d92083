"""Publishing through a transactional outbox, and the relay that moves it to Redis Streams.

A service never writes to Redis when it changes state: it calls ``Outbox.emit`` inside the
same Postgres transaction, so the event exists if and only if the change committed. The relay
then publishes committed rows in order and marks them published. A crash between XADD and
the mark publishes the row again: consumers are idempotent by event id, so that is safe.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import msgspec
import redis.asyncio as aioredis
from aiohttp import web

from shared import db
from shared.bus.events import EVENT_FIELD, Event
from shared.config import SETTINGS, Settings
from shared.lifecycle import Worker, add_worker, sleep_or_stop
from shared.observability import EVENTS_PUBLISHED, OUTBOX_BACKLOG, traceparent_var
from shared.redis import TRANSIENT_REDIS_ERRORS, WORKER_REDIS

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)

# One relay publishes at a time (leader by advisory lock): that keeps per-subject order
# without any coordination between replicas.
_RELAY_LOCK_KEY = 0x5749_5245  # "WIRE"
_NOTIFY_CHANNEL = "wi_outbox"


class Late:
    """A field value that the emitting SQL statement computes (a contact id an upsert
    returns, a timestamp read under a row lock), so the event can be written by the same
    statement as the state change: one round trip, atomic without BEGIN/COMMIT.

    Put ``late("column")`` where the value goes (``subject`` or any field of ``data``); the
    statement's source CTE supplies ``column``, and Postgres renders it with ``to_json``
    (text, uuid, boolean, number or timestamptz all decode as the field's type).
    """

    __slots__ = ("column",)

    def __init__(self, column: str) -> None:
        if not _COLUMN.match(column):
            raise ValueError(f"not a plain column name: {column!r}")
        self.column = column


def late(column: str) -> Any:
    """``Late(column)``, typed ``Any`` so it fits any field of an event struct."""
    return Late(column)


_SEQ_CTE = "event_seq"


@dataclass(frozen=True, slots=True)
class EventInsert:
    """CTEs (``event_seq``, ``event_row``) that insert one event into the outbox from within
    the caller's statement, with the parameters they use. ``seq_cte`` yields ``seq``;
    ``event`` still holds its ``Late`` placeholders (and seq), for ``emit`` to complete."""

    ctes: str
    params: list[Any]
    seq_cte: str
    event: Event


_COLUMN = re.compile(r"^[a-z_][a-z0-9_]*$")


class Outbox:
    """Writes events into the outbox, in the same transaction (or statement) as the change."""

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
        """Record an event inside the caller's open transaction; returns it with its seq."""
        if not conn.is_in_transaction():
            # Outside a transaction the event could outlive a rolled-back change.
            raise RuntimeError("Outbox.emit must run inside the state change's transaction")
        insert = self.insert(
            event_type, org_id=org_id, subject=subject, data=data, source="src", first_param=2
        )
        seq: int = await conn.fetchval(
            f"WITH src AS (SELECT $1::text AS subject), {insert.ctes} "
            f"SELECT seq FROM {insert.seq_cte}",
            subject,
            *insert.params,
        )
        event: E = msgspec.structs.replace(insert.event, seq=seq)  # type: ignore[assignment]
        return event

    def insert(
        self,
        event_type: type[Event],
        *,
        org_id: str,
        subject: str | Late,
        data: Any,
        source: str,
        first_param: int,
    ) -> EventInsert:
        """SQL that writes this event as part of a larger statement.

        ``source`` is a CTE of that statement yielding at most one row: a ``subject`` text
        column (whatever ``subject`` is here) and one column per ``Late`` value in ``data``.
        No source row, no event: the event exists exactly when the change it reports does.
        Parameters are numbered from ``first_param``. The subject's ``seq`` is taken in the
        same statement; its row lock serialises writers per subject, so seq order is commit
        order.
        """
        nonce = secrets.token_hex(8)
        seq_cte = _SEQ_CTE
        seq = Late("seq")  # placeholder for the seq CTE's value
        slots: dict[bytes, str] = {}

        def placeholder(value: object) -> str:
            if not isinstance(value, Late):
                raise TypeError(f"cannot encode {type(value).__name__} in an event")
            # Unforgeable by the data around it because of the per-call random nonce (user
            # text could contain the quote-NUL form, but not guess the nonce); a collision
            # would still be caught below (each placeholder must occur exactly once).
            text = f"\x00{nonce}:{len(slots)}"
            column = f"{seq_cte}.seq" if value is seq else f"{source}.{value.column}"
            slots[b'"\\u0000' + text[1:].encode() + b'"'] = column
            return text

        # Every concrete event type has a ``data`` field; the envelope base does not.
        make: Any = event_type
        event: Event = make(
            id=str(uuid.uuid4()),
            org_id=org_id,
            subject=subject,
            seq=seq,
            occurred_at=datetime.now(UTC),
            traceparent=traceparent_var.get(),
            data=data,
        )
        payload = msgspec.json.encode(event, enc_hook=placeholder)
        cuts: list[tuple[int, bytes, str]] = []
        for needle, expression in slots.items():
            if payload.count(needle) != 1:  # cannot happen with msgspec's encoding
                raise RuntimeError("late event field not found exactly once in the payload")
            cuts.append((payload.index(needle), needle, expression))
        cuts.sort()
        params: list[Any] = [uuid.UUID(event.id), self.stream, event_type.type_name()]
        parts: list[str] = []
        at = 0
        n = first_param + len(params)
        for position, needle, expression in cuts:
            params.append(payload[at:position])
            # to_json(NULL) is NULL, and NULL would swallow the whole payload.
            parts.append(
                f"${n}::bytea || convert_to(COALESCE(to_json({expression})::text, 'null'), 'UTF8')"
            )
            n += 1
            at = position + len(needle)
        params.append(payload[at:])
        parts.append(f"${n}::bytea")
        ctes = (
            f"{seq_cte} AS ("
            f"INSERT INTO subject_seqs (subject, seq) SELECT {source}.subject, 1 FROM {source} "
            f"ON CONFLICT (subject) DO UPDATE SET seq = subject_seqs.seq + 1 RETURNING seq), "
            f"event_row AS ("
            f"INSERT INTO outbox (event_id, stream, event_type, payload) "
            f"SELECT ${first_param}, ${first_param + 1}, ${first_param + 2}, {' || '.join(parts)} "
            f"FROM {source}, {seq_cte})"
        )
        return EventInsert(ctes=ctes, params=params, seq_cte=seq_cte, event=event)


class OutboxRelay:
    """Publishes committed outbox rows to their streams; one leader among all replicas."""

    # Retry pauses, capped well below 10 s: events flow again within seconds of Postgres and
    # Redis coming back after an outage of any length (see tests/test_faults.py).
    _MIN_BACKOFF = 0.5
    _MAX_BACKOFF = 4.0

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
        # Pause before retrying after an outage; reset by every batch that goes through, so
        # it only grows within one outage (it used to grow for the process's lifetime).
        self._backoff = self._MIN_BACKOFF

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
                self._backoff = self._MIN_BACKOFF
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
        return OutboxRelay(app[SETTINGS], app[WORKER_REDIS]).run

    add_worker(app, "outbox-relay", factory)
