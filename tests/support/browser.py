"""Headless Chromium for the browser tests, and a customer's site to load the SDK on.

The browser is the system Chromium (Debian package ``chromium``) driven by Playwright, which
downloads nothing here. Missing, the tests skip with the reason, except in CI (``CI=true``),
where a missing browser is a failure: the promises they prove would otherwise go unchecked.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web

from tests.support.server import Api
from tests.support.tokens import OrgFixture

if TYPE_CHECKING:
    from playwright.async_api import Browser

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def unavailable(reason: str) -> None:
    """Skip locally; fail in CI, where the browser tests must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the browser tests must run)", pytrace=False)
    pytest.skip(reason)


def chromium_path() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(found):
        unavailable("no Chromium: apt-get install -y chromium (or set CHROMIUM=/path)")
    return found


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        unavailable("playwright is not installed: make install")
        raise  # unreachable: unavailable() always raises
    path = chromium_path()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


# --- the customer's site ---------------------------------------------------------------------

_MODULE_PAGE = """<!doctype html><meta charset="utf-8"><title>shop</title>
<script type="module">
import WidgetIdentity, {{ WidgetIdentityError }} from "{api}/widget/v1/identity.js";
window.WidgetIdentity = WidgetIdentity;
window.WidgetIdentityError = WidgetIdentityError;
window.sdkReady = true;
</script>"""

_CLASSIC_PAGE = """<!doctype html><meta charset="utf-8"><title>shop (classic)</title>
<script src="{api}/widget/v1/identity.global.js"></script>
<script>window.sdkReady = typeof window.WidgetIdentity === "object";</script>"""

# What a page does with the product page's options; `user.token` becomes the callback that
# asks the site's own backend when the test passes `tokenFrom: {...claims}`.
START = """async ([options, claims]) => {
  if (claims) {
    options.user = { ...(options.user || {}), token: async () => {
      const reply = await fetch("/backend/contact-token", {
        method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(claims)});
      return reply.text();
    } };
  }
  try {
    const session = await WidgetIdentity.start(options);
    return { ok: true, session };
  } catch (error) {
    return { ok: false, name: error.name, code: error.code, status: error.status,
             detail: error.detail, isTyped: error instanceof WidgetIdentityError };
  }
}"""


@dataclass
class Site:
    """A customer's website on its own origin: pages that load the SDK from the API server,
    and a backend that mints contact tokens with the org's API key (as a real one would)."""

    api: Api
    org: OrgFixture | None = None  # provisioned once the site's origin is known
    origin: str = ""
    other_origin: str = ""  # the same site under a name the widget token does not allow
    # Tokens the backend hands out before minting fresh ones (e.g. an expired one).
    queued_tokens: list[str] = field(default_factory=list)
    token_requests: int = 0

    def url(self, path: str, *, origin: str | None = None) -> str:
        return (origin or self.origin) + path

    async def _page(self, request: web.Request) -> web.Response:
        template = _CLASSIC_PAGE if request.match_info["kind"] == "classic" else _MODULE_PAGE
        return web.Response(text=template.format(api=self.api.base_url), content_type="text/html")

    async def _contact_token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        if self.queued_tokens:
            return web.Response(text=self.queued_tokens.pop(0))
        claims: dict[str, Any] = await request.json()
        assert self.org is not None
        reply = await self.api.post(
            "/widget/authenticate-user", json=claims, token=self.org.api_key
        )
        if reply.status != 200:
            return web.json_response(reply.json, status=reply.status)
        return web.Response(text=reply.json["token"])

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{kind:(module|classic)}", self._page)
        app.router.add_post("/backend/contact-token", self._contact_token)
        return app


@asynccontextmanager
async def site_for(api: Api) -> AsyncIterator[Site]:
    """The site on a free port of 127.0.0.1; its ``org`` is for the caller to provision."""
    site = Site(api=api)
    runner = web.AppRunner(site.app(), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    site.origin = f"http://127.0.0.1:{port}"
    site.other_origin = f"http://localhost:{port}"
    try:
        yield site
    finally:
        await runner.cleanup()
