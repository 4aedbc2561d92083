"""Consumer groups on Redis Streams: ack after success, reclaim, dead letters, idempotency.

Each message's effect commits in one Postgres transaction together with a row in
``processed_events``; a redelivered message finds the row and is only acked. Messages of
one subject are handled in stream order; different subjects run concurrently. A message a
dead consumer left pending is reclaimed (XAUTOCLAIM) once idle; one that keeps failing goes
to the group's dead-letter stream after N deliveries, atomically with its ack.

A handler wrapped in ``Batched`` also knows how to apply several events of different
subjects at once: the consumer then commits such events a chunk per transaction (one
multi-row ``processed_events`` insert, one handler call), which saves most of the round
trips of a transaction per event. A chunk that fails for any reason other than the
infrastructure is rolled back and its events are applied again one per transaction, so a
poison message is retried and dead-lettered on its own while the others flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import msgspec
import redis.asyncio as aioredis
import redis.exceptions
from aiohttp import web

from shared import db
from shared.bus.events import (
    EVENT_FIELD,
    AnyEvent,
    Event,
    EventHeader,
    event_decoder,
    header_decoder,
)
from shared.bus.outbox import OUTBOX, Outbox
from shared.config import SETTINGS, Settings
from shared.lifecycle import Worker, add_worker, sleep_or_stop
from shared.observability import EVENT_LAG, EVENTS_CONSUMED
from shared.redis import TRANSIENT_REDIS_ERRORS, WORKER_REDIS, as_str, block_within_timeout

log = logging.getLogger(__name__)

Handler = Callable[[Any, asyncpg.Connection], Awaitable[None]]
"""Applies one event inside the transaction that also records it as processed."""

BatchHandler = Callable[[Sequence[Any], asyncpg.Connection], Awaitable[None]]
"""Applies several events of one type inside the one transaction that also records them as
processed. The events are of different subjects and in stream order; applying them must have
the effect of applying them one after the other. Several such transactions run at once, so
it must take every lock it needs in one global order (all keys sorted, phase by phase), or
two of them could deadlock."""

# Upper bound on the events one transaction applies: big enough to amortise BEGIN/COMMIT and
# the per-transaction statements, small enough that a failed chunk's one-by-one retry and
# the locks it holds stay short.
MAX_EVENTS_PER_TRANSACTION = 32


@dataclass(frozen=True, slots=True)
class Batched:
    """A handler that can also apply a batch of events (see ``BatchHandler``). Called with
    one event it is the plain handler, which the consumer falls back to when a batch fails."""

    one: Handler
    many: BatchHandler

    async def __call__(self, event: Any, conn: asyncpg.Connection) -> None:
        await self.one(event, conn)


class PoisonMessage(Exception):
    """The message can never be handled (undecodable); only dead-lettering helps."""


@dataclass(frozen=True, slots=True)
class _Message:
    id: bytes
    raw: bytes | None
    # Decoded once, when read: routing, ordering and the handler choice all need it.
    header: EventHeader | None

    @classmethod
    def parse(cls, mid: bytes, fields: dict[bytes, bytes] | None) -> _Message:
        raw = fields.get(EVENT_FIELD) if fields else None
        header = None
        if raw is not None:
            # Poison when undecodable: _decode says why once the message is handled.
            with contextlib.suppress(msgspec.MsgspecError):
                header = header_decoder.decode(raw)
        return cls(mid, raw, header)

    @property
    def subject(self) -> str:
        # Undecodable messages share one lane, in stream order.
        return "" if self.header is None else self.header.subject


@dataclass(slots=True)
class _Lane:
    """One subject's messages of a read batch, handled strictly in stream order."""

    messages: list[_Message]
    next: int = 0


# redis-py types stream replies loosely (unions over RESP versions); with bytes responses
# and RESP2 they are exactly these shapes.
_Entry = tuple[bytes, dict[bytes, bytes] | None]


