"""Promise 13: a promised merge exists. A merge id handed out in a session response is
readable at once (pending, with when it was requested), never 404, and ends done or failed:
applied by the merge consumer, or, when its event never comes, by the history worker straight
from Postgres, and either way exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from services import all_in_one
from services.history.consumers import GROUP
from services.history.overdue_merges import OverdueMerges
from shared.bus.events import EVENT_FIELD
from shared.bus.outbox import Outbox
from shared.config import Settings
from tests.support.history_fixtures import (
    add_conversations,
    history_app,
    make_contact,
    make_org,
    make_visitors,
)
from tests.support.journeys import chat_anonymously, log_in
from tests.support.server import Api, eventually, running
from tests.support.tokens import OrgFixture, mint_contact_token, provision_org

ORIGIN = {"Origin": "https://shop.example"}


@pytest.fixture
def lost_events(settings: Settings) -> Settings:
    """No relay: every event stays in the outbox and never reaches Redis, as if Redis had
    lost it; the worker's threshold is short."""
    return settings.with_overrides(relay_enabled=False, merge_pending_timeout=0.5)


async def login(api: Api, org: OrgFixture, visitor_token: str, token: str) -> dict[str, Any]:
    reply = await log_in(api, org, visitor_token, token)
    assert reply.status == 200, reply.body
    merge: dict[str, Any] = reply.body["merge"]
    assert merge is not None and merge["status"] == "pending"
    return merge


async def merge_of(api: Api, org: OrgFixture, merge_id: str) -> dict[str, Any]:
    reply = await api.get(f"/v1/merges/{merge_id}", token=org.api_key)
    assert reply.status == 200, reply.body
    body: dict[str, Any] = reply.body
    return body


def reaches(api: Api, org: OrgFixture, merge_id: str, status: str) -> Any:
    async def check() -> bool:
        return (await merge_of(api, org, merge_id))["status"] == status

    return check


def counted(name: str, outcome: str) -> float:
    return REGISTRY.get_sample_value(name, {"outcome": outcome}) or 0.0


async def merged_events(pool: asyncpg.Pool, merge_id: str) -> int:
    return int(
        await pool.fetchval(
            """SELECT count(*) FROM outbox WHERE event_type = 'history.merged'
               AND position($1::bytea IN payload) > 0""",
            merge_id.encode(),
        )
    )


async def deliver_late(redis: aioredis.Redis, pool: asyncpg.Pool, settings: Settings) -> int:
    """Publish every merge request still in the outbox, as a relay finally would."""
    rows = await pool.fetch(
        "SELECT payload FROM outbox WHERE event_type = 'history.merge_requested' ORDER BY id"
    )
    pipe = redis.pipeline(transaction=False)
    for row in rows:
        pipe.xadd(settings.event_streams[0], {EVENT_FIELD: row["payload"]})
    await pipe.execute()
    return len(rows)


def drained(redis: aioredis.Redis, settings: Settings) -> Any:
    async def check() -> bool:
        groups = {g["name"]: g for g in await redis.xinfo_groups(settings.event_streams[0])}
        group = groups.get(GROUP.encode())
        return group is not None and group["pending"] == 0 and group["lag"] == 0

    return check


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with running(all_in_one.create_app(settings)) as client:
        yield client


async def test_promise_13_a_merge_id_is_readable_the_instant_the_login_answers(
    api: Api,
) -> None:
    org = await provision_org(api)
    token = (await mint_contact_token(api, org, userId="ada", externalId="w"))["token"]
    seen: dict[str, tuple[datetime, str]] = {}
    for _ in range(100):
        chat = await chat_anonymously(api, org)
        first, said = chat.session, chat.conversation_id
        asked = datetime.now(UTC)
        merge = await login(api, org, first["visitorToken"], token)
        answered = datetime.now(UTC)
        # Right after the response: no retry, no sleep.
        now = await merge_of(api, org, merge["id"])
        assert now["status"] in ("pending", "done"), now
        requested_at = datetime.fromisoformat(now["requestedAt"])
        assert asked <= requested_at <= answered
        assert now["reason"] == "login"
        assert now["source"] == {"type": "visitor", "visitorId": first["identity"]["visitorId"]}
        assert now["target"]["externalId"] == "w"
        seen[merge["id"]] = (requested_at, said)

    for merge_id, (requested_at, said) in seen.items():
        await eventually(reaches(api, org, merge_id, "done"), timeout=30)
        done = await merge_of(api, org, merge_id)
        assert datetime.fromisoformat(done["requestedAt"]) == requested_at
        assert done["conversationIds"] == [said]


