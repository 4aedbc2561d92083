"""HTTP handlers of session resolution: parse, call the rules and stores, respond.

Public (browser) endpoints, CORS-checked and rate limited:
  POST /widget/sessions, GET /widget/sessions/{id}/history, POST /widget/sessions/{id}/logout
Internal (API key) endpoints:
  GET /v1/sessions/{id} (sessions:read),
  GET /v1/contacts/{contactId}/devices, DELETE /v1/contacts/{contactId}/devices/{visitorId}
  (contacts:manage)
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

import msgspec
from aiohttp import web
from msgspec import Meta

from services.session_resolution import cors, queries
from services.session_resolution.collect import collect_block, validate_fields
from services.session_resolution.deps import SESSION_CACHE, SESSION_CONFIG, SESSION_LIMITER, Deps
from services.session_resolution.identity import (
    BrowserInput,
    ServerIdentity,
    normalise_browser_input,
)
from services.session_resolution.resolution import resolve_session
from services.session_resolution.schemas import (
    CUSTOM_DATA_MAX_BYTES,
    AttributeOut,
    DeviceOut,
    DevicesOut,
    HistoryOut,
    IdentityOut,
    LogoutOut,
    MergeRefOut,
    SessionInfoOut,
    SessionOut,
    SessionRequest,
    WidgetConversationOut,
    WidgetMessageOut,
    session_request_decoder,
)
from services.session_resolution.session_access import (
    Located,
    check_can_log_out,
    check_session,
    is_revoked,
    locate_session,
    revoke_device,
    session_ended,
    unbind_visitor,
)
from services.session_resolution.session_tokens import token_hash
from shared.bus.outbox import OUTBOX
from shared.config import SETTINGS
from shared.db import DB_POOL
from shared.errors import Problem, not_found, validation_failed
from shared.identity.api_keys import API_KEYS
from shared.identity.contact_tokens import CONTACT_TOKENS
from shared.identity.org_policy import POLICIES, OrgPolicy
from shared.identity.widget_tokens import WIDGET_TOKENS, WidgetToken, normalize_origin
from shared.scope_history import HistoryScope, scope_page
from shared.web.http import bearer_token, decode_body, json_response, parse_uuid
from shared.web.openapi import Content, Query, operation
from shared.web.pagination import MAX_CURSOR_LENGTH, decode_cursor, encode_cursor, parse_limit
from shared.web.ratelimit import Limit

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_NO_STORE = {"Cache-Control": "no-store"}  # bodies carry bearer tokens


def _deps(request: web.Request) -> Deps:
    app = request.app
    return Deps(
        pool=app[DB_POOL],
        cache=app[SESSION_CACHE],
        outbox=app[OUTBOX],
        verifier=app[CONTACT_TOKENS],
        config=app[SESSION_CONFIG],
    )


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


def _origin(request: web.Request) -> str | None:
    return request.headers.get("Origin")


def _check_origin(request: web.Request, widget: WidgetToken | None) -> None:
    raw = _origin(request)
    if raw is None:
        return
    try:
        origin = normalize_origin(raw)
    except ValueError:
        origin = raw  # "null" or garbage: never in an allowed list
    cors.check_origin(origin, widget.allowed_origins if widget is not None else frozenset())


def with_cors(handler: Handler) -> Handler:
    """Echo the Origin on every response of a widget endpoint, problems included (see cors)."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        headers = cors.response_headers(_origin(request))
        try:
            response = await handler(request)
        except Problem as problem:
            problem.headers.update(headers)
            raise
        response.headers.update(headers)
        return response

    return wrapped


# The errors every session-token route shares, documented once.
_SESSION_TOKEN_ERRORS = {
    401: (
        "`invalid_session_token` (missing, unknown or another session's token), "
        "`session_ended` (logged out, device revoked or expired) or `token_revoked`."
    ),
    403: "`origin_not_allowed`.",
    404: "`not_found`: the path's session id is not a UUID.",
}


