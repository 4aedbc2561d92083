"""Test session plumbing: private Postgres and Redis, a fresh database per test, settings.

With TEST_DATABASE_URL and TEST_REDIS_URL set, those servers are used instead of starting
private ones. Every test gets its own database (cloned from a migrated template) and its own
stream prefix, so tests run in any order and never see each other's data.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from devstack import (
    DevServers,
    DevStackError,
    PgBouncer,
    ThrowawayCluster,
    dev_servers,
    pgbouncer,
    throwaway_cluster,
)
from devstack.binaries import find_pgbouncer
from shared import migrate
from shared.config import RateLimits, Settings
from shared.db import with_database
from tests.support.tools import missing

ADMIN_TOKEN = "test-admin-token-" + "x" * 16


@pytest.fixture(scope="session")
def servers() -> Iterator[DevServers]:
    db_url, redis_url = os.environ.get("TEST_DATABASE_URL"), os.environ.get("TEST_REDIS_URL")
    if db_url and redis_url:
        yield DevServers(database_url=db_url, redis_url=redis_url)
        return
    with dev_servers(None, log=lambda line: None) as started:
        yield started


@pytest.fixture
def no_cross_slot(redis_cluster: ThrowawayCluster) -> Iterator[None]:
    """Fails the test if any node of the cluster answered CROSSSLOT while it ran (INFO
    errorstats); the cluster tests use it on every test."""
    before = redis_cluster.error_counts("CROSSSLOT")
    yield
    assert redis_cluster.error_counts("CROSSSLOT") == before, "a node answered CROSSSLOT"


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[ThrowawayCluster]:
    """A private Redis Cluster (three primaries, a replica each), started once per run by the
    first test that asks for it (about 2 s). Tests share it as they share the one Redis: by
    their own stream prefix. A test may fail primaries over; the cluster stays whole."""
    with throwaway_cluster(log=lambda line: None) as cluster:
        yield cluster


@pytest.fixture(scope="session")
async def template_database(servers: DevServers) -> AsyncIterator[str]:
    """A database with every migration applied, cloned for each test (fast, isolated)."""
    name = f"wi_template_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(servers.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(with_database(servers.database_url, name))
        try:
            await migrate.migrate(conn)
        finally:
            await conn.close()
        yield name
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database_url(servers: DevServers, template_database: str) -> AsyncIterator[str]:
    name = f"wi_test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(servers.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
        yield with_database(servers.database_url, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def settings_for(database_url: str, redis_url: str, *, prefix: str = "wi:t:") -> Settings:
    """Settings for one test run: its own database and stream names, fast consumer timings,
    and rate limits high enough that only tests about rate limiting meet them."""
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        admin_token=ADMIN_TOKEN,
        key_encryption_key=secrets.token_bytes(32),
        stream_prefix=f"{prefix}{uuid.uuid4().hex[:12]}:",
        log_json=False,
        shutdown_timeout=5.0,
        consumer_block_ms=100,
        consumer_claim_idle_ms=300,
        auth_failures_per_ip=100_000,
        rate_limits=RateLimits(
            authenticate_per_key=100_000,
            sessions_per_ip=100_000,
            sessions_per_widget_token=100_000,
            sessions_per_visitor=100_000,
        ),
    )


@pytest.fixture
def settings(database_url: str, servers: DevServers) -> Settings:
    return settings_for(database_url, servers.redis_url)


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    from shared.db import create_pool

    created = await create_pool(settings)
    yield created
    await created.close()


@pytest.fixture
async def effects(pool: asyncpg.Pool) -> asyncpg.Pool:
    """The test database with ``bus_effects``, which the bus tests' consumers write."""
    from tests.support.bus import create_effects

    return await create_effects(pool)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    from shared.redis import create_redis

    client = create_redis(settings)
    yield client
    # Remove this test's streams so a long session does not accumulate them.
    keys = [k async for k in client.scan_iter(match=settings.stream_prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


# PgBouncer's pool per database in the tests: fewer server connections than any client pool.
SERVER_CONNECTIONS = 3


@pytest.fixture(scope="session")
def bouncer(servers: DevServers) -> Iterator[PgBouncer]:
    """One PgBouncer in front of the test Postgres for the whole session (each test's
    database gets its own pool in it)."""
    try:
        find_pgbouncer()
    except DevStackError as exc:
        missing(f"{exc}: the tests of the PgBouncer layout need it")
    with pgbouncer(servers.database_url, pool_size=SERVER_CONNECTIONS, log=lambda _: None) as b:
        yield b
