"""The merge consumer killed with SIGKILL in the middle of a batch of 1,000 merges, then
restarted: every merge is done exactly once, every conversation is in exactly one scope,
nothing is left pending. Some events are also delivered twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from services.history.consumers import GROUP
from shared.config import Settings
from tests.support.history_fixtures import (
    add_conversations,
    make_contact,
    make_org,
    make_visitors,
    merge_event,
    merge_request,
    publish,
)
from tests.support.server import eventually

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MERGES = 1000
CONTACTS = 50  # 20 merges into each contact, so merges into one contact run concurrently
PER_VISITOR = 2


async def pending(redis: aioredis.Redis, settings: Settings) -> int:
    summary = await redis.xpending(settings.event_streams[0], GROUP)
    return int(summary["pending"])


async def unread(redis: aioredis.Redis, settings: Settings) -> int | None:
    groups = {g["name"]: g for g in await redis.xinfo_groups(settings.event_streams[0])}
    group = groups.get(GROUP.encode())
    return None if group is None else group["lag"]


async def done(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM merges WHERE status = 'done'"))


@pytest.mark.slow
async def test_consumer_killed_mid_batch_applies_every_merge_exactly_once(
    settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    org = await make_org(pool)
    contacts = [await make_contact(pool, org) for _ in range(CONTACTS)]
    visitors = await make_visitors(pool, org, MERGES)
    expected_target: dict[str, str] = {}
    for i, visitor in enumerate(visitors):
        for conversation in await add_conversations(
            pool, org, visitor_id=visitor, count=PER_VISITOR, messages=1
        ):
            expected_target[conversation] = contacts[i % CONTACTS]
    requests = [
        merge_request(org, target_contact_id=contacts[i % CONTACTS], source_visitor_id=v)
        for i, v in enumerate(visitors)
    ]
    events = [merge_event(org, r) for r in requests]
    # Every tenth event is delivered twice (a relay that republished after a crash).
    await publish(redis, settings, events + events[::10])

    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "STREAM_PREFIX": settings.stream_prefix,
        "LOG_JSON": "false",
        "LOG_LEVEL": "WARNING",
        "RELAY_ENABLED": "false",
        "SHUTDOWN_TIMEOUT": "10",
        "CLAIM_IDLE_MS": "300",
        "BATCH": "50",
    }

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.support.history_consumer"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )

    for round_ in range(2):
        victim = start()
        try:

            async def some_applied(round_: int = round_) -> bool:
                return await done(pool) > (round_ + 1) * MERGES // 4

            await eventually(some_applied, timeout=60, interval=0.005)
        finally:
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
        assert victim.returncode == -signal.SIGKILL
        # It really died in the middle: merges left to do, messages held unacked.
        assert await done(pool) < MERGES
        assert await pending(redis, settings) > 0

    survivor = start()
    try:

        async def drained() -> bool:
            return (
                await done(pool) == MERGES
                and await pending(redis, settings) == 0
                and await unread(redis, settings) == 0
            )

        await eventually(drained, timeout=120)
    finally:
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(timeout=30) == 0

    # Every merge done, once, with exactly the conversations its visitor had.
    statuses = await pool.fetch("SELECT status, count(*) AS n FROM merges GROUP BY status")
    assert {r["status"]: r["n"] for r in statuses} == {"done": MERGES}
    assert (
        await pool.fetchval("SELECT count(*) FROM processed_events WHERE consumer = $1", GROUP)
        == MERGES
    )
    rows = await pool.fetch("SELECT id, conversation_ids, target_contact_id FROM merges")
    moved = Counter(str(c) for r in rows for c in r["conversation_ids"])
    assert set(moved) == set(expected_target)
    assert set(moved.values()) == {1}
    # Every conversation in exactly one scope: the contact its visitor merged into.
    conversations = await pool.fetch("SELECT id, visitor_id, contact_id FROM conversations")
    assert len(conversations) == MERGES * PER_VISITOR
    assert all(c["visitor_id"] is None for c in conversations)
    assert {str(c["id"]): str(c["contact_id"]) for c in conversations} == expected_target
    # One history.merged per merge (nothing announced twice).
    payloads = await pool.fetch("SELECT payload FROM outbox WHERE event_type = 'history.merged'")
    announced = Counter(msgspec.json.decode(p["payload"])["data"]["mergeId"] for p in payloads)
    assert set(announced) == {r.merge_id for r in requests}
    assert set(announced.values()) == {1}
