"""The events stream stays bounded, and trimming never drops an entry a consumer group still
needs, against a real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.typing import StreamIdT

from services import all_in_one
from shared.bus.retention import trim_stream
from shared.config import Settings
from tests.support.server import eventually, running
from tests.support.tokens import mint_contact_token, provision_org

HOUR_MS = 3600 * 1000


async def fill(redis: aioredis.Redis, stream: str, count: int) -> list[bytes]:
    pipe = redis.pipeline(transaction=False)
    for i in range(count):
        pipe.xadd(stream, {b"event": str(i).encode()})
    return list(await pipe.execute())


async def read(redis: aioredis.Redis, stream: str, group: str, count: int) -> list[bytes]:
    reply = await redis.xreadgroup(group, "c1", {stream: ">"}, count=count)
    return [entry_id for _stream, entries in reply for entry_id, _fields in entries]


async def remaining(redis: aioredis.Redis, stream: str) -> list[bytes]:
    return [entry_id for entry_id, _fields in await redis.xrange(stream)]


async def test_trimming_never_drops_pending_or_undelivered_entries(
    settings: Settings, redis: aioredis.Redis
) -> None:
    stream = settings.event_streams[0]
    ids = await fill(redis, stream, 1000)
    await redis.xgroup_create(stream, "fast", id="0")
    await redis.xgroup_create(stream, "slow", id="0")
    # fast: read and acknowledged 600, except entry 100 (failing, still pending).
    fast = await read(redis, stream, "fast", 600)
    await redis.xack(stream, "fast", *[i for i in fast if i != ids[100]])
    # slow: read 300, acknowledged the first 250; 250..299 pending, 300.. not delivered.
    slow = await read(redis, stream, "slow", 300)
    await redis.xack(stream, "slow", *slow[:250])

    removed = await trim_stream(redis, stream, retention_ms=0)

    assert removed == 100  # 0..99: acknowledged by both groups
    left = await remaining(redis, stream)
    assert left == ids[100:]
    # What each group still owes is still readable and claimable.
    pending_fast = await redis.xpending_range(stream, "fast", "-", "+", 10)
    assert [p["message_id"] for p in pending_fast] == [ids[100]]
    to_claim: list[StreamIdT] = [*slow[250:]]  # redis-py wants exactly this list type
    claimed = await redis.xclaim(stream, "slow", "c2", 0, to_claim)
    assert [entry_id for entry_id, _ in claimed] == ids[250:300]


async def test_acknowledged_entries_stay_for_the_retention_period(
    settings: Settings, redis: aioredis.Redis
) -> None:
    stream = settings.event_streams[0]
    await fill(redis, stream, 50)
    await redis.xgroup_create(stream, "g", id="0")
    await redis.xack(stream, "g", *await read(redis, stream, "g", 50))

    assert await trim_stream(redis, stream, retention_ms=HOUR_MS) == 0
    assert await redis.xlen(stream) == 50
    # Past the retention only the last delivered entry is kept.
    assert await trim_stream(redis, stream, retention_ms=0) == 49
    assert await redis.xlen(stream) == 1


async def test_a_group_that_never_read_keeps_the_whole_stream(
    settings: Settings, redis: aioredis.Redis
) -> None:
    stream = settings.event_streams[0]
    await fill(redis, stream, 20)
    await redis.xgroup_create(stream, "new-consumer", id="0")
    assert await trim_stream(redis, stream, retention_ms=0) == 0
    assert await redis.xlen(stream) == 20


async def test_without_groups_only_age_decides_and_a_missing_stream_is_fine(
    settings: Settings, redis: aioredis.Redis
) -> None:
    stream = settings.event_streams[0]
    assert await trim_stream(redis, stream, retention_ms=0) == 0
    assert not await redis.exists(stream)
    await fill(redis, stream, 5)
    assert await trim_stream(redis, stream, retention_ms=HOUR_MS) == 0
    await asyncio.sleep(0.01)  # every id is now older than "now - 0"
    assert await trim_stream(redis, stream, retention_ms=0) == 5


async def test_every_relay_process_trims_what_its_consumers_acknowledged(
    settings: Settings, redis: aioredis.Redis
) -> None:
    app = all_in_one.create_app(
        settings.with_overrides(stream_retention_seconds=0.0, stream_trim_interval=0.1)
    )
    async with running(app) as api:
        org = await provision_org(api)
        for i in range(5):
            await mint_contact_token(api, org, userId=f"u{i}")

        async def trimmed_to_the_last_acknowledged() -> bool:
            groups = await redis.xinfo_groups(settings.event_streams[0])
            done = len(groups) >= 2 and all(
                g["pending"] == 0 and g["last-delivered-id"] != b"0-0" for g in groups
            )
            return done and await redis.xlen(settings.event_streams[0]) == 1

        await eventually(trimmed_to_the_last_acknowledged)


async def test_a_group_acknowledging_or_vanishing_mid_trim_does_not_stop_the_trim(
    settings: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real race, made deterministic: between XINFO GROUPS and XPENDING the consumer acks
    # everything it held (group "a") and another group is deleted (group "b").
    stream = settings.event_streams[0]
    ids = await fill(redis, stream, 3)
    for group in ("a", "b"):
        await redis.xgroup_create(stream, group, id="0")
        await read(redis, stream, group, 3)
    snapshot = redis.xinfo_groups

    async def then_the_consumers_move(name: str) -> Any:
        groups = await snapshot(name)
        await redis.xack(stream, "a", *ids)
        await redis.xgroup_destroy(stream, "b")
        return groups

    monkeypatch.setattr(redis, "xinfo_groups", then_the_consumers_move)
    await asyncio.sleep(0.01)
    assert await trim_stream(redis, stream, retention_ms=0) == 2  # all but the last delivered
