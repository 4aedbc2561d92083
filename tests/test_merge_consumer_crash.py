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
    """Unacked merge events, over every partition."""
    total = 0
    for stream in settings.event_streams:
        total += int((await redis.xpending(stream, GROUP))["pending"])
    return total


async def unread(redis: aioredis.Redis, settings: Settings) -> int | None:
    """Merge events not yet delivered, over every partition; None before every partition has
    the group."""
    total = 0
    for stream in settings.event_streams:
        groups = {g["name"]: g for g in await redis.xinfo_groups(stream)}
        group = groups.get(GROUP.encode())
        if group is None:
            return None
        total += group["lag"]
    return total


async def done(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM merges WHERE status = 'done'"))


async def queue_merges(
    pool: asyncpg.Pool, redis: aioredis.Redis, settings: Settings, merges: int = MERGES
) -> dict[str, str]:
    """``merges`` merge events on the stream (every tenth twice, as a relay that republished
    after a crash would), their visitors' conversations in Postgres; returns each
    conversation's expected contact."""
    org = await make_org(pool)
    contacts = [await make_contact(pool, org) for _ in range(CONTACTS)]
    visitors = await make_visitors(pool, org, merges)
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
    await publish(redis, settings, events + events[::10])
    return expected_target


def consumer_process(settings: Settings, **extra: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "STREAM_PREFIX": settings.stream_prefix,
        "STREAM_PARTITIONS": str(settings.stream_partitions),
        "CONSUMER_LEASE_SECONDS": str(settings.consumer_lease_seconds),
        "LOG_JSON": "false",
        "LOG_LEVEL": "WARNING",
        "RELAY_ENABLED": "false",
        "SHUTDOWN_TIMEOUT": "10",
        "CLAIM_IDLE_MS": "300",
        "BATCH": "50",
        **extra,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.history_consumer"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )


async def until_drained(
    pool: asyncpg.Pool, redis: aioredis.Redis, settings: Settings, merges: int = MERGES
) -> None:
    async def drained() -> bool:
        return (
            await done(pool) == merges
            and await pending(redis, settings) == 0
            and await unread(redis, settings) == 0
        )

    await eventually(drained, timeout=120)


async def assert_every_merge_done_once(
    pool: asyncpg.Pool, expected_target: dict[str, str], merges: int = MERGES
) -> None:
    """Every merge done, once, with exactly the conversations its visitor had; every
    conversation in exactly one scope: the contact its visitor merged into."""
    statuses = await pool.fetch("SELECT status, count(*) AS n FROM merges GROUP BY status")
    assert {r["status"]: r["n"] for r in statuses} == {"done": merges}
    assert (
        await pool.fetchval("SELECT count(*) FROM processed_events WHERE consumer = $1", GROUP)
        == merges
    )
    rows = await pool.fetch("SELECT id, conversation_ids, target_contact_id FROM merges")
    moved = Counter(str(c) for r in rows for c in r["conversation_ids"])
    assert set(moved) == set(expected_target)
    assert set(moved.values()) == {1}
    conversations = await pool.fetch("SELECT id, visitor_id, contact_id FROM conversations")
    assert len(conversations) == merges * PER_VISITOR
    assert all(c["visitor_id"] is None for c in conversations)
    assert {str(c["id"]): str(c["contact_id"]) for c in conversations} == expected_target


@pytest.mark.slow
async def test_consumer_killed_mid_batch_applies_every_merge_exactly_once(
    settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    expected_target = await queue_merges(pool, redis, settings)
    for round_ in range(2):
        victim = consumer_process(settings)
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

    survivor = consumer_process(settings)
    try:
        await until_drained(pool, redis, settings)
    finally:
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(timeout=30) == 0
    await assert_every_merge_done_once(pool, expected_target)


@pytest.mark.slow
async def test_merge_consumers_scaled_1_3_1_over_four_partitions_do_every_merge_once(
    settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    partitioned = settings.with_overrides(stream_partitions=4, consumer_lease_seconds=2.0)
    merges = 3 * MERGES
    expected_target = await queue_merges(pool, redis, partitioned, merges)
    # One merge per transaction, one at a time per partition: the scaling happens while
    # most merges still wait.
    slow = {"CONCURRENCY": "1", "BATCH": "1"}
    first = consumer_process(partitioned, **slow)
    extra: list[subprocess.Popen[bytes]] = []
    try:
        await eventually(lambda: _more_than(pool, merges // 10), timeout=60, interval=0.01)
        extra = [consumer_process(partitioned, **slow) for _ in range(2)]
        await eventually(lambda: _owners(pool, 3), timeout=30)
        await eventually(lambda: _more_than(pool, merges // 2), timeout=60, interval=0.01)
        assert await done(pool) < merges  # scaled down with merges still to do
        for process in extra:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        await eventually(lambda: _owners(pool, 1), timeout=30)
        await until_drained(pool, redis, partitioned, merges)
    finally:
        for process in [first, *extra]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
    await assert_every_merge_done_once(pool, expected_target, merges)


async def _more_than(pool: asyncpg.Pool, merges: int) -> bool:
    return await done(pool) > merges


async def _owners(pool: asyncpg.Pool, members: int) -> bool:
    """Every partition owned, by exactly ``members`` distinct consumer processes."""
    rows = await pool.fetch("SELECT owner FROM partition_leases WHERE consumer_group = $1", GROUP)
    owners = {r["owner"] for r in rows}
    return len(rows) == 4 and None not in owners and len(owners) == members
