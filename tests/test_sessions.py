"""Session resolution over HTTP, issue 4 item by item, against the real all-in-one server
(token issuance + sessions + history), real Postgres and Redis, real signatures.

The helpers at the top are shared with test_session_promises.py and
test_session_state_machine.py.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from services import all_in_one
from shared.config import Settings
from tests.conftest import ADMIN_TOKEN
from tests.support.server import Api, Reply, eventually, running
from tests.support.tokens import OrgFixture, mint_contact_token, provision_org

ORIGIN = "https://shop.example"
WIDGET_SETTINGS: dict[str, Any] = {
    "collectUserData": True,
    "prefillUserData": {"name": True, "email": True},
    "extraDataCollectionFields": [
        {"name": "company", "label": "Company", "maxLength": 20},
        {"name": "seats", "label": "Seats", "type": "number"},
        {"name": "newsletter", "label": "Newsletter", "type": "boolean"},
    ],
}


# --- helpers shared by the session test modules -----------------------------------------------


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with running(all_in_one.create_app(settings)) as client:
        yield client


@pytest.fixture
async def org(api: Api) -> OrgFixture:
    return await provision_org(api, origins=(ORIGIN,), settings=WIDGET_SETTINGS)


async def visit(api: Api, org: OrgFixture, *, origin: str | None = ORIGIN, **body: Any) -> Reply:
    """One widget load: POST /widget/sessions from a page on ``origin``."""
    return await api.post(
        "/widget/sessions",
        json={"widgetToken": org.widget_token, **body},
        headers={} if origin is None else {"Origin": origin},
    )


async def resolved(api: Api, org: OrgFixture, **body: Any) -> dict[str, Any]:
    reply = await visit(api, org, **body)
    assert reply.status == 200, reply.body
    result: dict[str, Any] = reply.json
    return result


async def say(pool: asyncpg.Pool, session_id: str, text: str) -> str:
    """What the history service does for a chat message: a conversation in the session's
    scope as the ``session_scopes`` view publishes it (contact + externalId when verified,
    else the visitor)."""
    conversation_id = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        scope = await conn.fetchrow(
            "SELECT * FROM session_scopes WHERE session_id = $1", uuid.UUID(session_id)
        )
        assert scope is not None
        verified = scope["level"] == "verified"
        await conn.execute(
            """INSERT INTO conversations
                   (id, org_id, visitor_id, contact_id, external_id, origin_visitor_id)
               VALUES ($1, $2, $3, $4, $5, $6)""",
            conversation_id,
            scope["org_id"],
            None if verified else scope["visitor_id"],
            scope["contact_id"] if verified else None,
            scope["external_id"] if verified else "",
            scope["visitor_id"],
        )
        await conn.execute(
            """INSERT INTO messages (id, org_id, conversation_id, author, sender_verified, body)
               VALUES ($1, $2, $3, 'visitor', $4, $5)""",
            uuid.uuid4(),
            scope["org_id"],
            conversation_id,
            verified,
            text,
        )
    return str(conversation_id)


async def history(
    api: Api, session: dict[str, Any], *, origin: str | None = ORIGIN, query: str = ""
) -> Reply:
    return await api.get(
        f"/widget/sessions/{session['sessionId']}/history{query}",
        token=session["sessionToken"],
        headers={} if origin is None else {"Origin": origin},
    )


async def seen(api: Api, session: dict[str, Any]) -> set[str]:
    """Every message text this session's history shows."""
    reply = await history(api, session)
    assert reply.status == 200, reply.body
    return {m["text"] for c in reply.json["conversations"] for m in c["messages"]}


async def logout(api: Api, session: dict[str, Any], *, origin: str | None = ORIGIN) -> Reply:
    return await api.post(
        f"/widget/sessions/{session['sessionId']}/logout",
        token=session["sessionToken"],
        headers={} if origin is None else {"Origin": origin},
    )


