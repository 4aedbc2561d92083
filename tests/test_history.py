"""History store and API: every conversation lives in exactly one scope, messages remember
whether their sender was verified, and readers see only the scope they ask for."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.history import app as history
from shared.config import Settings
from tests.support.history_fixtures import (
    Org,
    add_conversations,
    make_api_key,
    make_contact,
    make_org,
    make_session,
    make_visitor,
)
from tests.support.server import Api, running


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with running(history.create_app(settings)) as client:
        yield client


@pytest.fixture
async def org(pool: asyncpg.Pool) -> Org:
    return await make_org(pool)


async def counts(pool: asyncpg.Pool) -> tuple[int, int]:
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM conversations) AS c, (SELECT count(*) FROM messages) AS m"
    )
    return row["c"], row["m"]


async def test_promise_3_browser_bound_history_stays_with_its_visitor(
    api: Api, pool: asyncpg.Pool, org: Org
) -> None:
    visitor = await make_visitor(pool, org)
    other = await make_visitor(pool, org)
    session = await make_session(pool, org, visitor, level="unverified")
    reply = await api.post(
        "/v1/conversations",
        json={"sessionId": session, "message": {"text": "hi, I am ada@example.com"}},
        token=org.key,
    )
    assert reply.status == 201, reply.body
    assert reply.body["scope"] == {"type": "visitor", "visitorId": visitor}
    assert reply.body["message"]["senderVerified"] is False

    mine = await api.get(f"/v1/visitors/{visitor}/history", token=org.key)
    assert mine.status == 200
    assert [c["id"] for c in mine.body["conversations"]] == [reply.body["id"]]
    assert mine.body["conversations"][0]["messages"][0]["text"] == "hi, I am ada@example.com"
    theirs = await api.get(f"/v1/visitors/{other}/history", token=org.key)
    assert theirs.body == {"conversations": [], "nextCursor": None}


async def test_promise_2_verified_history_is_per_contact_and_external_id(
    api: Api, pool: asyncpg.Pool, org: Org
) -> None:
    contact = await make_contact(pool, org)
    laptop, phone = await make_visitor(pool, org), await make_visitor(pool, org)
    on_laptop = await make_session(pool, org, laptop, contact_id=contact, external_id="w1")
    on_phone = await make_session(pool, org, phone, contact_id=contact, external_id="w1")
    other_workspace = await make_session(pool, org, phone, contact_id=contact, external_id="w2")

    first = await api.post("/v1/conversations", json={"sessionId": on_laptop}, token=org.key)
    assert first.status == 201
    assert first.body["scope"] == {"type": "contact", "contactId": contact, "externalId": "w1"}
    # The same person on another device writes into the same history...
    reply = await api.post(
        f"/v1/conversations/{first.body['id']}/messages",
        json={"text": "from my phone", "sessionId": on_phone},
        token=org.key,
    )
    assert reply.status == 201, reply.body
    assert reply.body["senderVerified"] is True
    # ...but under another externalId it is a separate history.
    second = await api.post("/v1/conversations", json={"sessionId": other_workspace}, token=org.key)
    denied = await api.post(
        f"/v1/conversations/{first.body['id']}/messages",
        json={"text": "wrong workspace", "sessionId": other_workspace},
        token=org.key,
    )
    assert denied.status == 403
    assert denied.body["code"] == "scope_mismatch"

    w1 = await api.get(f"/v1/contacts/{contact}/history?externalId=w1", token=org.key)
    w2 = await api.get(f"/v1/contacts/{contact}/history?externalId=w2", token=org.key)
    none = await api.get(f"/v1/contacts/{contact}/history", token=org.key)
    assert [c["id"] for c in w1.body["conversations"]] == [first.body["id"]]
    assert [m["text"] for m in w1.body["conversations"][0]["messages"]] == ["from my phone"]
    assert [c["id"] for c in w2.body["conversations"]] == [second.body["id"]]
    assert none.body["conversations"] == []


async def test_each_message_records_whether_its_sender_was_verified_at_the_time(
    api: Api, pool: asyncpg.Pool, org: Org
) -> None:
    visitor = await make_visitor(pool, org)
    contact = await make_contact(pool, org)
    anonymous = await make_session(pool, org, visitor)
    verified = await make_session(pool, org, visitor, contact_id=contact)
    conversation = (
        await api.post("/v1/conversations", json={"sessionId": verified}, token=org.key)
    ).body["id"]
    path = f"/v1/conversations/{conversation}/messages"
    by_visitor = await api.post(path, json={"text": "me", "sessionId": verified}, token=org.key)
    by_agent = await api.post(path, json={"text": "hello", "author": "agent"}, token=org.key)
    assert (by_visitor.status, by_agent.status) == (201, 201)
    assert by_visitor.body["senderVerified"] is True
    assert by_agent.body["author"] == "agent"
    assert by_agent.body["senderVerified"] is True  # written with the org's API key

    # An anonymous session of the same browser does not own the contact's conversation.
    reply = await api.post(path, json={"text": "x", "sessionId": anonymous}, token=org.key)
    assert reply.status == 403
    stored = await pool.fetch(
        "SELECT author, sender_verified FROM messages WHERE conversation_id = $1 ORDER BY created_at",
        conversation,
    )
    assert [(r["author"], r["sender_verified"]) for r in stored] == [
        ("visitor", True),
        ("agent", True),
    ]

    own = (await api.post("/v1/conversations", json={"sessionId": anonymous}, token=org.key)).body
    reply = await api.post(
        f"/v1/conversations/{own['id']}/messages",
        json={"text": "anon", "sessionId": anonymous},
        token=org.key,
    )
    assert reply.body["senderVerified"] is False


async def test_ended_or_expired_sessions_record_nothing(
    api: Api, pool: asyncpg.Pool, org: Org
) -> None:
    visitor = await make_visitor(pool, org)
    ended = await make_session(pool, org, visitor, ended=True)
    expired = await make_session(pool, org, visitor, expired=True)
    live = await make_session(pool, org, visitor)
    conversation = (
        await api.post("/v1/conversations", json={"sessionId": live}, token=org.key)
    ).body["id"]
    before = await counts(pool)
    for session in (ended, expired):
        reply = await api.post(
            "/v1/conversations",
            json={"sessionId": session, "message": {"text": "x"}},
            token=org.key,
        )
        assert reply.status == 409
        assert reply.body["code"] == "session_ended"
        reply = await api.post(
            f"/v1/conversations/{conversation}/messages",
            json={"text": "x", "sessionId": session},
            token=org.key,
        )
        assert reply.status == 409
    assert await counts(pool) == before


async def test_promise_8_another_orgs_ids_read_as_not_found(
    api: Api, pool: asyncpg.Pool, org: Org
) -> None:
    theirs = await make_org(pool)
    visitor = await make_visitor(pool, theirs)
    contact = await make_contact(pool, theirs)
    session = await make_session(pool, theirs, visitor)
    [conversation] = await add_conversations(
        pool, theirs, contact_id=contact, origin_visitor_id=visitor
    )
    before = await counts(pool)

    replies = [
        await api.post("/v1/conversations", json={"sessionId": session}, token=org.key),
        await api.post(
            f"/v1/conversations/{conversation}/messages",
            json={"text": "x", "author": "agent"},
            token=org.key,
        ),
        await api.get(f"/v1/contacts/{contact}/history", token=org.key),
        await api.get(f"/v1/visitors/{visitor}/history", token=org.key),
        await api.get("/v1/visitors/not-a-uuid/history", token=org.key),
    ]
    missing = await api.get(
        "/v1/visitors/00000000-0000-0000-0000-000000000000/history", token=org.key
    )
    for reply in replies:
        assert reply.status == 404
        assert reply.body["code"] == "not_found"
        assert reply.body["detail"] in {
            "session not found",
            "conversation not found",
            "contact not found",
            "visitor not found",
        }
    assert replies[3].body["detail"] == missing.body["detail"]
    assert await counts(pool) == before
    # Their own key sees it.
    reply = await api.get(f"/v1/contacts/{contact}/history", token=theirs.key)
    assert [c["id"] for c in reply.body["conversations"]] == [conversation]


async def test_api_key_scopes_are_enforced(api: Api, pool: asyncpg.Pool, org: Org) -> None:
    visitor = await make_visitor(pool, org)
    session = await make_session(pool, org, visitor)
    reader = await make_api_key(pool, org.id, ["history:read"])
    writer = await make_api_key(pool, org.id, ["history:write"])

    reply = await api.post("/v1/conversations", json={"sessionId": session}, token=reader)
    assert (reply.status, reply.body["code"]) == (403, "insufficient_scope")
    reply = await api.get(f"/v1/visitors/{visitor}/history", token=writer)
    assert (reply.status, reply.body["code"]) == (403, "insufficient_scope")
    reply = await api.get(f"/v1/visitors/{visitor}/history")
    assert (reply.status, reply.body["code"]) == (401, "invalid_api_key")
    assert await counts(pool) == (0, 0)
    assert (
        await api.post("/v1/conversations", json={"sessionId": session}, token=writer)
    ).status == 201
    assert (await api.get(f"/v1/visitors/{visitor}/history", token=reader)).status == 200


async def test_history_pages_newest_first_with_an_opaque_cursor(
    api: Api, pool: asyncpg.Pool, org: Org
) -> None:
    contact = await make_contact(pool, org)
    visitor = await make_visitor(pool, org)
    created = await add_conversations(
        pool, org, contact_id=contact, origin_visitor_id=visitor, count=45, messages=2
    )
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        path = f"/v1/contacts/{contact}/history?limit=20"
        if cursor:
            path += f"&cursor={cursor}"
        reply = await api.get(path, token=org.key)
        assert reply.status == 200, reply.body
        pages += 1
        seen += [c["id"] for c in reply.body["conversations"]]
        assert all(len(c["messages"]) == 2 for c in reply.body["conversations"])
        cursor = reply.body["nextCursor"]
        if cursor is None:
            break
    assert pages == 3
    # add_conversations makes each conversation one second older than the one before.
    assert seen == created


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=101",
        "limit=abc",
        "limit=%C2%B2",
        "cursor=nope",
        "cursor=W10",
        "cursor=" + "A" * 500,
    ],
)
async def test_bad_page_parameters_are_422(
    api: Api, pool: asyncpg.Pool, org: Org, query: str
) -> None:
    visitor = await make_visitor(pool, org)
    reply = await api.get(f"/v1/visitors/{visitor}/history?{query}", token=org.key)
    assert reply.status == 422
    assert reply.body["code"] == "validation_failed"


async def test_a_long_conversation_returns_its_newest_messages_and_says_so(
    api: Api, pool: asyncpg.Pool, org: Org
) -> None:
    visitor = await make_visitor(pool, org)
    [conversation] = await add_conversations(pool, org, visitor_id=visitor, messages=0)
    await pool.execute(
        """INSERT INTO messages (id, org_id, conversation_id, author, sender_verified, body, created_at)
           SELECT gen_random_uuid(), $1, $2, 'visitor', false, 'm' || i,
                  now() + make_interval(secs => i)
           FROM generate_series(1, 105) AS i""",
        org.id,
        conversation,
    )
    reply = await api.get(f"/v1/visitors/{visitor}/history", token=org.key)
    [conv] = reply.body["conversations"]
    assert conv["messagesTruncated"] is True
    assert [m["text"] for m in conv["messages"]] == [f"m{i}" for i in range(6, 106)]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/conversations", {"sessionId": "nope"}),
        ("/v1/conversations", {"sessionId": "{session}", "extra": 1}),
        ("/v1/conversations", {"sessionId": "{session}", "message": {"text": ""}}),
        ("/v1/conversations", {"sessionId": "{session}", "message": {"text": "a\u0000b"}}),
        ("/v1/conversations", {"sessionId": "{session}", "message": {"text": "x" * 10_001}}),
        (
            "/v1/conversations",
            {"sessionId": "{session}", "message": {"text": "x", "author": "god"}},
        ),
        (
            "/v1/conversations",
            {"sessionId": "{session}", "message": {"text": "x", "data": {"k": "\u0000"}}},
        ),
        ("/v1/conversations", [1, 2]),
        ("{messages}", {"text": "no session for a visitor message"}),
        ("{messages}", {"text": "x", "author": "agent", "sessionId": "{session}"}),
        ("{messages}", {"text": 5, "sessionId": "{session}"}),
    ],
)
async def test_bad_input_is_a_4xx_and_writes_nothing(
    api: Api, pool: asyncpg.Pool, org: Org, path: str, body: object
) -> None:
    visitor = await make_visitor(pool, org)
    session = await make_session(pool, org, visitor)
    [conversation] = await add_conversations(pool, org, visitor_id=visitor)
    path = path.replace("{messages}", f"/v1/conversations/{conversation}/messages")
    if isinstance(body, dict):
        body = {
            k: v.replace("{session}", session) if isinstance(v, str) else v for k, v in body.items()
        }
    before = await counts(pool)
    reply = await api.post(path, json=body, token=org.key)
    assert reply.status == 422, reply.body
    assert await counts(pool) == before
    malformed = await api.post(
        path, data=b"{not json", headers={"Content-Type": "application/json"}, token=org.key
    )
    assert malformed.status == 400
    assert await counts(pool) == before


async def test_unknown_conversation_is_not_found(api: Api, pool: asyncpg.Pool, org: Org) -> None:
    reply = await api.post(
        "/v1/conversations/00000000-0000-0000-0000-000000000000/messages",
        json={"text": "x", "author": "bot"},
        token=org.key,
    )
    assert (reply.status, reply.body["code"]) == (404, "not_found")
