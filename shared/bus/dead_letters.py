"""The dead-letter streams: where a consumer group parks what it gives up on, and the
operator tools to list and replay them (``widget-identity dlq list|replay``).

A message whose handling failed is retried until its CONSUMER_MAX_DELIVERIES-th delivery,
unless it is poison (``PoisonMessage``: it can never succeed), which goes at once. Either
way it lands in ``<stream>:dlq:<group>``, beside the partition it came from (so in its hash
slot), atomically with its ack, so it is never acked without its entry. Replaying puts it
back on that partition, where its subject's other events are.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from shared.bus.events import EVENT_FIELD
from shared.bus.handlers import PoisonMessage
from shared.bus.messages import Message, Outcome, stream_entries
from shared.config import Settings
from shared.redis import Redis, as_str

log = logging.getLogger(__name__)

_REPLAY_BATCH = 100


class FailurePolicy:
    """Decides, for one consumer group, what becomes of a message whose handler failed."""

    def __init__(self, settings: Settings, redis: Redis, *, stream: str, group: str) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.dead_letters = settings.dead_letter_stream(group, stream)
        self._max_deliveries = settings.consumer_max_deliveries

    async def after_failure(self, message: Message, exc: Exception) -> Outcome:
        """``RETRY`` (left pending, for the reclaim) or ``DEAD_LETTERED`` (parked, acked)."""
        pending = await self.redis.xpending_range(
            self.stream, self.group, min=message.id, max=message.id, count=1
        )
        deliveries = int(pending[0]["times_delivered"]) if pending else 1
        context = {
            "group": self.group,
            "messageId": as_str(message.id),
            "deliveries": deliveries,
            "error": repr(exc),
        }
        if not isinstance(exc, PoisonMessage) and deliveries < self._max_deliveries:
            log.warning("event failed; will retry", extra=context)
            return Outcome.RETRY
        log.error("event dead-lettered", extra=context)
        await self._park(message, exc, deliveries)
        return Outcome.DEAD_LETTERED

    async def _park(self, message: Message, exc: Exception, deliveries: int) -> None:
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


async def dead_letters(
    redis: Redis, settings: Settings, group: str, *, count: int = 100
) -> list[dict[str, str]]:
    """The group's first ``count`` dead letters of each partition, partition by partition
    (each entry names its ``stream``: the partition it came from)."""
    found: list[dict[str, str]] = []
    for stream in settings.event_streams:
        dlq = settings.dead_letter_stream(group, stream)
        for mid, fields in stream_entries(await redis.xrange(dlq, count=count)):
            entry = {as_str(k): as_str(v) for k, v in (fields or {}).items()}
            found.append({"id": as_str(mid), "stream": stream, **entry})
    return found


async def replay_dead_letters(
    redis: Redis, settings: Settings, group: str, *, count: int | None = None
) -> int:
    """Put dead letters back on the partition they came from (same event ids, so consumers
    that already applied them skip them) and remove them from the dead-letter stream: a batch
    at a time, each batch moved atomically (MULTI, within the partition's hash slot), in
    their original order. ``count`` bounds the total over all partitions."""
    replayed = 0
    started = time.monotonic()
    for partition in settings.event_streams:
        dlq = settings.dead_letter_stream(group, partition)
        while count is None or replayed < count:
            want = _REPLAY_BATCH if count is None else min(_REPLAY_BATCH, count - replayed)
            batch = stream_entries(await redis.xrange(dlq, count=want))
            if not batch:
                break
            pipe = redis.pipeline(transaction=True)
            for _mid, fields in batch:
                pipe.xadd(partition, {EVENT_FIELD: (fields or {}).get(EVENT_FIELD, b"")})
            pipe.xdel(dlq, *(mid for mid, _fields in batch))
            await pipe.execute()
            replayed += len(batch)
    log.info(
        "replayed dead letters",
        extra={"group": group, "count": replayed, "seconds": time.monotonic() - started},
    )
    return replayed
