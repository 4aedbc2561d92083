"""Promise 9 past one stream: with STREAM_PARTITIONS > 1 a subject's events all go to one
partition, every partition has one relay and, per consumer group, one consumer process at a
time, and consumers coming and going mid-load lose nothing, apply nothing twice and keep each
subject's events in order."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid

import asyncpg
import pytest
import redis.asyncio as aioredis
from widget_identity_client.events import event_streams as client_streams

from shared.bus.consumer import StreamConsumer
from shared.bus.dead_letters import dead_letters, replay_dead_letters
from shared.bus.events import EVENT_FIELD, VisitorCreated, header_decoder
from shared.bus.handlers import PoisonMessage
from shared.bus.leases import LeaseLost, PartitionLeases
from shared.bus.partitioned_consumer import PartitionedConsumer
from shared.bus.partitions import partition_of, stream_of
from shared.config import Settings
from tests.support.bus import (
    Load,
    applied_order,
    assert_each_subject_in_sequence,
    background,
    emit_visitor_events,
    relay,
    some_more_applied,
    start_bus_worker,
    until_applied,
)
from tests.support.bus_worker import GROUP, effect_handler
from tests.support.cli import cli
from tests.support.server import eventually

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTITIONS = 4


@pytest.fixture
def partitioned(settings: Settings) -> Settings:
    return settings.with_overrides(stream_partitions=PARTITIONS, consumer_lease_seconds=2.0)


def member(
    settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis, name: str, delay: float = 0.0
) -> PartitionedConsumer:
    return PartitionedConsumer(
        settings,
        pool,
        redis,
        group=GROUP,
        consumer_name=name,
        handlers={VisitorCreated: effect_handler(delay)},
    )


def test_a_subject_always_maps_to_the_same_partition() -> None:
    subjects = [str(uuid.uuid4()) for _ in range(4000)]
    for subject in subjects[:50]:
        assert partition_of(subject, 1) == 0
        assert partition_of(subject, 4) == partition_of(subject, 4)
    # Spread evenly enough that no partition is a hot spot.
    counts = [0] * PARTITIONS
    for subject in subjects:
        counts[partition_of(subject, PARTITIONS)] += 1
    assert min(counts) > len(subjects) / PARTITIONS * 0.8, counts


async def test_the_outbox_writes_each_event_to_its_subject_s_partition_as_python_computes_it(
    partitioned: Settings, pool: asyncpg.Pool
) -> None:
    # The statement computes the partition itself (a subject may be known only to SQL): it
    # must agree with the Python function readers and tools use, for any subject.
    subjects = [str(uuid.uuid4()) for _ in range(300)] + ["ünïcødé", "", "a" * 500]
    for partitions in (2, 3, PARTITIONS, 7):
        settings = partitioned.with_overrides(stream_partitions=partitions)
        await pool.execute("TRUNCATE outbox")
        await emit_visitor_events(pool, settings, subjects)
        rows = await pool.fetch("SELECT stream, payload FROM outbox")
        by_subject = {_subject(r["payload"]): r["stream"] for r in rows}
        assert len(by_subject) == len(subjects)
        assert all(
            stream == stream_of(subject, settings.event_streams)
            for subject, stream in by_subject.items()
        )
        assert set(by_subject.values()) == set(settings.event_streams)


async def test_one_partition_keeps_the_one_stream_and_several_carry_hash_tags(
    settings: Settings,
) -> None:
    assert settings.event_streams == (settings.events_stream,)
    tagged = settings.with_overrides(stream_partitions=3).event_streams
    assert tagged == tuple(f"{settings.events_stream}:{{{i}}}" for i in range(3))
    # A partition's dead letters sit in its hash slot.
    assert settings.dead_letter_stream("g", tagged[1]).startswith(tagged[1] + ":")


async def test_relays_share_the_partitions_one_owner_each_and_take_over_a_stopped_one(
    partitioned: Settings, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    first, second = relay(partitioned, redis), relay(partitioned, redis)
    subjects = [f"s{i}" for i in range(40)]
    stop_first = asyncio.Event()
    first_task = asyncio.create_task(first.run(stop_first))
    async with background(second.run):
        await eventually(lambda: _true(bool(first.owned) or bool(second.owned)))
        # Whoever came first holds every partition; the other holds none: never two.
        await asyncio.sleep(0.5)
        assert not set(first.owned) & set(second.owned)
        assert sorted(first.owned + second.owned) == sorted(partitioned.event_streams)
        await emit_visitor_events(pool, partitioned, subjects * 3)
        await eventually(lambda: _all_published(pool))
        stop_first.set()
        await asyncio.wait_for(first_task, timeout=10)
        # The stopped relay's partitions go to the other one.
        await eventually(lambda: _true(len(second.owned) == PARTITIONS))
        await emit_visitor_events(pool, partitioned, subjects)
        await eventually(lambda: _all_published(pool))
    for stream in partitioned.event_streams:
        subjects_here = [_subject(f[EVENT_FIELD]) for _id, f in await redis.xrange(stream)]
        assert subjects_here, stream
        assert all(stream_of(s, partitioned.event_streams) == stream for s in subjects_here)
    total = sum([await redis.xlen(s) for s in partitioned.event_streams])
    assert total == len(subjects) * 4


async def test_consumers_scaled_1_3_1_mid_load_apply_every_event_once_in_subject_order(
    partitioned: Settings, effects: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    load = Load(effects, partitioned, subjects=60)
    a = member(partitioned, effects, redis, "a", delay=0.002)
    async with background(relay(partitioned, redis).run), background(a.run):
        stop_load = asyncio.Event()
        load_task = asyncio.create_task(load.run(stop_load))
        await eventually(lambda: _true(len(a.owned) == PARTITIONS))
        await some_more_applied(effects)
        b = member(partitioned, effects, redis, "b", delay=0.002)
        c = member(partitioned, effects, redis, "c", delay=0.002)
        async with background(b.run), background(c.run):
            # Scaled up: every member reads its share (4 over 3: 2, 1, 1), none twice.
            await eventually(
                lambda: _true(
                    sorted(a.owned + b.owned + c.owned) == list(range(PARTITIONS))
                    and all(m.owned for m in (a, b, c))
                ),
                timeout=20,
            )
            await some_more_applied(effects)
        # Scaled down: the stopped members handed their partitions back.
        await eventually(lambda: _true(len(a.owned) == PARTITIONS), timeout=20)
        await some_more_applied(effects)
        stop_load.set()
        await load_task
        await until_applied(effects, load.emitted, timeout=60)
    assert await effects.fetchval("SELECT count(DISTINCT event_id) FROM bus_effects") == (
        load.emitted
    )
    assert_each_subject_in_sequence(await applied_order(effects))


@pytest.mark.slow
async def test_a_killed_consumer_s_partitions_are_taken_over_with_nothing_lost_or_reordered(
    partitioned: Settings, effects: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    def start(name: str) -> subprocess.Popen[bytes]:
        return start_bus_worker(partitioned, name)

    load = Load(effects, partitioned, subjects=60)
    survivor, victim = start("survivor"), start("victim")
    try:
        async with background(relay(partitioned, redis).run), background(load.run):
            await _members_own(effects, {"survivor", "victim"})
            await some_more_applied(effects)
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            await _members_own(effects, {"survivor"}, timeout=30)
            await some_more_applied(effects)
        await until_applied(effects, load.emitted, timeout=60)
    finally:
        for process in (survivor, victim):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
    assert await effects.fetchval("SELECT count(DISTINCT event_id) FROM bus_effects") == (
        load.emitted
    )
    assert await effects.fetchval("SELECT count(*) FROM bus_effects") == load.emitted
    assert_each_subject_in_sequence(await applied_order(effects))


async def test_a_process_that_lost_its_partition_applies_nothing_more_of_it(
    partitioned: Settings, pool: asyncpg.Pool
) -> None:
    def leases(name: str) -> PartitionLeases:
        return PartitionLeases(
            pool, group=GROUP, member=name, partitions=PARTITIONS, lease_seconds=2, read_margin=0
        )

    old, new = leases("old"), leases("new")
    await old.heartbeat()
    taken = await old.acquire(PARTITIONS)
    assert sorted(taken) == list(range(PARTITIONS))
    lease = old.lease(0, taken[0])
    async with pool.acquire() as conn, conn.transaction():
        await lease.fence(conn)  # the owner applies
    await new.heartbeat()
    assert await new.acquire(PARTITIONS) == {}  # a live owner keeps its partitions
    # The old owner stalls past its lease while one of its applies is still running: the
    # takeover skips that partition until the apply ends, and takes the rest.
    await pool.execute(
        "UPDATE consumer_members SET seen_at = now() - interval '1 minute' WHERE member = 'old'"
    )
    async with pool.acquire() as conn, conn.transaction():
        await lease.fence(conn)
        assert sorted(await new.acquire(PARTITIONS)) == [1, 2, 3]
    assert list(await new.acquire(PARTITIONS)) == [0]
    with pytest.raises(LeaseLost):
        async with pool.acquire() as conn, conn.transaction():
            await lease.fence(conn)
    # A member gone for good (a pod that never came back under its name) is forgotten.
    await pool.execute(
        "UPDATE consumer_members SET seen_at = now() - interval '2 days' WHERE member = 'old'"
    )
    await new.acquire(PARTITIONS)
    assert await pool.fetchval("SELECT array_agg(member) FROM consumer_members") == ["new"]


async def test_a_partition_s_dead_letters_stay_beside_it_and_replay_into_it(
    partitioned: Settings, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    async def handle(event: VisitorCreated, conn: asyncpg.Connection) -> None:
        if event.subject.startswith("poison"):
            raise PoisonMessage("never applies")

    consumer = PartitionedConsumer(
        partitioned, pool, redis, group=GROUP, consumer_name="m", handlers={VisitorCreated: handle}
    )
    poisoned = [f"poison-{i}" for i in range(12)]
    async with background(relay(partitioned, redis).run), background(consumer.run):
        await emit_visitor_events(pool, partitioned, [*poisoned, "fine"])

        async def parked() -> bool:
            return len(await dead_letters(redis, partitioned, GROUP)) == len(poisoned)

        await eventually(parked, timeout=20)
    listed = await dead_letters(redis, partitioned, GROUP)
    assert {entry["stream"] for entry in listed} == {
        stream_of(s, partitioned.event_streams) for s in poisoned
    }
    for entry in listed:
        subject = _subject(entry["event"].encode())
        assert entry["stream"] == stream_of(subject, partitioned.event_streams)
    lengths = {s: await redis.xlen(s) for s in partitioned.event_streams}
    assert await replay_dead_letters(redis, partitioned, GROUP) == len(poisoned)
    for stream in partitioned.event_streams:
        back = sum(1 for e in listed if e["stream"] == stream)
        assert await redis.xlen(stream) == lengths[stream] + back
    assert await dead_letters(redis, partitioned, GROUP) == []


def _subject(raw: bytes | str) -> str:
    return header_decoder.decode(raw).subject


async def _true(value: bool) -> bool:
    return value


async def _all_published(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval("SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL"))


async def _members_own(pool: asyncpg.Pool, members: set[str], *, timeout: float = 20) -> None:
    """Wait until exactly ``members`` own every partition between them."""

    async def settled() -> bool:
        rows = await pool.fetch(
            "SELECT partition, owner FROM partition_leases WHERE consumer_group = $1", GROUP
        )
        owners = {r["owner"] for r in rows}
        return len(rows) == PARTITIONS and owners == members

    await eventually(settled, timeout=timeout)


async def test_changing_the_partition_count_after_draining_loses_nothing_and_keeps_order(
    settings: Settings, effects: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    # The documented procedure: stop the writers, wait until `streams status --check` says
    # every stream is drained, switch every process to the new count, start again.
    one = settings.with_overrides(stream_partitions=1)
    four = settings.with_overrides(stream_partitions=PARTITIONS, consumer_lease_seconds=2.0)
    load = Load(effects, one, subjects=40)
    consumer = StreamConsumer(
        one,
        effects,
        redis,
        group=GROUP,
        consumer_name="before",
        handlers={VisitorCreated: effect_handler(0.002)},
    )
    async with background(relay(one, redis).run), background(consumer.run):
        async with background(load.run):
            await some_more_applied(effects)
        code, status, err = await cli(one, "streams", "status", "--check")
        if code == 0:  # the load stopped just after the consumer caught up: still a check
            assert status["drained"], status
        else:
            assert code == 3, err
            assert not status["drained"]

        async def drained() -> bool:
            code, _status, _err = await cli(one, "streams", "status", "--check")
            return code == 0

        await eventually(drained, timeout=60)
    before = load.emitted
    load = Load(effects, four, subjects=40)
    members = [member(four, effects, redis, name, delay=0.002) for name in ("x", "y")]
    async with (
        background(relay(four, redis).run),
        background(members[0].run),
        background(members[1].run),
    ):
        async with background(load.run):
            await some_more_applied(effects)
        await until_applied(effects, before + load.emitted, timeout=60)
        code, status, err = await cli(four, "streams", "status", "--check")
        assert code == 0, (status, err)
        assert [s["stream"] for s in status["streams"]] == list(four.event_streams)
    assert await effects.fetchval("SELECT count(DISTINCT event_id) FROM bus_effects") == (
        before + load.emitted
    )
    # Subjects' sequence numbers carry on across the switch, each in order.
    assert_each_subject_in_sequence(await applied_order(effects))


async def test_streams_status_refuses_a_partition_count_out_of_range(settings: Settings) -> None:
    code, _out, err = await cli(settings, "streams", "status", "--partitions", "0")
    assert code == 2
    assert "--partitions" in err


def test_the_typed_client_names_the_partitions_as_the_server_does(settings: Settings) -> None:
    for partitions in (1, 2, 4, 7):
        for cluster in (False, True):
            server = settings.with_overrides(stream_partitions=partitions, redis_cluster=cluster)
            assert client_streams(
                settings.stream_prefix, partitions=partitions, cluster=cluster
            ) == list(server.event_streams)
