"""Promise 9, when Redis loses its data: Postgres is the source of truth, and what was
promised is published again from it.

A private Redis of the test's own is killed while the merge consumer is behind, under a
stream of logins that each promise a merge, and comes back either empty (a restart without
persistence, a lost volume) or as it was some time earlier (a failover to a replica that
lagged: the snapshot ``SAVE`` took then). The consumer then catches up, and the database
must show every promise kept: every merge a login handed out is ``done``, each applied once,
every conversation in the person's scope, the outbox drained and nothing pending in the
stream.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from devstack import ThrowawayRedis, throwaway_redis
from services.history import app as history
from services.session_resolution import app as session_resolution
from services.token_issuance import app as token_issuance
from shared.config import Settings
from shared.service import service_app
from tests.support.server import Api, Reply, eventually, running
from tests.support.tokens import OrgFixture, provision_org

pytestmark = pytest.mark.slow

ORIGIN = "https://shop.example"


@pytest.fixture
def own_redis() -> Iterator[ThrowawayRedis]:
    with throwaway_redis(log=lambda line: None) as server:
        yield server


@pytest.fixture
def lossy_settings(settings: Settings, own_redis: ThrowawayRedis) -> Settings:
    return settings.with_overrides(redis_url=own_redis.url)


def front_app(settings: Settings) -> web.Application:
    """Everything but the merge consumer: sessions promise merges, the relay publishes them,
    and nobody applies them yet (the consumer is behind)."""
    app = service_app(settings, name="front")
    for service in (token_issuance, session_resolution, history):
        service.setup_routes(app)
    session_resolution.setup_consumers(app)
    return app


@dataclass(frozen=True, slots=True)
class Login:
    merge_id: str
    contact_id: str
    conversation_id: str


class Unavailable(Exception):
    """A 503: the service said honestly that it cannot answer now (nothing was promised)."""


def _body(reply: Reply, status: int) -> Any:
    if reply.status == 503:
        raise Unavailable(reply.body)
    assert reply.status == status, reply.body
    return reply.json


async def login_with_history(api: Api, org: OrgFixture) -> Login:
    """An anonymous visitor chats, then signs in: the login promises a merge of that chat."""
    anonymous = await _session(api, org)
    conversation = _body(
        await api.post(
            "/v1/conversations",
            json={"sessionId": anonymous["sessionId"], "message": {"text": "where is my order?"}},
            token=org.api_key,
        ),
        201,
    )
    user = f"u-{uuid.uuid4().hex[:10]}"
    minted = _body(
        await api.post(
            "/widget/authenticate-user",
            json={"userId": user, "email": f"{user}@example.com"},
            token=org.api_key,
        ),
        200,
    )
    verified = await _session(
        api, org, visitorToken=anonymous["visitorToken"], user={"token": minted["token"]}
    )
    assert verified["merge"] is not None, verified
    return Login(verified["merge"]["id"], minted["contactId"], conversation["id"])


async def _session(api: Api, org: OrgFixture, **body: Any) -> dict[str, Any]:
    reply = await api.post(
        "/widget/sessions",
        json={"widgetToken": org.widget_token, **body},
        headers={"Origin": ORIGIN},
    )
    result: dict[str, Any] = _body(reply, 200)
    return result


async def logins_while(api: Api, org: OrgFixture, until: asyncio.Event) -> list[Login]:
    """Logins back to back until told to stop; a login refused while Redis is away (503) is
    simply not promised, and is not counted."""
    done: list[Login] = []
    while not until.is_set():
        try:
            done.append(await login_with_history(api, org))
        except Unavailable:
            await asyncio.sleep(0.05)
    return done


async def merge_consumer_group_exists(settings: Settings) -> None:
    """Start the merge consumer once, so its group exists (as in any running deployment),
    then stop it: from here on it is behind."""
    async with running(history.create_consumer_app(settings)):
        client = aioredis.Redis.from_url(settings.redis_url)
        try:

            async def created() -> bool:
                if not await client.exists(settings.event_streams[0]):
                    return False
                groups = await client.xinfo_groups(settings.event_streams[0])
                return any(g["name"] == history.GROUP.encode() for g in groups)

            await eventually(created, timeout=10)
        finally:
            await client.aclose()


async def everything_published(pool: asyncpg.Pool) -> None:
    async def drained() -> bool:
        return await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0

    await eventually(drained, timeout=20)


async def nothing_pending(settings: Settings) -> None:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:

        async def acknowledged() -> bool:
            summary = await client.xpending(settings.event_streams[0], history.GROUP)
            return int(summary["pending"]) == 0

        await eventually(acknowledged, timeout=20)
    finally:
        await client.aclose()


async def assert_every_promise_kept(
    api: Api, org: OrgFixture, pool: asyncpg.Pool, settings: Settings, logins: list[Login]
) -> None:
    async def all_done() -> bool:
        for login in logins:
            merge = await api.get(f"/v1/merges/{login.merge_id}", token=org.api_key)
            if merge.status != 200 or merge.json["status"] != "done":
                return False
        return True

    await eventually(all_done, timeout=60)
    # One row per promise, each recording exactly its own conversation: a second application
    # would have found nothing left to move.
    moved = await pool.fetch(
        """SELECT id::text, status, conversation_ids::text[] AS moved FROM merges
           WHERE id = ANY($1::uuid[])""",
        [login.merge_id for login in logins],
    )
    assert {r["id"]: (r["status"], r["moved"]) for r in moved} == {
        login.merge_id: ("done", [login.conversation_id]) for login in logins
    }
    placed = await pool.fetch(
        "SELECT id::text, contact_id::text FROM conversations WHERE id = ANY($1::uuid[])",
        [login.conversation_id for login in logins],
    )
    assert {r["id"]: r["contact_id"] for r in placed} == {
        login.conversation_id: login.contact_id for login in logins
    }
    await everything_published(pool)  # the merges' own events too
    await nothing_pending(settings)


async def test_promise_9_redis_restarted_empty_while_the_consumer_is_behind_loses_no_merge(
    lossy_settings: Settings, own_redis: ThrowawayRedis, pool: asyncpg.Pool
) -> None:
    settings = lossy_settings
    await merge_consumer_group_exists(settings)
    async with running(front_app(settings)) as api:
        org = await provision_org(api)
        before = [await login_with_history(api, org) for _ in range(20)]
        await everything_published(pool)  # in Redis, waiting for the consumer

        stop = asyncio.Event()
        load = asyncio.create_task(logins_while(api, org, stop))
        await asyncio.sleep(1.0)
        own_redis.kill()
        await asyncio.sleep(1.0)
        own_redis.start()  # empty: no persistence
        await asyncio.sleep(2.0)
        stop.set()
        during = await load
        after = [await login_with_history(api, org) for _ in range(5)]
        await everything_published(pool)

    logins = before + during + after
    async with running(history.create_consumer_app(settings)), running(front_app(settings)) as api:
        await assert_every_promise_kept(api, org, pool, settings, logins)


async def test_promise_9_failover_to_a_lagging_replica_loses_no_merge(
    lossy_settings: Settings, own_redis: ThrowawayRedis, pool: asyncpg.Pool
) -> None:
    settings = lossy_settings
    await merge_consumer_group_exists(settings)
    snapshot = own_redis.workdir / "lagging.rdb"
    async with running(front_app(settings)) as api:
        org = await provision_org(api)
        replicated = [await login_with_history(api, org) for _ in range(10)]
        await everything_published(pool)
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            await client.save()  # what the replica had when it fell behind
        finally:
            await client.aclose()
        shutil.copy(own_redis.workdir / "dump.rdb", snapshot)
        not_replicated = [await login_with_history(api, org) for _ in range(10)]
        await everything_published(pool)

        own_redis.kill()
        shutil.copy(snapshot, own_redis.workdir / "dump.rdb")
        # The replica takes over: the last ten logins' events are gone, and no new event
        # comes to reveal it; the relay must notice by itself.
        own_redis.start()
        await asyncio.sleep(2.0)

    logins = replicated + not_replicated
    async with running(history.create_consumer_app(settings)), running(front_app(settings)) as api:
        await assert_every_promise_kept(api, org, pool, settings, logins)