async def test_promise_13_a_request_whose_event_never_comes_is_applied_from_postgres_once(
    lost_events: Settings, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    applied_before = counted("wi_history_overdue_merges_total", "done")
    async with running(all_in_one.create_app(lost_events)) as api:
        org = await provision_org(api)
        other = await provision_org(api, name="Other")
        token = (await mint_contact_token(api, org, userId="ada"))["token"]
        chat = await chat_anonymously(api, org)
        first, said = chat.session, chat.conversation_id
        merge = await login(api, org, first["visitorToken"], token)
        pending = await merge_of(api, org, merge["id"])
        assert pending["status"] in ("pending", "done")
        # Another org's key cannot tell this id from a made-up one.
        assert (await api.get(f"/v1/merges/{merge['id']}", token=other.api_key)).status == 404

        await eventually(reaches(api, org, merge["id"], "done"), timeout=15)
        done = await merge_of(api, org, merge["id"])
        assert done["conversationIds"] == [said]
        assert done["requestedAt"] == pending["requestedAt"]
        assert await merged_events(pool, merge["id"]) == 1
        assert counted("wi_history_overdue_merges_total", "done") == applied_before + 1

        # The event turns up after all: the consumer finds the merge applied and does nothing.
        assert await deliver_late(redis, pool, lost_events) == 1
        await eventually(drained(redis, lost_events), timeout=15)
        assert (
            await pool.fetchval("SELECT count(*) FROM processed_events WHERE consumer = $1", GROUP)
            == 1
        )
        assert (await merge_of(api, org, merge["id"]))["conversationIds"] == [said]
        assert await merged_events(pool, merge["id"]) == 1
        assert await pool.fetchval("SELECT count(*) FROM merges") == 1


async def test_promise_13_the_worker_and_the_consumer_racing_apply_each_merge_once(
    settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    # The app's own worker waits a minute: the race below is between the test's workers and
    # the consumer, started at the same moment.
    quiet = settings.with_overrides(relay_enabled=False)
    async with running(all_in_one.create_app(quiet)) as api:
        org = await provision_org(api)
        token = (await mint_contact_token(api, org, userId="ada"))["token"]
        moved: dict[str, str] = {}
        for _ in range(20):
            chat = await chat_anonymously(api, org)
            first, said = chat.session, chat.conversation_id
            moved[(await login(api, org, first["visitorToken"], token))["id"]] = said

        eager = settings.with_overrides(merge_pending_timeout=0.001)
        workers = [OverdueMerges(eager, pool, Outbox(settings.event_streams[0])) for _ in range(2)]
        await asyncio.gather(
            deliver_late(redis, pool, settings), *(worker.sweep() for worker in workers)
        )
        await eventually(drained(redis, settings), timeout=15)
        for merge_id, said in moved.items():
            merge = await merge_of(api, org, merge_id)
            assert (merge["status"], merge["conversationIds"]) == ("done", [said])
            assert await merged_events(pool, merge_id) == 1
        assert await pool.fetchval("SELECT count(*) FROM merges") == len(moved)


async def test_promise_13_a_merge_that_can_never_apply_ends_failed(
    settings: Settings, lost_events: Settings, pool: asyncpg.Pool
) -> None:
    quiet = settings.with_overrides(relay_enabled=False)
    async with running(all_in_one.create_app(quiet)) as api:
        org = await provision_org(api)
        minted = await mint_contact_token(api, org, userId="ada")
        chat = await chat_anonymously(api, org)
        first, said = chat.session, chat.conversation_id
        merge = await login(api, org, first["visitorToken"], minted["token"])
        # Erased before its merge could apply: the merge never can.
        erased = await api.delete(f"/v1/contacts/{minted['contactId']}", token=org.api_key)
        assert erased.status == 200, erased.body
        assert (await merge_of(api, org, merge["id"]))["status"] == "pending"

        # A history consumer process with a short threshold takes it from Postgres.
        async with running(history_app(lost_events)):
            await eventually(reaches(api, org, merge["id"], "failed"), timeout=15)
        failed = await merge_of(api, org, merge["id"])
        assert "erased" in failed["error"]
        assert failed["completedAt"] is not None
        assert failed["conversationIds"] == []
        # Nothing moved, and nothing stayed either: the browser was bound to the erased
        # contact, so erasure took what it typed too (promise 12).
        back = await api.get(
            f"/v1/visitors/{first['identity']['visitorId']}/history", token=org.api_key
        )
        assert said and back.body["conversations"] == []


async def test_promise_13_an_explicit_merge_whose_event_is_lost_is_applied_too(
    lost_events: Settings,
) -> None:
    async with running(all_in_one.create_app(lost_events)) as api:
        org = await provision_org(api)
        into = (await mint_contact_token(api, org, userId="ada"))["contactId"]
        out_of = (await mint_contact_token(api, org, userId="ada-old"))["contactId"]
        accepted = await api.post(
            f"/v1/contacts/{into}/merge", json={"sourceContactId": out_of}, token=org.api_key
        )
        assert accepted.status == 202, accepted.body
        await eventually(reaches(api, org, accepted.body["id"], "done"), timeout=15)


async def test_promise_13_the_worker_walks_every_overdue_request_once_across_pages(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    org = await make_org(pool)
    contact = await make_contact(pool, org)
    visitors = await make_visitors(pool, org, 450)  # more than two of the worker's pages
    for visitor in visitors:
        await add_conversations(pool, org, visitor_id=visitor)
    # Requested two minutes ago, with events that never came.
    await pool.execute(
        """INSERT INTO merge_requests (id, org_id, visitor_id, contact_id, requested_at)
           SELECT gen_random_uuid(), $1, v, $2, now() - interval '2 minutes'
           FROM unnest($3::uuid[]) AS v""",
        org.id,
        contact,
        visitors,
    )
    worker = OverdueMerges(
        settings.with_overrides(merge_pending_timeout=1.0), pool, Outbox(settings.event_streams[0])
    )
    assert await worker.sweep() == len(visitors)
    assert await pool.fetchval(
        "SELECT count(*) FROM merges WHERE status = 'done' AND cardinality(conversation_ids) = 1"
    ) == len(visitors)
    assert await pool.fetchval(
        "SELECT count(*) FROM conversations WHERE contact_id = $1", contact
    ) == len(visitors)
    # Everything before its mark is settled: the next sweep finds nothing to do.
    assert await worker.sweep() == 0
    assert await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE event_type = 'history.merged'"
    ) == len(visitors)
