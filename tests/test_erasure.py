"""Erasure (GDPR): a contact's history, bindings, sessions' copies and tokens go at once,
with a receipt; afterwards no API shows the data and no merge, undo or replay brings it back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from services.history.erasure import erase_contact
from services.history.merges import apply_requested_merge
from shared.bus.events import ContactAuthenticated, ContactAuthenticatedData
from shared.bus.outbox import Outbox
from shared.config import Settings
from shared.db import create_pool, in_transaction
from tests.support.history_fixtures import (
    Org,
    add_conversations,
    bind_device,
    emit_merge_requests,
    history_app,
    make_api_key,
    make_contact,
    make_org,
    make_session,
    make_visitor,
    make_visitors,
    merge_event,
    merge_request,
    publish,
)
from tests.support.server import Api, eventually, running

EMAIL = "ada.lovelace@example.com"

# Every table that can hold a contact's data; after erasure none may mention its email.
TABLES = (
    "contacts",
    "visitors",
    "device_bindings",
    "sessions",
    "conversations",
    "messages",
    "merges",
)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with running(history_app(settings)) as client:
        yield client


@pytest.fixture
async def org(pool: asyncpg.Pool) -> Org:
    return await make_org(pool)


async def mentions(pool: asyncpg.Pool, needle: str) -> dict[str, int]:
    found = {}
    for table in (*TABLES, "outbox"):
        column = "convert_from(payload, 'UTF8')" if table == "outbox" else f"{table}::text"
        n = await pool.fetchval(
            f"SELECT count(*) FROM {table} WHERE position($1 IN {column}) > 0", needle
        )
        if n:
            found[table] = n
    return found


async def outbox_events(pool: asyncpg.Pool, event_type: str) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT payload FROM outbox WHERE event_type = $1 ORDER BY id", event_type
    )
    return [msgspec.json.decode(r["payload"]) for r in rows]


async def published_contact_event(
    pool: asyncpg.Pool, settings: Settings, org: Org, contact: str
) -> None:
    """What token issuance left behind: a published event carrying the contact's email."""
    outbox = Outbox(settings.event_streams[0])

    async def emit(conn: asyncpg.Connection) -> None:
        await outbox.emit(
            conn,
            ContactAuthenticated,
            org_id=org.id,
            subject=contact,
            data=ContactAuthenticatedData(
                contact_id=contact,
                jti="j",
                expires_at=datetime(2030, 1, 1, tzinfo=UTC),
                email=EMAIL,
            ),
        )

    await in_transaction(pool, emit)
    await pool.execute("UPDATE outbox SET published_at = now()")


