"""Promise 12 from outside, against the real all-in-one server: after a person is erased, no
store (every Postgres table, every Redis key of the deployment: caches, the event stream,
dead letters) holds anything they or their browsers said, their browsers start over as new
anonymous visitors, and signing in again makes a new, empty contact."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from services import all_in_one
from shared.bus.events import EVENT_FIELD
from shared.config import Settings
from tests.support.server import Api, eventually, running
from tests.support.tokens import OrgFixture, mint_contact_token, provision_org
from tests.test_sessions import ORIGIN, history, resolved, say, seen

# Everything that identifies the person or that they (or their browsers) typed.
USER_ID = "user-ada-5f1c"
EMAIL = "ada.verified@example.com"
NAME = "Ada Verified-Lovelace"
EXTERNAL_ID = "workspace-ada-77"
CUSTOM = "tier-ada-platinum"
TYPED_NAME = "Ada Typed-Byron"
TYPED_EMAIL = "ada.typed@example.net"
TYPED_PHONE = "+44 20 7946 0991"
TYPED_COMPANY = "Difference Engines"
SAID_BEFORE_LOGIN = "my card ends 4242 (merged at login)"
SAID_ON_OLD_TAB = "my address is 12 Marylebone (never merged)"
SAID_VERIFIED = "please call me back (verified)"
PERSONAL = (
    USER_ID,
    EMAIL,
    NAME,
    EXTERNAL_ID,
    CUSTOM,
    TYPED_NAME,
    TYPED_EMAIL,
    TYPED_PHONE,
    TYPED_COMPANY,
    SAID_BEFORE_LOGIN,
    SAID_ON_OLD_TAB,
    SAID_VERIFIED,
)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with running(all_in_one.create_app(settings)) as client:
        yield client


# The widget collects typed details, so the person's own words reach every store.
WIDGET_SETTINGS = {
    "collectUserData": True,
    "extraDataCollectionFields": [
        {"name": "phone", "label": "Phone", "maxLength": 30},
        {"name": "company", "label": "Company", "maxLength": 30},
    ],
}


@pytest.fixture
async def org(api: Api) -> OrgFixture:
    return await provision_org(api, origins=(ORIGIN,), settings=WIDGET_SETTINGS)


_HEX = re.compile(r"\\x([0-9a-f]+)")


async def postgres_leftovers(pool: asyncpg.Pool) -> dict[str, list[str]]:
    """Every base table of the database, every row as text (bytea decoded too): which of the
    person's values still appear, per table."""
    found: dict[str, list[str]] = {}
    tables = await pool.fetch(
        """SELECT table_name FROM information_schema.tables
           WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"""
    )
    assert len(tables) > 10  # the dump really looks at the schema
    for table in tables:
        name = table["table_name"]
        rows = await pool.fetch(f'SELECT t::text AS row FROM "{name}" AS t')
        for row in rows:
            text = row["row"]
            decoded = " ".join(
                bytes.fromhex(h).decode("utf-8", "replace")
                for h in _HEX.findall(text)
                if len(h) % 2 == 0
            )
            hits = [v for v in PERSONAL if v in text or v in decoded]
            if hits:
                found.setdefault(name, []).extend(hits)
    return found


async def redis_leftovers(redis: aioredis.Redis, prefix: str) -> dict[str, list[str]]:
    """Every key of this deployment's prefix, its value read by type: which of the person's
    values still appear, per key."""
    found: dict[str, list[str]] = {}
    async for key in redis.scan_iter(match=prefix + "*"):
        kind = (await redis.type(key)).decode()
        # redis-py types replies loosely (bytes | str): this client returns bytes.
        parts: list[Any] = [key]
        if kind == "string":
            parts.append(await redis.get(key) or b"")
        elif kind == "hash":
            for field, value in (await redis.hgetall(key)).items():
                parts += [field, value]
        elif kind == "stream":
            for _id, fields in await redis.xrange(key):
                for field, value in (fields or {}).items():
                    parts += [field, value]
        elif kind == "list":
            parts += await redis.lrange(key, 0, -1)
        elif kind == "set":
            parts += list(await redis.smembers(key))
        elif kind == "zset":
            parts += await redis.zrange(key, 0, -1)
        blob = b"\n".join(parts)
        hits = [v for v in PERSONAL if v.encode() in blob]
        if hits:
            found[key.decode()] = hits
    return found


async def stream_types(redis: aioredis.Redis, settings: Settings) -> list[str]:
    return [
        (fields or {}).get(EVENT_FIELD, b"").decode()
        for stream in settings.event_streams
        for _id, fields in await redis.xrange(stream)
    ]


