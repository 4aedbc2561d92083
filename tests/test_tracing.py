"""Tracing: a login that requests a merge is one trace, from the HTTP request through the
outbox, the relay's publish and the merge consumer's transaction; without an endpoint
nothing is traced."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import asyncpg
import msgspec
import pytest
from aiohttp import web

from services import all_in_one
from services.history.consumers import GROUP
from shared import tracing
from shared.config import Settings
from tests.support.journeys import chat_anonymously, log_in, until_merge_done
from tests.support.server import running
from tests.support.tokens import mint_contact_token, provision_org

from opentelemetry.sdk.trace import ReadableSpan  # isort: skip
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # isort: skip
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # isort: skip
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind  # isort: skip

ORIGIN = {"Origin": "https://shop.example"}


@pytest.fixture
def exporter(settings: Settings) -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    assert tracing.configure(settings, service_name="test", processor=SimpleSpanProcessor(memory))
    try:
        yield memory
    finally:
        tracing.shutdown()


def parent_of(traceparent: str) -> tuple[int, int]:
    """(trace id, span id) a W3C traceparent names."""
    _version, trace_id, span_id, _flags = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


def parent_ids(span: ReadableSpan) -> tuple[int, int] | None:
    return None if span.parent is None else (span.parent.trace_id, span.parent.span_id)


async def outbox_events(pool: asyncpg.Pool, event_type: str) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT payload FROM outbox WHERE event_type = $1 ORDER BY id", event_type
    )
    return [msgspec.json.decode(row["payload"]) for row in rows]


async def test_a_login_merge_is_one_trace_from_the_request_to_the_consumers_transaction(
    settings: Settings, pool: asyncpg.Pool, exporter: InMemorySpanExporter
) -> None:
    async with running(all_in_one.create_app(settings)) as api:
        org = await provision_org(api)
        chat = await chat_anonymously(api, org)
        minted = await mint_contact_token(api, org, userId="ada", email="ada@example.com")
        login = await log_in(api, org, chat.session["visitorToken"], minted["token"])
        assert login.status == 200, login.body
        merge_id = login.body["merge"]["id"]

        await until_merge_done(api, org, merge_id, timeout=15)

    [requested] = await outbox_events(pool, "history.merge_requested")
    assert requested["data"]["mergeId"] == merge_id
    request_span_ids = parent_of(requested["traceparent"])
    trace_id = request_span_ids[0]
    spans = exporter.get_finished_spans()

    # The event's traceparent is the login request's server span.
    [request] = [s for s in spans if s.context is not None and ids(s) == request_span_ids]
    assert request.kind is SpanKind.SERVER
    assert request.name == "POST /widget/sessions"
    assert request.parent is None  # the client sent no traceparent: the trace starts here
    in_request = [s for s in spans if parent_ids(s) == request_span_ids]
    scopes = {s.instrumentation_scope.name for s in in_request if s.instrumentation_scope}
    assert "opentelemetry.instrumentation.asyncpg" in scopes  # its transaction's queries
    assert "opentelemetry.instrumentation.redis" in scopes  # its rate limits

    def about_the_event(span: ReadableSpan) -> bool:
        return (span.attributes or {}).get("messaging.message.id") == requested["id"]

    # The relay's publish of that event: a child of the request, in its trace.
    [publish] = [s for s in spans if s.kind is SpanKind.PRODUCER and about_the_event(s)]
    assert publish.name == f"publish {settings.event_streams[0]}"
    assert parent_ids(publish) == request_span_ids

    # The merge consumer's handling: also a child of the request, around its transaction.
    [handled] = [s for s in spans if s.kind is SpanKind.CONSUMER and about_the_event(s)]
    assert handled.name == "process history.merge_requested"
    assert (handled.attributes or {}).get("messaging.consumer.group.name") == GROUP
    assert parent_ids(handled) == request_span_ids
    children = [s for s in spans if parent_ids(s) == ids(handled)]
    queries = [s for s in children if s.kind is SpanKind.CLIENT]
    statements = [str((s.attributes or {}).get("db.statement", "")) for s in queries]
    assert statements[0].startswith("BEGIN") and statements[-1].startswith("COMMIT")
    assert any("processed_events" in st for st in statements)
    assert any("conversations" in st for st in statements)  # the merge itself

    # What the handler emits carries the handling span: the trace goes on from there, and
    # the relay publishes the follow-up event as the handling's child.
    [done] = await outbox_events(pool, "history.merged")
    assert done["data"]["mergeId"] == merge_id
    assert parent_of(done["traceparent"]) == ids(handled)
    [follow_up] = [s for s in children if s.kind is not SpanKind.CLIENT]
    assert follow_up.kind is SpanKind.PRODUCER
    assert (follow_up.attributes or {}).get("messaging.message.id") == done["id"]

    assert {ids(s)[0] for s in (request, publish, handled, *children)} == {trace_id}


async def test_without_an_endpoint_nothing_is_traced(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    assert settings.otel_exporter_otlp_endpoint is None
    app = all_in_one.create_app(settings)
    assert type(app) is web.Application  # not the instrumented subclass: no server spans
    assert not hasattr(asyncpg.Connection.fetch, "__wrapped__")  # asyncpg is not instrumented
    async with running(app) as api:
        org = await provision_org(api)
        reply = await api.post(
            "/widget/sessions", json={"widgetToken": org.widget_token}, headers=ORIGIN
        )
        assert reply.status == 200, reply.body
    events = await outbox_events(pool, "visitor.created")
    assert events
    assert [event["traceparent"] for event in events] == [None] * len(events)
