"""Consume widget-identity events with a consumer group, typed.

    pip install 'widget-identity-client[events]'
    python consume_events.py --redis-url redis://redis.internal:6379 --group crm-sync

Without --redis-url it uses $REDIS_URL, else the Redis of a ``make run`` in the server's
checkout that is running now (its ``.devdata/env``, looked for from here upwards).

Every event is printed once it is handled; it is acknowledged only after ``handle`` returns,
so whatever a crash interrupts is delivered again on the next start. Ctrl-C stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from pathlib import Path

import redis.asyncio as aioredis
from widget_identity_client.events import EventConsumer, Handler
from widget_identity_client.models import (
    AnyEvent,
    ContactAuthenticated,
    ContactErased,
    HistoryMerged,
)


async def handle(event: AnyEvent) -> None:
    # Delivery is at-least-once: a real handler deduplicates by event.id.
    match event:
        case ContactAuthenticated(data=data):
            print(f"contact {data.contact_id} authenticated (userId {data.user_id})")
        case HistoryMerged(data=data):
            print(f"merge {data.merge_id}: {data.conversations_moved} conversations moved")
        case ContactErased(data=data):
            print(f"contact {data.contact_id} erased (receipt {data.receipt_id})")
        case _:
            print(f"{event.__struct_config__.tag} about {event.subject}")


async def consume(
    redis_url: str,
    *,
    group: str,
    consumer: str | None = None,
    stream_prefix: str = "wi:",
    partitions: int = 1,
    stop: asyncio.Event | None = None,
    handler: Handler = handle,
    block_ms: int = 5000,
) -> None:
    """Read every partition of the server's events as ``consumer`` of ``group`` until
    ``stop`` is set: one ``EventConsumer`` per partition, side by side."""
    redis = aioredis.from_url(redis_url)
    try:
        readers = [
            EventConsumer(
                redis,
                group=group,
                consumer=consumer,
                stream_prefix=stream_prefix,
                block_ms=block_ms,
                partition=partition,
                partitions=partitions,
            )
            for partition in range(partitions)
        ]
        await asyncio.gather(*(reader.run(handler, stop=stop) for reader in readers))
    finally:
        await redis.aclose()


def dev_redis_url(start: Path | None = None) -> str | None:
    """REDIS_URL from the ``.devdata/env`` that a running ``make run`` writes (and removes
    when it stops), in ``start`` (default: the current directory) or a parent of it."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        with contextlib.suppress(OSError):
            text = (directory / ".devdata" / "env").read_text()
            for line in text.splitlines():
                name, _, value = line.partition("=")
                if name == "REDIS_URL":
                    return value.strip().strip("'")
    return None


async def main() -> None:
    parser = argparse.ArgumentParser(description="Print widget-identity events.")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL") or dev_redis_url(),
        help="default: $REDIS_URL, else the running `make run` of this checkout",
    )
    parser.add_argument("--group", default="example-consumer")
    parser.add_argument("--consumer", default=None, help="default: host-pid")
    parser.add_argument("--stream-prefix", default="wi:", help="the server's STREAM_PREFIX")
    parser.add_argument("--partitions", type=int, default=1, help="the server's STREAM_PARTITIONS")
    args = parser.parse_args()
    if not args.redis_url:
        parser.error("no --redis-url, no REDIS_URL, and no running `make run` found (.devdata/env)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
            loop.add_signal_handler(sig, stop.set)
    await consume(
        args.redis_url,
        group=args.group,
        consumer=args.consumer,
        stream_prefix=args.stream_prefix,
        partitions=args.partitions,
        stop=stop,
    )


if __name__ == "__main__":
    asyncio.run(main())
