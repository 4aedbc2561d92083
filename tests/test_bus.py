"""Promise 9: nothing is lost between Postgres and Redis, and nothing is applied twice.

State changes commit together with an outbox row; the relay publishes it; consumers apply
each event exactly once, in order per subject, and park in a dead-letter stream an event that
still fails after N deliveries, or at once one that never can succeed (poison).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from shared.bus.consumer import StreamConsumer
from shared.bus.dead_letters import dead_letters, replay_dead_letters
from shared.bus.events import (
    EVENT_FIELD,
    ContactAuthenticated,
    ContactAuthenticatedData,
    VisitorCreated,
    VisitorCreatedData,
    event_decoder,
)
from shared.bus.handlers import Batched, PoisonMessage
from shared.bus.outbox import Outbox, late
from shared.config import Settings
from shared.db import create_pool
from shared.redis import Redis, create_redis
from tests.support.bus import (
    applied_order,
    assert_each_subject_in_sequence,
    background,
    emit_visitor_events,
    relay,
    start_bus_worker,
    until_applied,
)
from tests.support.bus_worker import GROUP, effect_handler
from tests.support.cli import cli
from tests.support.proxy import fault_proxy
from tests.support.server import eventually

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def stream_events(redis: aioredis.Redis, settings: Settings) -> list[dict[str, Any]]:
    entries = await redis.xrange(settings.event_streams[0])
    return [msgspec.json.decode(fields[EVENT_FIELD]) for _id, fields in entries]


async def test_event_commits_with_its_state_change_or_not_at_all(
    settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    outbox = Outbox(settings.event_streams[0])
    with pytest.raises(RuntimeError):  # outside a transaction it could outlive a rollback
        async with pool.acquire() as conn:
            await outbox.emit(
                conn,
                VisitorCreated,
                org_id="o",
                subject="s",
                data=VisitorCreatedData(visitor_id="v", widget_token_id="w"),
            )
    with pytest.raises(ZeroDivisionError):
        async with pool.acquire() as conn, conn.transaction():
            await outbox.emit(
                conn,
                VisitorCreated,
                org_id="o",
                subject="s",
                data=VisitorCreatedData(visitor_id="v", widget_token_id="w"),
            )
            _ = 1 / 0
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0

    committed = await emit_visitor_events(pool, settings, ["visitor-1"])
    async with background(relay(settings, redis).run):

        async def published() -> bool:
            return len(await stream_events(redis, settings)) == 1

        await eventually(published)
    [event] = await stream_events(redis, settings)
    # Readable by any language with a plain Redis client: one JSON field, camelCase envelope.
    assert event["id"] == committed[0]
    assert event["type"] == "visitor.created"
    assert {
        "id",
        "type",
        "version",
        "orgId",
        "subject",
        "seq",
        "occurredAt",
        "traceparent",
        "data",
    } <= set(event)
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0


async def test_an_event_written_by_its_change_s_own_statement_carries_what_the_statement_computed(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    # One statement, no BEGIN/COMMIT: the row and its event commit together or not at all.
    outbox = Outbox(settings.event_streams[0])
    await pool.execute("CREATE TABLE things (id uuid PRIMARY KEY, name text NOT NULL)")
    # Timestamps come out in UTC even where the database's own default zone is not UTC.
    database = await pool.fetchval("SELECT current_database()")
    await pool.execute(f"ALTER DATABASE \"{database}\" SET timezone TO 'Asia/Kathmandu'")
    pool = await create_pool(settings)

    def insert(name: str, *, existing: bool = False) -> tuple[str, list[Any]]:
        event = outbox.insert(
            ContactAuthenticated,
            org_id="o",
            subject=late("subject"),
            data=ContactAuthenticatedData(
                contact_id=late("thing_id"),
                jti=name,  # a plain value beside the computed ones
                expires_at=late("at"),
                created=late("fresh"),
                external_id=late("nothing"),  # NULL in SQL: null in JSON, not a lost event
                # Looks like a placeholder; must stay a plain string.
                email="\x00" + name + ":0",
            ),
            source="made",
            first_param=3,
        )
        statement = f"""WITH t AS (INSERT INTO things SELECT gen_random_uuid(), $1
                                    WHERE NOT $2 RETURNING id),
                           made AS (SELECT id::text AS subject, id AS thing_id,
                                           timestamptz '2030-01-02 03:04:05+00' AS at,
                                           true AS fresh, NULL::text AS nothing FROM t),
                           {event.ctes}
                      SELECT thing_id FROM made"""
        return statement, [name, existing, *event.params]

    statement, params = insert("first")
    thing_id = await pool.fetchval(statement, *params)
    statement, params = insert("none", existing=True)
    assert await pool.fetchval(statement, *params) is None  # no source row, no event
    await pool.execute("ALTER TABLE things ADD CHECK (length(name) < 10)")
    statement, params = insert("x" * 10)
    with pytest.raises(asyncpg.CheckViolationError):  # the change fails: no event either
        await pool.fetchval(statement, *params)
    [payload] = await pool.fetchval("SELECT array_agg(payload) FROM outbox")
    await pool.close()
    event = event_decoder.decode(payload)
    assert isinstance(event, ContactAuthenticated)
    assert event.subject == event.data.contact_id == str(thing_id)
    assert event.seq == 1
    assert event.data.expires_at == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert event.data.created is True
    assert event.data.jti == "first"
    assert event.data.email == "\x00first:0"
    assert event.data.external_id is None
    assert b'"expiresAt":"2030-01-02T03:04:05+00:00"' in payload


async def test_sequence_numbers_are_per_subject_and_gapless(
    settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    await emit_visitor_events(pool, settings, ["a", "b", "a", "a", "b"])
    async with background(relay(settings, redis).run):

        async def published() -> bool:
            return len(await stream_events(redis, settings)) == 5

        await eventually(published)
    events = await stream_events(redis, settings)
    assert [(e["subject"], e["seq"]) for e in events] == [
        ("a", 1),
        ("b", 1),
        ("a", 2),
        ("a", 3),
        ("b", 2),
    ]


async def test_process_killed_between_commit_and_publish_still_gets_its_event_published(
    settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    # A child process commits a state change with its event, then dies by SIGKILL before any
    # relay could publish it.
    script = (
        "import asyncio, os, signal, asyncpg\n"
        "from shared.bus.outbox import Outbox\n"
        "from shared.bus.events import VisitorCreated, VisitorCreatedData\n"
        "async def main():\n"
        "    conn = await asyncpg.connect(os.environ['DATABASE_URL'])\n"
        "    async with conn.transaction():\n"
        '        await conn.execute("CREATE TABLE state_change (id int)")\n'
        "        await Outbox(os.environ['STREAM']).emit(conn, VisitorCreated, org_id='o', subject='doomed',"
        " data=VisitorCreatedData(visitor_id='doomed', widget_token_id='w'))\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "DATABASE_URL": settings.database_url, "STREAM": settings.event_streams[0]}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert await pool.fetchval("SELECT to_regclass('state_change') IS NOT NULL")
    assert await redis.xlen(settings.event_streams[0]) == 0

    async with background(relay(settings, redis).run):

        async def published() -> bool:
            return [e["subject"] for e in await stream_events(redis, settings)] == ["doomed"]

        await eventually(published)


async def test_only_one_relay_publishes_at_a_time(
    settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    await emit_visitor_events(pool, settings, [f"s{i}" for i in range(300)])
    async with background(relay(settings, redis).run), background(relay(settings, redis).run):

        async def published() -> bool:
            return await redis.xlen(settings.event_streams[0]) >= 300

        await eventually(published)
        await asyncio.sleep(0.3)
    assert await redis.xlen(settings.event_streams[0]) == 300


async def pending(redis: aioredis.Redis, settings: Settings) -> int:
    """Unacked messages of the test group; -1 before the consumer has created the group."""
    groups = await redis.xinfo_groups(settings.event_streams[0])
    return next((int(g["pending"]) for g in groups if g["name"] == GROUP.encode()), -1)


def consumer(
    settings: Settings, pool: asyncpg.Pool, redis: Redis, handler: Any, **overrides: Any
) -> StreamConsumer:
    return StreamConsumer(
        settings.with_overrides(**overrides) if overrides else settings,
        pool,
        redis,
        group=GROUP,
        consumer_name=f"c-{uuid.uuid4().hex[:6]}",
        handlers={VisitorCreated: handler},
    )


async def publish_all(
    settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis, n: int
) -> None:
    async with background(relay(settings, redis).run):

        async def published() -> bool:
            return await redis.xlen(settings.event_streams[0]) >= n

        await eventually(published, timeout=60)


async def test_a_lost_read_reply_never_lets_a_subject_s_later_event_overtake(
    settings: Settings, effects: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    # XREADGROUP ">" ran (the entry is now pending for us) but the reply was lost. Sending it
    # again would hand over the *next* entry and leave the first for the reclaim, 30 s later.
    await emit_visitor_events(effects, settings, ["s", "s"])
    await publish_all(settings, effects, redis, 2)
    async with fault_proxy(settings.redis_url) as (proxy, url):
        through = settings.with_overrides(redis_url=url)
        client = create_redis(through)  # the workers' client
        worker = consumer(through, effects, client, effect_handler(0), consumer_batch=1)
        await worker.ensure_group()
        proxy.lose_reply_to(b"XREADGROUP", b"\r\n>\r\n")
        async with background(worker.run):
            await until_applied(effects, 2)
        await client.aclose()
    assert await applied_order(effects) == [("s", 1), ("s", 2)]


async def test_a_later_event_waits_behind_an_earlier_one_that_failed_and_awaits_its_retry(
    settings: Settings, effects: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    # seq 1 fails once and waits, pending, for its retry; seq 2 arrives by a new read
    # meanwhile. Applied at once it would overtake seq 1.
    failed_once = asyncio.Event()
    record = effect_handler(0)

    async def handler(event: VisitorCreated, conn: asyncpg.Connection) -> None:
        if event.seq == 1 and not failed_once.is_set():
            failed_once.set()
            raise RuntimeError("a bug that the retry does not hit")
        await record(event, conn)

    await emit_visitor_events(effects, settings, ["s"])
    await publish_all(settings, effects, redis, 1)
    worker = consumer(settings, effects, redis, handler, consumer_claim_idle_ms=300)
    async with background(worker.run):
        await asyncio.wait_for(failed_once.wait(), timeout=10)
        await emit_visitor_events(effects, settings, ["s"])
        await publish_all(settings, effects, redis, 2)
        await until_applied(effects, 2)
    assert await applied_order(effects) == [("s", 1), ("s", 2)]
    assert not await redis.xpending_range(settings.event_streams[0], GROUP, "-", "+", 10)


async def test_a_redelivered_event_is_applied_once(
    settings: Settings, effects: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    await emit_visitor_events(effects, settings, ["x"])
    await publish_all(settings, effects, redis, 1)
    # The relay crashed after XADD but before marking the row: the same event is published again.
    [(_, fields)] = await redis.xrange(settings.event_streams[0])
    await redis.xadd(settings.event_streams[0], {EVENT_FIELD: fields[EVENT_FIELD]})

    async with background(consumer(settings, effects, redis, effect_handler(0)).run):

        async def all_acked() -> bool:
            groups = await redis.xinfo_groups(settings.event_streams[0])
            return any(g["pending"] == 0 and g["entries-read"] == 2 for g in groups)

        await eventually(all_acked)
    assert await effects.fetchval("SELECT count(*) FROM bus_effects") == 1


async def test_a_failing_event_is_dead_lettered_after_n_deliveries_garbage_at_once_others_flow(
    settings: Settings, effects: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    bad_subject = "poison"
    tries: list[str] = []

    async def handler(event: VisitorCreated, conn: asyncpg.Connection) -> None:
        tries.append(event.subject)
        if event.subject == bad_subject:
            raise ValueError("this event can never be applied")
        await effect_handler(0)(event, conn)

    garbage = await redis.xadd(settings.event_streams[0], {EVENT_FIELD: b"{not json"})
    await emit_visitor_events(effects, settings, ["ok-1", bad_subject, "ok-2", "ok-3"])
    await publish_all(settings, effects, redis, 5)

    max_deliveries = 3
    worker = consumer(
        settings,
        effects,
        redis,
        handler,
        consumer_max_deliveries=max_deliveries,
        consumer_claim_idle_ms=50,
    )
    async with background(worker.run):

        async def settled() -> bool:
            return (
                await pending(redis, settings) == 0 and await redis.xlen(worker.dead_letters) == 2
            )

        await eventually(settled, timeout=20)
        await asyncio.sleep(0.3)  # nothing further may arrive
    letters = {
        letter["originalId"]: letter for letter in await dead_letters(redis, settings, GROUP)
    }
    assert len(letters) == 2
    # The garbage can never decode: parked on its first delivery. The failing event may be
    # a passing fault: it got every delivery first.
    assert letters.pop(garbage.decode())["deliveries"] == "1"
    [failing] = letters.values()
    assert failing["deliveries"] == str(max_deliveries)
    assert tries.count(bad_subject) == max_deliveries
    assert sorted(r["subject"] for r in await effects.fetch("SELECT subject FROM bus_effects")) == [
        "ok-1",
        "ok-2",
        "ok-3",
    ]

    # Once the bug is fixed, a replay applies the parked event; the garbage stays garbage.
    bad_subject = "fixed"
    assert await replay_dead_letters(redis, settings, GROUP) == 2
    assert await redis.xlen(worker.dead_letters) == 0
    async with background(
        consumer(
            settings,
            effects,
            redis,
            handler,
            consumer_max_deliveries=max_deliveries,
            consumer_claim_idle_ms=50,
        ).run
    ):

        async def replayed() -> bool:
            return (
                await effects.fetchval("SELECT count(*) FROM bus_effects WHERE subject = 'poison'")
                == 1
            )

        await eventually(replayed, timeout=20)

        async def garbage_parked_again() -> bool:
            return await redis.xlen(worker.dead_letters) == 1

        await eventually(garbage_parked_again, timeout=20)


async def test_an_event_its_handler_calls_poison_is_dead_lettered_at_once_and_its_subject_goes_on(
    settings: Settings, effects: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    tries: list[tuple[str, int]] = []

    async def handler(event: VisitorCreated, conn: asyncpg.Connection) -> None:
        tries.append((event.subject, event.seq))
        if event.subject == "never" and event.seq == 1:
            raise PoisonMessage("this event can never be applied")
        await effect_handler(0)(event, conn)

    await emit_visitor_events(effects, settings, ["ok-1", "never", "never", "ok-2"])
    await publish_all(settings, effects, redis, 4)
    # Claim idle and deliveries set so that a retry would show: the reclaim would redeliver
    # the poison within the wait below, and only its fifth delivery would park it.
    worker = consumer(
        settings,
        effects,
        redis,
        handler,
        consumer_max_deliveries=5,
        consumer_claim_idle_ms=50,
    )
    async with background(worker.run):

        async def settled() -> bool:
            return (
                await pending(redis, settings) == 0 and await redis.xlen(worker.dead_letters) >= 1
            )

        await eventually(settled, timeout=20)
        await asyncio.sleep(0.5)  # nothing further may arrive
    [letter] = await dead_letters(redis, settings, GROUP)
    assert letter["deliveries"] == "1"
    assert "PoisonMessage" in letter["error"]
    parked = msgspec.json.decode(letter["event"])
    assert (parked["subject"], parked["seq"]) == ("never", 1)
    assert tries.count(("never", 1)) == 1
    # The subject's next event was not held behind the parked one.
    assert sorted(await applied_order(effects)) == [("never", 2), ("ok-1", 1), ("ok-2", 1)]


def batched_effects(
    poison: str | None, batch_sizes: list[int], failure: type[Exception] = ValueError
) -> Batched:
    """A batch-capable handler writing ``bus_effects``; the batch form writes every event's
    effect first and only then fails on the poison one, so only a rollback keeps the good
    ones of that batch from being applied twice."""

    async def one(event: VisitorCreated, conn: asyncpg.Connection) -> None:
        if event.subject == poison:
            raise failure("this event can never be applied")
        await effect_handler(0)(event, conn)

    async def many(events: Sequence[VisitorCreated], conn: asyncpg.Connection) -> None:
        batch_sizes.append(len(events))
        await conn.execute(
            """INSERT INTO bus_effects (event_id, subject, seq)
               SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[])""",
            [e.id for e in events],
            [e.subject for e in events],
            [e.seq for e in events],
        )
        if any(e.subject == poison for e in events):
            raise failure("this event can never be applied")

    return Batched(one=one, many=many)


@pytest.mark.parametrize(
    ("failure", "deliveries"),
    [(ValueError, 3), (PoisonMessage, 1)],
    ids=["failing-event-retried", "poison-parked-at-once"],
)
async def test_a_poison_message_in_a_batch_is_dead_lettered_and_the_rest_applied_once(
    settings: Settings,
    effects: asyncpg.Pool,
    redis: aioredis.Redis,
    failure: type[Exception],
    deliveries: int,
) -> None:
    good = [f"ok-{i}" for i in range(12)]
    await emit_visitor_events(effects, settings, [*good[:5], "poison", *good[5:]])
    await publish_all(settings, effects, redis, 13)

    max_deliveries = 3
    batch_sizes: list[int] = []
    worker = consumer(
        settings,
        effects,
        redis,
        batched_effects("poison", batch_sizes, failure),
        consumer_max_deliveries=max_deliveries,
        consumer_claim_idle_ms=50,
        consumer_concurrency=1,  # one transaction for the whole read: the poison is inside it
    )
    async with background(worker.run):

        async def settled() -> bool:
            return (
                await pending(redis, settings) == 0 and await redis.xlen(worker.dead_letters) == 1
            )

        await eventually(settled, timeout=20)
        await asyncio.sleep(0.3)  # nothing further may arrive
    assert batch_sizes and batch_sizes[0] == 13  # the batch path really ran, and failed
    [letter] = await dead_letters(redis, settings, GROUP)
    assert letter["deliveries"] == str(deliveries)
    assert msgspec.json.decode(letter["event"])["subject"] == "poison"
    rows = await effects.fetch("SELECT subject FROM bus_effects ORDER BY subject")
    assert sorted(r["subject"] for r in rows) == sorted(good)  # each exactly once
    assert (
        await effects.fetchval("SELECT count(*) FROM processed_events WHERE consumer = $1", GROUP)
        == 12
    )


async def test_a_batching_consumer_never_runs_two_events_of_a_subject_at_once(
    settings: Settings, effects: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    subjects = [f"subject-{i % 7}" for i in range(350)]
    await emit_visitor_events(effects, settings, subjects)
    await publish_all(settings, effects, redis, len(subjects))
    batch_sizes: list[int] = []
    in_flight: set[str] = set()
    overlaps: list[str] = []
    plain = batched_effects(None, batch_sizes)

    async def many(events: Sequence[VisitorCreated], conn: asyncpg.Connection) -> None:
        mine = {e.subject for e in events}
        if len(mine) < len(events) or mine & in_flight:
            overlaps.extend(sorted(mine))
        in_flight.update(mine)
        try:
            await plain.many(events, conn)
            await asyncio.sleep(0.002)  # widen the window another batch could overlap in
        finally:
            in_flight.difference_update(mine)

    worker = consumer(
        settings,
        effects,
        redis,
        Batched(one=plain.one, many=many),
        consumer_batch=60,
        consumer_concurrency=2,
    )
    async with background(worker.run):
        await until_applied(effects, len(subjects), timeout=30)
    assert max(batch_sizes) > 1  # several subjects per transaction
    assert overlaps == []
    assert_each_subject_in_sequence(await applied_order(effects))


async def test_one_consumer_applies_each_subjects_events_in_sequence_order(
    settings: Settings, effects: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    subjects = [f"subject-{i % 4}" for i in range(400)]
    await emit_visitor_events(effects, settings, subjects)
    await publish_all(settings, effects, redis, len(subjects))
    # Subjects run side by side inside a batch; one subject's events never overtake each other.
    worker = consumer(settings, effects, redis, effect_handler(0), consumer_batch=37)
    async with background(worker.run):
        await until_applied(effects, len(subjects), timeout=30)
    assert_each_subject_in_sequence(await applied_order(effects))


async def test_many_consumers_converge_to_the_sequential_state_by_sequence_number(
    settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    # Consumers of one group share the stream, so two of them can hold events of the same
    # subject at once. Handlers that keep state use the envelope's per-subject seq as a
    # version: the final state is what sequential application gives, and never goes back.
    await pool.execute(
        "CREATE TABLE subject_state (subject text PRIMARY KEY, version bigint NOT NULL, value text NOT NULL)"
    )

    async def last_writer_by_seq(event: VisitorCreated, conn: asyncpg.Connection) -> None:
        await conn.execute(
            """INSERT INTO subject_state (subject, version, value) VALUES ($1, $2, $3)
               ON CONFLICT (subject) DO UPDATE SET version = excluded.version, value = excluded.value
               WHERE subject_state.version < excluded.version""",
            event.subject,
            event.seq,
            event.id,
        )

    ids = await emit_visitor_events(pool, settings, ["contact-1"] * 1000)
    await publish_all(settings, pool, redis, 1000)
    workers = [
        consumer(settings, pool, redis, last_writer_by_seq, consumer_batch=25) for _ in range(4)
    ]
    async with (
        background(workers[0].run),
        background(workers[1].run),
        background(workers[2].run),
        background(workers[3].run),
    ):

        async def done() -> bool:
            return (
                await pending(redis, settings) == 0
                and await pool.fetchval("SELECT count(*) FROM processed_events") == 1000
            )

        await eventually(done, timeout=60)
    row = await pool.fetchrow(
        "SELECT version, value FROM subject_state WHERE subject = 'contact-1'"
    )
    assert (row["version"], row["value"]) == (1000, ids[-1])


@pytest.mark.slow
async def test_consumer_killed_mid_batch_applies_every_event_exactly_once(
    settings: Settings, effects: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    total = 3000
    await emit_visitor_events(effects, settings, [f"v{i}" for i in range(total)])
    await publish_all(settings, effects, redis, total)

    def start(name: str) -> subprocess.Popen[bytes]:
        return start_bus_worker(settings, name)

    for round_ in range(3):
        victim = start(f"victim-{round_}")
        try:

            async def some_applied(round_: int = round_) -> bool:
                count = await effects.fetchval("SELECT count(*) FROM bus_effects")
                return bool(count > (round_ + 1) * total // 5)

            await eventually(some_applied, timeout=60, interval=0.01)
        finally:
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
        assert await pending(redis, settings) > 0  # it really died holding unacked messages

    survivor = start("survivor")
    try:

        async def drained() -> bool:
            applied = await effects.fetchval("SELECT count(DISTINCT event_id) FROM bus_effects")
            return await pending(redis, settings) == 0 and applied == total

        await eventually(drained, timeout=120)
    finally:
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(timeout=30) == 0
    assert await effects.fetchval("SELECT count(*) FROM bus_effects") == total
    assert (
        await effects.fetchval("SELECT count(*) FROM processed_events WHERE consumer = $1", GROUP)
        == total
    )


async def test_the_cli_lists_and_replays_dead_letters(
    settings: Settings, redis: aioredis.Redis
) -> None:
    dead = settings.dead_letter_stream("crm")
    for i in range(250):  # more than one replay batch
        await redis.xadd(
            dead, {EVENT_FIELD: b'{"id":"e%d"}' % i, b"originalId": b"1-0", b"error": b"boom"}
        )
    code, listed, err = await cli(settings, "dlq", "list", "--group", "crm", "--count", "2")
    assert code == 0, err
    assert [(e["originalId"], e["error"]) for e in listed] == [("1-0", "boom")] * 2
    code, replayed, err = await cli(settings, "dlq", "replay", "--group", "crm", "--count", "120")
    assert (code, replayed) == (0, {"group": "crm", "replayed": 120}), err
    assert await redis.xlen(dead) == 130
    code, replayed, err = await cli(settings, "dlq", "replay", "--group", "crm")
    assert (code, replayed) == (0, {"group": "crm", "replayed": 130}), err
    assert await redis.xlen(dead) == 0
    replayed_events = [f[EVENT_FIELD] for _id, f in await redis.xrange(settings.event_streams[0])]
    assert replayed_events == [b'{"id":"e%d"}' % i for i in range(250)]  # in their order


def test_the_bus_stands_on_the_process_layer_alone() -> None:
    """No module of shared.bus pulls in the web layer or a service, even indirectly."""
    probe = (
        "import importlib, pkgutil, sys, shared.bus\n"
        "for m in pkgutil.iter_modules(shared.bus.__path__):\n"
        "    importlib.import_module('shared.bus.' + m.name)\n"
        "print('\\n'.join(sys.modules))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "shared.bus.consumer" in loaded
    assert [
        m
        for m in loaded
        if m in ("shared.web", "services") or m.startswith(("shared.web.", "services."))
    ] == []