@operation(
    summary="CORS preflight for a widget endpoint",
    description=(
        "Answers any origin; the actual request is checked against the widget token's "
        "allowed origins."
    ),
    tags=["widget sessions"],
    responses={
        204: Content(
            None,
            description="Preflight allowed.",
            headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": "Content-Type, Authorization",
                "Access-Control-Max-Age": "Seconds the preflight may be cached.",
            },
        )
    },
    backend=False,
)
async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=204, headers=cors.preflight_headers(_origin(request)))


async def _rate_limit(
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


# --- POST /widget/sessions ------------------------------------------------------------------


@operation(
    summary="Resolve a widget session: who is this visitor, and how far to trust that",
    description=(
        "Public; called by the widget in the visitor's browser with the org's widget token. "
        "When the browser sends `Origin`, it must be one of the widget token's allowed "
        "origins. `user.token` (a contact token) is the only thing that makes the session "
        "`verified`; name, email, fields and customData from the browser stay `unverified`. "
        "Keep the returned `visitorToken` and send it back next time."
    ),
    tags=["widget sessions"],
    body=SessionRequest,
    responses={
        200: Content(
            SessionOut,
            description="The session, its tokens, the resolved identity and what to collect.",
        )
    },
    errors={
        401: (
            "`invalid_widget_token`, or the contact token failed: `token_invalid`, "
            "`token_expired`, `token_revoked`."
        ),
        403: (
            "`origin_not_allowed`, `org_mismatch` (contact token of another org), "
            "`external_id_mismatch` or `external_id_unsigned`."
        ),
        422: "`validation_failed`: bad fields, customData or visitor details; nothing was changed.",
        429: "",
    },
)
@with_cors
async def create_session(request: web.Request) -> web.Response:
    body = await decode_body(request, session_request_decoder)
    app = request.app
    pool = app[DB_POOL]
    widget = await app[WIDGET_TOKENS].get(pool, body.widget_token)
    if widget is None:
        await _rate_limit(request, None, None, None)
        raise Problem(401, "invalid_widget_token", "the widget token is unknown or revoked")
    _check_origin(request, widget)
    policy = await app[POLICIES].get(pool, widget.org_id)
    visitor_key = None if body.visitor_token is None else token_hash(body.visitor_token).hex()[:32]
    await _rate_limit(request, widget, policy, visitor_key)

    if body.custom_data and len(msgspec.json.encode(body.custom_data)) > CUSTOM_DATA_MAX_BYTES:
        raise validation_failed(f"customData exceeds {CUSTOM_DATA_MAX_BYTES} bytes")
    fields = validate_fields(body.fields, widget.settings)
    user = body.user
    browser = normalise_browser_input(
        BrowserInput(
            name=None if user is None else user.name,
            email=None if user is None else user.email,
            external_id=None if user is None else user.external_id,
            fields=fields,
            custom_data=body.custom_data,
        )
    )
    server = None
    if user is not None and user.token is not None:
        # A token that fails is its own 401/403: never a silent downgrade to unverified.
        claims = await app[CONTACT_TOKENS].verify(user.token, org_id=widget.org_id)
        server = ServerIdentity(
            contact_id=claims.contact_id,
            issued_at=claims.issued_at,
            expires_at=claims.expires_at,
            external_id=claims.external_id,
            name=claims.name,
            email=claims.email,
            custom_data=claims.custom_data,
        )
    resolved = await resolve_session(
        _deps(request),
        widget=widget,
        policy=policy,
        visitor_token=body.visitor_token,
        server=server,
        browser=browser,
    )
    resolution = resolved.resolution
    attributes = {
        k: AttributeOut(value=a.value, source=a.source, verified=a.verified)
        for k, a in resolution.attributes.items()
    }
    out = SessionOut(
        session_id=resolved.session_id,
        session_token=resolved.session_token,
        expires_at=resolved.expires_at,
        visitor_token=resolved.visitor_token,
        identity=IdentityOut(
            level=resolution.level,
            visitor_id=resolved.visitor_id,
            contact_id=resolution.contact_id,
            external_id=resolution.external_id or None,
            external_id_verified=resolution.external_id_verified,
            attributes=attributes,
        ),
        merge=None
        if resolved.merge_id is None
        else MergeRefOut(id=resolved.merge_id, status="pending"),
        collect=collect_block(widget.settings, resolution.attributes),
    )
    return json_response(out, headers=_NO_STORE)


# --- session-token endpoints ----------------------------------------------------------------


async def _session_for(request: web.Request) -> tuple[str, Located]:
    """Path id, token, CORS and rate limit, in that order (the origin check needs the session's
    widget token, which only the session token reveals)."""
    session_id = parse_uuid(request.match_info["session_id"], "session")
    deps = _deps(request)
    located = await locate_session(deps, bearer_token(request))
    record = located.record
    widget = await request.app[WIDGET_TOKENS].get_by_id(deps.pool, record.widget_token_id)
    _check_origin(request, widget)
    policy = None if widget is None else await request.app[POLICIES].get(deps.pool, widget.org_id)
    await _rate_limit(request, widget, policy, record.visitor_id)
    return session_id, located


@operation(
    summary="The conversations this session's scope may see",
    description=(
        "A verified session sees its contact's history for its externalId (from every "
        "device); anonymous and unverified sessions see only their own browser's. Newest "
        "first, paged with `cursor`."
    ),
    tags=["widget sessions"],
    query=[
        Query("limit", Annotated[int, Meta(ge=1, le=50)], "Page size (default 20)."),
        Query(
            "cursor",
            Annotated[str, Meta(max_length=MAX_CURSOR_LENGTH)],
            "`nextCursor` from the previous page.",
        ),
    ],
    responses={200: HistoryOut},
    security="sessionToken",
    errors={
        **_SESSION_TOKEN_ERRORS,
        422: "`validation_failed`: limit or cursor is not valid.",
        429: "",
    },
)
@with_cors
async def session_history(request: web.Request) -> web.Response:
    session_id, located = await _session_for(request)
    deps = _deps(request)
    await check_session(deps, located, session_id)
    record = located.record
    limit = parse_limit(request.query.get("limit"), maximum=deps.config.history_page_max)
    cursor = request.query.get("cursor")
    after = decode_cursor(cursor) if cursor else None
    # Only a verified session reads the contact's scope; anything else, its own browser's.
    scope = (
        HistoryScope.of_contact(record.org_id, record.contact_id, record.external_id)
        if record.level == "verified" and record.contact_id is not None
        else HistoryScope.of_visitor(record.org_id, record.visitor_id)
    )
    page = await scope_page(
        deps.pool,
        scope,
        limit=limit,
        after=after,
        messages_per=deps.config.messages_per_conversation,
    )
    out = HistoryOut(
        conversations=[
            WidgetConversationOut(
                id=c.id,
                created_at=c.created_at,
                messages=[
                    WidgetMessageOut(
                        id=m.id,
                        author=m.author,
                        text=m.body,
                        sender_verified=m.sender_verified,
                        created_at=m.created_at,
                    )
                    for m in c.messages
                ],
            )
            for c in page.conversations
        ],
        next_cursor=encode_cursor(*page.next_after) if page.next_after is not None else None,
    )
    return json_response(out, headers=_NO_STORE)


@operation(
    summary="Log out this browser: unbind the device and end the session",
    description=(
        "The session token stops working and the browser gets a fresh `visitorToken`: the "
        "next session there is a new visitor that sees none of the contact's history."
    ),
    tags=["widget sessions"],
    responses={200: LogoutOut},
    security="sessionToken",
    errors={
        **_SESSION_TOKEN_ERRORS,
        429: "",
    },
)
@with_cors
async def logout(request: web.Request) -> web.Response:
    session_id, located = await _session_for(request)
    check_can_log_out(located, session_id)
    record = located.record
    result = await unbind_visitor(
        _deps(request),
        visitor_id=record.visitor_id,
        org_id=record.org_id,
        widget_token_id=record.widget_token_id,
        reason="logout",
    )
    if result is None or result.new_visitor_token is None:
        raise session_ended()
    out = LogoutOut(visitor_token=result.new_visitor_token, ended_sessions=result.ended_sessions)
    return json_response(out, headers=_NO_STORE)


# --- internal API ---------------------------------------------------------------------------


@operation(
    summary="Session introspection for platform services",
    tags=["sessions"],
    responses={200: SessionInfoOut},
    security="apiKey",
    scope="sessions:read",
    errors=(404,),
)
async def get_session(request: web.Request) -> web.Response:
    principal = await request.app[API_KEYS].authenticate(request, "sessions:read")
    session_id = parse_uuid(request.match_info["session_id"], "session")
    deps = _deps(request)
    row = await queries.session_by_id(deps.pool, principal.org_id, session_id)
    if row is None:
        raise not_found("session")  # another org's session reads exactly like a missing one
    iat = row.contact_token_issued_at
    revoked = await is_revoked(
        deps, row.org_id, row.contact_id, None if iat is None else int(iat.timestamp())
    )
    end_reason = row.end_reason or ("tokens_revoked" if revoked else None)
    active = row.ended_at is None and not revoked and row.expires_at.timestamp() > time.time()
    out = SessionInfoOut(
        id=row.id,
        org_id=row.org_id,
        visitor_id=row.visitor_id,
        level=row.level,
        contact_id=row.contact_id,
        external_id=row.external_id or None,
        external_id_verified=row.external_id_verified,
        attributes={k: msgspec.convert(v, AttributeOut) for k, v in row.attributes.items()},
        active=active,
        created_at=row.created_at,
        expires_at=row.expires_at,
        ended_at=row.ended_at,
        end_reason=end_reason,
    )
    return json_response(out)


@operation(
    summary="The devices (visitors) bound to a contact",
    tags=["sessions"],
    responses={200: DevicesOut},
    security="apiKey",
    scope="contacts:manage",
    errors=(404,),
)
async def list_devices(request: web.Request) -> web.Response:
    principal = await request.app[API_KEYS].authenticate(request, "contacts:manage")
    contact_id = parse_uuid(request.match_info["contact_id"], "contact")
    rows = await queries.contact_devices(request.app[DB_POOL], principal.org_id, contact_id)
    out = DevicesOut(
        devices=[
            DeviceOut(
                visitor_id=r.visitor_id,
                external_id=r.external_id or None,
                bound_at=r.bound_at,
                last_seen_at=r.last_seen_at,
            )
            for r in rows
        ]
    )
    return json_response(out)


@operation(
    summary="Unbind one device from a contact and end its sessions",
    tags=["sessions"],
    responses={204: Content(None, description="Unbound.")},
    security="apiKey",
    scope="contacts:manage",
    errors=(404,),
)
async def delete_device(request: web.Request) -> web.Response:
    principal = await request.app[API_KEYS].authenticate(request, "contacts:manage")
    contact_id = parse_uuid(request.match_info["contact_id"], "contact")
    visitor_id = parse_uuid(request.match_info["visitor_id"], "device")
    found = await revoke_device(
        _deps(request), org_id=principal.org_id, contact_id=contact_id, visitor_id=visitor_id
    )
    if not found:
        raise not_found("device")
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_route("OPTIONS", "/widget/sessions", preflight)
    router.add_post("/widget/sessions", create_session)
    router.add_route("OPTIONS", "/widget/sessions/{session_id}/history", preflight)
    router.add_get("/widget/sessions/{session_id}/history", session_history)
    router.add_route("OPTIONS", "/widget/sessions/{session_id}/logout", preflight)
    router.add_post("/widget/sessions/{session_id}/logout", logout)
    router.add_get("/v1/sessions/{session_id}", get_session)
    router.add_get("/v1/contacts/{contact_id}/devices", list_devices)
    router.add_delete("/v1/contacts/{contact_id}/devices/{visitor_id}", delete_device)
