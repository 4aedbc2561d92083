"""The bus tests' common moves: an effect table only a consumer's idempotency keeps free of
duplicates, events to feed it, workers run in the background, and the order check."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from shared.bus.events import VisitorCreated, VisitorCreatedData
from shared.bus.outbox import Outbox
from shared.bus.relay import OutboxRelay
from shared.config import Settings
from shared.redis import Redis
from tests.support.server import eventually

ROOT = Path(__file__).resolve().parent.parent.parent


def relay(settings: Settings, redis: Redis) -> OutboxRelay:
    """The real outbox relay, polling every 0.1 s so tests wait little for it."""
    return OutboxRelay(settings, redis, poll_interval=0.1)


async def create_effects(pool: asyncpg.Pool) -> asyncpg.Pool:
    """``bus_effects``, written by ``tests.support.bus_worker.effect_handler``: no unique
    constraint on purpose, and ``applied_at`` in the order the handler ran."""
    await pool.execute(
        "CREATE TABLE bus_effects (event_id uuid NOT NULL, subject text NOT NULL, seq bigint NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    return pool


async def emit_visitor_events(
    pool: asyncpg.Pool, settings: Settings, subjects: list[str]
) -> list[str]:
    outbox = Outbox(settings.event_streams)
    ids: list[str] = []
    async with pool.acquire() as conn, conn.transaction():
        for subject in subjects:
            event = await outbox.emit(
                conn,
                VisitorCreated,
                org_id=str(uuid.uuid4()),
                subject=subject,
                data=VisitorCreatedData(visitor_id=subject, widget_token_id="w"),
            )
            ids.append(event.id)
    return ids


@asynccontextmanager
async def background(
    run: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def until_applied(effects: asyncpg.Pool, count: int, *, timeout: float = 10) -> None:
    async def done() -> bool:
        return await effects.fetchval("SELECT count(*) FROM bus_effects") == count

    await eventually(done, timeout=timeout)


async def applied_order(effects: asyncpg.Pool) -> list[tuple[str, int]]:
    """(subject, seq) of every applied event, in the order the handler applied them."""
    rows = await effects.fetch("SELECT subject, seq FROM bus_effects ORDER BY applied_at")
    return [(r["subject"], r["seq"]) for r in rows]


def assert_each_subject_in_sequence(order: list[tuple[str, int]]) -> None:
    last: dict[str, int] = {}
    for subject, seq in order:
        assert seq == last.get(subject, 0) + 1, (subject, seq)
        last[subject] = seq


class Load:
    """Events for ``subjects`` subjects, emitted a transaction at a time in the background
    until stopped; ``emitted`` counts the committed ones."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, subjects: int) -> None:
        self._pool = pool
        self._settings = settings
        self._subjects = [f"subject-{i}" for i in range(subjects)]
        self.emitted = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batch = random.choices(self._subjects, k=20)
            await emit_visitor_events(self._pool, self._settings, batch)
            self.emitted += len(batch)
            await asyncio.sleep(0.01)


async def some_more_applied(effects: asyncpg.Pool, more: int = 200) -> None:
    """Let the load run until ``more`` further events are applied."""
    start = await effects.fetchval("SELECT count(*) FROM bus_effects")

    async def grown() -> bool:
        return bool(await effects.fetchval("SELECT count(*) FROM bus_effects") >= start + more)

    await eventually(grown, timeout=30)


def start_bus_worker(settings: Settings, name: str, **extra: str) -> subprocess.Popen[bytes]:
    """``tests.support.bus_worker`` as its own process, consumer ``name`` of its group, on
    ``settings``' database, Redis, prefix and partitions (a 2 ms handler, a 300 ms reclaim,
    no relay): a process a test can SIGKILL at any instant."""
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "STREAM_PREFIX": settings.stream_prefix,
        "STREAM_PARTITIONS": str(settings.stream_partitions),
        "CONSUMER_LEASE_SECONDS": str(settings.consumer_lease_seconds),
        "HANDLER_DELAY_MS": "2",
        "CLAIM_IDLE_MS": "300",
        "LOG_JSON": "false",
        "RELAY_ENABLED": "false",
        "CONSUMER_NAME": name,
        **extra,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.bus_worker"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
