"""Operator tools for the dead-letter streams (``widget-identity dlq list|replay``).

A consumer parks a message it gave up on (after CONSUMER_MAX_DELIVERIES) in
``<prefix>events:dlq:<group>``, atomically with its ack (see shared.bus.consumer); these list
and replay them.
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis

from shared.bus.consumer import stream_entries
from shared.bus.events import EVENT_FIELD
from shared.config import Settings
from shared.redis import as_str

log = logging.getLogger(__name__)

_REPLAY_BATCH = 100


async def dead_letters(
    redis: aioredis.Redis, settings: Settings, group: str, *, count: int = 100
) -> list[dict[str, str]]:
    entries = stream_entries(await redis.xrange(settings.dead_letter_stream(group), count=count))
    return [
        {"id": as_str(mid), **{as_str(k): as_str(v) for k, v in (fields or {}).items()}}
        for mid, fields in entries
    ]


async def replay_dead_letters(
    redis: aioredis.Redis, settings: Settings, group: str, *, count: int | None = None
) -> int:
    """Put dead letters back on the events stream (same event ids, so consumers that already
    applied them skip them) and remove them from the dead-letter stream: a batch at a time,
    each batch moved atomically (MULTI), in their original order."""
    stream = settings.dead_letter_stream(group)
    replayed = 0
    started = time.monotonic()
    while count is None or replayed < count:
        want = _REPLAY_BATCH if count is None else min(_REPLAY_BATCH, count - replayed)
        batch = stream_entries(await redis.xrange(stream, count=want))
        if not batch:
            break
        pipe = redis.pipeline(transaction=True)
        for _mid, fields in batch:
            pipe.xadd(settings.events_stream, {EVENT_FIELD: (fields or {}).get(EVENT_FIELD, b"")})
        pipe.xdel(stream, *(mid for mid, _fields in batch))
        await pipe.execute()
        replayed += len(batch)
    log.info(
        "replayed dead letters",
        extra={"group": group, "count": replayed, "seconds": time.monotonic() - started},
    )
    return replayed
