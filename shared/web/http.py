"""HTTP plumbing every service shares: the base app, middlewares, body decoding, responses.

``base_app`` builds an aiohttp application with no I/O; the Postgres pool and the Redis
client open in cleanup contexts. Services then add their routes in their own ``app.py``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared import db
from shared import redis as redis_mod
from shared.config import SETTINGS, Settings
from shared.errors import (
    Problem,
    db_busy,
    db_unavailable,
    deadline_exceeded,
    unavailable,
    validation_failed,
)
from shared.lifecycle import READINESS, SERVICE_NAME, Readiness, shutdown_of
from shared.observability import HTTP_IN_FLIGHT, HTTP_LATENCY, HTTP_REQUESTS, request_id_var
from shared.web import apidocs, openapi
from shared.web.ratelimit import RATE_LIMITER, RateLimiter

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PROBLEM_JSON = "application/problem+json"
# What every response says in ``Server``: aiohttp's default names Python's and its own version.
SERVER_NAME = "widget-identity"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

_encoder = msgspec.json.Encoder()


def json_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_encoder.encode(body), status=status, content_type="application/json", headers=headers
    )


def problem_response(problem: Problem, request: web.Request | None = None) -> web.Response:
    return web.Response(
        body=_encoder.encode(problem.body(request.path if request is not None else None)),
        status=problem.status,
        content_type=PROBLEM_JSON,
        headers=problem.headers,
    )


async def decode_body(request: web.Request, decoder: msgspec.json.Decoder[T]) -> T:
    """Read and validate a JSON body; every way it can be wrong is a 4xx problem."""
    if request.content_type != "application/json":
        raise Problem(415, "unsupported_media_type", "the body must be application/json")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(request) from None
    if not raw:
        raise validation_failed("the body is empty; a JSON object is required")
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise validation_failed(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise Problem(400, "malformed_json", f"the body is not valid JSON ({exc})") from None
    except RecursionError:
        raise validation_failed("the body is nested too deeply") from None


def _too_large(request: web.Request) -> Problem:
    return Problem(
        413,
        "payload_too_large",
        f"the body exceeds {request.app[SETTINGS].max_body_bytes} bytes",
    )


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def client_ip(request: web.Request) -> str:
    """The socket peer, or the client a trusted proxy chain reports (TRUSTED_PROXY_HOPS);
    a client-written X-Forwarded-For is never believed beyond the trusted hops."""
    hops = request.app[SETTINGS].trusted_proxy_hops
    if hops > 0:
        chain = [p.strip() for p in request.headers.get("X-Forwarded-For", "").split(",")]
        chain = [p for p in chain if p]
        if len(chain) >= hops:
            return chain[-hops][:64]
    return request.remote or "unknown"


def parse_uuid(raw: str, what: str) -> str:
    """Path ids that are not UUIDs are simply not found (no 500 from the driver)."""
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise Problem(404, "not_found", f"{what} not found") from None


# Labelled metric children per (method, route, status): ``labels()`` costs a lock and tuple
# work on every call, and the same few combinations repeat. Bounded: past the cap (odd
# methods), fall back to plain ``labels()``.
_METRIC_CHILDREN: dict[tuple[str, str, int], tuple[Any, Any]] = {}
_METRIC_CHILDREN_MAX = 1024


def _http_metrics(method: str, route: str, status: int) -> tuple[Any, Any]:
    key = (method, route, status)
    children = _METRIC_CHILDREN.get(key)
    if children is None:
        children = (
            HTTP_LATENCY.labels(method, route),
            HTTP_REQUESTS.labels(method, route, str(status)),
        )
        if len(_METRIC_CHILDREN) < _METRIC_CHILDREN_MAX:
            _METRIC_CHILDREN[key] = children
    return children


@web.middleware
async def request_context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _REQUEST_ID.match(incoming) else secrets.token_hex(8)
    token = request_id_var.set(request_id)
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    started = time.perf_counter()
    status = 500
    HTTP_IN_FLIGHT.inc()
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-Id"] = request_id
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        HTTP_IN_FLIGHT.dec()
        latency, requests = _http_metrics(request.method, route_name, status)
        latency.observe(time.perf_counter() - started)
        requests.inc()
        request_id_var.reset(token)


def route_kind(path: str) -> str:
    """Which budget and which database bulkhead (``shared.db.bulkhead_caps``) a request gets:
    ``widget`` (the browser's endpoints; a verified login then moves to ``identity``),
    ``identity`` (authenticate-user), ``admin`` (the operator's), ``api`` (everything else:
    customer backends, platform services, probes)."""
    if path.startswith("/widget/sessions"):
        return "widget"
    if path == "/widget/authenticate-user":
        return "identity"
    if path.startswith("/admin/"):
        return "admin"
    return "api"


def request_budget(settings: Settings, kind: str) -> float:
    if kind == "widget":
        return settings.widget_request_timeout
    if kind == "admin":
        return settings.admin_request_timeout
    return settings.request_timeout


@web.middleware
async def deadline_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request ends within its kind's budget: past it, the handler is cancelled (its
    transaction rolls back, its connection returns to the pool) and the client gets a quick
    503 deadline_exceeded instead of a hang. The kind also picks the request's bulkhead in
    the database pool (``shared.db.bulkhead_caps``)."""
    kind = route_kind(request.path)
    budget = request_budget(request.app[SETTINGS], kind)
    token = db.ROUTE_KIND.set(kind)
    timer = asyncio.timeout(budget)
    try:
        async with timer:
            return await handler(request)
    except TimeoutError:
        if not timer.expired():
            raise  # some inner timeout; problem_middleware decides what it means
        log.warning("request deadline exceeded", extra={"kind": kind, "budget": budget})
        raise deadline_exceeded(budget) from None
    finally:
        db.ROUTE_KIND.reset(token)


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place where exceptions become problem+json; nothing leaks a traceback."""
    try:
        return await handler(request)
    except Problem as problem:
        return problem_response(problem, request)
    except web.HTTPRequestEntityTooLarge:
        return problem_response(_too_large(request), request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        http_problem = Problem(exc.status, code, exc.reason)
        if exc.status == 405 and "Allow" in exc.headers:
            http_problem.headers["Allow"] = exc.headers["Allow"]
        return problem_response(http_problem, request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if db.is_transient(exc):
            if db.is_busy(exc):
                # Expected under a hot lock, at request rate: one line, no traceback.
                log.warning("database busy", extra={"error": repr(exc)})
                return problem_response(db_busy(), request)
            log.warning("database unavailable", exc_info=True)
            return problem_response(db_unavailable(), request)
        if isinstance(exc, redis_mod.TRANSIENT_REDIS_ERRORS):
            log.warning("redis unavailable", exc_info=True)
            return problem_response(
                unavailable("redis_unavailable", "the event store is unavailable"), request
            )
        log.exception("unhandled error")
        return problem_response(
            Problem(500, "internal_error", "an internal error occurred"), request
        )


async def name_the_server(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook; aiohttp only fills ``Server`` in when it is unset. Once
    the process drains, every answer also says ``Connection: close``: a keep-alive client
    then opens its next connection to another replica instead of reusing one this process
    is about to close under it."""
    response.headers["Server"] = SERVER_NAME
    if request.app[READINESS].draining:
        # The hook runs after aiohttp wrote its Connection header from keep_alive: set both,
        # the header for the client, force_close for our side to close after this answer.
        response.force_close()
        response.headers["Connection"] = "close"


class ProbeOut(msgspec.Struct, kw_only=True):
    """A probe's answer: ``ok``/``ready``; ``degraded`` (still ready) with the checks that
    failed but that the process can serve without; ``draining``/``unavailable`` with what
    failed."""

    status: str
    checks: list[str] | msgspec.UnsetType = msgspec.UNSET
    failed: dict[str, str] | msgspec.UnsetType = msgspec.UNSET
    degraded: dict[str, str] | msgspec.UnsetType = msgspec.UNSET


@openapi.operation(
    summary="Liveness: the process is up",
    tags=["operations"],
    responses={200: ProbeOut},
    backend=False,
)
async def healthz(request: web.Request) -> web.Response:
    return json_response(ProbeOut(status="ok"))


@openapi.operation(
    summary="Readiness: Postgres reachable, not draining",
    tags=["operations"],
    responses={
        200: openapi.Content(
            ProbeOut,
            description=(
                "Ready: `ready` when every dependency answered, `degraded` when only Redis did "
                "not (sessions and authentication still answer from Postgres; see README)."
            ),
        ),
        503: openapi.Content(
            ProbeOut,
            description="Not ready: `draining` after SIGTERM, or `unavailable` with the failed checks.",
        ),
    },
    backend=False,
)
async def readyz(request: web.Request) -> web.Response:
    readiness = request.app[READINESS]
    if readiness.draining:
        return json_response(ProbeOut(status="draining"), status=503)
    names = list(readiness.checks)
    results = await asyncio.gather(
        *(asyncio.wait_for(readiness.checks[n](), timeout=2.5) for n in names),
        return_exceptions=True,
    )
    failed = {
        n: type(r).__name__
        for n, r in zip(names, results, strict=True)
        if isinstance(r, BaseException)
    }
    degraded = {n: why for n, why in failed.items() if n in readiness.degradable}
    if len(degraded) < len(failed):
        return json_response(ProbeOut(status="unavailable", failed=failed), status=503)
    if degraded:
        return json_response(ProbeOut(status="degraded", checks=names, degraded=degraded))
    return json_response(ProbeOut(status="ready", checks=names))


@openapi.operation(
    summary="Prometheus metrics",
    tags=["operations"],
    responses={
        200: openapi.Content(
            str, media_type="text/plain", description="Prometheus text exposition format."
        )
    },
    backend=False,
)
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def base_app(settings: Settings, *, name: str) -> web.Application:
    """The application every service starts from: middlewares, probes, pools. No I/O here."""
    app = web.Application(
        middlewares=[request_context_middleware, problem_middleware, deadline_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app.on_response_prepare.append(name_the_server)
    # Without Redis a process still answers sessions and authentication from Postgres
    # (README, "When Redis is down"): it stays in the load balancer, reporting degraded.
    readiness = Readiness(degradable={"redis"})
    app[READINESS] = readiness
    shutdown_of(app)
    # Registered first so they close last, after consumers and handlers have finished.
    app.cleanup_ctx.append(db.pool_context(settings))
    app.cleanup_ctx.append(redis_mod.redis_context(settings))

    async def rate_limiter(app: web.Application) -> AsyncIterator[None]:
        app[RATE_LIMITER] = RateLimiter(
            app[redis_mod.REDIS], settings.stream_prefix, app[redis_mod.REDIS_BREAKER]
        )
        yield

    app.cleanup_ctx.append(rate_limiter)

    async def register_checks(app: web.Application) -> None:
        readiness.checks["postgres"] = lambda: db.ping(app[db.DB_POOL])
        readiness.checks["redis"] = lambda: redis_mod.ping(app[redis_mod.REDIS])

    app.on_startup.append(register_checks)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    apidocs.install(app, title=f"widget-identity ({name})")
    app[SERVICE_NAME] = name
    return app
