"""Promises 4 and 5: a login merges the browser's own history once, traceably and undoably;
two verified contacts merge only on an explicit call. The merge consumer applies each merge
exactly once under redelivery and concurrency, without deadlocks."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from services import all_in_one
from services.history.consumers import GROUP
from services.history.merges import apply_requested_merge
from shared.bus.dead_letters import dead_letters, replay_dead_letters
from shared.bus.outbox import Outbox
from shared.config import Settings
from shared.db import create_pool
from tests.support.history_fixtures import (
    Org,
    add_conversations,
    emit_merge_requests,
    history_app,
    make_api_key,
    make_contact,
    make_org,
    make_visitor,
    make_visitors,
    merge_event,
    merge_request,
    publish,
)
from tests.support.journeys import chat_anonymously, log_in, until_merge_done
from tests.support.server import Api, eventually, running
from tests.support.tokens import mint_contact_token, provision_org


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with running(history_app(settings)) as client:
        yield client


@pytest.fixture
async def org(pool: asyncpg.Pool) -> Org:
    return await make_org(pool)


async def merge_status(pool: asyncpg.Pool, merge_id: str) -> str | None:
    status: str | None = await pool.fetchval("SELECT status FROM merges WHERE id = $1", merge_id)
    return status


async def wait_for_status(pool: asyncpg.Pool, merge_id: str, status: str) -> None:
    async def reached() -> bool:
        return await merge_status(pool, merge_id) == status

    await eventually(reached, timeout=15)


async def scope_of(pool: asyncpg.Pool, ids: list[str]) -> set[tuple[Any, ...]]:
    rows = await pool.fetch(
        "SELECT visitor_id, contact_id, external_id FROM conversations WHERE id = ANY($1::uuid[])",
        ids,
    )
    return {
        (
            str(r["visitor_id"]) if r["visitor_id"] else None,
            str(r["contact_id"]) if r["contact_id"] else None,
            r["external_id"],
        )
        for r in rows
    }


async def outbox_events(pool: asyncpg.Pool, event_type: str) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT payload FROM outbox WHERE event_type = $1 ORDER BY id", event_type
    )
    return [msgspec.json.decode(r["payload"]) for r in rows]


async def test_promise_4_login_merge_moves_the_browsers_history_once_and_records_it(
    api: Api, pool: asyncpg.Pool, settings: Settings, org: Org
) -> None:
    visitor = await make_visitor(pool, org)
    contact = await make_contact(pool, org)
    moved = await add_conversations(pool, org, visitor_id=visitor, count=3, messages=2)
    own = await add_conversations(
        pool, org, contact_id=contact, external_id="w", origin_visitor_id=visitor
    )
    request = merge_request(
        org, target_contact_id=contact, target_external_id="w", source_visitor_id=visitor
    )
    await emit_merge_requests(pool, settings, org, [request])
    await wait_for_status(pool, request.merge_id, "done")

    reply = await api.get(f"/v1/merges/{request.merge_id}", token=org.key)
    assert reply.status == 200
    merge = reply.body
    assert merge["status"] == "done"
    assert merge["reason"] == "login"
    assert merge["source"] == {"type": "visitor", "visitorId": visitor}
    assert merge["target"] == {"type": "contact", "contactId": contact, "externalId": "w"}
    assert sorted(merge["conversationIds"]) == sorted(moved)
    assert merge["conversationsMoved"] == 3
    assert merge["completedAt"] is not None

    assert await scope_of(pool, moved) == {(None, contact, "w")}
    contact_history = await api.get(f"/v1/contacts/{contact}/history?externalId=w", token=org.key)
    assert {c["id"] for c in contact_history.body["conversations"]} == {*moved, *own}
    merged_conv = next(c for c in contact_history.body["conversations"] if c["id"] == moved[0])
    assert merged_conv["lastMergeId"] == request.merge_id
    assert merged_conv["originVisitorId"] == visitor
    # Messages keep the trust level they were written under.
    assert {m["senderVerified"] for m in merged_conv["messages"]} == {False}
    visitor_history = await api.get(f"/v1/visitors/{visitor}/history", token=org.key)
    assert visitor_history.body["conversations"] == []

    async def announced() -> bool:
        return len(await outbox_events(pool, "history.merged")) == 1

    await eventually(announced)
    [event] = await outbox_events(pool, "history.merged")
    assert event["subject"] == contact
    assert event["data"] == {
        "mergeId": request.merge_id,
        "targetContactId": contact,
        "targetExternalId": "w",
        "conversationsMoved": 3,
    }


async def test_promise_4_the_same_merge_delivered_twice_has_one_effect(
    api: Api, pool: asyncpg.Pool, redis: aioredis.Redis, settings: Settings, org: Org
) -> None:
    visitor = await make_visitor(pool, org)
    contact = await make_contact(pool, org)
    moved = await add_conversations(pool, org, visitor_id=visitor, count=2)
    request = merge_request(org, target_contact_id=contact, source_visitor_id=visitor)
    event = merge_event(org, request)
    # The same event twice (a relay republish), and the same merge in a second event
    # (a publisher retrying at a higher level).
    await publish(redis, settings, [event, event, merge_event(org, request)])

    await eventually(drained(redis, settings), timeout=15)
    assert await merge_status(pool, request.merge_id) == "done"
    assert await scope_of(pool, moved) == {(None, contact, "")}
    assert len(await outbox_events(pool, "history.merged")) == 1
    assert await pool.fetchval("SELECT count(*) FROM merges") == 1
    # A later replay of the same event is skipped as well.
    await publish(redis, settings, [event])
    await eventually(drained(redis, settings), timeout=15)
    assert len(await outbox_events(pool, "history.merged")) == 1


def drained(redis: aioredis.Redis, settings: Settings) -> Any:
    """True once the history group has read every entry of every partition and acked it."""

    async def check() -> bool:
        for stream in settings.event_streams:
            groups = {g["name"]: g for g in await redis.xinfo_groups(stream)}
            group = groups.get(GROUP.encode())
            if group is None or group["pending"] != 0 or group["lag"] != 0:
                return False
        return True

    return check


async def test_promise_4_undo_restores_exactly_what_moved(
    api: Api, pool: asyncpg.Pool, settings: Settings, org: Org
) -> None:
    visitor = await make_visitor(pool, org)
    contact = await make_contact(pool, org)
    moved = await add_conversations(pool, org, visitor_id=visitor, count=3)
    own = await add_conversations(pool, org, contact_id=contact, origin_visitor_id=visitor, count=2)
    request = merge_request(org, target_contact_id=contact, source_visitor_id=visitor)
    await emit_merge_requests(pool, settings, org, [request])
    await wait_for_status(pool, request.merge_id, "done")
    # After the merge one moved conversation is moved on elsewhere and the contact gets a
    # new conversation: undo must touch neither.
    other = await make_contact(pool, org)
    later = await add_conversations(pool, org, contact_id=contact, origin_visitor_id=visitor)
    await pool.execute("UPDATE conversations SET contact_id = $2 WHERE id = $1", moved[0], other)

    reply = await api.post(f"/v1/merges/{request.merge_id}/undo", token=org.key)
    assert reply.status == 200, reply.body
    assert reply.body == {"id": request.merge_id, "status": "undone", "conversationsRestored": 2}
    assert await scope_of(pool, moved[1:]) == {(visitor, None, "")}
    assert await scope_of(pool, [moved[0]]) == {(None, other, "")}
    assert await scope_of(pool, own + later) == {(None, contact, "")}
    status = await api.get(f"/v1/merges/{request.merge_id}", token=org.key)
    assert status.body["status"] == "undone"
    assert status.body["undoneAt"] is not None
    [undone] = await outbox_events(pool, "history.merge_undone")
    assert undone["data"] == {"mergeId": request.merge_id, "conversationsRestored": 2}

    again = await api.post(f"/v1/merges/{request.merge_id}/undo", token=org.key)
    assert again.status == 409
    assert again.body["code"] == "merge_not_undoable"
    assert len(await outbox_events(pool, "history.merge_undone")) == 1
    # Re-delivering the original request cannot merge it again.
    await emit_merge_requests(pool, settings, org, [request])

    async def redelivery_handled() -> bool:
        return bool(await pool.fetchval("SELECT count(*) FROM processed_events") == 2)

    await eventually(redelivery_handled)
    assert await merge_status(pool, request.merge_id) == "undone"
    assert await scope_of(pool, moved[1:]) == {(visitor, None, "")}


async def test_promise_5_contacts_merge_only_on_the_explicit_call_which_is_recorded_and_undoable(
    pool: asyncpg.Pool, settings: Settings, org: Org
) -> None:
    visitor = await make_visitor(pool, org)
    keep, absorbed = await make_contact(pool, org), await make_contact(pool, org)
    keep_w = await add_conversations(
        pool, org, contact_id=keep, external_id="w", origin_visitor_id=visitor
    )
    absorbed_w = await add_conversations(
        pool, org, contact_id=absorbed, external_id="w", origin_visitor_id=visitor, count=2
    )
    absorbed_v = await add_conversations(
        pool, org, contact_id=absorbed, external_id="v", origin_visitor_id=visitor
    )
    # Without the consumer first, so the pending state is observable.
    async with running(history_app(settings, consumer=False)) as api:
        reply = await api.post(
            f"/v1/contacts/{keep}/merge",
            json={"sourceContactId": absorbed, "externalId": "w"},
            token=org.key,
        )
        assert reply.status == 202, reply.body
        assert reply.body["status"] == "pending"
        merge_id = reply.body["id"]
        assert reply.headers["Location"] == f"/v1/merges/{merge_id}"
        pending = await api.get(f"/v1/merges/{merge_id}", token=org.key)
        assert pending.body["status"] == "pending"
        assert pending.body["reason"] == "admin"
        assert pending.body["source"] == {
            "type": "contact",
            "contactId": absorbed,
            "externalId": "w",
        }
        assert await scope_of(pool, absorbed_w) == {(None, absorbed, "w")}

    async with running(history_app(settings)) as api:
        await wait_for_status(pool, merge_id, "done")
        assert await scope_of(pool, absorbed_w + keep_w) == {(None, keep, "w")}
        assert await scope_of(pool, absorbed_v) == {(None, absorbed, "v")}  # other externalId
        reply = await api.post(f"/v1/merges/{merge_id}/undo", token=org.key)
        assert reply.body["conversationsRestored"] == 2
        assert await scope_of(pool, absorbed_w) == {(None, absorbed, "w")}
        assert await scope_of(pool, keep_w) == {(None, keep, "w")}


async def test_explicit_merge_rejects_bad_requests_without_writing(
    api: Api, pool: asyncpg.Pool, org: Org
) -> None:
    a, b = await make_contact(pool, org), await make_contact(pool, org)
    theirs = await make_org(pool)
    foreign = await make_contact(pool, theirs)
    reader = await make_api_key(pool, org.id, ["history:read", "history:write"])
    cases = [
        (f"/v1/contacts/{a}/merge", {"sourceContactId": a}, org.key, 422),
        (f"/v1/contacts/{a}/merge", {"sourceContactId": "x"}, org.key, 422),
        (f"/v1/contacts/{a}/merge", {"sourceContactId": b, "more": 1}, org.key, 422),
        (f"/v1/contacts/{a}/merge", {"sourceContactId": foreign}, org.key, 404),
        (f"/v1/contacts/{foreign}/merge", {"sourceContactId": a}, org.key, 404),
        (f"/v1/contacts/{a}/merge", {"sourceContactId": b}, reader, 403),
        ("/v1/contacts/nope/merge", {"sourceContactId": b}, org.key, 404),
    ]
    for path, body, key, status in cases:
        reply = await api.post(path, json=body, token=key)
        assert reply.status == status, (path, body, reply.body)
    assert await pool.fetchval("SELECT count(*) FROM merges") == 0
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
    # Merges and undo of another org are not found either.
    merge = merge_request(
        theirs, target_contact_id=foreign, source_contact_id=await make_contact(pool, theirs)
    )
    async with pool.acquire() as conn, conn.transaction():
        await apply_requested_merge(conn, Outbox(api.base_url), theirs.id, merge)
    for reply in (
        await api.get(f"/v1/merges/{merge.merge_id}", token=org.key),
        await api.post(f"/v1/merges/{merge.merge_id}/undo", token=org.key),
        await api.get("/v1/merges/nope", token=org.key),
    ):
        assert (reply.status, reply.body["code"]) == (404, "not_found")
    assert (await api.get(f"/v1/merges/{merge.merge_id}", token=theirs.key)).status == 200


async def test_merge_into_a_missing_or_same_scope_fails_and_moves_nothing(
    api: Api, pool: asyncpg.Pool, settings: Settings, org: Org
) -> None:
    visitor = await make_visitor(pool, org)
    contact = await make_contact(pool, org)
    mine = await add_conversations(pool, org, visitor_id=visitor)
    nowhere = merge_request(org, target_contact_id=str(uuid.uuid4()), source_visitor_id=visitor)
    itself = merge_request(org, target_contact_id=contact, source_contact_id=contact)
    await emit_merge_requests(pool, settings, org, [nowhere, itself])
    await wait_for_status(pool, nowhere.merge_id, "failed")
    await wait_for_status(pool, itself.merge_id, "failed")
    reply = await api.get(f"/v1/merges/{nowhere.merge_id}", token=org.key)
    assert "not found" in reply.body["error"]
    assert await scope_of(pool, mine) == {(visitor, None, "")}
    undo = await api.post(f"/v1/merges/{nowhere.merge_id}/undo", token=org.key)
    assert (undo.status, undo.body["code"]) == (409, "merge_not_undoable")


async def apply_all_at_once(settings: Settings, org: Org, requests: list[Any]) -> list[str]:
    """Every merge in its own transaction, all at once, none retried (a pool wide enough that
    none waits for a connection). Transactions queue behind each other's locks as long as a
    statement may run: the request path's short lock_timeout (a bulkhead: the real consumer
    retries what it ends) would otherwise turn the queueing this test is about into
    errors it is not about."""
    wide = await create_pool(
        settings.with_overrides(
            db_pool_max=len(requests), db_lock_timeout=settings.db_statement_timeout
        )
    )
    try:
        outbox = Outbox(settings.event_streams[0])
        return await asyncio.gather(*(apply_without_retry(wide, outbox, org, r) for r in requests))
    finally:
        await wide.close()


async def apply_without_retry(
    pool: asyncpg.Pool, outbox: Outbox, org: Org, data: Any, event_id: str | None = None
) -> str:
    """One consumer transaction with NO retry: a deadlock or serialization failure raises."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO processed_events (consumer, event_id) VALUES ($1, $2)",
            GROUP,
            event_id or str(uuid.uuid4()),
        )
        return (await apply_requested_merge(conn, outbox, org.id, data)).status


