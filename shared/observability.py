"""JSON logs that carry the request id, and the Prometheus metrics every service shares."""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import msgspec
from aiohttp.http_exceptions import BadHttpMessage
from prometheus_client import Counter, Gauge, Histogram

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

# Attributes every LogRecord has; anything else was passed via ``extra=`` and is logged.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            doc["requestId"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(doc, enc_hook=str).decode()


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a malformed request (an 8 KiB URL, a broken request line) as an ERROR
    with a traceback before any app code runs; the client already got its 400. One warning
    line is the honest size for that, and keeps a flood of junk from drowning real errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BadHttpMessage):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = f"malformed HTTP request rejected with 400: {type(exc).__name__}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def configure_logging(level: str, *, json: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log duplicates our metrics and would dominate the output.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(MalformedRequestFilter())


# Metrics are process-wide (one registry per process), so they are defined once here.
HTTP_REQUESTS = Counter("wi_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "wi_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
HTTP_IN_FLIGHT = Gauge("wi_http_requests_in_flight", "HTTP requests being handled")
EVENTS_PUBLISHED = Counter("wi_events_published_total", "Events the outbox relay published")
EVENTS_REDRIVEN = Counter(
    "wi_events_redriven_total",
    "Published events put back in the outbox because Redis lost them",
)
OUTBOX_BACKLOG = Gauge("wi_outbox_backlog", "Unpublished outbox rows seen by the relay")
STREAM_ENTRIES = Gauge(
    "wi_stream_entries", "Entries in an events stream (partition) after its last trim", ["stream"]
)
STREAM_TRIMMED = Counter(
    "wi_stream_trimmed_total", "Events-stream entries trimmed (acknowledged by every group)"
)
EVENTS_CONSUMED = Counter(
    "wi_events_consumed_total", "Events handled by consumers", ["group", "outcome"]
)
EVENT_LAG = Histogram(
    "wi_event_lag_seconds",
    "Time from an event's occurrence to its handling",
    ["group"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
