"""The widget endpoints' edge, one call per handler step: who is calling (the widget token or
the session token), from which origin, from which client IP, and how often.

Public browser endpoints get three things here before any rule runs: the caller is identified
(an unknown widget or session token is refused), the browser's ``Origin`` is checked against
the widget token's allowed origins (cors.py says why requests without one pass), and the rate
limits of the org's policy are taken. ``with_cors`` echoes the origin on every answer.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from aiohttp import web

from services.session_resolution import cors
from services.session_resolution.app_keys import SESSION_LIMITER, Deps
from services.session_resolution.session_access import Located, locate_session
from services.session_resolution.session_tokens import token_hash
from shared.config import SETTINGS
from shared.db import DB_POOL
from shared.errors import Problem
from shared.identity.org_policy import POLICIES, OrgPolicy
from shared.identity.widget_tokens import WIDGET_TOKENS, WidgetToken, normalize_origin
from shared.web.http import bearer_token, client_ip, parse_uuid
from shared.web.ratelimit import Limit

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def origin(request: web.Request) -> str | None:
    return request.headers.get("Origin")


def check_origin(request: web.Request, widget: WidgetToken | None) -> None:
    raw = origin(request)
    if raw is None:
        return
    try:
        normalized = normalize_origin(raw)
    except ValueError:
        normalized = raw  # "null" or garbage: never in an allowed list
    cors.check_origin(normalized, widget.allowed_origins if widget is not None else frozenset())


def with_cors(handler: Handler) -> Handler:
    """Echo the Origin on every response of a widget endpoint, problems included (see cors)."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        headers = cors.response_headers(origin(request))
        try:
            response = await handler(request)
        except Problem as problem:
            problem.headers.update(headers)
            raise
        response.headers.update(headers)
        return response

    return wrapped


async def rate_limit(
    request: web.Request,
    widget: WidgetToken | None,
    policy: OrgPolicy | None,
    visitor_key: str | None,
) -> None:
    """Per IP, per widget token and per visitor, in one Redis round trip. The numbers come from
    the org's policy, else the environment; unknown widget tokens count against the IP only."""
    settings = request.app[SETTINGS]
    limiter = request.app[SESSION_LIMITER]
    ip = client_ip(request)
    if widget is None or policy is None:
        await limiter.check(Limit(f"sr:ip:-:{ip}", settings.rate_limits.sessions_per_ip))
        return
    limits = policy.effective_rate_limits(settings.rate_limits)
    checks = [
        Limit(f"sr:ip:{widget.org_id}:{ip}", limits.sessions_per_ip),
        Limit(f"sr:wt:{widget.id}", limits.sessions_per_widget_token),
    ]
    if visitor_key is not None:
        checks.append(Limit(f"sr:v:{visitor_key}", limits.sessions_per_visitor))
    await limiter.check(*checks)


async def admit_widget(
    request: web.Request, widget_token: str, visitor_token: str | None
) -> tuple[WidgetToken, OrgPolicy]:
    """The widget token, its origin and the rate limits of its org, in that order; an unknown
    widget token still counts against the caller's IP before its 401."""
    app = request.app
    pool = app[DB_POOL]
    widget = await app[WIDGET_TOKENS].get(pool, widget_token)
    if widget is None:
        await rate_limit(request, None, None, None)
        raise Problem(401, "invalid_widget_token", "the widget token is unknown or revoked")
    check_origin(request, widget)
    policy = await app[POLICIES].get(pool, widget.org_id)
    visitor_key = None if visitor_token is None else token_hash(visitor_token).hex()[:32]
    await rate_limit(request, widget, policy, visitor_key)
    return widget, policy


async def admit_session(request: web.Request) -> tuple[str, Located]:
    """Path id, session token, origin and rate limit, in that order (the origin check needs the
    session's widget token, which only the session token reveals)."""
    session_id = parse_uuid(request.match_info["session_id"], "session")
    deps = Deps.from_app(request.app)
    located = await locate_session(deps, bearer_token(request))
    record = located.record
    widget = await request.app[WIDGET_TOKENS].get_by_id(deps.pool, record.widget_token_id)
    check_origin(request, widget)
    policy = None if widget is None else await request.app[POLICIES].get(deps.pool, widget.org_id)
    await rate_limit(request, widget, policy, record.visitor_id)
    return session_id, located
