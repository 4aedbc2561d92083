"""Exactly-once effect: each message's effect commits in one Postgres transaction together
with its row in ``processed_events``, so a redelivered message finds the row and is only
acked.

A handler wrapped in ``Batched`` also knows how to apply several events of different
subjects at once: such events are then committed a chunk per transaction (one multi-row
``processed_events`` insert, one handler call), which saves most of the round trips of a
transaction per event. A chunk that fails for any reason other than the infrastructure is
rolled back and its events are applied again one per transaction, so a failing message is
retried or dead-lettered on its own while the others flow.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from typing import cast

import asyncpg
import msgspec

from shared import db
from shared.bus.dead_letters import FailurePolicy
from shared.bus.events import EVENT_FIELD, AnyEvent, Event, event_decoder, header_decoder
from shared.bus.handlers import Batched, BatchHandler, Handler, PoisonMessage
from shared.bus.leases import Lease, LeaseLost
from shared.bus.messages import Message, Outcome
from shared.config import Settings
from shared.observability import EVENT_LAG, EVENTS_CONSUMED
from shared.redis import TRANSIENT_REDIS_ERRORS
from shared.tracing import handling

log = logging.getLogger(__name__)

# Upper bound on the events one transaction applies: big enough to amortise BEGIN/COMMIT and
# the per-transaction statements, small enough that a failed chunk's one-by-one retry and
# the locks it holds stay short.
MAX_EVENTS_PER_TRANSACTION = 32

# Not an outcome: counts events whose chunk was rolled back and that go one by one (each
# then counts under its own outcome too).
BATCH_SPLIT = "batch_split"

# Failures that say nothing about the message (infrastructure, or the partition went to
# another process): the message is retried, never dead-lettered.
_NOT_THE_MESSAGE: tuple[type[BaseException], ...] = (
    *db.TRANSIENT_DB_ERRORS,
    *TRANSIENT_REDIS_ERRORS,
    LeaseLost,
)

_Item = tuple[int, Message, AnyEvent]
"""A batchable message of a round: its place in the round, the message, its event."""


class Applier:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        failures: FailurePolicy,
        *,
        group: str,
        handlers: Mapping[type[Event], Handler],
        lease: Lease | None = None,
    ) -> None:
        self.pool = pool
        # With partitions: every apply transaction first checks this process still owns the
        # partition (shared.bus.leases), and holds that true until it commits.
        self._lease = lease
        self.group = group
        self._failures = failures
        self._concurrency = settings.consumer_concurrency
        self._semaphore = asyncio.Semaphore(settings.consumer_concurrency)
        self._handlers = {cls.type_name(): h for cls, h in handlers.items()}
        self._batch_handlers = {
            cls.type_name(): h.many for cls, h in handlers.items() if isinstance(h, Batched)
        }

    @property
    def batches(self) -> bool:
        return bool(self._batch_handlers)

    async def handle_one(self, message: Message) -> Outcome:
        async with self._semaphore:
            try:
                event = self._decode(message)
                if event is None:
                    outcome = Outcome.SKIPPED
                else:
                    with handling(self.group, [event]):
                        await db.in_transaction(self.pool, lambda conn: self._apply(event, conn))
                    self._observe_lag([event])
                    outcome = Outcome.APPLIED
            except _NOT_THE_MESSAGE:
                # Infrastructure (or the partition went to another process), not the
                # message: never dead-letter for this.
                self._count(Outcome.RETRY)
                raise
            except Exception as exc:
                outcome = await self._failures.after_failure(message, exc)
        self._count(outcome)
        return outcome

    async def handle_round(self, heads: list[Message]) -> list[Outcome]:
        """Outcomes of messages of pairwise different subjects, in the order given; the
        batchable ones are applied a chunk per transaction."""
        outcomes: dict[int, Outcome] = {}
        chunks: dict[str, list[_Item]] = {}
        work: list[Awaitable[None]] = []

        async def one(i: int, message: Message) -> None:
            outcomes[i] = await self.handle_one(message)

        async def chunk(type_name: str, items: list[_Item]) -> None:
            results = await self._handle_chunk(type_name, items)
            for (i, _message, _event), outcome in zip(items, results, strict=True):
                outcomes[i] = outcome

        for i, message in enumerate(heads):
            event = self._batchable(message)
            if event is None:
                work.append(one(i, message))
            else:
                chunks.setdefault(event.type_name(), []).append((i, message, event))
        for type_name, items in chunks.items():
            # Spread the round over the concurrent transactions, up to the cap per chunk.
            per = -(-len(items) // self._concurrency)
            size = max(1, min(MAX_EVENTS_PER_TRANSACTION, per))
            for start in range(0, len(items), size):
                work.append(chunk(type_name, items[start : start + size]))
        await asyncio.gather(*work)
        return [outcomes[i] for i in range(len(heads))]

    def _batchable(self, message: Message) -> AnyEvent | None:
        header = message.header
        if header is None or header.type not in self._batch_handlers:
            return None
        try:
            return event_decoder.decode(cast(bytes, message.raw))
        except msgspec.MsgspecError:
            return None  # poison: handled (and parked) alone

    async def _handle_chunk(self, type_name: str, items: list[_Item]) -> list[Outcome]:
        if len(items) == 1:
            return [await self.handle_one(items[0][1])]
        events = [event for _i, _m, event in items]
        many = self._batch_handlers[type_name]
        async with self._semaphore:
            try:
                with handling(self.group, events):
                    await db.in_transaction(
                        self.pool, lambda conn: self._apply_many(many, events, conn)
                    )
            except _NOT_THE_MESSAGE:
                # Infrastructure, not the messages: never dead-letter for this.
                self._count(Outcome.RETRY, len(items))
                raise
            except Exception as exc:
                failure: Exception | None = exc
            else:
                failure = None
        if failure is None:
            self._observe_lag(events)
            self._count(Outcome.APPLIED, len(items))
            return [Outcome.APPLIED] * len(items)
        # Something in the chunk cannot be applied (or the chunk as a whole could not): it
        # was rolled back, so apply each event alone, where one failure touches nobody else.
        EVENTS_CONSUMED.labels(self.group, BATCH_SPLIT).inc(len(items))
        log.warning(
            "batch failed; applying its events one by one",
            extra={"group": self.group, "events": len(items), "error": repr(failure)},
        )
        return list(await asyncio.gather(*(self.handle_one(m) for _i, m, _e in items)))

    def _decode(self, message: Message) -> AnyEvent | None:
        """The event, or None when this group has no handler for its type."""
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
        if self._lease is not None:
            await self._lease.fence(conn)
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
        if self._lease is not None:
            await self._lease.fence(conn)
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

    def _count(self, outcome: Outcome, n: int = 1) -> None:
        EVENTS_CONSUMED.labels(self.group, outcome.value).inc(n)

    def _observe_lag(self, events: list[AnyEvent]) -> None:
        now = datetime.now(UTC)
        for event in events:
            EVENT_LAG.labels(self.group).observe(
                max(0.0, (now - event.occurred_at).total_seconds())
            )
