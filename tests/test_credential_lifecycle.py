"""Revoking an API key or a widget token, changing a widget token's origins, or disabling an
org takes effect on every replica within one second, whether the change is made through the
admin API or the CLI; enabling the org restores everything just as fast.

Two replicas (all-in-one apps on the same Postgres and Redis): the change goes through
replica A and replica B is polled for at most one second. Each test first has B use (and so
cache) the credential, and checks B's listener is connected throughout: otherwise B would
read Postgres on every request and the test would prove nothing about the broadcast.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from shared.config import Settings
from tests.conftest import ADMIN_TOKEN
from tests.support.cli import cli
from tests.support.replicas import Replicas, two_replicas, within_one_second
from tests.support.server import eventually


@pytest.fixture
async def replicas(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Replicas]:
    async with two_replicas(settings, pool) as both:
        yield both


async def test_b_caches_an_api_key_so_only_the_broadcast_revokes_it_within_a_second(
    replicas: Replicas,
) -> None:
    assert (await replicas.authenticate_on_b()).status == 200
    # Written behind the services' backs: nobody announces it, and B keeps its cached key
    # (so a refusal below is the broadcast's doing, not a cache miss).
    await replicas.pool.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1", replicas.org.api_key_id
    )
    assert (await replicas.authenticate_on_b()).status == 200
    await replicas.admin("DELETE", f"/api-keys/{replicas.org.api_key_id}")

    async def refused() -> bool:
        return (await replicas.authenticate_on_b()).status == 401

    await within_one_second(replicas, refused)


async def test_a_revoked_api_key_is_refused_on_every_replica_within_a_second(
    replicas: Replicas,
) -> None:
    other = await replicas.a.post(
        f"/admin/v1/orgs/{replicas.org.org_id}/api-keys",
        json={"scopes": ["contacts:authenticate"]},
        token=ADMIN_TOKEN,
    )
    for key in (replicas.org.api_key, other.json["key"]):
        assert (await replicas.authenticate_on_b(key)).status == 200
    await replicas.admin("DELETE", f"/api-keys/{replicas.org.api_key_id}")

    async def refused() -> bool:
        reply = await replicas.authenticate_on_b()
        return reply.status == 401 and reply.json["code"] == "invalid_api_key"

    await within_one_second(replicas, refused)
    assert (await replicas.authenticate_on_b(other.json["key"])).status == 200


async def test_a_revoked_widget_token_is_refused_on_every_replica_within_a_second(
    replicas: Replicas,
) -> None:
    assert (await replicas.session_on_b()).status == 200
    await replicas.admin("DELETE", f"/widget-tokens/{replicas.org.widget_token_id}")

    async def refused() -> bool:
        reply = await replicas.session_on_b()
        return reply.status == 401 and reply.json["code"] == "invalid_widget_token"

    await within_one_second(replicas, refused)


async def test_changed_allowed_origins_apply_on_every_replica_within_a_second(
    replicas: Replicas,
) -> None:
    assert (await replicas.session_on_b()).status == 200
    await replicas.admin(
        "PATCH",
        f"/widget-tokens/{replicas.org.widget_token_id}",
        {"allowedOrigins": ["https://new.example"]},
    )

    async def moved() -> bool:
        old = await replicas.session_on_b()
        return old.status == 403 and old.json["code"] == "origin_not_allowed"

    await within_one_second(replicas, moved)
    assert (await replicas.session_on_b("https://new.example")).status == 200


async def test_disabling_an_org_ends_its_credentials_on_every_replica_and_enabling_restores(
    replicas: Replicas,
) -> None:
    assert (await replicas.authenticate_on_b()).status == 200
    assert (await replicas.session_on_b()).status == 200
    assert await replicas.contact_token_on_b() == "ok"
    made_up = await replicas.authenticate_on_b("wik_" + secrets.token_urlsafe(32))

    disabled = await replicas.admin("PATCH", "", {"disabled": True})
    assert disabled.json["disabled"] is True

    async def all_refused() -> bool:
        key = await replicas.authenticate_on_b()
        session = await replicas.session_on_b()
        return (
            (key.status, key.json) == (made_up.status, made_up.json)  # same body as any bad key
            and (session.status, session.json["code"]) == (401, "invalid_widget_token")
            and await replicas.contact_token_on_b() == "token_revoked"
        )

    await within_one_second(replicas, all_refused)
    history = await replicas.b.get(
        f"/v1/visitors/{'0' * 8}-0000-4000-8000-{'0' * 12}/history", token=replicas.org.api_key
    )
    assert (history.status, history.json["code"]) == (401, "invalid_api_key")

    enabled = await replicas.admin("PATCH", "", {"disabled": False})
    assert enabled.json["disabled"] is False

    async def all_restored() -> bool:
        return (
            (await replicas.authenticate_on_b()).status == 200
            and (await replicas.session_on_b()).status == 200
            and await replicas.contact_token_on_b() == "ok"
        )

    await within_one_second(replicas, all_restored)


async def test_changes_made_with_the_cli_reach_every_replica_within_a_second(
    replicas: Replicas,
) -> None:
    org = replicas.org
    assert (await replicas.authenticate_on_b()).status == 200
    assert (await replicas.session_on_b()).status == 200

    code, _, err = await cli(replicas.settings, "org", "disable", "--org", org.org_id)
    assert code == 0, err

    async def key_refused() -> bool:
        return (await replicas.authenticate_on_b()).status == 401

    await within_one_second(replicas, key_refused)

    code, _, err = await cli(replicas.settings, "org", "enable", "--org", org.org_id)
    assert code == 0, err

    async def key_accepted() -> bool:
        return (await replicas.authenticate_on_b()).status == 200

    await within_one_second(replicas, key_accepted)

    code, _, err = await cli(
        replicas.settings,
        "widget-token",
        "revoke",
        "--org",
        org.org_id,
        "--id",
        org.widget_token_id,
    )
    assert code == 0, err

    async def widget_refused() -> bool:
        return (await replicas.session_on_b()).status == 401

    await within_one_second(replicas, widget_refused)

    code, _, err = await cli(
        replicas.settings, "api-key", "revoke", "--org", org.org_id, "--key-id", org.api_key_id
    )
    assert code == 0, err
    await within_one_second(replicas, key_refused)


async def test_a_replica_whose_listener_lost_its_connection_trusts_nothing_it_cached(
    replicas: Replicas, redis: aioredis.Redis
) -> None:
    assert (await replicas.authenticate_on_b()).status == 200
    assert (await replicas.session_on_b()).status == 200
    # Changes nobody announces: B's caches keep answering from memory...
    await replicas.pool.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1", replicas.org.api_key_id
    )
    await replicas.pool.execute(
        "UPDATE widget_tokens SET revoked_at = now() WHERE id = $1", replicas.org.widget_token_id
    )
    assert (await replicas.authenticate_on_b()).status == 200
    assert (await replicas.session_on_b()).status == 200
    # ...until the listener's connection drops: everything cached is dropped and not trusted.
    await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")

    async def refused() -> bool:
        key = await replicas.authenticate_on_b()
        session = await replicas.session_on_b()
        return key.status == 401 and session.status == 401

    await eventually(refused, timeout=5.0)
