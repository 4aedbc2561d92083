"""The Playground's page and its demo backend (what a customer's site and backend would do).

``GET /playground`` serves a page with no inline code and nothing from elsewhere (a strict CSP
says so). The demo endpoints answer only the server's own origin when a browser calls, and
act only on the demo org; anyone who can reach the server can use them, which is why
``PLAYGROUND`` is off unless asked for.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import msgspec
from aiohttp import web

from services.history.merge_responses import merge_out
from services.history.queries import merge_rows
from services.history.schemas import (
    CreateConversation,
    CreatedConversation,
    MergeOut,
    create_conversation_decoder,
)
from services.playground.demo import DemoOrg, PageSettings, mint_contact_token, record_conversation
from services.token_issuance.app_keys import KEYRING
from services.token_issuance.schemas import (
    AuthenticateUserRequest,
    AuthenticateUserResponse,
    authenticate_user_decoder,
)
from shared.bus.outbox import OUTBOX
from shared.config import SETTINGS
from shared.db import DB_POOL
from shared.errors import Problem, not_found
from shared.identity.org_policy import POLICIES
from shared.web.http import decode_body, json_response, parse_uuid
from shared.web.openapi import Content, operation

DEMO: web.AppKey[DemoOrg] = web.AppKey("playground_demo", DemoOrg)

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_FILES = {
    "playground.html": "text/html",
    "playground.js": "text/javascript",
    "playground.css": "text/css",
}


class WidgetTokenOut(msgspec.Struct, rename="camel", kw_only=True):
    widget_token: str
    allowed_origins: list[str]


page_settings_decoder = msgspec.json.Decoder(PageSettings)


@cache
def _file(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


def own_origin(request: web.Request) -> str:
    """The server's origin as this request reached it; a browser caller must be on it."""
    origin = str(request.url.origin())
    sent = request.headers.get("Origin")
    if sent is not None and sent != origin:
        raise Problem(403, "origin_not_allowed", "the playground answers only its own page")
    return origin


def _static(name: str) -> web.Response:
    return web.Response(
        body=_file(name),
        content_type=_FILES[name],
        charset="utf-8",
        headers={
            "Content-Security-Policy": _CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )


@operation(
    summary="The Playground: try the widget options against this server",
    tags=["playground"],
    responses={200: Content(str, media_type="text/html", description="The page.")},
    backend=False,
)
async def page(request: web.Request) -> web.Response:
    return _static("playground.html")


@operation(
    summary="The Playground's script or style sheet",
    tags=["playground"],
    path={"name": str},
    responses={200: Content(str, media_type="text/javascript", description="The file.")},
    errors=(404,),
    backend=False,
)
async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _FILES or name.endswith(".html"):
        raise not_found("file")
    return _static(name)


@operation(
    summary="A widget token of the demo org for these options, allowed on this server's origin",
    tags=["playground"],
    body=PageSettings,
    responses={200: WidgetTokenOut},
    errors={403: "`origin_not_allowed`", 422: "`validation_failed`", 429: ""},
)
async def widget_token(request: web.Request) -> web.Response:
    origin = own_origin(request)
    body = await decode_body(request, page_settings_decoder)
    app = request.app
    token = await app[DEMO].widget_token(app[DB_POOL], app[SETTINGS], origin, body)
    return json_response(WidgetTokenOut(widget_token=token, allowed_origins=[origin]))


@operation(
    summary="The demo backend: a contact token for a demo-org user",
    description="The body of `POST /widget/authenticate-user`; the org is always the demo org.",
    tags=["playground"],
    body=AuthenticateUserRequest,
    responses={200: AuthenticateUserResponse},
    errors={403: "`origin_not_allowed`", 409: "", 422: "`validation_failed`"},
)
async def contact_token(request: web.Request) -> web.Response:
    own_origin(request)
    body = await decode_body(request, authenticate_user_decoder)
    app = request.app
    pool, settings = app[DB_POOL], app[SETTINGS]
    org_id = await app[DEMO].org_id(pool, settings)
    minted = await mint_contact_token(
        pool, app[OUTBOX], app[KEYRING], app[POLICIES], settings, org_id, body
    )
    return json_response(minted)


@operation(
    summary="The demo chat service: record a conversation in a demo session's scope",
    tags=["playground"],
    body=CreateConversation,
    responses={201: CreatedConversation},
    errors={403: "`origin_not_allowed`", 404: "", 409: "`session_ended`", 422: ""},
)
async def conversation(request: web.Request) -> web.Response:
    own_origin(request)
    body = await decode_body(request, create_conversation_decoder)
    app = request.app
    org_id = await app[DEMO].org_id(app[DB_POOL], app[SETTINGS])
    created = await record_conversation(app[DB_POOL], org_id, body)
    return json_response(created, status=201)


@operation(
    summary="A demo-org merge and its status",
    tags=["playground"],
    responses={200: MergeOut},
    errors={403: "`origin_not_allowed`", 404: "`not_found` (also until the consumer applied it)"},
)
async def merge(request: web.Request) -> web.Response:
    own_origin(request)
    merge_id = parse_uuid(request.match_info["merge_id"], "merge")
    app = request.app
    org_id = await app[DEMO].org_id(app[DB_POOL], app[SETTINGS])
    row = await merge_rows.get_merge(app[DB_POOL], org_id, merge_id)
    if row is None:
        raise not_found("merge")
    return json_response(merge_out(row))


def add_playground_routes(app: web.Application) -> None:
    app[DEMO] = DemoOrg()
    router = app.router
    router.add_get("/playground", page)
    router.add_get("/playground/{name}", asset)
    router.add_post("/playground/api/widget-token", widget_token)
    router.add_post("/playground/api/contact-token", contact_token)
    router.add_post("/playground/api/conversations", conversation)
    router.add_get("/playground/api/merges/{merge_id}", merge)
