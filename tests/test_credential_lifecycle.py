"""Revoking an API key or a widget token, changing a widget token's origins, or disabling an
org takes effect on every replica within one second, whether the change is made through the
admin API or the CLI; enabling the org restores everything just as fast.

Two replicas (all-in-one apps on the same Postgres and Redis): the change goes through
replica A and replica B is polled for at most one second. Each test first has B use (and so
cache) the credential, and checks B's listener is connected throughout: otherwise B would
read Postgres on every request and the test would prove nothing about the broadcast.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from services import all_in_one
from shared.config import Settings
from shared.errors import Problem
from shared.identity.contact_tokens import CONTACT_TOKENS
from shared.identity.revocation import REVOCATION_FEED
from tests.conftest import ADMIN_TOKEN
from tests.support.cli import cli
from tests.support.server import Api, Reply, eventually, running
from tests.support.tokens import OrgFixture, mint_contact_token, provision_org

ORIGIN = "https://shop.example"


@dataclass
class Replicas:
    a: Api
    b: Api
    app_b: web.Application
    org: OrgFixture
    contact_token: str
    settings: Settings
    pool: asyncpg.Pool

    async def admin(self, method: str, path: str, body: Any = None) -> Reply:
        """An admin call through replica A."""
        reply = await self.a.request(
            method, f"/admin/v1/orgs/{self.org.org_id}{path}", json=body, token=ADMIN_TOKEN
        )
        assert reply.status == 200, reply.body
        return reply

    async def authenticate_on_b(self, key: str | None = None) -> Reply:
        return await self.b.post(
            "/widget/authenticate-user", json={"userId": "u-1"}, token=key or self.org.api_key
        )

    async def session_on_b(self, origin: str = ORIGIN) -> Reply:
        return await self.b.post(
            "/widget/sessions",
            json={"widgetToken": self.org.widget_token},
            headers={"Origin": origin},
        )

    async def contact_token_on_b(self) -> str:
        try:
            await self.app_b[CONTACT_TOKENS].verify(self.contact_token, org_id=self.org.org_id)
        except Problem as problem:
            return problem.code
        return "ok"

    def b_is_listening(self) -> bool:
        return self.app_b[REVOCATION_FEED].live


async def listening(app: web.Application) -> None:
    async def live() -> bool:
        return app[REVOCATION_FEED].live

    await eventually(live, timeout=5.0)


@pytest.fixture
async def replicas(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Replicas]:
    app_a, app_b = all_in_one.create_app(settings), all_in_one.create_app(settings)
    async with running(app_a) as a, running(app_b) as b:
        await listening(app_a)
        await listening(app_b)
        org = await provision_org(a, origins=(ORIGIN,))
        minted = await mint_contact_token(a, org, userId="alice")
        yield Replicas(a, b, app_b, org, minted["token"], settings, pool)


async def within_one_second(replicas: Replicas, check: Callable[[], Awaitable[bool]]) -> None:
    """Poll replica B for at most one second, then assert."""
    deadline = time.monotonic() + 1.0
    while not await check():
        assert time.monotonic() < deadline, "replica B still has the old state after 1 s"
        await asyncio.sleep(0.02)
    assert replicas.b_is_listening()  # B was caching all along: the broadcast did it


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