def stream_entries(reply: Any) -> list[_Entry]:
    """redis-py's XRANGE/XREADGROUP entries, typed."""
    return cast(list[_Entry], reply or [])


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class StreamConsumer:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        *,
        group: str,
        handlers: Mapping[type[Event], Handler],
        consumer_name: str | None = None,
        stream: str | None = None,
    ) -> None:
        if not group:
            raise ValueError("a consumer needs a group name")
        self.settings = settings
        self.pool = pool
        self.redis = redis
        self.group = group
        self.consumer = consumer_name or default_consumer_name()
        self.stream = stream or settings.events_stream
        self.dead_letters = settings.dead_letter_stream(group)
        self._handlers = {cls.type_name(): h for cls, h in handlers.items()}
        self._batch_handlers = {
            cls.type_name(): h.many for cls, h in handlers.items() if isinstance(h, Batched)
        }
        self._semaphore = asyncio.Semaphore(settings.consumer_concurrency)
        self._claim_cursor = b"0-0"
        self._next_claim = 0.0
        self._unacked: list[bytes] = []
        # Subjects whose event failed and waits, pending, for its retry: subject -> (that
        # message's id, when it failed). Later events of the subject wait behind it.
        self._held: dict[str, tuple[bytes, float]] = {}
        # XREADGROUP BLOCK shares the client's socket timeout: keep it inside.
        self._block_ms = block_within_timeout(settings, settings.consumer_block_ms)

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                await self.ensure_group()
                # Our own pending entries first (a restart under the same name).
                await self._handle(await self._read("0"))
                while not stop.is_set():
                    handled = await self.poll_once()
                    # Redis and Postgres answer again: the next outage starts from a short
                    # pause. (Reset only on stop, the pause kept doubling from one outage to
                    # the next: events flowed 1.5, 2.0, 6.1, 8.0 s after four Redis restarts.)
                    backoff = 0.5
                    if not handled:
                        await asyncio.sleep(0)
                await self._flush_acks()
                backoff = 0.5
            except (*db.TRANSIENT_DB_ERRORS, *TRANSIENT_REDIS_ERRORS) as exc:
                log.warning(
                    "consumer interrupted; retrying",
                    extra={"group": self.group, "error": repr(exc)},
                )
                await sleep_or_stop(stop, backoff)
                # Capped well below 10 s: after an outage of any length the consumer is
                # back within seconds of its dependency (see tests/test_faults.py).
                backoff = min(backoff * 2, 4.0)
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The stream or group was deleted under us: recreate and carry on.
                log.warning("consumer group vanished; recreating", extra={"group": self.group})

    async def poll_once(self) -> int:
        """Reclaim idle messages, then read new ones; return how many were handled."""
        handled = 0
        now = time.monotonic()
        # Reclaiming is a scan of the pending list: do it a few times per idle period, not
        # on every poll.
        if now >= self._next_claim:
            self._next_claim = now + max(0.05, self.settings.consumer_claim_idle_ms / 4000)
            handled = await self._handle(await self._reclaim())
        messages = await self._read(">", block=self._block_ms if not handled else None)
        return handled + await self._handle(messages)

    async def _reclaim(self) -> list[_Message]:
        reply = await self.redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self.settings.consumer_claim_idle_ms,
            start_id=self._claim_cursor,
            count=self.settings.consumer_batch,
        )
        reply = cast(Any, reply)
        self._claim_cursor = reply[0]
        return [_Message.parse(mid, fields) for mid, fields in reply[1]]

    async def _read(self, start: str, *, block: int | None = None) -> list[_Message]:
        # The acks of the previous batch travel with this read, in one round trip, and Redis
        # runs the two back to back: the batch stays pending until the next one is claimed.
        acks = self._unacked
        pipe = self.redis.pipeline(transaction=False)
        if acks:
            pipe.xack(self.stream, self.group, *acks)
        pipe.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: start},
            count=self.settings.consumer_batch,
            block=block,
        )
        reply = (await pipe.execute())[-1]
        self._unacked = []
        messages: list[_Message] = []
        for _stream, entries in cast(list[tuple[bytes, Any]], reply or []):
            for mid, fields in stream_entries(entries):
                messages.append(_Message.parse(mid, fields))
        return messages

    async def _handle(self, messages: Sequence[_Message]) -> int:
        if not messages:
            return 0
        # Keep each subject's messages in stream order; subjects run side by side.
        by_subject: dict[str, list[_Message]] = {}
        for message in messages:
            by_subject.setdefault(message.subject, []).append(message)
        self._hold_back(by_subject)
        if self._batch_handlers:
            done = await self._handle_in_rounds([_Lane(m) for m in by_subject.values()])
        else:
            results = await asyncio.gather(
                *(self._handle_in_order(msgs) for msgs in by_subject.values())
            )
            done = [mid for ids in results for mid in ids]
        # Acked with the next read (or on stop); a crash before that only means a redelivery,
        # which processed_events turns into a plain ack.
        self._unacked.extend(done)
        return len(messages)

    def _hold_back(self, by_subject: dict[str, list[_Message]]) -> None:
        """Leave pending the new messages of a subject whose earlier message failed and waits
        for its retry, unless that message is in this batch (then all run in order): applied
        now, they would overtake it. The reclaim brings them back in stream order, after it.
        A hold outlives a few reclaim periods only if another consumer took the failed
        message over; it is dropped then, so the subject never stalls here."""
        if not self._held:
            return
        now = time.monotonic()
        expiry = 3 * self.settings.consumer_claim_idle_ms / 1000
        for subject in [s for s in by_subject if s in self._held]:
            held_id, since = self._held[subject]
            if any(m.id == held_id for m in by_subject[subject]):
                continue
            if now - since > expiry:
                del self._held[subject]
                continue
            del by_subject[subject]

    def _note_outcome(self, message: _Message, outcome: str) -> None:
        if outcome == "retry":
            held = self._held.get(message.subject)
            if held is None or held[0] != message.id:
                self._held[message.subject] = (message.id, time.monotonic())
        elif message.subject in self._held and self._held[message.subject][0] == message.id:
            del self._held[message.subject]  # applied or dead-lettered: the rest may follow

    async def _flush_acks(self) -> None:
        if self._unacked:
            await self.redis.xack(self.stream, self.group, *self._unacked)
            self._unacked = []

    async def _handle_in_order(self, messages: list[_Message]) -> list[bytes]:
        done: list[bytes] = []
        for message in messages:
            outcome = await self._handle_one(message)
            self._note_outcome(message, outcome)
            if outcome == "retry":
                # Later messages of this subject must wait for this one: leave them pending
                # too, to be reclaimed in order.
                break
            if outcome == "ack":
                done.append(message.id)
        return done

    async def _handle_in_rounds(self, lanes: list[_Lane]) -> list[bytes]:
        """Round k handles the k-th message of every subject (so no two of one subject), the
        batchable ones a chunk per transaction; round k+1 starts when round k is done."""
        done: list[bytes] = []
        while lanes:
            heads = [lane.messages[lane.next] for lane in lanes]
            outcomes = await self._handle_round(heads)
            still: list[_Lane] = []
            for lane, head, outcome in zip(lanes, heads, outcomes, strict=True):
                self._note_outcome(head, outcome)
                if outcome == "retry":
                    continue  # the rest of this subject waits, pending, for the reclaim
                if outcome == "ack":
                    done.append(head.id)
                lane.next += 1
                if lane.next < len(lane.messages):
                    still.append(lane)
            lanes = still
        return done

    async def _handle_round(self, heads: list[_Message]) -> list[str]:
        """Outcomes of messages of pairwise different subjects, in the order given."""
        outcomes = [""] * len(heads)
        chunks: dict[str, list[tuple[int, _Message, AnyEvent]]] = {}
        work: list[Awaitable[None]] = []

        async def one(i: int, message: _Message) -> None:
            outcomes[i] = await self._handle_one(message)

        for i, message in enumerate(heads):
            header = message.header
            if header is not None and header.type in self._batch_handlers:
                try:
                    event = event_decoder.decode(cast(bytes, message.raw))
                except msgspec.MsgspecError:
                    work.append(one(i, message))  # poison: handled (and parked) alone
                    continue
                chunks.setdefault(header.type, []).append((i, message, event))
            else:
                work.append(one(i, message))
        for type_name, items in chunks.items():
            # Spread the round over the concurrent transactions, up to the cap per chunk.
            per = -(-len(items) // self.settings.consumer_concurrency)
            size = max(1, min(MAX_EVENTS_PER_TRANSACTION, per))
            for start in range(0, len(items), size):
                work.append(self._handle_chunk(type_name, items[start : start + size], outcomes))
        await asyncio.gather(*work)
        return outcomes

    async def _handle_chunk(
        self, type_name: str, items: list[tuple[int, _Message, AnyEvent]], outcomes: list[str]
    ) -> None:
        if len(items) == 1:
            [(i, message, _event)] = items
            outcomes[i] = await self._handle_one(message)
            return
        events = [event for _i, _m, event in items]
        many = self._batch_handlers[type_name]
        async with self._semaphore:
            try:
                await db.in_transaction(
                    self.pool, lambda conn: self._apply_many(many, events, conn)
                )
            except (*db.TRANSIENT_DB_ERRORS, *TRANSIENT_REDIS_ERRORS):
                # Infrastructure, not the messages: never dead-letter for this.
                EVENTS_CONSUMED.labels(self.group, "retry").inc(len(items))
                raise
            except Exception as exc:
                failure: Exception | None = exc
            else:
                failure = None
        if failure is None:
            now = datetime.now(UTC)
            for i, _message, event in items:
                outcomes[i] = "ack"
                EVENT_LAG.labels(self.group).observe(
                    max(0.0, (now - event.occurred_at).total_seconds())
                )
            EVENTS_CONSUMED.labels(self.group, "handled").inc(len(items))
            return
        # Something in the chunk cannot be applied (or the chunk as a whole could not): it
        # was rolled back, so apply each event alone, where one failure touches nobody else.
        EVENTS_CONSUMED.labels(self.group, "batch_split").inc(len(items))
        log.warning(
            "batch failed; applying its events one by one",
            extra={"group": self.group, "events": len(items), "error": repr(failure)},
        )
        results = await asyncio.gather(*(self._handle_one(m) for _i, m, _e in items))
        for (i, _message, _event), outcome in zip(items, results, strict=True):
            outcomes[i] = outcome

    async def _handle_one(self, message: _Message) -> str:
        """Return "ack" (done or not ours), "retry" (leave pending) or "dead" (dead-lettered)."""
        async with self._semaphore:
            try:
                event = self._decode(message)
                if event is None:
                    EVENTS_CONSUMED.labels(self.group, "skipped").inc()
                    return "ack"
                await db.in_transaction(self.pool, lambda conn: self._apply(event, conn))
                EVENTS_CONSUMED.labels(self.group, "handled").inc()
                EVENT_LAG.labels(self.group).observe(
                    max(0.0, (datetime.now(UTC) - event.occurred_at).total_seconds())
                )
                return "ack"
            except (*db.TRANSIENT_DB_ERRORS, *TRANSIENT_REDIS_ERRORS):
                # Infrastructure, not the message: never dead-letter for this.
                EVENTS_CONSUMED.labels(self.group, "retry").inc()
                raise
            except Exception as exc:
                EVENTS_CONSUMED.labels(self.group, "failed").inc()
                return await self._after_failure(message, exc)

    def _decode(self, message: _Message) -> AnyEvent | None:
        if message.raw is None:
            raise PoisonMessage(f"message has no {EVENT_FIELD.decode()!r} field")
        try:
            header = message.header or header_decoder.decode(message.raw)
            if header.type not in self._handlers:
                return None
            return event_decoder.decode(message.raw)
        except msgspec.MsgspecError as exc:
            raise PoisonMessage(f"undecodable event: {exc}") from exc

    async def _apply(self, event: AnyEvent, conn: asyncpg.Connection) -> None:
        first_time = await conn.fetchval(
            """INSERT INTO processed_events (consumer, event_id) VALUES ($1, $2)
               ON CONFLICT DO NOTHING RETURNING true""",
            self.group,
            uuid.UUID(event.id),
        )
        if first_time:
            await self._handlers[event.type_name()](event, conn)

    async def _apply_many(
        self, many: BatchHandler, events: list[AnyEvent], conn: asyncpg.Connection
    ) -> None:
        ids = [uuid.UUID(event.id) for event in events]
        # Sorted, so two transactions racing on the same ids wait for each other in order.
        rows = await conn.fetch(
            """INSERT INTO processed_events (consumer, event_id)
               SELECT $1, id FROM unnest($2::uuid[]) AS t(id) ORDER BY id
               ON CONFLICT DO NOTHING RETURNING event_id""",
            self.group,
            ids,
        )
        fresh = {row["event_id"] for row in rows}
        first_time: list[AnyEvent] = []
        for event, event_id in zip(events, ids, strict=True):
            if event_id in fresh:
                fresh.discard(event_id)  # the same id twice in one chunk: the first counts
                first_time.append(event)
        if first_time:
            await many(first_time, conn)

    async def _after_failure(self, message: _Message, exc: Exception) -> str:
        pending = await self.redis.xpending_range(
            self.stream, self.group, min=message.id, max=message.id, count=1
        )
        deliveries = int(pending[0]["times_delivered"]) if pending else 1
        if deliveries < self.settings.consumer_max_deliveries:
            log.warning(
                "event failed; will retry",
                extra={
                    "group": self.group,
                    "messageId": as_str(message.id),
                    "deliveries": deliveries,
                    "error": repr(exc),
                },
            )
            return "retry"
        log.error(
            "event dead-lettered",
            extra={
                "group": self.group,
                "messageId": as_str(message.id),
                "deliveries": deliveries,
                "error": repr(exc),
            },
        )
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(
            self.dead_letters,
            {
                EVENT_FIELD: message.raw or b"",
                b"originalId": message.id,
                b"group": self.group,
                b"error": repr(exc)[:2000],
                b"deliveries": str(deliveries),
                b"failedAt": datetime.now(UTC).isoformat(),
            },
        )
        pipe.xack(self.stream, self.group, message.id)
        await pipe.execute()
        EVENTS_CONSUMED.labels(self.group, "dead_lettered").inc()
        return "dead"


def add_consumer(
    app: web.Application,
    *,
    group: str,
    handlers: Callable[[Outbox], Mapping[type[Event], Handler]],
) -> None:
    """Run a consumer group's ``StreamConsumer`` for the app's lifetime. ``handlers`` gets
    the app's outbox, so handlers can emit follow-up events in their own transaction."""

    def factory(app: web.Application) -> Worker:
        return StreamConsumer(
            app[SETTINGS],
            app[db.DB_POOL],
            app[WORKER_REDIS],
            group=group,
            handlers=handlers(app[OUTBOX]),
        ).run

    add_worker(app, f"{group}-consumer", factory)