async def test_50_concurrent_merges_into_one_contact_no_error_no_deadlock_right_totals(
    pool: asyncpg.Pool, settings: Settings, org: Org
) -> None:
    contact = await make_contact(pool, org)
    visitors = await make_visitors(pool, org, 50)
    for i, visitor in enumerate(visitors):
        await add_conversations(pool, org, visitor_id=visitor, count=1 + i % 4, messages=0)
    total = sum(1 + i % 4 for i in range(50))
    requests = [
        merge_request(org, target_contact_id=contact, source_visitor_id=v) for v in visitors
    ]
    assert await apply_all_at_once(settings, org, requests) == ["done"] * 50
    assert (
        await pool.fetchval("SELECT count(*) FROM conversations WHERE contact_id = $1", contact)
        == total
    )
    assert (
        await pool.fetchval("SELECT count(*) FROM conversations WHERE visitor_id IS NOT NULL") == 0
    )
    assert (
        await pool.fetchval(
            "SELECT sum(cardinality(conversation_ids)) FROM merges WHERE status = 'done'"
        )
        == total
    )
    events = await outbox_events(pool, "history.merged")
    assert sum(e["data"]["conversationsMoved"] for e in events) == total
    assert sorted(e["seq"] for e in events) == list(range(1, 51))


async def test_50_concurrent_merges_through_the_consumer(
    api: Api, pool: asyncpg.Pool, redis: aioredis.Redis, settings: Settings, org: Org
) -> None:
    contact = await make_contact(pool, org)
    visitors = await make_visitors(pool, org, 50)
    for visitor in visitors:
        await add_conversations(pool, org, visitor_id=visitor, count=2, messages=0)
    requests = [
        merge_request(org, target_contact_id=contact, source_visitor_id=v) for v in visitors
    ]
    # Each event also delivered twice.
    events = [merge_event(org, r) for r in requests]
    await publish(redis, settings, events + events)
    await eventually(drained(redis, settings), timeout=30)
    statuses = await pool.fetch("SELECT status, count(*) AS n FROM merges GROUP BY status")
    assert {r["status"]: r["n"] for r in statuses} == {"done": 50}
    assert (
        await pool.fetchval("SELECT count(*) FROM conversations WHERE contact_id = $1", contact)
        == 100
    )
    assert len(await outbox_events(pool, "history.merged")) == 50
    assert await dead_letters(redis, settings, GROUP) == []


