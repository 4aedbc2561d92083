"""The token-issuance service running on this test's database, with one provisioned org:
what the token-issuance test modules share (each subclasses it with its own helpers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
from aiohttp import web

from services.token_issuance.app import create_app
from shared.config import Settings
from tests.support.server import Api, running
from tests.support.tokens import OrgFixture, provision_org


@dataclass
class TokenIssuanceEnv:
    api: Api
    app: web.Application
    org: OrgFixture
    pool: asyncpg.Pool
    settings: Settings


E = TypeVar("E", bound=TokenIssuanceEnv)


@asynccontextmanager
async def token_issuance(
    settings: Settings, pool: asyncpg.Pool, env_type: type[E]
) -> AsyncIterator[E]:
    app = create_app(settings)
    async with running(app) as api:
        org = await provision_org(api)
        yield env_type(api=api, app=app, org=org, pool=pool, settings=settings)
