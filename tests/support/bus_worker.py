"""A consumer process for the bus tests: applies VisitorCreated events to ``bus_effects``.

Run as ``python -m tests.support.bus_worker`` with DATABASE_URL, REDIS_URL, STREAM_PREFIX,
HANDLER_DELAY_MS (and STREAM_PARTITIONS, CONSUMER_LEASE_SECONDS) in the environment, so a test can SIGKILL it at any instant. The
effect table has no unique constraint on purpose: only the consumer's own idempotency can
keep a redelivered event from being applied twice.
"""

from __future__ import annotations

import asyncio
import os
import signal

import asyncpg

from shared.bus.consumer import StreamConsumer
from shared.bus.events import VisitorCreated
from shared.bus.partitioned_consumer import PartitionedConsumer
from shared.config import Settings
from shared.db import create_pool
from shared.redis import create_redis

GROUP = "bus-test"


def effect_handler(delay: float):  # type: ignore[no-untyped-def]
    async def handle(event: VisitorCreated, conn: asyncpg.Connection) -> None:
        await conn.execute(
            "INSERT INTO bus_effects (event_id, subject, seq) VALUES ($1, $2, $3)",
            event.id,
            event.subject,
            event.seq,
        )
        if delay:
            await asyncio.sleep(delay)

    return handle


async def main() -> None:
    settings = Settings.from_env().with_overrides(
        consumer_block_ms=100,
        consumer_claim_idle_ms=int(os.environ.get("CLAIM_IDLE_MS", "300")),
        consumer_batch=int(os.environ.get("BATCH", "100")),
    )
    pool = await create_pool(settings)
    redis = create_redis(settings)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    # Like add_consumer: one stream, or this process's share of the partitions.
    kind = PartitionedConsumer if len(settings.event_streams) > 1 else StreamConsumer
    consumer = kind(
        settings,
        pool,
        redis,
        group=GROUP,
        consumer_name=os.environ.get("CONSUMER_NAME"),
        handlers={
            VisitorCreated: effect_handler(int(os.environ.get("HANDLER_DELAY_MS", "0")) / 1000)
        },
    )
    print("ready", flush=True)
    await consumer.run(stop)
    await pool.close()
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