async def test_concurrent_crossing_merges_serialise_as_if_sequential(
    pool: asyncpg.Pool, settings: Settings, org: Org
) -> None:
    visitor = await make_visitor(pool, org)
    a, b = await make_contact(pool, org), await make_contact(pool, org)
    conversations = await add_conversations(
        pool, org, contact_id=a, origin_visitor_id=visitor, count=5
    )
    conversations += await add_conversations(
        pool, org, contact_id=b, origin_visitor_id=visitor, count=7
    )
    requests = [
        merge_request(org, target_contact_id=b, source_contact_id=a)
        if i % 2
        else merge_request(org, target_contact_id=a, source_contact_id=b)
        for i in range(50)
    ]
    assert await apply_all_at_once(settings, org, requests) == ["done"] * 50
    # Every merge moves everything its source has, so any sequential order leaves all 12
    # conversations in one contact; interleaved merges would have left them split.
    scopes = await scope_of(pool, conversations)
    assert scopes in ({(None, a, "")}, {(None, b, "")})
    assert await pool.fetchval("SELECT count(*) FROM conversations") == 12


async def test_a_poison_merge_request_is_dead_lettered_and_replayable(
    api: Api, pool: asyncpg.Pool, redis: aioredis.Redis, settings: Settings, org: Org
) -> None:
    visitor = await make_visitor(pool, org)
    contact = await make_contact(pool, org)
    mine = await add_conversations(pool, org, visitor_id=visitor)
    # For an org that does not exist yet: the merge row cannot be written (foreign key).
    later_org = Org(str(uuid.uuid4()), "", "")
    later_contact, later_visitor = str(uuid.uuid4()), str(uuid.uuid4())
    early = merge_request(
        later_org, target_contact_id=later_contact, source_visitor_id=later_visitor
    )
    good = merge_request(org, target_contact_id=contact, source_visitor_id=visitor)
    malformed = merge_request(org, target_contact_id="not-a-uuid", source_visitor_id=visitor)
    await publish(redis, settings, [merge_event(later_org, early), merge_event(org, malformed)])
    await publish(redis, settings, [merge_event(org, good)])
    await wait_for_status(pool, good.merge_id, "done")
    assert await scope_of(pool, mine) == {(None, contact, "")}

    async def dead(n: int) -> Any:
        async def check() -> bool:
            return len(await dead_letters(redis, settings, GROUP)) == n

        return check

    await eventually(await dead(2), timeout=30)
    assert await merge_status(pool, early.merge_id) is None

    # The operator fixes the cause, then replays: the parked merge applies, once.
    real = await make_org(pool, later_org.id)
    await make_contact(pool, real, contact_id=later_contact)
    await make_visitor(pool, real, visitor_id=later_visitor)
    parked = await add_conversations(pool, real, visitor_id=later_visitor, count=2)
    assert await replay_dead_letters(redis, settings, GROUP) == 2
    await wait_for_status(pool, early.merge_id, "done")
    assert await scope_of(pool, parked) == {(None, later_contact, "")}
    # The malformed one can never apply: it is parked again.
    await eventually(await dead(1), timeout=30)


