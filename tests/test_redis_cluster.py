"""REDIS_CLUSTER=true: every process on a real Redis Cluster (devstack.redis_cluster, three
primaries with a replica each) keeps the promises it keeps on one Redis, and never sends a
command whose keys span two slots — on the cluster alone, and on the whole scaled-out layout
(the cluster, four stream partitions, Postgres behind PgBouncer).

The promises are proven by the very tests that prove them on one Redis, called here with the
cluster's settings (this module's ``settings`` fixture, which ``pool``, ``redis`` and the
apps below take): the session promises and the session cache, rate limits, revocation
broadcasts reaching a second replica within a second, login merges applied once through the
relay and a consumer group, erasure leaving nothing in Redis (SCAN walks every primary), and
dead letters parked and replayed, by the consumer and by ``widget-identity dlq replay``.

No CROSSSLOT: redis-py refuses a cross-slot script, transaction or multi-key command before
sending it (and the flows above would fail); whatever it lets through, the cluster answers
with CROSSSLOT and counts in INFO errorstats. Every test here checks that no node's count
moved while it ran (``no_cross_slot``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ResponseError
from widget_identity_client.events import EventConsumer

from devstack import PgBouncer, ThrowawayCluster
from services import all_in_one
from shared.bus.relay import mark_key
from shared.config import Settings
from shared.errors import ConfigError
from shared.redis import create_redis, node_demoted
from tests import (
    test_bus,
    test_client_events,
    test_credential_lifecycle,
    test_erasure_everywhere,
    test_merges,
    test_session_promises,
    test_sessions,
)
from tests.conftest import settings_for
from tests.support.history_fixtures import Org, history_app, make_org
from tests.support.journeys import chat_anonymously, log_in, until_merge_done
from tests.support.replicas import Replicas, two_replicas
from tests.support.server import Api, eventually, running
from tests.support.tokens import OrgFixture, mint_contact_token, provision_org

# Every test here fails if a node answered CROSSSLOT while it ran.
pytestmark = pytest.mark.usefixtures("no_cross_slot")


@pytest.fixture(params=["cluster", "scaled-out"])
def settings(
    request: pytest.FixtureRequest, database_url: str, redis_cluster: ThrowawayCluster
) -> Settings:
    """Each promise on two layouts: one Redis Cluster, and the whole scaled-out layout —
    the cluster with the events in four partitions, and Postgres behind PgBouncer in
    transaction mode (the direct URL for the relay's and migrations' sessions)."""
    settings = settings_for(database_url, redis_cluster.seed_url).with_overrides(redis_cluster=True)
    if request.param == "scaled-out":
        bouncer: PgBouncer = request.getfixturevalue("bouncer")
        settings = settings.with_overrides(
            stream_partitions=4,
            consumer_lease_seconds=2.0,
            database_url=bouncer.url_for(database_url),
            database_direct_url=database_url,
            database_pool_mode="transaction",
        )
    return settings


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with running(all_in_one.create_app(settings)) as client:
        yield client


@pytest.fixture
async def org(api: Api) -> OrgFixture:
    return await provision_org(
        api, origins=(test_sessions.ORIGIN,), settings=test_sessions.WIDGET_SETTINGS
    )


@pytest.fixture
async def replicas(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Replicas]:
    async with two_replicas(settings, pool) as both:
        yield both


@pytest.fixture
async def history_api(settings: Settings) -> AsyncIterator[Api]:
    async with running(history_app(settings)) as client:
        yield client


@pytest.fixture
async def history_org(pool: asyncpg.Pool) -> Org:
    return await make_org(pool)


# --- the names and the client ---------------------------------------------------------


def test_on_a_cluster_every_stream_and_the_keys_beside_it_share_a_slot() -> None:
    env = {"DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://h:7000"}
    single = Settings.from_env(env)
    # One Redis, one partition: today's names.
    assert single.event_streams == ("wi:events",)
    assert (single.dead_letter_stream("history"), mark_key("wi:events")) == (
        "wi:events:dlq:history",
        "wi:events:published",
    )
    for partitions in ("1", "4"):
        cluster = Settings.from_env(
            {**env, "REDIS_CLUSTER": "true", "STREAM_PARTITIONS": partitions}
        )
        for stream in cluster.event_streams:
            for beside in (cluster.dead_letter_stream("history", stream), mark_key(stream)):
                assert beside.startswith(stream)  # found by a SCAN of the prefix
                assert key_slot(beside.encode()) == key_slot(stream.encode())


def test_a_prefix_with_braces_is_refused_on_a_cluster() -> None:
    with pytest.raises(ConfigError, match="STREAM_PREFIX"):
        Settings.from_env(
            {
                "DATABASE_URL": "postgresql://x/y",
                "REDIS_URL": "redis://h:7000",
                "REDIS_CLUSTER": "true",
                "STREAM_PREFIX": "wi}:",
            }
        )


def test_redis_url_names_one_or_several_seed_nodes_on_a_cluster() -> None:
    env = {"DATABASE_URL": "postgresql://x/y", "REDIS_CLUSTER": "true"}
    seeds = Settings.from_env({**env, "REDIS_URL": "redis://a:7000, redis://b:7001"})
    assert seeds.redis_url == "redis://a:7000,redis://b:7001"
    for bad in ("unix:///tmp/redis.sock", "redis://a:7000,unix:///x", "redis://:7000"):
        with pytest.raises(ConfigError, match="REDIS_URL"):
            Settings.from_env({**env, "REDIS_URL": bad})
    with pytest.raises(ConfigError, match="REDIS_URL"):  # a comma list is for a cluster
        Settings.from_env({**env, "REDIS_CLUSTER": "false", "REDIS_URL": "redis://a:1,b:2"})


async def test_any_seed_that_answers_will_do(
    settings: Settings, redis_cluster: ThrowawayCluster
) -> None:
    nobody = "redis://127.0.0.1:1"  # nothing listens on port 1
    client = create_redis(settings.with_overrides(redis_url=f"{nobody},{settings.redis_url}"))
    try:
        assert isinstance(client, RedisCluster)
        assert await client.ping()
        assert len(client.get_primaries()) == 3
    finally:
        await client.aclose()


async def test_the_guard_sees_a_cross_slot_command(redis_cluster: ThrowawayCluster) -> None:
    """``no_cross_slot`` proves something: a CROSSSLOT answer is counted by its node."""
    port = redis_cluster.ports[0]
    with redis_cluster.client(port) as node:
        before = redis_cluster.error_counts("CROSSSLOT")[port]
        with pytest.raises(ResponseError, match="same slot") as refused:
            node.mget("wi:a", "wi:b")  # two slots, whatever node owns them
        assert refused.value.status_code == "CROSSSLOT"
        assert redis_cluster.error_counts("CROSSSLOT")[port] == before + 1
        node.config_resetstat()  # leave the count where this test found it


# --- the promises, on a cluster ---------------------------------------------------------


async def test_promise_1_only_a_contact_token_verifies(
    api: Api, org: OrgFixture, pool: asyncpg.Pool
) -> None:
    await test_session_promises.test_promise_1_only_a_contact_token_verifies(api, org, pool)


async def test_promise_6_logout_buries_the_cached_session(
    api: Api, org: OrgFixture, pool: asyncpg.Pool
) -> None:
    await test_session_promises.test_promise_6_logout_unbinds_the_shared_browser(api, org, pool)


async def test_the_session_cache_answers_returning_visitors_without_a_postgres_write(
    api: Api, org: OrgFixture, pool: asyncpg.Pool, redis: Any, settings: Settings
) -> None:
    await test_sessions.test_returning_visitor_with_nothing_new_costs_no_postgres_write(
        api, org, pool, redis, settings
    )


@pytest.mark.parametrize(
    ("limit_name", "per_visitor"),
    [("sessionsPerVisitor", True), ("sessionsPerWidgetToken", False), ("sessionsPerIp", False)],
)
async def test_rate_limits_count_across_slots(api: Api, limit_name: str, per_visitor: bool) -> None:
    # Each request counts against three limits whose keys lie on different slots.
    await test_sessions.test_rate_limits_come_from_org_policy(api, limit_name, per_visitor)


async def test_a_revoked_api_key_is_refused_on_every_replica_within_a_second(
    replicas: Replicas,
) -> None:
    await test_credential_lifecycle.test_b_caches_an_api_key_so_only_the_broadcast_revokes_it_within_a_second(
        replicas
    )


async def test_a_revoked_contact_ends_its_cached_verified_session(
    api: Api, org: OrgFixture, pool: asyncpg.Pool
) -> None:
    await test_sessions.test_revocation_invalidates_the_cached_verified_session(api, org, pool)


async def test_a_login_merge_goes_through_the_relay_and_the_consumer_group_once(
    settings: Settings, pool: asyncpg.Pool, redis: Any
) -> None:
    await test_merges.test_promise_4_end_to_end_a_login_merges_what_the_browser_said_and_undo_puts_it_back(
        settings, pool
    )
    # The relay's mark sits on its stream's slot (a failover loses both or neither).
    marked = [s for s in settings.event_streams if await redis.get(mark_key(s)) is not None]
    assert marked
    for stream in marked:
        assert redis.keyslot(mark_key(stream)) == redis.keyslot(stream)


async def test_the_same_merge_delivered_twice_has_one_effect(
    history_api: Api, pool: asyncpg.Pool, redis: Any, settings: Settings, history_org: Org
) -> None:
    await test_merges.test_promise_4_the_same_merge_delivered_twice_has_one_effect(
        history_api, pool, redis, settings, history_org
    )


async def test_a_poison_merge_is_dead_lettered_with_its_ack_and_replayable(
    history_api: Api, pool: asyncpg.Pool, redis: Any, settings: Settings, history_org: Org
) -> None:
    await test_merges.test_a_poison_merge_request_is_dead_lettered_and_replayable(
        history_api, pool, redis, settings, history_org
    )


async def test_the_cli_lists_and_replays_dead_letters(settings: Settings, redis: Any) -> None:
    await test_bus.test_the_cli_lists_and_replays_dead_letters(settings, redis)


async def test_erasure_leaves_nothing_on_any_node(
    api: Api, pool: asyncpg.Pool, redis: Any, settings: Settings
) -> None:
    org = await provision_org(
        api,
        origins=(test_sessions.ORIGIN,),
        settings=test_erasure_everywhere.WIDGET_SETTINGS,
    )
    # Its Redis side reads every key of the prefix with SCAN, which a cluster client runs on
    # every primary: the caches, the stream and the dead letters lie on different nodes.
    await test_erasure_everywhere.test_promise_12_erasure_leaves_nothing_in_any_store_and_the_browsers_start_over(
        api, org, pool, redis, settings
    )


async def test_the_python_clients_event_consumer_reads_from_a_cluster(
    redis: Any, settings: Settings
) -> None:
    consumer = EventConsumer(
        redis,
        group=test_client_events.GROUP,
        consumer="worker-1",
        stream_prefix=settings.stream_prefix,
        block_ms=50,
    )
    await (
        test_client_events.test_a_failing_handler_leaves_the_event_pending_and_it_comes_again_first(
            consumer, redis
        )
    )


# --- failovers ------------------------------------------------------------------------


async def test_everything_carries_on_after_every_primary_failed_over(
    replicas: Replicas, redis_cluster: ThrowawayCluster
) -> None:
    """A manual failover of each primary in turn (the replica takes over, nothing is lost):
    the clients follow MOVED to the new primaries, the workers' blocked reads that the
    demoted node cut short ("UNBLOCKED") are read again, and the promises still hold."""
    api, org = replicas.a, replicas.org
    chat = await chat_anonymously(api, org)
    assert (await replicas.authenticate_on_b()).status == 200  # B caches the key
    for primary in redis_cluster.primaries():
        await asyncio.to_thread(redis_cluster.failover, primary)

    # A login after the failovers: its merge goes through the relay and the consumer group.
    minted = await mint_contact_token(api, org, userId="ada")
    login = await log_in(api, org, chat.session["visitorToken"], minted["token"])
    assert login.status == 200, login.body
    merge_id = login.body["merge"]["id"]

    await until_merge_done(api, org, merge_id, timeout=20)
    # B's revocation listener is back on a node: a revocation reaches it within a second.
    await eventually(lambda: _listening(replicas), timeout=10)
    await test_credential_lifecycle.test_b_caches_an_api_key_so_only_the_broadcast_revokes_it_within_a_second(
        replicas
    )


async def _listening(replicas: Replicas) -> bool:
    return replicas.b_is_listening()


def test_a_read_cut_short_by_a_failover_is_a_disconnection() -> None:
    demoted = ResponseError(
        "force unblock from blocking operation, instance state changed (master -> replica?)",
        status_code="UNBLOCKED",
    )
    assert node_demoted(demoted)
    assert not node_demoted(ResponseError("NOGROUP No such key", status_code="NOGROUP"))
