"""The browser SDK as files: ``GET /widget/v1/identity.js`` (ES module),
``/widget/v1/identity.global.js`` (the same code as a classic script setting
``window.WidgetIdentity``) and ``/widget/v1/identity.d.ts`` (its types).

The files are public code, the same for everyone: ``Access-Control-Allow-Origin: *`` without
credentials lets any page load them (a cross-origin module script needs CORS) and exposes
nothing. The API calls they make are CORS-checked against the widget token's allowed origins
as always.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from aiohttp import web

from shared.web.openapi import Content, operation

_MODULE_EXPORTS = "// --- module exports"
_CLASSIC_TAIL = (
    "\nglobalThis.WidgetIdentity = WidgetIdentity;\n"
    "globalThis.WidgetIdentityError = WidgetIdentityError;\n"
)
# Short enough that a fix reaches every page soon; the ETag keeps revalidation cheap.
_CACHE_CONTROL = "public, max-age=300"


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _asset(body: bytes, content_type: str) -> Asset:
    return Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def _source(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


@cache
def module_script() -> Asset:
    return _asset(_source("identity.js").encode(), "text/javascript")


@cache
def classic_script() -> Asset:
    """The module's code without its ``export``/``import.meta`` tail, wrapped in a function (a
    second copy on a page must not collide) and published as globals instead."""
    source = _source("identity.js")
    body, found, _ = source.partition(_MODULE_EXPORTS)
    if not found:
        raise RuntimeError(f"identity.js lost its {_MODULE_EXPORTS!r} marker")
    wrapped = f'(function () {{\n"use strict";\n{body}{_CLASSIC_TAIL}}})();\n'
    return _asset(wrapped.encode(), "text/javascript")


@cache
def type_declarations() -> Asset:
    return _asset(_source("identity.d.ts").encode(), "application/typescript")


def _serve(request: web.Request, asset: Asset) -> web.Response:
    headers = {
        "Access-Control-Allow-Origin": "*",  # public code, no credentials: see the module doc
        "Cache-Control": _CACHE_CONTROL,
        "ETag": asset.etag,
        "X-Content-Type-Options": "nosniff",
    }
    if asset.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(
        body=asset.body, content_type=asset.content_type, charset="utf-8", headers=headers
    )


_FILE_RESPONSES = {
    200: Content(str, media_type="text/javascript", description="The SDK source."),
    304: Content(None, description="Not modified (`If-None-Match` matched the `ETag`)."),
}


@operation(
    summary="The browser SDK as an ES module",
    description=(
        "`import WidgetIdentity from '<server>/widget/v1/identity.js'`; it talks to the server "
        "it was loaded from. Public, cacheable, `Access-Control-Allow-Origin: *`."
    ),
    tags=["browser"],
    responses=_FILE_RESPONSES,
    backend=False,
)
async def identity_module(request: web.Request) -> web.Response:
    return _serve(request, module_script())


@operation(
    summary="The browser SDK as a classic script (sets window.WidgetIdentity)",
    tags=["browser"],
    responses=_FILE_RESPONSES,
    backend=False,
)
async def identity_classic(request: web.Request) -> web.Response:
    return _serve(request, classic_script())


@operation(
    summary="TypeScript declarations of the browser SDK",
    tags=["browser"],
    responses={
        200: Content(str, media_type="application/typescript", description="identity.d.ts"),
        304: _FILE_RESPONSES[304],
    },
    backend=False,
)
async def identity_types(request: web.Request) -> web.Response:
    return _serve(request, type_declarations())


def add_browser_routes(app: web.Application) -> None:
    router = app.router
    router.add_get("/widget/v1/identity.js", identity_module)
    router.add_get("/widget/v1/identity.global.js", identity_classic)
    router.add_get("/widget/v1/identity.d.ts", identity_types)