async def test_promise_4_end_to_end_a_login_merges_what_the_browser_said_and_undo_puts_it_back(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    """Through the real all-in-one server: widget sessions, the history API, the login merge
    requested by session resolution, the merge consumer, undo and erasure."""
    origin = {"Origin": "https://shop.example"}
    async with running(all_in_one.create_app(settings)) as api:
        org = await provision_org(api)
        chat = await chat_anonymously(api, org)
        minted = await mint_contact_token(api, org, userId="ada", email="ada@example.com")
        login = await log_in(api, org, chat.session["visitorToken"], minted["token"])
        assert login.status == 200, login.body
        merge = login.body["merge"]
        assert merge is not None and merge["status"] == "pending"

        await until_merge_done(api, org, merge["id"], timeout=15)
        contact = minted["contactId"]
        history_reply = await api.get(f"/v1/contacts/{contact}/history", token=org.api_key)
        [conversation] = history_reply.body["conversations"]
        assert conversation["id"] == chat.conversation_id
        assert conversation["messages"][0]["senderVerified"] is False  # said before login
        widget = await api.get(
            f"/widget/sessions/{login.body['sessionId']}/history",
            token=login.body["sessionToken"],
            headers=origin,
        )
        assert widget.status == 200, widget.body
        assert chat.conversation_id in str(widget.body)

        undo = await api.post(f"/v1/merges/{merge['id']}/undo", token=org.api_key)
        assert undo.body["conversationsRestored"] == 1
        visitor = chat.session["identity"]["visitorId"]
        back = await api.get(f"/v1/visitors/{visitor}/history", token=org.api_key)
        assert [c["id"] for c in back.body["conversations"]] == [chat.conversation_id]

        # Verified again, said more, then erased: the widget session stops working.
        verified = await api.post(
            "/v1/conversations",
            json={"sessionId": login.body["sessionId"], "message": {"text": "secret"}},
            token=org.api_key,
        )
        assert verified.body["message"]["senderVerified"] is True
        erased = await api.delete(f"/v1/contacts/{contact}", token=org.api_key)
        assert erased.status == 200, erased.body
        # Its own conversation and the one undo put back in its browser's scope (promise 12).
        assert erased.body["conversationsDeleted"] == 2
        widget = await api.get(
            f"/widget/sessions/{login.body['sessionId']}/history",
            token=login.body["sessionToken"],
            headers=origin,
        )
        assert widget.status in (401, 404), widget.body
        assert "secret" not in str(widget.body)
        assert await pool.fetchval("SELECT count(*) FROM messages WHERE body = 'secret'") == 0
