"""Promise 9 on the scaled-out layout: four partitions spread over a real Redis Cluster (three
primaries with a replica each). Consumers coming and going mid-load, and a primary failed
over to its replica mid-load, lose no event, apply none twice, and keep each subject's events
in order."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import redis.asyncio as aioredis

from devstack import ThrowawayCluster
from shared.config import Settings
from tests import test_partitions
from tests.conftest import settings_for
from tests.support.bus import (
    Load,
    applied_order,
    assert_each_subject_in_sequence,
    background,
    relay,
    some_more_applied,
    until_applied,
)
from tests.test_partitions import PARTITIONS, member

# Every test here fails if a node answered CROSSSLOT while it ran.
pytestmark = pytest.mark.usefixtures("no_cross_slot")


@pytest.fixture
def partitioned(database_url: str, redis_cluster: ThrowawayCluster) -> Settings:
    return settings_for(database_url, redis_cluster.seed_url).with_overrides(
        redis_cluster=True, stream_partitions=PARTITIONS, consumer_lease_seconds=2.0
    )


@pytest.fixture
def settings(partitioned: Settings) -> Settings:
    """What ``pool`` and ``redis`` are made from: the cluster's settings."""
    return partitioned


def test_the_partitions_spread_over_the_shards(
    partitioned: Settings, redis_cluster: ThrowawayCluster
) -> None:
    primaries = {redis_cluster.primary_of_key(s).port for s in partitioned.event_streams}
    assert len(primaries) == len(redis_cluster.primaries())


async def test_on_a_cluster_consumers_scaled_1_3_1_mid_load_apply_every_event_once_in_order(
    partitioned: Settings, effects: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    await test_partitions.test_consumers_scaled_1_3_1_mid_load_apply_every_event_once_in_subject_order(
        partitioned, effects, redis
    )


@pytest.mark.slow
async def test_a_primary_failed_over_mid_load_loses_no_event_and_applies_none_twice(
    partitioned: Settings,
    effects: asyncpg.Pool,
    redis: aioredis.Redis,
    redis_cluster: ThrowawayCluster,
) -> None:
    load = Load(effects, partitioned, subjects=60)
    members = [member(partitioned, effects, redis, name, delay=0.002) for name in ("a", "b")]
    async with (
        background(relay(partitioned, redis).run),
        background(members[0].run),
        background(members[1].run),
    ):
        async with background(load.run):
            await some_more_applied(effects)
            # Every shard that holds a partition, one after the other, while events flow.
            for stream in partitioned.event_streams[:2]:
                primary = redis_cluster.primary_of_key(stream)
                await asyncio.to_thread(redis_cluster.failover, primary)
                await some_more_applied(effects)
        await until_applied(effects, load.emitted, timeout=90)
    assert await effects.fetchval("SELECT count(*) FROM bus_effects") == load.emitted
    assert await effects.fetchval("SELECT count(DISTINCT event_id) FROM bus_effects") == (
        load.emitted
    )
    assert_each_subject_in_sequence(await applied_order(effects))
