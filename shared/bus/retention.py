"""Bounded event streams: what every consumer group has acknowledged is trimmed once it is
older than ``STREAM_RETENTION_SECONDS``; an entry still pending in some group, or not yet
delivered to it, is never removed. Without this the stream, and Redis's
memory, grows with every event ever published.

Every process that runs the outbox relay also runs this (every ``STREAM_TRIM_INTERVAL``
seconds). Concurrent trims from several replicas are harmless: each computes a bound from
the groups' state at that moment and XTRIM MINID only ever removes entries below it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from aiohttp import web
from redis.exceptions import ResponseError

from shared.config import SETTINGS, Settings
from shared.lifecycle import Worker, add_worker, sleep_or_stop
from shared.observability import STREAM_ENTRIES, STREAM_TRIMMED
from shared.redis import TRANSIENT_REDIS_ERRORS, WORKER_REDIS, Redis, as_str

log = logging.getLogger(__name__)

StreamId = tuple[int, int]


# Above any id Redis generates (ms since the epoch).
_PAST_EVERY_ID: StreamId = (2**62, 0)


def parse_id(raw: bytes | str) -> StreamId:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def acknowledged_bound(redis: Redis, stream: str) -> StreamId | None:
    """The lowest id some consumer group may still need: entries below it were delivered to
    and acknowledged by every group. A group's oldest pending entry counts (it may be retried
    or reclaimed), and so does everything after its last-delivered id (not read yet). With no
    group, nothing is needed: the bound is past every id. None when the stream is missing."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    bound: StreamId = _PAST_EVERY_ID
    for group in groups:
        # Everything up to last-delivered was delivered; keeping that one entry too costs
        # nothing and needs no id arithmetic. Entries delivered after this snapshot have
        # higher ids, so the bound only errs on the side of keeping.
        keep = parse_id(group["last-delivered-id"])
        if int(group["pending"]) > 0:
            try:
                oldest = await redis.xpending_range(stream, group["name"], "-", "+", 1)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    continue  # deleted since the snapshot: it needs nothing
                raise
            # Empty when the group acknowledged everything since the snapshot.
            if oldest:
                keep = min(keep, parse_id(cast(bytes, oldest[0]["message_id"])))
        if keep == (0, 0):
            # A group that never read holds the whole stream; say who, or nobody will know.
            log.info(
                "stream not trimmed: a group has read nothing",
                extra={"group": as_str(group["name"])},
            )
        bound = min(bound, keep)
    return bound


async def trim_bound(redis: Redis, stream: str, *, retention_ms: int) -> StreamId:
    """The lowest id that must stay: entries below it are old enough and acknowledged by
    every group."""
    now_ms = int(time.time() * 1000)
    acknowledged = await acknowledged_bound(redis, stream)
    if acknowledged is None:
        return (0, 0)  # no stream yet: nothing to trim
    return min((max(0, now_ms - retention_ms), 0), acknowledged)


async def trim_stream(redis: Redis, stream: str, *, retention_ms: int) -> int:
    """Remove what no group still needs; returns how many entries went."""
    bound = await trim_bound(redis, stream, retention_ms=retention_ms)
    if bound == (0, 0):
        return 0
    removed = int(await redis.xtrim(stream, minid=f"{bound[0]}-{bound[1]}", approximate=False))
    STREAM_TRIMMED.inc(removed)
    STREAM_ENTRIES.labels(stream).set(await redis.xlen(stream))
    return removed


class StreamRetention:
    def __init__(self, settings: Settings, redis: Redis) -> None:
        self._streams = settings.event_streams
        self._redis = redis
        self._retention_ms = int(settings.stream_retention_seconds * 1000)
        self._interval = settings.stream_trim_interval

    async def run(self, stop: asyncio.Event) -> None:
        while not await sleep_or_stop(stop, self._interval):
            for stream in self._streams:  # one partition per call: each has its own slot
                try:
                    removed = await trim_stream(
                        self._redis, stream, retention_ms=self._retention_ms
                    )
                except TRANSIENT_REDIS_ERRORS as exc:
                    log.warning("stream trim skipped", extra={"error": repr(exc)})
                    continue
                if removed:
                    log.info("stream trimmed", extra={"stream": stream, "removed": removed})


def add_stream_retention(app: web.Application) -> None:
    def factory(app: web.Application) -> Worker:
        return StreamRetention(app[SETTINGS], app[WORKER_REDIS]).run

    add_worker(app, "stream-retention", factory)
