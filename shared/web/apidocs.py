"""Publishing the contract: ``GET /openapi.json`` (this app's OpenAPI 3.1 document, built
once at start-up from the routes it serves) and ``GET /docs``, a self-contained page that
renders it in the browser with no network access at all (no CDN; a strict CSP says so too).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import msgspec
from aiohttp import web

from shared.web import openapi


@dataclass
class DocumentCache:
    """The encoded document, filled at start-up (an app's state is set before it starts)."""

    title: str
    body: bytes | None = None


OPENAPI_DOCUMENT: web.AppKey[DocumentCache] = web.AppKey("openapi_document", DocumentCache)
_DOCS_PAGE = "openapi_docs.html"


@cache
def docs_page() -> tuple[bytes, str]:
    """The docs page and its Content-Security-Policy. The policy allows exactly the page's own
    inline script and style (by hash) and requests to this origin: nothing else loads."""
    page = resources.files("shared.web").joinpath(_DOCS_PAGE).read_bytes()
    text = page.decode()

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.S)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
            for b in bodies
        )

    policy = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return page, policy


@openapi.operation(
    summary="This app's OpenAPI 3.1 document",
    tags=["operations"],
    responses={200: openapi.Content(dict[str, Any], description="The OpenAPI 3.1 document.")},
    backend=False,
)
async def openapi_json(request: web.Request) -> web.Response:
    cached = request.app[OPENAPI_DOCUMENT]
    if cached.body is None:  # served before start-up finished: build it now, once
        cached.body = msgspec.json.encode(
            openapi.build_document(request.app, title=cached.title, strict=False)
        )
    return web.Response(body=cached.body, content_type="application/json")


@openapi.operation(
    summary="Human-readable API documentation (works offline)",
    tags=["operations"],
    responses={
        200: openapi.Content(
            str,
            media_type="text/html",
            description="A self-contained page that renders /openapi.json; it loads nothing from elsewhere.",
        )
    },
    backend=False,
)
async def docs(request: web.Request) -> web.Response:
    page, policy = docs_page()
    return web.Response(
        body=page,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": policy,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


def install(app: web.Application, *, title: str) -> None:
    """Serve ``/openapi.json`` and ``/docs``; the document is built once, at start-up, when
    every service has added its routes."""
    cached = DocumentCache(title)
    app[OPENAPI_DOCUMENT] = cached
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)

    async def build(app: web.Application) -> None:
        cached.body = msgspec.json.encode(openapi.build_document(app, title=title, strict=False))

    app.on_startup.append(build)
