"""Each floor of ``make bench`` (bench/floor.py) does the work its docstring lists, so a
real path is compared with equal work, not less: rows, outbox rows, cache entries, events and
signatures are checked here. Correctness only; the bench measures, nothing here times."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import jwt
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from bench.floor import FLOOR, create_app
from shared.config import Settings

KEY, WIDGET = "floor-test-key", "floor-test-widget"


@pytest.fixture
async def floor(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, web.Application]]:
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("FLOOR_API_KEY", KEY)
    monkeypatch.setenv("FLOOR_WIDGET_TOKEN", WIDGET)
    monkeypatch.setenv("FLOOR_PREFIX", settings.stream_prefix + "floor:")
    app = create_app()
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", app
    finally:
        await runner.cleanup()


async def post(base: str, path: str, body: Any, **headers: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.post(base + path, json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        reply: dict[str, Any] = await r.json()
        return reply


async def counts(pool: asyncpg.Pool) -> dict[str, int]:
    tables = ("contacts", "visitors", "sessions", "device_bindings", "merge_requests", "outbox")
    return {t: await pool.fetchval(f"SELECT count(*) FROM {t}") for t in tables}


async def events(redis: aioredis.Redis, app: web.Application) -> int:
    return int(await redis.xlen(app[FLOOR].prefix + "events"))


async def test_each_floor_does_the_work_its_path_requires(
    floor: tuple[str, web.Application], pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    base, app = floor
    state = app[FLOOR]

    # authenticate: contact upsert + one outbox row + one event + an EdDSA token.
    before = await counts(pool)
    auth = await post(
        base,
        "/floor/authenticate",
        {"userId": "u1", "email": "u1@x.example"},
        Authorization=f"Bearer {KEY}",
    )
    claims = jwt.decode(
        auth["token"],
        state.key.public_key(),
        algorithms=["EdDSA"],
        audience="floor",
        issuer="floor",
    )
    assert claims["sub"] == auth["contactId"]
    after = await counts(pool)
    assert (after["contacts"] - before["contacts"], after["outbox"] - before["outbox"]) == (1, 1)
    assert await events(redis, app) == 1
    again = await post(
        base,
        "/floor/authenticate",
        {"userId": "u1", "email": "u1@x.example"},
        Authorization=f"Bearer {KEY}",
    )
    assert again["contactId"] == auth["contactId"]  # an upsert, not a second contact

    # a new visitor: visitor + session rows, two outbox rows, cached state, two events.
    before = await counts(pool)
    new = await post(base, "/floor/sessions/new", {"widgetToken": WIDGET})
    after = await counts(pool)
    assert [after[t] - before[t] for t in ("visitors", "sessions", "outbox")] == [1, 1, 2]
    assert await events(redis, app) == 4
    seqs = await pool.fetchval(
        "SELECT seq FROM subject_seqs WHERE subject = $1",
        str(await pool.fetchval("SELECT id FROM visitors")),
    )
    assert seqs == 2

    # a returning visitor: the same session back, nothing written to Postgres.
    body = {"widgetToken": WIDGET, "visitorToken": new["visitorToken"]}
    before = await counts(pool)
    back = await post(base, "/floor/sessions/returning", body)
    assert (back["sessionId"], back["sessionToken"]) == (new["sessionId"], new["sessionToken"])
    assert await counts(pool) == before

    # the history page of that session: its scope's conversations.
    visitor = await pool.fetchval(
        "SELECT visitor_id FROM sessions WHERE id = $1", uuid.UUID(new["sessionId"])
    )
    await pool.execute(
        """WITH c AS (INSERT INTO conversations (id, org_id, visitor_id, origin_visitor_id)
                      VALUES (gen_random_uuid(), $1, $2, $2) RETURNING id)
           INSERT INTO messages (id, org_id, conversation_id, author, sender_verified, body)
           SELECT gen_random_uuid(), $1, id, 'visitor', false, 'hi' FROM c""",
        state.org_id,
        visitor,
    )
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"{base}/floor/sessions/{new['sessionId']}/history",
            headers={"Authorization": f"Bearer {new['sessionToken']}"},
        ) as r,
    ):
        page = await r.json()
    assert [m["text"] for c in page["conversations"] for m in c["messages"]] == ["hi"]

    # a login: device binding, merge request, verified session, two outbox rows, two events.
    before = await counts(pool)
    login = await post(base, "/floor/sessions/login", {**body, "user": {"token": auth["token"]}})
    after = await counts(pool)
    assert login["merge"] is not None
    assert [
        after[t] - before[t] for t in ("device_bindings", "merge_requests", "sessions", "outbox")
    ] == [1, 1, 1, 2]
    assert (
        await pool.fetchval(
            "SELECT level FROM sessions WHERE id = $1", uuid.UUID(login["sessionId"])
        )
        == "verified"
    )
    assert await events(redis, app) == 6