async def row_counts(pool: asyncpg.Pool) -> dict[str, int]:
    counts = {}
    for table in ("visitors", "sessions", "device_bindings", "outbox", "contacts"):
        counts[table] = await pool.fetchval(f"SELECT count(*) FROM {table}")
    return counts


async def outbox_types(pool: asyncpg.Pool) -> list[str]:
    rows = await pool.fetch("SELECT event_type FROM outbox ORDER BY id")
    return [r["event_type"] for r in rows]


# --- item 1: visitors and levels --------------------------------------------------------------


async def test_new_visitor_gets_a_fresh_unguessable_visitor_token(
    api: Api, org: OrgFixture, pool: asyncpg.Pool
) -> None:
    reply = await visit(api, org)
    assert reply.status == 200, reply.body
    body = reply.json
    assert body["visitorToken"].startswith("wiv_")
    assert len(body["visitorToken"]) == 47  # 256 random bits
    assert body["sessionToken"].startswith("wis_")
    assert body["identity"] == {
        "level": "anonymous",
        "visitorId": body["identity"]["visitorId"],
        "contactId": None,
        "externalId": None,
        "externalIdVerified": False,
        "attributes": {},
    }
    assert body["merge"] is None
    assert reply.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert reply.headers["Cache-Control"] == "no-store"
    # Stored hashed only.
    stored = await pool.fetchval(
        "SELECT token_hash FROM visitors WHERE id = $1", uuid.UUID(body["identity"]["visitorId"])
    )
    assert body["visitorToken"].encode() not in stored
    assert await outbox_types(pool) == ["visitor.created", "session.resolved"]


async def test_returning_visitor_stays_the_same_visitor(api: Api, org: OrgFixture) -> None:
    first = await resolved(api, org)
    again = await resolved(api, org, visitorToken=first["visitorToken"])
    assert again["identity"]["visitorId"] == first["identity"]["visitorId"]
    assert again["visitorToken"] == first["visitorToken"]
    assert again["sessionId"] == first["sessionId"]  # nothing new: the same session


@pytest.mark.parametrize(
    "token",
    ["wiv_" + "A" * 43, "not-a-token", "", "wis_" + "A" * 43],
)
async def test_unknown_or_malformed_visitor_token_is_a_new_visitor(
    api: Api, org: OrgFixture, token: str
) -> None:
    known = await resolved(api, org)
    reply = await resolved(api, org, visitorToken=token)
    assert reply["visitorToken"] != token
    assert reply["identity"]["visitorId"] != known["identity"]["visitorId"]


async def test_typed_details_make_an_unverified_visitor_remembered_by_the_browser(
    api: Api, org: OrgFixture
) -> None:
    first = await resolved(api, org, user={"name": "Ann", "email": "ann@example.com"})
    assert first["identity"]["level"] == "unverified"
    assert first["identity"]["attributes"]["email"] == {
        "value": "ann@example.com",
        "source": "browser",
        "verified": False,
    }
    again = await resolved(api, org, visitorToken=first["visitorToken"])
    assert again["identity"]["level"] == "unverified"
    assert again["identity"]["attributes"]["name"]["value"] == "Ann"
    assert again["sessionId"] == first["sessionId"]
    changed = await resolved(
        api, org, visitorToken=first["visitorToken"], user={"email": "ann@work.example"}
    )
    assert changed["sessionId"] != first["sessionId"]
    assert changed["identity"]["attributes"]["email"]["value"] == "ann@work.example"


async def test_verified_contact_gets_server_attributes(api: Api, org: OrgFixture) -> None:
    minted = await mint_contact_token(
        api, org, userId="u1", email="ann@example.com", name="Ann", customData={"plan": "pro"}
    )
    reply = await visit(
        api, org, user={"token": minted["token"], "name": "Mallory", "email": "m@evil.example"}
    )
    assert reply.status == 200, reply.body
    identity = reply.json["identity"]
    assert identity["level"] == "verified"
    assert identity["contactId"] == minted["contactId"]
    assert identity["attributes"]["email"] == {
        "value": "ann@example.com",
        "source": "server",
        "verified": True,
    }
    assert identity["attributes"]["name"]["value"] == "Ann"
    assert identity["attributes"]["plan"] == {"value": "pro", "source": "server", "verified": True}


