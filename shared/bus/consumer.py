"""Consumer groups on Redis Streams: the read loop and the group's membership.

A consumer reads new messages (XREADGROUP), reclaims what a dead consumer left pending once
it is idle (XAUTOCLAIM), and acks a batch only after its effect committed. What happens in
between is told elsewhere: shared.bus.ordering keeps each subject's messages in stream order,
shared.bus.applier applies each exactly once, shared.bus.dead_letters decides between a
retry and the dead-letter stream when one fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import asyncpg
import redis.exceptions
from aiohttp import web

from shared import db
from shared.bus.applier import Applier
from shared.bus.dead_letters import FailurePolicy
from shared.bus.events import Event
from shared.bus.handlers import Handler
from shared.bus.leases import Lease
from shared.bus.messages import Message
from shared.bus.ordering import SubjectOrder
from shared.bus.outbox import OUTBOX, Outbox
from shared.config import SETTINGS, Settings
from shared.lifecycle import Worker, add_worker, sleep_or_stop
from shared.redis import (
    TRANSIENT_REDIS_ERRORS,
    WORKER_REDIS,
    Redis,
    block_within_timeout,
    node_demoted,
)

log = logging.getLogger(__name__)


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class StreamConsumer:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        redis: Redis,
        *,
        group: str,
        handlers: Mapping[type[Event], Handler],
        consumer_name: str | None = None,
        stream: str | None = None,
        lease: Lease | None = None,
    ) -> None:
        """``stream``: the one partition this reads (default: the only one). ``lease``: this
        process's ownership of that partition, when the group shares several
        (shared.bus.partitioned_consumer); None when every consumer reads the stream."""
        if not group:
            raise ValueError("a consumer needs a group name")
        self.settings = settings
        self.redis = redis
        self.group = group
        self.consumer = consumer_name or default_consumer_name()
        self.stream = stream or settings.event_streams[0]
        failures = FailurePolicy(settings, redis, stream=self.stream, group=group)
        self.dead_letters = failures.dead_letters
        self._lease = lease
        self._applier = Applier(
            settings, pool, failures, group=group, handlers=handlers, lease=lease
        )
        self._order = SubjectOrder(settings.consumer_claim_idle_ms)
        self._claim_cursor = b"0-0"
        self._next_claim = 0.0
        self._unacked: list[bytes] = []
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
                if self._lease is not None:
                    await self._take_over_pending()
                await self._drain_own_pending()
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
                if node_demoted(exc):
                    # A cluster failover cut our blocking read short: the next read goes to
                    # the new primary. The acks that travelled with it are sent again with
                    # the next read (acking twice is harmless); our pending entries come first.
                    log.warning(
                        "stream's node failed over; reading again", extra={"group": self.group}
                    )
                    continue
                if "NOGROUP" not in str(exc):
                    raise
                # The stream or group was deleted under us: recreate and carry on.
                log.warning("consumer group vanished; recreating", extra={"group": self.group})

    async def poll_once(self) -> int:
        """Reclaim idle messages, then read new ones; return how many were handled."""
        if self._lease is not None and not self._lease.fresh():
            # Our partition may go to another process any moment (no recent heartbeat):
            # whatever we read now could overtake what it reads.
            await asyncio.sleep(0.1)
            return 0
        handled = 0
        now = time.monotonic()
        # Reclaiming is a scan of the pending list: do it a few times per idle period, not
        # on every poll.
        if now >= self._next_claim:
            self._next_claim = now + max(0.05, self.settings.consumer_claim_idle_ms / 4000)
            handled = await self._handle(await self._reclaim())
        messages = await self._read(">", block=self._block_ms if not handled else None)
        return handled + await self._handle(messages)

    async def _drain_own_pending(self) -> None:
        """Our own pending entries first, all of them, in stream order, before anything new
        (a restart under the same name; what a partition's previous owner left)."""
        after = "0"
        while True:
            messages = await self._read(after)
            if not messages:
                return
            await self._handle(messages)
            after = messages[-1].id.decode()

    async def _take_over_pending(self) -> None:
        """A partition just taken: everything the group still has pending on it (what its
        previous owner read and did not ack) becomes ours, to handle first and in order. The
        previous owner stopped reading it, or lost the lease and can apply nothing more."""
        cursor: bytes | str = "0-0"
        while True:
            reply = cast(
                Any,
                await self.redis.xautoclaim(
                    self.stream,
                    self.group,
                    self.consumer,
                    min_idle_time=0,
                    start_id=cursor,
                    # Not JUSTID: redis-py then returns the ids without the cursor.
                    count=1000,
                ),
            )
            cursor = reply[0]
            if cursor in (b"0-0", "0-0"):
                return

    async def _reclaim(self) -> list[Message]:
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
        return Message.parse_all(reply[1])

    async def _read(self, start: str, *, block: int | None = None) -> list[Message]:
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
        messages: list[Message] = []
        for _stream, entries in cast(list[tuple[bytes, Any]], reply or []):
            messages.extend(Message.parse_all(entries))
        return messages

    async def _handle(self, messages: Sequence[Message]) -> int:
        if not messages:
            return 0
        lanes = self._order.lanes(messages)
        if self._applier.batches:
            done = await self._order.in_rounds(lanes, self._applier.handle_round)
        else:
            done = await self._order.in_order(lanes, self._applier.handle_one)
        # Acked with the next read (or on stop); a crash before that only means a redelivery,
        # which processed_events turns into a plain ack.
        self._unacked.extend(done)
        return len(messages)

    async def _flush_acks(self) -> None:
        if self._unacked:
            await self.redis.xack(self.stream, self.group, *self._unacked)
            self._unacked = []


def add_consumer(
    app: web.Application,
    *,
    group: str,
    handlers: Callable[[Outbox], Mapping[type[Event], Handler]],
) -> None:
    """Run a consumer group's member for the app's lifetime: a ``StreamConsumer`` of the one
    stream, or, with several partitions, a ``PartitionedConsumer`` that reads its share of
    them. ``handlers`` gets the app's outbox, so handlers can emit follow-up events in their
    own transaction."""
    # Imported here: the partitioned consumer builds on StreamConsumer, in this module.
    from shared.bus.partitioned_consumer import PartitionedConsumer

    def factory(app: web.Application) -> Worker:
        settings = app[SETTINGS]
        kind = PartitionedConsumer if len(settings.event_streams) > 1 else StreamConsumer
        return kind(
            settings,
            app[db.DB_POOL],
            app[WORKER_REDIS],
            group=group,
            handlers=handlers(app[OUTBOX]),
        ).run

    add_worker(app, f"{group}-consumer", factory)