async def test_erasure_removes_the_contacts_data_everywhere_and_returns_a_receipt(
    api: Api, pool: asyncpg.Pool, settings: Settings, org: Org
) -> None:
    contact = await make_contact(pool, org, email=EMAIL)
    laptop, phone = await make_visitor(pool, org), await make_visitor(pool, org)
    bystander = await make_contact(pool, org, email="grace@example.com")
    await bind_device(pool, org, contact, laptop, "w1")
    await bind_device(pool, org, contact, phone)
    await bind_device(pool, org, bystander, phone)
    attrs = {"email": {"value": EMAIL, "source": "server", "verified": True}}
    session = await make_session(
        pool, org, laptop, contact_id=contact, external_id="w1", attributes=attrs
    )
    await make_session(pool, org, phone, contact_id=contact, attributes=attrs)
    gone = await add_conversations(
        pool,
        org,
        contact_id=contact,
        external_id="w1",
        origin_visitor_id=laptop,
        count=3,
        messages=2,
    )
    gone += await add_conversations(
        pool, org, contact_id=contact, origin_visitor_id=phone, count=1, messages=4
    )
    kept = await add_conversations(
        pool, org, contact_id=bystander, origin_visitor_id=phone, count=2
    )
    # What the laptop typed before logging in, never merged: the person's too.
    gone += await add_conversations(pool, org, visitor_id=laptop, count=1)
    stranger = await make_visitor(pool, org)
    kept += await add_conversations(pool, org, visitor_id=stranger, count=1)
    await published_contact_event(pool, settings, org, contact)
    assert await mentions(pool, EMAIL)

    reply = await api.delete(f"/v1/contacts/{contact}", token=org.key)
    assert reply.status == 200, reply.body
    receipt = reply.body
    assert receipt["contactId"] == contact
    assert uuid.UUID(receipt["receiptId"])
    assert receipt["erasedAt"]
    assert (
        receipt["conversationsDeleted"],
        receipt["messagesDeleted"],
        receipt["bindingsRemoved"],
        receipt["sessionsEnded"],
        receipt["browsersErased"],
    ) == (5, 11, 2, 2, 2)

    # Postgres: nothing of the contact is left but an empty tombstone.
    assert await mentions(pool, EMAIL) == {}
    assert (
        await pool.fetchval("SELECT count(*) FROM conversations WHERE id = ANY($1::uuid[])", gone)
        == 0
    )
    assert (
        await pool.fetchval("SELECT count(*) FROM conversations WHERE id = ANY($1::uuid[])", kept)
        == 3
    )
    assert (
        await pool.fetchval("SELECT count(*) FROM device_bindings WHERE contact_id = $1", contact)
        == 0
    )
    # The bystander's binding of the shared phone stays on record, unbound: the phone is
    # erased and starts over.
    assert await pool.fetchval(
        "SELECT unbound_at IS NOT NULL FROM device_bindings WHERE contact_id = $1", bystander
    )
    tombstone = await pool.fetchrow("SELECT * FROM contacts WHERE id = $1", contact)
    assert tombstone["erased_at"] is not None
    assert tombstone["tokens_not_before"] is not None
    assert (tombstone["user_id"], tombstone["verified_email"], tombstone["attributes"]) == (
        None,
        None,
        {},
    )
    assert tombstone["contact_key"] == f"erased:{contact}"
    sessions = await pool.fetch(
        "SELECT ended_at, attributes FROM sessions WHERE contact_id = $1", contact
    )
    assert all(s["ended_at"] is not None and s["attributes"] == {} for s in sessions)

    # Events: tokens revoked everywhere, and the erasure announced with its receipt.
    [revoked] = await outbox_events(pool, "contact.tokens_revoked")
    [erased] = await outbox_events(pool, "contact.erased")
    assert revoked["data"]["contactId"] == contact
    assert erased["data"] == {
        "contactId": contact,
        "receiptId": receipt["receiptId"],
        "visitorIds": sorted([laptop, phone]),
    }

    # Every API: the history is not found, nothing can be written for it any more.
    reply = await api.get(f"/v1/contacts/{contact}/history?externalId=w1", token=org.key)
    assert (reply.status, reply.body["code"]) == (404, "not_found")
    reply = await api.post("/v1/conversations", json={"sessionId": session}, token=org.key)
    assert (reply.status, reply.body["code"]) == (409, "session_ended")
    reply = await api.post(
        f"/v1/conversations/{gone[0]}/messages",
        json={"text": "x", "author": "agent"},
        token=org.key,
    )
    assert reply.status == 404
    reply = await api.get(f"/v1/visitors/{laptop}/history", token=org.key)
    assert reply.body["conversations"] == []
    reply = await api.get(f"/v1/visitors/{stranger}/history", token=org.key)
    assert {c["id"] for c in reply.body["conversations"]} == {kept[-1]}
    # Erasing again: already gone.
    again = await api.delete(f"/v1/contacts/{contact}", token=org.key)
    assert (again.status, again.body["code"]) == (404, "not_found")
    assert len(await outbox_events(pool, "contact.erased")) == 1


async def test_erasure_needs_contacts_manage_and_the_same_org(
    api: Api, pool: asyncpg.Pool, org: Org
) -> None:
    contact = await make_contact(pool, org)
    visitor = await make_visitor(pool, org)
    await add_conversations(pool, org, contact_id=contact, origin_visitor_id=visitor)
    theirs = await make_org(pool)
    reader = await make_api_key(pool, org.id, ["history:read", "history:write"])
    assert (await api.delete(f"/v1/contacts/{contact}", token=reader)).status == 403
    assert (await api.delete(f"/v1/contacts/{contact}", token=theirs.key)).status == 404
    assert (await api.delete("/v1/contacts/nope", token=org.key)).status == 404
    assert (await api.delete(f"/v1/contacts/{uuid.uuid4()}", token=org.key)).status == 404
    assert await pool.fetchval("SELECT count(*) FROM conversations") == 1
    assert await pool.fetchval("SELECT erased_at FROM contacts WHERE id = $1", contact) is None


