"""The widget's HTTP handlers: public browser endpoints, CORS-checked and rate limited.

  POST /widget/sessions, GET /widget/sessions/{id}/history, POST /widget/sessions/{id}/logout

Each handler reads top-down, one call per step: decode the request, pass the edge (edge.py:
caller, origin, rate limits), apply the input rules, run the use case, build the response.
"""

from __future__ import annotations

from typing import Annotated

from aiohttp import web
from msgspec import Meta

from services.session_resolution import cors, edge
from services.session_resolution.app_keys import Deps
from services.session_resolution.collect import collect_block
from services.session_resolution.resolution import Resolved, resolve_session
from services.session_resolution.schemas import (
    AttributeOut,
    HistoryOut,
    IdentityOut,
    LogoutOut,
    MergeRefOut,
    SessionOut,
    SessionRequest,
    WidgetConversationOut,
    WidgetMessageOut,
    session_request_decoder,
)
from services.session_resolution.session_access import (
    LoggedOut,
    check_can_log_out,
    check_session,
    log_out,
)
from services.session_resolution.session_inputs import browser_input, server_identity
from shared.db import use_bulkhead
from shared.identity.contact_tokens import CONTACT_TOKENS
from shared.identity.widget_tokens import WidgetToken
from shared.scope_history import HistoryScope, scope_page
from shared.web.http import decode_body, json_response
from shared.web.openapi import Content, Query, operation
from shared.web.pagination import MAX_CURSOR_LENGTH, decode_cursor, encode_cursor, parse_limit

_NO_STORE = {"Cache-Control": "no-store"}  # bodies carry bearer tokens

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
    return web.Response(status=204, headers=cors.preflight_headers(edge.origin(request)))


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
            "`token_expired`, `token_revoked`, `token_lifetime_exceeded` (its `exp` lies "
            "further ahead than the org's `maxTokenLifetime` allows)."
        ),
        403: (
            "`origin_not_allowed`, `org_mismatch` (contact token of another org), "
            "`external_id_mismatch` or `external_id_unsigned`."
        ),
        422: "`validation_failed`: bad fields, customData or visitor details; nothing was changed.",
        429: "",
    },
)
@edge.with_cors
async def create_session(request: web.Request) -> web.Response:
    body = await decode_body(request, session_request_decoder)
    if body.user is not None:
        use_bulkhead("identity")  # a verified login reads and locks contacts
    widget, policy = await edge.admit_widget(request, body.widget_token, body.visitor_token)
    browser = browser_input(body, widget.settings)
    server = await server_identity(request.app[CONTACT_TOKENS], body.user, widget.org_id)
    resolved = await resolve_session(
        Deps.from_app(request.app),
        widget=widget,
        policy=policy,
        visitor_token=body.visitor_token,
        server=server,
        browser=browser,
    )
    return json_response(_session_out(resolved, widget), headers=_NO_STORE)


def _session_out(resolved: Resolved, widget: WidgetToken) -> SessionOut:
    resolution = resolved.resolution
    attributes = {
        k: AttributeOut(value=a.value, source=a.source, verified=a.verified)
        for k, a in resolution.attributes.items()
    }
    return SessionOut(
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


# --- session-token endpoints ----------------------------------------------------------------


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
@edge.with_cors
async def session_history(request: web.Request) -> web.Response:
    session_id, located = await edge.admit_session(request)
    deps = Deps.from_app(request.app)
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
@edge.with_cors
async def logout(request: web.Request) -> web.Response:
    session_id, located = await edge.admit_session(request)
    check_can_log_out(located, session_id)
    logged_out = await log_out(Deps.from_app(request.app), located.record)
    return json_response(_logout_out(logged_out), headers=_NO_STORE)


def _logout_out(logged_out: LoggedOut) -> LogoutOut:
    return LogoutOut(
        visitor_token=logged_out.visitor_token, ended_sessions=logged_out.ended_sessions
    )


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_route("OPTIONS", "/widget/sessions", preflight)
    router.add_post("/widget/sessions", create_session)
    router.add_route("OPTIONS", "/widget/sessions/{session_id}/history", preflight)
    router.add_get("/widget/sessions/{session_id}/history", session_history)
    router.add_route("OPTIONS", "/widget/sessions/{session_id}/logout", preflight)
    router.add_post("/widget/sessions/{session_id}/logout", logout)