@pytest.mark.parametrize(
    ("token", "code"),
    [
        ("garbage", "token_invalid"),
        ("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "token_invalid"),
    ],
)
async def test_a_failing_contact_token_is_its_401_not_a_downgrade(
    api: Api, org: OrgFixture, pool: asyncpg.Pool, token: str, code: str
) -> None:
    before = await row_counts(pool)
    reply = await visit(api, org, user={"token": token, "email": "a@b.example"})
    assert (reply.status, reply.json["code"]) == (401, code)
    assert await row_counts(pool) == before


# --- item 2: externalId policy -----------------------------------------------------------------


async def test_org_policy_can_require_a_signed_external_id(api: Api, pool: asyncpg.Pool) -> None:
    strict = await provision_org(api, origins=(ORIGIN,), policy={"requireSignedExternalId": True})
    unsigned = await mint_contact_token(api, strict, userId="ann")
    before = await row_counts(pool)
    reply = await visit(api, strict, user={"token": unsigned["token"], "externalId": "w1"})
    assert (reply.status, reply.json["code"]) == (403, "external_id_unsigned")
    assert await row_counts(pool) == before
    signed = await mint_contact_token(api, strict, userId="ann", externalId="w1")
    ok = await resolved(api, strict, user={"token": signed["token"], "externalId": "w1"})
    assert (ok["identity"]["externalId"], ok["identity"]["externalIdVerified"]) == ("w1", True)


# --- item 3: the collect block -----------------------------------------------------------------


async def test_collect_block_asks_what_is_unknown_and_prefills_what_is_known(
    api: Api, org: OrgFixture
) -> None:
    first = await resolved(api, org)
    collect = first["collect"]
    assert collect["collectUserData"] is True
    assert [f["name"] for f in collect["ask"]] == [
        "name",
        "email",
        "company",
        "seats",
        "newsletter",
    ]
    assert collect["ask"][2] == {
        "name": "company",
        "label": "Company",
        "type": "text",
        "required": False,
        "maxLength": 20,
    }
    assert collect["prefill"] == {}
    answered = await resolved(
        api,
        org,
        visitorToken=first["visitorToken"],
        user={"name": "Ann", "email": "ann@example.com"},
        fields={"company": "Acme", "seats": 5, "newsletter": False},
    )
    assert answered["collect"]["ask"] == []
    assert answered["collect"]["prefill"] == {"name": "Ann", "email": "ann@example.com"}
    assert answered["identity"]["attributes"]["seats"] == {
        "value": 5,
        "source": "browser",
        "verified": False,
    }


@pytest.mark.parametrize(
    "body",
    [
        {"fields": {"unknown": "x"}},
        {"fields": {"company": "x" * 21}},
        {"fields": {"seats": "five"}},
        {"fields": {"newsletter": "yes"}},
        {"fields": {"company": {"nested": 1}}},
        {"customData": {"big": "x" * 1000, **{f"k{i}": "x" * 999 for i in range(9)}}},
        {"customData": {"nested": {"a": 1}}},
        {"customData": {f"k{i}": i for i in range(51)}},
        {"customData": {"bad key": 1}},
        {"user": {"email": "not-an-email"}},
        {"user": {"name": "x" * 201}},
        {"user": {"externalId": "x" * 257}},
        {"visitorToken": "x" * 101},
    ],
)
async def test_bad_visitor_input_is_a_clear_422_that_changes_nothing(
    api: Api, org: OrgFixture, pool: asyncpg.Pool, body: dict[str, Any]
) -> None:
    before = await row_counts(pool)
    reply = await visit(api, org, **body)
    assert reply.status == 422, reply.body
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert reply.json["code"] == "validation_failed"
    assert await row_counts(pool) == before


# --- item 4: session tokens, history, logout, introspection ------------------------------------


async def test_history_needs_this_sessions_live_token(api: Api, org: OrgFixture) -> None:
    one = await resolved(api, org)
    two = await resolved(api, org)
    cases = [
        ({**one, "sessionToken": "wis_" + "A" * 43}, 401, "invalid_session_token"),
        ({**one, "sessionToken": "nonsense"}, 401, "invalid_session_token"),
        ({**one, "sessionToken": two["sessionToken"]}, 401, "invalid_session_token"),
        ({**one, "sessionId": "not-a-uuid"}, 404, "not_found"),
    ]
    for session, status, code in cases:
        reply = await history(api, session)
        assert (reply.status, reply.json["code"]) == (status, code), session
    reply = await api.get(f"/widget/sessions/{one['sessionId']}/history")
    assert (reply.status, reply.json["code"]) == (401, "invalid_session_token")
    assert (await history(api, one)).status == 200


async def test_history_is_newest_first_and_paginated(
    api: Api, org: OrgFixture, pool: asyncpg.Pool
) -> None:
    session = await resolved(api, org)
    for text in ("first", "second", "third"):
        await say(pool, session["sessionId"], text)
    page = await history(api, session, query="?limit=2")
    assert page.status == 200, page.body
    texts = [c["messages"][0]["text"] for c in page.json["conversations"]]
    assert texts == ["third", "second"]
    message = page.json["conversations"][0]["messages"][0]
    assert set(message) == {"id", "author", "text", "senderVerified", "createdAt"}
    assert message["senderVerified"] is False
    rest = await history(api, session, query=f"?limit=2&cursor={page.json['nextCursor']}")
    assert [c["messages"][0]["text"] for c in rest.json["conversations"]] == ["first"]
    assert rest.json["nextCursor"] is None
    for query in ("?limit=0", "?limit=51", "?limit=x", "?cursor=%%%", "?cursor=bm9wZQ"):
        bad = await history(api, session, query=query)
        assert (bad.status, bad.json["code"]) == (422, "validation_failed"), query


async def test_session_introspection_for_platform_services(api: Api, org: OrgFixture) -> None:
    minted = await mint_contact_token(api, org, userId="ann", externalId="w1", name="Ann")
    session = await resolved(api, org, user={"token": minted["token"]})
    info = await api.get(f"/v1/sessions/{session['sessionId']}", token=org.api_key)
    assert info.status == 200, info.body
    body = info.json
    assert body["id"] == session["sessionId"]
    assert body["orgId"] == org.org_id
    assert body["visitorId"] == session["identity"]["visitorId"]
    assert (body["level"], body["contactId"], body["externalId"]) == (
        "verified",
        minted["contactId"],
        "w1",
    )
    assert (body["active"], body["endedAt"], body["endReason"]) == (True, None, None)
    assert (await api.get(f"/v1/sessions/{session['sessionId']}")).status == 401
    limited = await api.post(
        f"/admin/v1/orgs/{org.org_id}/api-keys",
        json={"scopes": ["history:read"]},
        token=ADMIN_TOKEN,
    )
    denied = await api.get(f"/v1/sessions/{session['sessionId']}", token=limited.json["key"])
    assert (denied.status, denied.json["code"]) == (403, "insufficient_scope")
    assert (await logout(api, session)).status == 200
    ended = (await api.get(f"/v1/sessions/{session['sessionId']}", token=org.api_key)).json
    assert (ended["active"], ended["endReason"]) == (False, "logout")
    assert ended["endedAt"] is not None


async def test_logout_twice_is_session_ended(api: Api, org: OrgFixture) -> None:
    session = await resolved(api, org)
    assert (await logout(api, session)).status == 200
    again = await logout(api, session)
    assert (again.status, again.json["code"]) == (401, "session_ended")


# --- item 5: the login merge trigger and device bindings ---------------------------------------


async def merge_events(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT payload FROM outbox WHERE event_type = 'history.merge_requested' ORDER BY id"
    )
    return [json.loads(r["payload"]) for r in rows]


async def test_login_on_a_browser_with_history_requests_one_merge(
    api: Api, org: OrgFixture, pool: asyncpg.Pool
) -> None:
    browsing = await resolved(api, org)
    token = (await mint_contact_token(api, org, userId="ann", externalId="w1"))["token"]
    login = await resolved(api, org, visitorToken=browsing["visitorToken"], user={"token": token})
    assert login["merge"] is not None
    assert login["merge"]["status"] == "pending"
    [event] = await merge_events(pool)
    assert event["subject"] == login["identity"]["contactId"]
    assert event["data"] == {
        "mergeId": login["merge"]["id"],
        "reason": "login",
        "targetContactId": login["identity"]["contactId"],
        "targetExternalId": "w1",
        "sourceVisitorId": browsing["identity"]["visitorId"],
        "sourceContactId": None,
        "sourceExternalId": "",
    }
    # The promise is recorded with the session that hands it out (promise 13).
    [request] = await pool.fetch(
        "SELECT merge_id, org_id, visitor_id, contact_id, external_id FROM login_merge_requests"
    )
    assert [str(v) for v in request.values()] == [
        login["merge"]["id"],
        org.org_id,
        browsing["identity"]["visitorId"],
        login["identity"]["contactId"],
        "w1",
    ]
    # Presenting a token again (even a freshly minted one) asks for nothing more.
    fresh = (await mint_contact_token(api, org, userId="ann", externalId="w1"))["token"]
    again = await resolved(api, org, visitorToken=browsing["visitorToken"], user={"token": fresh})
    assert again["merge"] is None
    assert len(await merge_events(pool)) == 1
    # New browser-bound activity on this browser, then a login again: one more merge.
    await resolved(api, org, visitorToken=browsing["visitorToken"], user={"name": "Ann"})
    relogin = await resolved(api, org, visitorToken=browsing["visitorToken"], user={"token": fresh})
    assert relogin["merge"] is not None
    assert relogin["merge"]["id"] != login["merge"]["id"]
    assert len(await merge_events(pool)) == 2
    assert await pool.fetchval("SELECT count(*) FROM login_merge_requests") == 2


async def test_no_merge_for_a_first_load_login_or_when_the_org_turns_it_off(
    api: Api, pool: asyncpg.Pool
) -> None:
    keep = await provision_org(api, origins=(ORIGIN,), policy={"mergeAnonymousOnLogin": False})
    token = (await mint_contact_token(api, keep, userId="ann"))["token"]
    browsing = await resolved(api, keep)
    login = await resolved(api, keep, visitorToken=browsing["visitorToken"], user={"token": token})
    assert login["merge"] is None
    first_load = await resolved(api, keep, user={"token": token})
    assert first_load["merge"] is None
    assert await merge_events(pool) == []
    assert await pool.fetchval("SELECT count(*) FROM login_merge_requests") == 0


async def test_a_contacts_devices_can_be_listed_and_revoked(api: Api, org: OrgFixture) -> None:
    token = (await mint_contact_token(api, org, userId="ann"))["token"]
    laptop = await resolved(api, org, user={"token": token})
    phone = await resolved(api, org, user={"token": token})
    contact = laptop["identity"]["contactId"]
    listed = await api.get(f"/v1/contacts/{contact}/devices", token=org.api_key)
    assert listed.status == 200, listed.body
    assert {d["visitorId"] for d in listed.json["devices"]} == {
        laptop["identity"]["visitorId"],
        phone["identity"]["visitorId"],
    }
    gone = await api.delete(
        f"/v1/contacts/{contact}/devices/{phone['identity']['visitorId']}", token=org.api_key
    )
    assert gone.status == 204
    reply = await history(api, phone)
    assert (reply.status, reply.json["code"]) == (401, "session_ended")
    back = await resolved(api, org, visitorToken=phone["visitorToken"])
    assert back["identity"]["visitorId"] != phone["identity"]["visitorId"]
    assert back["identity"]["level"] == "anonymous"
    listed = await api.get(f"/v1/contacts/{contact}/devices", token=org.api_key)
    assert [d["visitorId"] for d in listed.json["devices"]] == [laptop["identity"]["visitorId"]]
    assert (await history(api, laptop)).status == 200
    again = await api.delete(
        f"/v1/contacts/{contact}/devices/{phone['identity']['visitorId']}", token=org.api_key
    )
    assert again.status == 404


# --- item 6: public-endpoint hygiene -----------------------------------------------------------


async def test_origin_must_be_allowed_by_the_widget_token(
    api: Api, org: OrgFixture, pool: asyncpg.Pool
) -> None:
    before = await row_counts(pool)
    for origin in ("https://evil.example", "null", "http://shop.example"):
        reply = await visit(api, org, origin=origin)
        assert (reply.status, reply.json["code"]) == (403, "origin_not_allowed"), origin
        assert reply.headers["Vary"] == "Origin"
    assert await row_counts(pool) == before
    # Server-side callers send no Origin: CORS protects browsers, the widget token is public.
    assert (await visit(api, org, origin=None)).status == 200


async def test_preflight_is_answered(api: Api, org: OrgFixture) -> None:
    for path in ("/widget/sessions", f"/widget/sessions/{uuid.uuid4()}/history"):
        reply = await api.request(
            "OPTIONS",
            path,
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, authorization",
            },
        )
        assert reply.status == 204
        assert reply.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert reply.headers["Access-Control-Allow-Headers"] == "Content-Type, Authorization"
        assert "POST" in reply.headers["Access-Control-Allow-Methods"]
        assert reply.headers["Vary"] == "Origin"