async def test_no_merge_undo_or_replay_brings_erased_data_back(
    api: Api, pool: asyncpg.Pool, redis: aioredis.Redis, settings: Settings, org: Org
) -> None:
    erased = await make_contact(pool, org)
    survivor = await make_contact(pool, org)
    visitor, newcomer = await make_visitor(pool, org), await make_visitor(pool, org)
    await add_conversations(pool, org, visitor_id=visitor, count=2)
    # Before erasure: the visitor's history merged into the contact (login), and an admin
    # merged part of the contact's history into another contact.
    login = merge_request(org, target_contact_id=erased, source_visitor_id=visitor)
    login_event = merge_event(org, login)
    await publish(redis, settings, [login_event])
    await eventually(lambda: _status(pool, login.merge_id, "done"))
    await add_conversations(
        pool, org, contact_id=erased, external_id="x", origin_visitor_id=visitor
    )
    reply = await api.post(
        f"/v1/contacts/{survivor}/merge",
        json={"sourceContactId": erased, "externalId": "x"},
        token=org.key,
    )
    admin_merge = reply.body["id"]
    await eventually(lambda: _status(pool, admin_merge, "done"))

    assert (await api.delete(f"/v1/contacts/{erased}", token=org.key)).status == 200

    # Replaying the old login event, a fresh merge into the erased contact, and a merge out
    # of it: nothing moves into it, and the new ones fail.
    newcomer_history = await add_conversations(pool, org, visitor_id=newcomer)
    late = merge_request(org, target_contact_id=erased, source_visitor_id=newcomer)
    out = merge_request(org, target_contact_id=survivor, source_contact_id=erased)
    await publish(redis, settings, [login_event])
    await emit_merge_requests(pool, settings, org, [late, out])
    await eventually(lambda: _status(pool, late.merge_id, "failed"))
    await eventually(lambda: _status(pool, out.merge_id, "failed"))
    assert "erased" in await pool.fetchval("SELECT error FROM merges WHERE id = $1", late.merge_id)
    assert (
        await pool.fetchval("SELECT count(*) FROM conversations WHERE contact_id = $1", erased) == 0
    )
    assert await pool.fetchval(
        "SELECT visitor_id FROM conversations WHERE id = $1", newcomer_history[0]
    ) == uuid.UUID(newcomer)

    # Undo in either direction would resurrect or re-home erased data: refused.
    for merge_id in (login.merge_id, admin_merge):
        reply = await api.post(f"/v1/merges/{merge_id}/undo", token=org.key)
        assert (reply.status, reply.body["code"]) == (409, "merge_not_undoable"), reply.body
    assert (
        await pool.fetchval("SELECT count(*) FROM conversations WHERE contact_id = $1", erased) == 0
    )
    assert (
        await pool.fetchval("SELECT count(*) FROM conversations WHERE contact_id = $1", survivor)
        == 1
    )
    # An explicit merge naming the erased contact is simply not found.
    reply = await api.post(
        f"/v1/contacts/{survivor}/merge", json={"sourceContactId": erased}, token=org.key
    )
    assert reply.status == 404


async def _status(pool: asyncpg.Pool, merge_id: str, status: str) -> bool:
    return bool(await pool.fetchval("SELECT status FROM merges WHERE id = $1", merge_id) == status)


async def waiting_on_a_lock(pool: asyncpg.Pool, query_prefix: str) -> bool:
    return bool(
        await pool.fetchval(
            """SELECT count(*) FROM pg_stat_activity
               WHERE datname = current_database() AND wait_event_type = 'Lock'
                 AND query LIKE $1""",
            query_prefix + "%",
        )
    )


