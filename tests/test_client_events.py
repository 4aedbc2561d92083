"""The client's typed event consumer (and its runnable example) against the real server and
Redis: events arrive typed, are acknowledged only after the handler returned, unknown types
are acknowledged and skipped, and what a failing handler left behind comes again first."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import msgspec
import pytest
import redis.asyncio as aioredis
from widget_identity_client import AdminClient, WidgetIdentityClient
from widget_identity_client.events import EventConsumer, EventDecodeError
from widget_identity_client.models import (
    AnyEvent,
    AuthenticateUserRequest,
    ContactAuthenticated,
    CreateApiKeyRequest,
    CreateOrgRequest,
    VisitorCreated,
    VisitorCreatedData,
)

from services import all_in_one
from shared.config import Settings
from tests.conftest import ADMIN_TOKEN
from tests.support.server import eventually, running

EXAMPLE = Path(__file__).resolve().parent.parent / "clients/python/examples/consume_events.py"
GROUP = "client-test"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("consume_events_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def pending(redis: aioredis.Redis, stream: str, group: str = GROUP) -> int:
    summary = await redis.xpending(stream, group)
    return int(summary["pending"])


def visitor_created(seq: int = 1) -> bytes:
    """An event as the server's relay writes it, built from the client's own model."""
    return msgspec.json.encode(
        VisitorCreated(
            id=str(uuid.uuid4()),
            org_id=str(uuid.uuid4()),
            subject="v-1",
            seq=seq,
            occurred_at=datetime(2030, 1, 1, tzinfo=UTC),
            data=VisitorCreatedData(visitor_id="v-1", widget_token_id=str(uuid.uuid4())),
        )
    )


@pytest.fixture
def consumer(redis: aioredis.Redis, settings: Settings) -> EventConsumer:
    return EventConsumer(
        redis, group=GROUP, consumer="worker-1", stream_prefix=settings.stream_prefix, block_ms=50
    )


async def test_the_example_consumer_receives_contact_authenticated_typed_and_acks_it(
    settings: Settings, redis: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example()
    received: list[AnyEvent] = []
    stop = asyncio.Event()

    async def handle(event: AnyEvent) -> None:
        await example.handle(event)  # the example's own handler prints it
        received.append(event)

    async with running(all_in_one.create_app(settings)) as api:
        async with AdminClient(api.base_url, ADMIN_TOKEN) as admin:
            org = await admin.create_org(CreateOrgRequest(name="Acme"))
            key = await admin.create_api_key(
                org.id, CreateApiKeyRequest(scopes=["contacts:authenticate"])
            )
        consuming = asyncio.create_task(
            example.consume(
                settings.redis_url,
                group=GROUP,
                consumer="example-1",
                stream_prefix=settings.stream_prefix,
                stop=stop,
                handler=handle,
                block_ms=50,
            )
        )
        try:
            async with WidgetIdentityClient(api.base_url, key.key) as client:
                token = await client.authenticate_user(AuthenticateUserRequest(user_id="u-42"))

            async def authenticated() -> bool:
                return any(isinstance(e, ContactAuthenticated) for e in received)

            await eventually(authenticated, timeout=15)
        finally:
            stop.set()
            await consuming

    event = next(e for e in received if isinstance(e, ContactAuthenticated))
    assert event.org_id == org.id and event.subject == token.contact_id
    assert (event.data.contact_id, event.data.user_id, event.data.created) == (
        token.contact_id,
        "u-42",
        True,
    )
    assert f"contact {token.contact_id} authenticated" in capsys.readouterr().out
    assert await pending(redis, settings.event_streams[0]) == 0


async def test_unknown_event_types_are_acked_and_skipped(
    consumer: EventConsumer, redis: aioredis.Redis
) -> None:
    future = b'{"type": "contact.teleported", "id": "x", "data": {"where": "mars"}}'
    await redis.xadd(consumer.stream, {"event": future})
    await redis.xadd(consumer.stream, {"event": visitor_created()})
    received: list[AnyEvent] = []

    async def handle(event: AnyEvent) -> None:
        received.append(event)

    while await consumer.poll(handle):
        pass
    assert [type(e) for e in received] == [VisitorCreated]
    assert await pending(redis, consumer.stream) == 0


async def test_a_failing_handler_leaves_the_event_pending_and_it_comes_again_first(
    consumer: EventConsumer, redis: aioredis.Redis
) -> None:
    await redis.xadd(consumer.stream, {"event": visitor_created(1)})

    async def fail(event: AnyEvent) -> None:
        raise RuntimeError("the CRM is down")

    with pytest.raises(RuntimeError):
        await consumer.poll(fail)
    assert await pending(redis, consumer.stream) == 1

    await redis.xadd(consumer.stream, {"event": visitor_created(2)})
    received: list[int] = []

    async def handle(event: AnyEvent) -> None:
        received.append(event.seq)

    while await consumer.poll(handle):
        pass
    assert received == [1, 2]  # the redelivered one first, then the new one
    assert await pending(redis, consumer.stream) == 0


async def test_an_entry_that_breaks_the_contract_raises_and_stays_pending_until_acked(
    consumer: EventConsumer, redis: aioredis.Redis
) -> None:
    broken = b'{"type": "visitor.created", "id": "x"}'  # a known type without its fields
    added = await redis.xadd(consumer.stream, {"event": broken})
    entry_id = added.decode() if isinstance(added, bytes) else added

    async def handle(event: AnyEvent) -> None:
        raise AssertionError("an invalid event must not reach the handler")

    with pytest.raises(EventDecodeError) as invalid:
        await consumer.poll(handle)
    assert invalid.value.entry_id == entry_id and invalid.value.raw == broken
    assert await pending(redis, consumer.stream) == 1
    await consumer.ack(entry_id)
    assert await pending(redis, consumer.stream) == 0


async def test_the_group_is_created_once_and_a_stopped_run_returns(
    consumer: EventConsumer, redis: aioredis.Redis
) -> None:
    await consumer.ensure_group()
    await consumer.ensure_group()  # BUSYGROUP is not an error
    groups = await redis.xinfo_groups(consumer.stream)
    assert [g["name"] for g in groups] == [GROUP.encode()]

    stop = asyncio.Event()

    async def handle(event: AnyEvent) -> None:
        stop.set()

    await redis.xadd(consumer.stream, {"event": visitor_created()})
    run = asyncio.create_task(consumer.run(handle, stop=stop))
    try:
        await asyncio.wait_for(asyncio.shield(run), timeout=15)
    finally:
        if not run.done():
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
    assert await pending(redis, consumer.stream) == 0