async def test_unknown_widget_token_is_401(api: Api, pool: asyncpg.Pool) -> None:
    before = await row_counts(pool)
    reply = await api.post("/widget/sessions", json={"widgetToken": "wit_nope"})
    assert (reply.status, reply.json["code"]) == (401, "invalid_widget_token")
    assert await row_counts(pool) == before


@pytest.mark.parametrize(
    ("limit_name", "per_visitor"),
    [("sessionsPerVisitor", True), ("sessionsPerWidgetToken", False), ("sessionsPerIp", False)],
)
async def test_rate_limits_come_from_org_policy(
    api: Api, limit_name: str, per_visitor: bool
) -> None:
    limited = await provision_org(api, origins=(ORIGIN,), policy={"rateLimits": {limit_name: 3}})
    first = await resolved(api, limited)
    token = first["visitorToken"] if per_visitor else None
    body: dict[str, Any] = {} if token is None else {"visitorToken": token}
    # Three requests count against the limit (the first visit has no visitor token yet).
    for _ in range(3 if per_visitor else 2):
        assert (await visit(api, limited, **body)).status == 200
    refused = await visit(api, limited, **body)
    assert (refused.status, refused.json["code"]) == (429, "rate_limited")
    assert int(refused.headers["Retry-After"]) >= 1
    if per_visitor:
        # Another browser behind the same IP is not affected by this visitor's limit.
        assert (await visit(api, limited)).status == 200


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        (b"{" * 100 + b"x" * (70 * 1024), "application/json", 413),
        (b"{not json", "application/json", 400),
        (b'{"widgetToken": "x", "admin": true}', "application/json", 422),
        (b'{"widgetToken": 7}', "application/json", 422),
        (b"[" * 1000 + b"]" * 1000, "application/json", 422),
        (
            b'{"widgetToken": "x", "customData": ' + b'{"a":' * 500 + b"1" + b"}" * 501,
            "application/json",
            422,
        ),
        (b"widgetToken=x", "application/x-www-form-urlencoded", 415),
        (b"", "application/json", 422),
    ],
)
async def test_hostile_bodies_are_4xx_and_change_nothing(
    api: Api, pool: asyncpg.Pool, data: bytes, content_type: str, status: int
) -> None:
    before = await row_counts(pool)
    reply = await api.post(
        "/widget/sessions", data=data, headers={"Content-Type": content_type, "Origin": ORIGIN}
    )
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert await row_counts(pool) == before