async def test_erasure_waits_for_a_merge_in_flight_and_erases_what_it_moved(
    api: Api, pool: asyncpg.Pool, settings: Settings, org: Org
) -> None:
    contact = await make_contact(pool, org)
    visitor = await make_visitor(pool, org)
    moved = await add_conversations(pool, org, visitor_id=visitor, count=3)
    outbox = Outbox(settings.event_streams[0])
    async with pool.acquire() as conn:
        merge = conn.transaction()
        await merge.start()
        # The merge has locked the contact and moved the conversations, not yet committed.
        request = merge_request(org, target_contact_id=contact, source_visitor_id=visitor)
        assert (await apply_requested_merge(conn, outbox, org.id, request)).status == "done"
        erasure = asyncio.create_task(api.delete(f"/v1/contacts/{contact}", token=org.key))
        await eventually(lambda: waiting_on_a_lock(pool, "SELECT true FROM contacts"))
        await merge.commit()
    reply = await erasure
    assert reply.status == 200
    assert reply.body["conversationsDeleted"] == 3
    assert (
        await pool.fetchval("SELECT count(*) FROM conversations WHERE id = ANY($1::uuid[])", moved)
        == 0
    )


async def test_a_merge_arriving_during_erasure_waits_and_then_fails(
    api: Api, pool: asyncpg.Pool, settings: Settings, org: Org
) -> None:
    contact = await make_contact(pool, org)
    visitor = await make_visitor(pool, org)
    mine = await add_conversations(pool, org, visitor_id=visitor, count=2)
    async with pool.acquire() as eraser:
        erasure = eraser.transaction()
        await erasure.start()
        # The erasure holds the contact row; a merge into it now must wait, then see the tombstone.
        await erase_contact(eraser, Outbox(settings.event_streams[0]), org.id, contact)
        request = merge_request(org, target_contact_id=contact, source_visitor_id=visitor)

        async def merge(conn: asyncpg.Connection) -> str:
            return (
                await apply_requested_merge(
                    conn, Outbox(settings.event_streams[0]), org.id, request
                )
            ).status

        merging = asyncio.create_task(in_transaction(pool, merge))
        await eventually(lambda: waiting_on_a_lock(pool, "SELECT id, erased_at IS NULL"))
        await erasure.commit()
    assert await merging == "failed"
    assert (
        await pool.fetchval("SELECT count(*) FROM conversations WHERE contact_id = $1", contact)
        == 0
    )
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM conversations WHERE id = ANY($1::uuid[]) AND visitor_id = $2",
            mine,
            visitor,
        )
        == 2
    )


async def test_erasure_racing_many_merges_into_the_contact_leaves_nothing_behind(
    api: Api, pool: asyncpg.Pool, settings: Settings, org: Org
) -> None:
    contact = await make_contact(pool, org)
    visitors = await make_visitors(pool, org, 30)
    for visitor in visitors:
        await add_conversations(pool, org, visitor_id=visitor, count=2)
    requests = [
        merge_request(org, target_contact_id=contact, source_visitor_id=v) for v in visitors
    ]
    # Merges queue behind each other's locks as long as a statement may run (the consumer's
    # retry of a request-path lock timeout is not what this test is about).
    wide = await create_pool(
        settings.with_overrides(
            db_pool_max=30, db_pool_min=30, db_lock_timeout=settings.db_statement_timeout
        )
    )
    try:
        outbox = Outbox(settings.event_streams[0])

        async def merge(data: Any, delay: float) -> str:
            async def work(conn: asyncpg.Connection) -> str:
                return (await apply_requested_merge(conn, outbox, org.id, data)).status

            await asyncio.sleep(delay)  # spread the merges around the erasure
            return await in_transaction(wide, work)

        async def erase_once_merging() -> int:
            await eventually(lambda: _any_done(pool), interval=0.001, timeout=30)
            return (await api.delete(f"/v1/contacts/{contact}", token=org.key)).status

        *outcomes, erase_status = await asyncio.gather(
            *(merge(r, i / 100) for i, r in enumerate(requests)), erase_once_merging()
        )
    finally:
        await wide.close()
    assert erase_status == 200
    # Each merge either happened before the erasure (and was erased with it) or after it
    # (and failed): never into the tombstone.
    assert set(outcomes) <= {"done", "failed"}
    assert "done" in outcomes
    assert (
        await pool.fetchval("SELECT count(*) FROM conversations WHERE contact_id = $1", contact)
        == 0
    )
    failed = outcomes.count("failed")
    assert (
        await pool.fetchval("SELECT count(*) FROM conversations WHERE visitor_id IS NOT NULL")
        == 2 * failed
    )


async def _any_done(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM merges WHERE status = 'done'"))