async def test_promise_12_erasure_leaves_nothing_in_any_store_and_the_browsers_start_over(
    api: Api, org: OrgFixture, pool: asyncpg.Pool, redis: aioredis.Redis, settings: Settings
) -> None:
    # The phone: first an unverified visitor typing their details, saying something, then
    # signing in (the login merges what it said); its older tab's session stays live and later
    # says more, which is never merged.
    typed = await resolved(
        api,
        org,
        user={"name": TYPED_NAME, "email": TYPED_EMAIL},
        fields={"phone": TYPED_PHONE, "company": TYPED_COMPANY},
    )
    assert typed["identity"]["level"] == "unverified"
    await say(pool, typed["sessionId"], SAID_BEFORE_LOGIN)
    token = await mint_contact_token(
        api,
        org,
        userId=USER_ID,
        email=EMAIL,
        name=NAME,
        externalId=EXTERNAL_ID,
        customData={"tier": CUSTOM},
    )
    contact = token["contactId"]
    phone = await resolved(
        api, org, visitorToken=typed["visitorToken"], user={"token": token["token"]}
    )
    assert phone["identity"]["level"] == "verified"
    assert phone["merge"] is not None
    await eventually(lambda: _merge_done(api, org, phone["merge"]["id"]))
    await say(pool, typed["sessionId"], SAID_ON_OLD_TAB)  # the old unverified tab
    # The laptop: verified only.
    laptop = await resolved(api, org, user={"token": token["token"]})
    await say(pool, laptop["sessionId"], SAID_VERIFIED)
    assert {SAID_BEFORE_LOGIN, SAID_VERIFIED} <= await seen(api, laptop)

    # Redis holds the person: their contact.authenticated in the stream, a dead letter that
    # names them, and an entry the relay put there for an outbox row the erasure will find
    # already gone (a batch in flight), which only a scan of the stream can find.
    await eventually(lambda: _published(redis, settings, EMAIL))
    [(stream, authenticated)] = [
        (stream, fields)
        for stream in settings.event_streams
        for _id, fields in await redis.xrange(stream)
        if fields and EMAIL.encode() in fields[EVENT_FIELD]
    ]
    await redis.xadd(
        settings.dead_letter_stream("history", stream),
        {
            EVENT_FIELD: authenticated[EVENT_FIELD],
            b"group": b"history",
            b"error": f"ValueError('bad address {TYPED_EMAIL}')".encode(),
        },
    )
    # (A relay that crashed before marking a row published puts the same payload there again.)
    await redis.xadd(stream, {EVENT_FIELD: authenticated[EVENT_FIELD]})
    assert await postgres_leftovers(pool)
    assert await redis_leftovers(redis, settings.stream_prefix)

    reply = await api.delete(f"/v1/contacts/{contact}", token=org.api_key)
    assert reply.status == 200, reply.body
    assert reply.json["browsersErased"] == 2

    # Eventually (the consumers of contact.erased finish in Redis) nothing is left anywhere.
    async def nothing_left() -> bool:
        return not await postgres_leftovers(pool) and not await redis_leftovers(
            redis, settings.stream_prefix
        )

    try:
        await eventually(nothing_left, timeout=20)
    except AssertionError:
        pg, rd = (
            await postgres_leftovers(pool),
            await redis_leftovers(redis, settings.stream_prefix),
        )
        raise AssertionError(f"left behind: postgres {pg}, redis {rd}") from None
    # The erasure's own events (ids only) remain, as its record.
    assert "contact.erased" in " ".join(await stream_types(redis, settings))

    # Each browser, presenting its old visitor token, is a new anonymous visitor with nothing.
    for browser in (typed, laptop):
        again = await resolved(api, org, visitorToken=browser["visitorToken"])
        assert again["identity"]["level"] == "anonymous"
        assert again["identity"]["visitorId"] != browser["identity"]["visitorId"]
        assert again["visitorToken"] != browser["visitorToken"]
        assert again["identity"]["attributes"] == {}
        assert await seen(api, again) == set()
    # Their old sessions show nothing any more either.
    for old in (typed, phone, laptop):
        assert (await history(api, old)).status == 401

    # Signing in again as the same user: a new contact, with an empty history.
    fresh = await mint_contact_token(api, org, userId=USER_ID, email=EMAIL)
    assert fresh["contactId"] != contact
    back = await resolved(api, org, user={"token": fresh["token"]})
    assert back["identity"]["contactId"] == fresh["contactId"]
    assert await seen(api, back) == set()
    reply = await api.get(
        f"/v1/contacts/{fresh['contactId']}/history?externalId={EXTERNAL_ID}",
        token=org.api_key,
    )
    assert reply.status == 200 and reply.json["conversations"] == []


async def _merge_done(api: Api, org: OrgFixture, merge_id: str) -> bool:
    reply = await api.get(f"/v1/merges/{merge_id}", token=org.api_key)
    return reply.status == 200 and reply.json["status"] == "done"


async def _published(redis: aioredis.Redis, settings: Settings, needle: str) -> bool:
    for stream in settings.event_streams:
        entries: list[Any] = await redis.xrange(stream) or []
        if any(needle.encode() in fields.get(EVENT_FIELD, b"") for _id, fields in entries):
            return True
    return False