# --- item 7: the fast path and cache invalidation ----------------------------------------------

FORBID_WRITES = """
CREATE FUNCTION forbid_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'write to % on a fast-path widget load', TG_TABLE_NAME; END $$;
CREATE TRIGGER no_visitor_writes BEFORE INSERT OR UPDATE OR DELETE ON visitors
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_write();
CREATE TRIGGER no_session_writes BEFORE INSERT OR UPDATE OR DELETE ON sessions
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_write();
CREATE TRIGGER no_binding_writes BEFORE INSERT OR UPDATE OR DELETE ON device_bindings
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_write();
CREATE TRIGGER no_event_writes BEFORE INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_write();
"""


async def test_returning_visitor_with_nothing_new_costs_no_postgres_write(
    api: Api, org: OrgFixture, pool: asyncpg.Pool, redis: Any, settings: Settings
) -> None:
    token = (await mint_contact_token(api, org, userId="ann", name="Ann"))["token"]
    anonymous = await resolved(api, org)
    typed = await resolved(api, org, user={"email": "bob@example.com"}, fields={"seats": 2})
    verified = await resolved(api, org, user={"token": token})
    # From here on, any write to these tables fails the request with a 500.
    await pool.execute(FORBID_WRITES)

    async def loads() -> None:
        for _ in range(5):
            again = await resolved(api, org, visitorToken=anonymous["visitorToken"])
            assert again["sessionId"] == anonymous["sessionId"]
            assert again["sessionToken"] == anonymous["sessionToken"]
            # The widget re-sending what it already sent is nothing new either.
            again = await resolved(
                api,
                org,
                visitorToken=typed["visitorToken"],
                user={"email": "bob@example.com"},
                fields={"seats": 2},
            )
            assert again["sessionId"] == typed["sessionId"]
            again = await resolved(
                api, org, visitorToken=verified["visitorToken"], user={"token": token}
            )
            assert again["sessionId"] == verified["sessionId"]
            assert again["identity"]["level"] == "verified"

    await loads()
    # With the Redis cache gone, Postgres is read, still not written.
    keys = [k async for k in redis.scan_iter(match=settings.stream_prefix + "sr:*")]
    assert keys
    await redis.delete(*keys)
    await loads()
    # And something new is written (the guard is real: this write is refused).
    refused = await visit(api, org, visitorToken=anonymous["visitorToken"], user={"name": "Al"})
    assert refused.status == 500


