"""OpenTelemetry tracing: one trace from an HTTP request through the outbox, the relay's
publish and the consumer that applies the event.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set: then no SDK object exists, nothing is
instrumented, and every helper here returns at its first line. On, the process gets one
tracer provider (never installed as OpenTelemetry's global one, so tests can swap it), the
asyncpg and Redis instrumentations, and the aiohttp server instrumentation (its
middleware first in every Application made after ``configure``).

How the pieces join: ``Outbox`` writes the active span (the request's server span) into
the event's ``traceparent`` (none when tracing is off). The relay publishes
each event under a span whose parent is that traceparent, and the consumer applies it
under a span whose parent is the same traceparent, so its transaction (and the asyncpg
spans inside) sit in the request's trace. Database and Redis calls outside any request or
handling (the relay's and consumers' polling) would each start a one-span trace every
second; the sampler drops them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from shared.bus.events import Event
from shared.config import Settings

_SCOPE = "widget_identity"
_UNTRACED_PATHS = "^/healthz$,^/readyz$,^/metrics$"
_propagator = TraceContextTextMapPropagator()


class _Tracing:
    """The process's tracing while it is on."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(_SCOPE)


_active: _Tracing | None = None


class _NoUntiedClientRoots(Sampler):
    """Root sampler: a Postgres or Redis call with no request or handling around it is a
    poll of a background loop, dropped; every other root (a request, a handling) is kept."""

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        if kind is SpanKind.CLIENT:
            return SamplingResult(Decision.DROP)
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "NoUntiedClientRoots"


def configure(
    settings: Settings, *, service_name: str, processor: SpanProcessor | None = None
) -> bool:
    """Turn tracing on for this process, once; True when it is on. ``processor`` (tests)
    replaces the OTLP exporter and turns tracing on without an endpoint."""
    global _active
    if _active is not None:
        return True
    if processor is None:
        if settings.otel_exporter_otlp_endpoint is None:
            return False
        # Imported only when exporting: it pulls in protobuf and an HTTP client.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # The base endpoint of the standard variable gets the signal's path, as the spec
        # says; headers, timeout and compression come from their own OTEL_ variables.
        endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": settings.otel_service_name or f"widget-identity-{service_name}"}
        ),
        sampler=ParentBased(root=_NoUntiedClientRoots()),
    )
    provider.add_span_processor(processor)
    # Read when instrumenting: probes arrive every few seconds from every kubelet and load
    # balancer, and would be traces of nothing. Set the variable to trace them anyway.
    os.environ.setdefault("OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS", _UNTRACED_PATHS)
    # Every aiohttp Application made from now on traces its requests (the instrumentor
    # swaps aiohttp.web.Application for a subclass that adds its middleware first).
    AioHttpServerInstrumentor().instrument(tracer_provider=provider)
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    RedisInstrumentor().instrument(tracer_provider=provider)
    _active = _Tracing(provider)
    return True


def shutdown() -> None:
    """Flush and turn tracing off again (the atexit hook of the provider also flushes)."""
    global _active
    if _active is None:
        return
    AioHttpServerInstrumentor().uninstrument()
    AsyncPGInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
    RedisInstrumentor().uninstrument()
    _active.provider.shutdown()
    _active = None


def current_traceparent() -> str | None:
    """What an event emitted now carries: the active span (the request's server span, or the
    handling span of a consumer); None when tracing is off or no span is active."""
    if _active is not None:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            return traceparent(trace.get_current_span())
    return None


def traceparent(span: trace.Span) -> str | None:
    """The W3C ``traceparent`` of a span, or None for no (or a non-recording no-op) span."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def _parent(value: str | None) -> otel_context.Context | None:
    if not value:
        return None
    return _propagator.extract({"traceparent": value})


class _Envelope(msgspec.Struct):
    """What a span needs of an event as the relay holds it (encoded)."""

    id: str = ""
    type: str = ""
    traceparent: str | None = None


_envelope = msgspec.json.Decoder(_Envelope)


@contextlib.contextmanager
def publishing(rows: Sequence[tuple[str, bytes]]) -> Iterator[None]:
    """One PRODUCER span per ``(stream, payload)`` the relay sends in one round trip, each in
    the trace of the request that emitted the event (its envelope's ``traceparent``)."""
    if _active is None or not rows:
        yield
        return
    spans: list[trace.Span] = []
    for stream, payload in rows:
        try:
            envelope = _envelope.decode(payload)
        except msgspec.MsgspecError:
            envelope = _Envelope()
        spans.append(
            _active.tracer.start_span(
                f"publish {stream}",
                context=_parent(envelope.traceparent),
                kind=SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "redis",
                    "messaging.operation.type": "send",
                    "messaging.destination.name": stream,
                    "messaging.message.id": envelope.id,
                    "widget_identity.event.type": envelope.type,
                },
            )
        )
    try:
        yield
    except BaseException as exc:
        for span in spans:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        for span in spans:
            span.end()


@contextlib.contextmanager
def handling(group: str, events: Sequence[Event]) -> Iterator[None]:
    """A CONSUMER span around applying ``events`` (one transaction), current for the
    handler: its queries are its children and the events it emits carry it. One event: the
    span's parent is the event's traceparent. Several (a batch): a span of its own, linked
    to each event's."""
    if _active is None or not events:
        yield
        return
    parent = _parent(events[0].traceparent) if len(events) == 1 else None
    links = (
        []
        if len(events) == 1
        else [
            Link(trace.get_current_span(context).get_span_context())
            for context in (_parent(event.traceparent) for event in events)
            if context is not None
        ]
    )
    attributes: dict[str, Any] = {
        "messaging.system": "redis",
        "messaging.operation.type": "process",
        "messaging.consumer.group.name": group,
        "messaging.batch.message_count": len(events),
    }
    if len(events) == 1:
        attributes["messaging.message.id"] = events[0].id
    with _active.tracer.start_as_current_span(
        f"process {events[0].type_name()}",
        context=parent,
        kind=SpanKind.CONSUMER,
        links=links,
        attributes=attributes,
    ):
        yield
