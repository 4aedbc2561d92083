"""A consumer group's member when the events are split into several partitions: it owns a
fair share of them (shared.bus.leases) and runs one ``StreamConsumer`` per owned partition.

Every second or so it shows itself alive, learns how many members the group has, gives back
what exceeds its share (stopping that partition's reader first, so its acks are flushed),
takes free partitions up to its share, and drops a partition another member took over. A new
owner first claims what the group still has pending on the partition, so a subject's events
go on in stream order whichever process reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

from shared import db
from shared.bus.consumer import StreamConsumer, default_consumer_name
from shared.bus.events import Event
from shared.bus.handlers import Handler
from shared.bus.leases import LeaseLost, PartitionLeases
from shared.config import Settings
from shared.lifecycle import sleep_or_stop
from shared.redis import TRANSIENT_REDIS_ERRORS, Redis, block_within_timeout

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Reader:
    epoch: int
    stop: asyncio.Event
    task: asyncio.Task[None]


class PartitionedConsumer:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        redis: Redis,
        *,
        group: str,
        handlers: Mapping[type[Event], Handler],
        consumer_name: str | None = None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._redis = redis
        self._handlers = handlers
        self.group = group
        self.streams = settings.event_streams
        block_s = block_within_timeout(settings, settings.consumer_block_ms) / 1000
        self.leases = PartitionLeases(
            pool,
            group=group,
            member=consumer_name or default_consumer_name(),
            partitions=len(self.streams),
            lease_seconds=settings.consumer_lease_seconds,
            # A read may deliver until its BLOCK ends; a tenth of the lease covers two
            # machines' clocks running at slightly different rates, and a slow heartbeat.
            read_margin=block_s + settings.consumer_lease_seconds / 10,
        )
        self._interval = min(1.0, settings.consumer_lease_seconds / 5)
        self._readers: dict[int, _Reader] = {}

    @property
    def owned(self) -> list[int]:
        """The partitions this member reads now."""
        return sorted(self._readers)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    await self.rebalance()
                except (*db.TRANSIENT_DB_ERRORS, *TRANSIENT_REDIS_ERRORS) as exc:
                    # The readers stop reading by themselves once the heartbeat is stale.
                    log.warning(
                        "partition rebalance interrupted; retrying",
                        extra={"group": self.group, "error": repr(exc)},
                    )
                await sleep_or_stop(stop, self._interval)
        finally:
            await self._stop_readers(list(self._readers))
            with contextlib.suppress(*db.TRANSIENT_DB_ERRORS, asyncio.TimeoutError):
                async with asyncio.timeout(5):
                    await self.leases.leave()

    async def rebalance(self) -> None:
        """One round: heartbeat, drop what was lost, give back the excess, take a share."""
        live = await self.leases.heartbeat()
        owned = await self.leases.owned()
        # Readers that ended (their lease was lost, or they failed) or whose partition is no
        # longer ours under the same epoch.
        for partition, reader in list(self._readers.items()):
            if reader.task.done() or owned.get(partition) != reader.epoch:
                # (Still ours under that epoch, a reader that failed on its own starts again
                # below.)
                await self._stop_readers([partition])
                self._report(partition, reader)
        share = self.leases.fair_share(live)
        if len(owned) > share:
            # Give back the highest-numbered ones: every member agrees on which go first,
            # so the partitions settle quickly.
            extra = sorted(owned)[share:]
            await self._stop_readers(extra)
            await self.leases.release(extra)
            for partition in extra:
                owned.pop(partition)
            log.info("partitions handed back", extra={"group": self.group, "partitions": extra})
        elif len(owned) < share:
            taken = await self.leases.acquire(share - len(owned))
            owned.update(taken)
            if taken:
                log.info(
                    "partitions taken",
                    extra={"group": self.group, "partitions": sorted(taken)},
                )
        for partition, epoch in owned.items():
            if partition not in self._readers:
                self._start(partition, epoch)

    def _start(self, partition: int, epoch: int) -> None:
        stop = asyncio.Event()
        reader = StreamConsumer(
            self._settings,
            self._pool,
            self._redis,
            group=self.group,
            handlers=self._handlers,
            consumer_name=self.leases.member,
            stream=self.streams[partition],
            lease=self.leases.lease(partition, epoch),
        )
        task = asyncio.create_task(reader.run(stop), name=f"{self.group}-p{partition}")
        self._readers[partition] = _Reader(epoch, stop, task)

    async def _stop_readers(self, partitions: list[int]) -> None:
        readers = [self._readers.pop(p) for p in partitions if p in self._readers]
        for reader in readers:
            reader.stop.set()
        # A reader finishes its batch and flushes its acks before it returns.
        await asyncio.gather(*(r.task for r in readers), return_exceptions=True)

    def _report(self, partition: int, reader: _Reader) -> None:
        if not reader.task.done() or reader.task.cancelled():
            return
        error = reader.task.exception()
        if isinstance(error, LeaseLost):
            log.warning("partition taken over", extra={"group": self.group, "partition": partition})
        elif error is not None:
            log.error(
                "partition reader failed: %r",
                error,
                extra={"group": self.group, "partition": partition, "error": repr(error)},
            )