async def test_last_seen_is_refreshed_at_most_once_per_interval(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    from services.session_resolution.app_keys import SESSION_CONFIG
    from services.session_resolution.config import SessionConfig

    app = all_in_one.create_app(settings)
    app[SESSION_CONFIG] = SessionConfig(last_seen_interval=0.0)
    async with running(app) as client:
        org = await provision_org(client, origins=(ORIGIN,))
        first = await resolved(client, org)
        visitor = uuid.UUID(first["identity"]["visitorId"])
        seen_at = await pool.fetchval("SELECT last_seen_at FROM visitors WHERE id = $1", visitor)
        again = await resolved(client, org, visitorToken=first["visitorToken"])
        assert again["sessionId"] == first["sessionId"]
        later = await pool.fetchval("SELECT last_seen_at FROM visitors WHERE id = $1", visitor)
        assert later > seen_at


async def test_revocation_invalidates_the_cached_verified_session(
    api: Api, org: OrgFixture, pool: asyncpg.Pool
) -> None:
    token = (await mint_contact_token(api, org, userId="ann"))["token"]
    session = await resolved(api, org, user={"token": token})
    assert (await resolved(api, org, visitorToken=session["visitorToken"], user={"token": token}))[
        "sessionId"
    ] == session["sessionId"]
    contact = session["identity"]["contactId"]
    revoked = await api.post(f"/v1/contacts/{contact}/revoke-tokens", token=org.api_key)
    assert revoked.status == 200, revoked.body

    reply = await visit(api, org, visitorToken=session["visitorToken"], user={"token": token})
    assert (reply.status, reply.json["code"]) == (401, "token_revoked")
    reply = await history(api, session)
    assert (reply.status, reply.json["code"]) == (401, "token_revoked")
    info = (await api.get(f"/v1/sessions/{session['sessionId']}", token=org.api_key)).json
    assert (info["active"], info["endReason"]) == (False, "tokens_revoked")

    # The revocation shows in session_scopes (what the history service reads) at once, and
    # the consumer records it with a session.ended event; the answers stay the same.
    async def recorded() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT ended_at IS NOT NULL FROM session_scopes WHERE session_id = $1",
                uuid.UUID(session["sessionId"]),
            )
        )

    assert await recorded()  # at once: the view reads the revocation itself

    async def event_emitted() -> bool:  # and the consumer records it, with its event
        return "session.ended" in await outbox_types(pool)

    await eventually(event_emitted)
    reply = await history(api, session)
    assert (reply.status, reply.json["code"]) == (401, "token_revoked")
    # A token minted after the revocation gets a new session, never the revoked one.
    fresh = (await mint_contact_token(api, org, userId="ann"))["token"]
    renewed = await resolved(api, org, visitorToken=session["visitorToken"], user={"token": fresh})
    assert renewed["sessionId"] != session["sessionId"]
    assert (await history(api, renewed)).status == 200
    # The browser can still log out with its revoked session (the visitor is still bound).
    out = await logout(api, session)
    assert out.status == 200, out.body
    reply = await history(api, renewed)
    assert (reply.status, reply.json["code"]) == (401, "session_ended")


