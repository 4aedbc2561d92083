"""Two replicas of the all-in-one app on one Postgres and Redis, for promises that must hold
"on every replica within one second": a change goes through replica A, replica B is polled
for at most one second. B uses (and so caches) the credential first and its revocation
listener must stay connected throughout; otherwise B would read Postgres on every request
and a test would prove nothing about the broadcast."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web

from services import all_in_one
from shared.config import Settings
from shared.errors import Problem
from shared.identity.contact_tokens import CONTACT_TOKENS
from shared.identity.revocation import REVOCATION_FEED
from tests.conftest import ADMIN_TOKEN
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


@asynccontextmanager
async def two_replicas(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Replicas]:
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
