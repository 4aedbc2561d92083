"""Migrations apply once, in order, under a lock: replicas starting together are safe."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from devstack import DevServers
from shared import migrate
from shared.db import with_database
from shared.errors import ConfigError


@pytest.fixture
async def empty_database(servers: DevServers) -> str:
    name = f"wi_empty_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(servers.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return with_database(servers.database_url, name)


async def test_replicas_migrating_at_once_apply_each_migration_exactly_once(
    empty_database: str,
) -> None:
    conns = [await asyncpg.connect(empty_database) for _ in range(5)]
    try:
        results = await asyncio.gather(*(migrate.migrate(c) for c in conns))
        expected = [m.version for m in migrate.load_migrations()]
        applied = sorted(v for r in results for v in r)
        assert applied == expected  # every version once, by exactly one replica
        rows = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == expected
        assert await migrate.migrate(conns[0]) == []
    finally:
        for c in conns:
            await c.close()


async def test_a_migration_edited_after_it_was_applied_stops_startup(empty_database: str) -> None:
    conn = await asyncpg.connect(empty_database)
    try:
        await migrate.migrate(conn)
        await conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
        with pytest.raises(ConfigError, match="was changed after it was applied"):
            await migrate.migrate(conn)
    finally:
        await conn.close()


async def test_schema_rejects_half_identities(database_url: str) -> None:
    # The constraints, not just the code, keep a conversation in exactly one scope.
    conn = await asyncpg.connect(database_url)
    try:
        org = await conn.fetchval(
            "INSERT INTO orgs (id, name) VALUES (gen_random_uuid(), 'o') RETURNING id"
        )
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO conversations (id, org_id, origin_visitor_id) VALUES (gen_random_uuid(), $1, gen_random_uuid())",
                org,
            )
    finally:
        await conn.close()