async def test_deleted_signing_key_stops_verifying_on_the_fast_path(
    api: Api, org: OrgFixture
) -> None:
    old_token = (await mint_contact_token(api, org, userId="ann"))["token"]
    session = await resolved(api, org, user={"token": old_token})
    rotated = await api.post(f"/admin/v1/orgs/{org.org_id}/signing-keys", token=ADMIN_TOKEN)
    assert rotated.status in (200, 201), rotated.body
    deleted = await api.delete(
        f"/admin/v1/orgs/{org.org_id}/signing-keys/{org.kid}", token=ADMIN_TOKEN
    )
    assert deleted.status in (200, 204), deleted.body
    reply = await visit(api, org, visitorToken=session["visitorToken"], user={"token": old_token})
    assert (reply.status, reply.json["code"]) == (401, "token_invalid")


async def test_concurrent_logins_on_one_browser_request_exactly_one_merge(
    api: Api, org: OrgFixture, pool: asyncpg.Pool
) -> None:
    browsing = await resolved(api, org, user={"name": "Ann"})
    token = (await mint_contact_token(api, org, userId="ann", externalId="w1"))["token"]
    # Another device first, so the verifier's key cache is warm before the burst.
    await resolved(api, org, user={"token": token})
    replies = await asyncio.gather(
        *(
            visit(api, org, visitorToken=browsing["visitorToken"], user={"token": token})
            for _ in range(20)
        )
    )
    assert {r.status for r in replies} == {200}, [r.body for r in replies if r.status != 200][:2]
    merges = [r.json["merge"] for r in replies if r.json["merge"] is not None]
    assert len(merges) == 1
    assert [e["data"]["mergeId"] for e in await merge_events(pool)] == [merges[0]["id"]]
    assert [
        str(r["merge_id"]) for r in await pool.fetch("SELECT merge_id FROM login_merge_requests")
    ] == [merges[0]["id"]]
    bindings = await pool.fetchval(
        "SELECT count(*) FROM device_bindings WHERE visitor_id = $1",
        uuid.UUID(browsing["identity"]["visitorId"]),
    )
    assert bindings == 1
