"""The browser SDK and the Playground in a real browser (headless Chromium), against the real
all-in-one server: one test per promise a page relies on.

Pages live on a customer's site (a second server, another origin) and load the SDK from the
API server, as on the web: module and classic script, CORS and localStorage included.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from aiohttp import web

from services import all_in_one
from services.token_issuance.app_keys import KEYRING
from services.token_issuance.signing_keys import sign_contact_token
from shared.config import SETTINGS, Settings
from shared.web.openapi import build_document
from tests.support.browser import START, Site, chromium, site_for, unavailable
from tests.support.journeys import until_merge_done
from tests.support.server import Api, running
from tests.support.tokens import OrgFixture, provision_org

if TYPE_CHECKING:  # at run time the browser fixture imports it, or skips with the reason
    from playwright.async_api import Browser, BrowserContext, Page

ROOT = Path(__file__).resolve().parent.parent
ADA = {"userId": "ada", "email": "ada@example.com", "name": "Ada Lovelace"}


@dataclass
class Env:
    api: Api
    app: web.Application
    site: Site
    org: OrgFixture
    pool: asyncpg.Pool


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched


@pytest.fixture
async def env(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Env]:
    app = all_in_one.create_app(settings.with_overrides(playground=True))
    async with running(app) as api, site_for(api) as site:
        site.org = await provision_org(
            api, origins=(site.origin,), settings={"collectUserData": True}
        )
        yield Env(api=api, app=app, site=site, org=site.org, pool=pool)


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """One device: its own cookies and localStorage."""
    created = await browser.new_context()
    yield created
    await created.close()


async def open_page(
    context: BrowserContext, env: Env, *, kind: str = "module", origin: str | None = None
) -> Page:
    page = await context.new_page()
    await page.goto(env.site.url(f"/{kind}", origin=origin))
    await page.wait_for_function("window.sdkReady === true")
    return page


async def start(
    page: Page, env: Env, claims: dict[str, Any] | None = None, **options: Any
) -> dict[str, Any]:
    """``WidgetIdentity.start({token, ...options})`` in the page; with ``claims``, ``user.token``
    is a callback asking the site's backend for a contact token with those claims."""
    result: dict[str, Any] = await page.evaluate(
        START, [{"token": env.org.widget_token, **options}, claims]
    )
    return result


async def started(
    page: Page, env: Env, claims: dict[str, Any] | None = None, **options: Any
) -> dict[str, Any]:
    result = await start(page, env, claims, **options)
    assert result["ok"], result
    session: dict[str, Any] = result["session"]
    return session


async def seen(page: Page) -> set[str]:
    texts = await page.evaluate(
        "async () => (await WidgetIdentity.history()).conversations"
        ".flatMap(c => c.messages.map(m => m.text))"
    )
    return set(texts)


async def say(env: Env, session: dict[str, Any], text: str) -> None:
    """The chat service records a message in the session's scope (API key, history:write)."""
    reply = await env.api.post(
        "/v1/conversations",
        json={"sessionId": session["sessionId"], "message": {"text": text}},
        token=env.org.api_key,
    )
    assert reply.status == 201, reply.body


def ada(external_id: str | None = "workspace-1") -> dict[str, Any]:
    return {**ADA, "externalId": external_id} if external_id else dict(ADA)


# --- the promises -----------------------------------------------------------------------------


async def test_two_devices_of_one_verified_person_see_the_same_history(
    env: Env, browser: Browser
) -> None:
    laptop, phone = await browser.new_context(), await browser.new_context()
    try:
        on_laptop, on_phone = await open_page(laptop, env), await open_page(phone, env)
        user = {"externalId": "workspace-1"}
        first = await started(on_laptop, env, ada(), user=user)
        second = await started(on_phone, env, ada(), user=user)
        assert first["identity"]["level"] == second["identity"]["level"] == "verified"
        assert first["identity"]["visitorId"] != second["identity"]["visitorId"]  # two browsers
        await say(env, first, "asked on the laptop")
        assert await seen(on_phone) == {"asked on the laptop"}
        assert await seen(on_laptop) == {"asked on the laptop"}
    finally:
        await laptop.close()
        await phone.close()


async def test_an_anonymous_chat_follows_the_visitor_who_logs_in(
    env: Env, context: BrowserContext
) -> None:
    page = await open_page(context, env)
    anonymous = await started(page, env)
    assert anonymous["identity"]["level"] == "anonymous"
    await say(env, anonymous, "my order is late")

    verified = await started(page, env, ada(), user={"externalId": "workspace-1"})
    assert verified["identity"]["level"] == "verified"
    assert verified["identity"]["visitorId"] == anonymous["identity"]["visitorId"]
    merge = verified["merge"]
    assert merge is not None and merge["status"] == "pending"

    await until_merge_done(env.api, env.org, merge["id"], timeout=30)
    assert await seen(page) == {"my order is late"}


async def test_logout_on_a_shared_computer_leaves_the_next_visitor_nothing(
    env: Env, context: BrowserContext
) -> None:
    page = await open_page(context, env)
    ada_session = await started(page, env, ada(), user={"externalId": "workspace-1"})
    await say(env, ada_session, "my address is 1 Main St")
    after = await page.evaluate("async () => (await WidgetIdentity.logout()).identity")
    assert after["level"] == "anonymous"
    assert after["visitorId"] != ada_session["identity"]["visitorId"]

    await page.reload()  # the next person at this computer opens the site
    await page.wait_for_function("window.sdkReady === true")
    next_visitor = await started(page, env)
    assert next_visitor["identity"]["level"] == "anonymous"
    assert next_visitor["identity"]["visitorId"] == after["visitorId"]
    assert next_visitor["identity"]["attributes"] == {}
    assert await seen(page) == set()
    # The old session token is dead, not merely forgotten by the page.
    reply = await env.api.get(
        f"/widget/sessions/{ada_session['sessionId']}/history", token=ada_session["sessionToken"]
    )
    assert (reply.status, reply.json["code"]) == (401, "session_ended")


async def test_a_page_on_an_origin_the_widget_token_does_not_allow_is_refused(
    env: Env, context: BrowserContext
) -> None:
    page = await open_page(context, env, origin=env.site.other_origin)
    refused = await start(page, env)
    assert refused == {
        "ok": False,
        "name": "WidgetIdentityError",
        "code": "origin_not_allowed",
        "status": 403,
        "detail": f"the origin {env.site.other_origin!r} is not in this widget token's allowed origins",
        "isTyped": True,
    }


async def test_switching_external_id_switches_history(env: Env, context: BrowserContext) -> None:
    page = await open_page(context, env)
    first = await started(page, env, ada("workspace-1"), user={"externalId": "workspace-1"})
    await say(env, first, "about workspace 1")
    second = await started(page, env, ada("workspace-2"), user={"externalId": "workspace-2"})
    assert second["identity"]["externalId"] == "workspace-2"
    assert await seen(page) == set()
    await started(page, env, ada("workspace-1"), user={"externalId": "workspace-1"})
    assert await seen(page) == {"about workspace 1"}


async def test_a_reload_keeps_the_visitor(
    env: Env, context: BrowserContext, browser: Browser
) -> None:
    page = await open_page(context, env)
    before = await started(page, env, user={"name": "Ada"})
    await say(env, before, "before the reload")
    await page.reload()
    await page.wait_for_function("window.sdkReady === true")
    after = await started(page, env)
    assert after["identity"]["visitorId"] == before["identity"]["visitorId"]
    assert await seen(page) == {"before the reload"}
    # Another browser is another visitor.
    elsewhere = await browser.new_context()
    try:
        other = await started(await open_page(elsewhere, env), env)
        assert other["identity"]["visitorId"] != before["identity"]["visitorId"]
    finally:
        await elsewhere.close()


async def test_logout_in_one_tab_reaches_the_other(env: Env, context: BrowserContext) -> None:
    tab_a, tab_b = await open_page(context, env), await open_page(context, env)
    user = {"externalId": "workspace-1"}
    in_a = await started(tab_a, env, ada(), user=user)
    in_b = await started(tab_b, env, ada(), user=user)
    assert in_a["identity"]["visitorId"] == in_b["identity"]["visitorId"]  # one browser
    await say(env, in_b, "private")
    await tab_b.evaluate(
        "() => { window.changes = []; WidgetIdentity.addEventListener('identitychange',"
        " (e) => window.changes.push([e.detail.reason, e.detail.identity.level])); }"
    )

    new_visitor = await tab_a.evaluate(
        "async () => (await WidgetIdentity.logout()).identity.visitorId"
    )
    await tab_b.wait_for_function("window.changes.length > 0")
    assert await tab_b.evaluate("window.changes") == [["logout-elsewhere", "anonymous"]]
    assert await tab_b.evaluate("WidgetIdentity.identity().visitorId") == new_visitor
    assert await seen(tab_b) == set()


async def test_an_expired_contact_token_is_refreshed_through_the_callback(
    env: Env, context: BrowserContext
) -> None:
    # A real contact, and a token for it signed with the org's key that expired 10 minutes ago.
    minted = await env.api.post("/widget/authenticate-user", json=ada(), token=env.org.api_key)
    key = await env.app[KEYRING].current(env.pool, env.org.org_id)
    now, settings = int(time.time()), env.app[SETTINGS]
    expired = sign_contact_token(
        key,
        {
            "iss": settings.token_issuer,
            "aud": settings.token_audience,
            "sub": minted.json["contactId"],
            "org": env.org.org_id,
            "iat": now - 1200,
            "exp": now - 600,
            "jti": str(uuid.uuid4()),
            **ada(),
        },
    )
    page = await open_page(context, env)

    # As a string there is nobody to ask for another: the typed error, as the server said it.
    stale = await start(page, env, user={"token": expired, "externalId": "workspace-1"})
    assert (stale["ok"], stale["code"], stale["status"], stale["isTyped"]) == (
        False,
        "token_expired",
        401,
        True,
    )

    # As a callback: asked once, gives the expired token, asked again, gives a fresh one.
    env.site.queued_tokens.append(expired)
    session = await started(page, env, ada(), user={"externalId": "workspace-1"})
    assert session["identity"]["level"] == "verified"
    assert session["identity"]["contactId"] == minted.json["contactId"]
    assert env.site.token_requests == 2


async def test_the_classic_script_form_works(env: Env, context: BrowserContext) -> None:
    page = await open_page(context, env, kind="classic")
    session = await started(page, env, ada(), user={"externalId": "workspace-1"})
    assert session["identity"]["level"] == "verified"
    assert await page.evaluate("typeof window.WidgetIdentity.create") == "function"
    assert await page.evaluate("new WidgetIdentityError('x', 1, 'y') instanceof Error")
    await say(env, session, "from a classic page")
    assert await seen(page) == {"from a classic page"}


async def test_the_sdk_files_are_public_small_and_typed(env: Env, context: BrowserContext) -> None:
    sizes = {}
    for path, media in [
        ("/widget/v1/identity.js", "text/javascript"),
        ("/widget/v1/identity.global.js", "text/javascript"),
        ("/widget/v1/identity.d.ts", "application/typescript"),
    ]:
        reply = await env.api.get(path, headers={"Origin": "https://anywhere.example"})
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith(media)
        assert reply.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in reply.headers
        etag = {k.lower(): v for k, v in reply.headers.items()}["etag"]
        again = await env.api.get(path, headers={"If-None-Match": etag})
        assert again.status == 304
        body = reply.body.encode()
        sizes[path] = (len(body), len(gzip.compress(body)))
    print("\nSDK sizes (bytes, gzipped):", sizes)
    assert sizes["/widget/v1/identity.js"][1] < 8 * 1024  # no dependencies bundled in

    # Every name the module exports is declared in identity.d.ts, and nothing else is.
    page = await open_page(context, env)
    exported = await page.evaluate(
        f"async () => Object.keys(await import('{env.api.base_url}/widget/v1/identity.js')).sort()"
    )
    declarations = (ROOT / "services/session_resolution/browser/identity.d.ts").read_text()
    for name in exported:
        needle = "export default" if name == "default" else f" {name}"
        assert needle in declarations, name


def typescript_compiler() -> list[str]:
    """``tsc`` from a project-local install (.venv/node), installed from npm on first use."""
    local = ROOT / ".venv" / "node"
    tsc = local / "node_modules" / ".bin" / "tsc"
    if not tsc.exists():
        npm = shutil.which("npm")
        if npm is None or shutil.which("node") is None:
            unavailable("no node/npm to install TypeScript for checking identity.d.ts")
        assert npm is not None  # unavailable() raised otherwise
        local.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(local),
                "--no-audit",
                "--no-fund",
                "--silent",
                "typescript@5",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return [str(tsc)]


def test_the_type_declarations_compile_with_the_product_page_options(tmp_path: Path) -> None:
    tsc = typescript_compiler()
    shutil.copy(
        ROOT / "services/session_resolution/browser/identity.d.ts", tmp_path / "identity.d.ts"
    )
    shutil.copy(ROOT / "tests/support/browser_usage.ts", tmp_path / "usage.ts")
    result = subprocess.run(
        [
            *tsc,
            "--noEmit",
            "--strict",
            "--target",
            "es2022",
            "--module",
            "es2022",
            "--lib",
            "es2022,dom",
            "usage.ts",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # And a wrong shape is caught: the check can fail.
    (tmp_path / "wrong.ts").write_text(
        'import { WidgetIdentity } from "./identity";\n'
        "WidgetIdentity.start({ token: 42, user: { token: 7 } });\n"
    )
    wrong = subprocess.run(
        [*tsc, "--noEmit", "--strict", "--lib", "es2022,dom", "wrong.ts"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert wrong.returncode != 0 and "wrong.ts" in wrong.stdout


# --- the Playground ---------------------------------------------------------------------------


async def attribute_rows(page: Page, device: str) -> list[list[str]]:
    rows: list[list[str]] = await page.eval_on_selector_all(
        f"{device} .attributes tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )
    return rows


async def test_the_playground_resolves_the_options_live_on_two_devices(
    env: Env, context: BrowserContext, browser: Browser, tmp_path: Path
) -> None:
    page = await context.new_page()
    reply = await page.goto(env.api.base_url + "/playground")
    assert reply is not None and "default-src 'none'" in reply.headers["content-security-policy"]
    external: list[str] = []
    page.on(
        "request", lambda r: None if r.url.startswith(env.api.base_url) else external.append(r.url)
    )
    await page.wait_for_selector("body[data-ready=true]")
    this, other = '[data-device="this-browser"]', '[data-device="other-device"]'
    # customData from the page is a browser claim: "unverified", never more.
    assert await page.text_content(f"{this} .level") == "unverified"
    assert ["plan", '"pro"', "browser", "false"] in await attribute_rows(page, this)

    # Toggles: the widget token's settings change, and so does what the widget asks.
    await page.check("#collectUserData")
    await page.check("#extraPhone")
    await page.wait_for_selector(f"{this} form.collect input[name=phone]")
    assert await page.is_visible(f"{this} form.collect input[name=email]")
    await page.fill(f"{this} form.collect input[name=name]", "Ada")
    await page.fill(f"{this} form.collect input[name=phone]", "+44 20 7946 0000")
    await page.click(f"{this} form.collect button")
    # The level was "unverified" already (customData): wait for the typed values themselves.
    await page.wait_for_selector(f"{this} .attributes tr:has-text('+44 20 7946 0000')")
    rows = await attribute_rows(page, this)
    assert ["name", '"Ada"', "browser", "false"] in rows
    assert ["phone", '"+44 20 7946 0000"', "browser", "false"] in rows

    # Verified through the demo backend: attributes from the server, and the anonymous
    # conversation follows into the verified scope (a login merge, shown when done).
    await page.click(f"{this} .say")
    await page.wait_for_selector(f"{this} .history li")
    await page.check(f"{this} .verify")
    await page.wait_for_selector(f"{this} .level.verified")
    await page.wait_for_selector(f"{this} .merge:has-text('done')")
    rows = await attribute_rows(page, this)
    assert ["email", '"ada@example.com"', "server", "true"] in rows
    assert "workspace-1" in (await page.text_content(f"{this} .scope") or "")
    # The other device signs in as Ada too and sees the same history.
    await page.check(f"{other} .verify")
    await page.wait_for_selector(f"{other} .level.verified")
    await page.wait_for_selector(f"{other} .history li")
    shown = await page.text_content(f"{other} .history li")
    assert shown is not None and shown.startswith("Hello from This browser")

    # The snippet is the options object as the product page writes it, and it evaluates.
    await page.click("#copy")
    snippet = await page.text_content("#snippet")
    assert snippet is not None and snippet.startswith('{ token: "wit_')
    blank = await context.new_page()
    options = await blank.evaluate(
        "(text) => { const o = new Function('return (' + text + ')')();"
        " return {...o, user: {...o.user, token: typeof o.user.token}}; }",
        snippet,
    )
    await blank.close()
    assert options["collectUserData"] is True
    assert options["extraDataCollectionFields"] == [
        {"key": "phone", "label": "Phone", "type": "text", "required": False}
    ]
    assert options["user"] == {
        "token": "function",
        "externalId": "workspace-1",
        "name": "Ada Lovelace",
        "email": "ada@example.com",
    }
    assert options["customData"] == {"plan": "pro"}

    await page.set_viewport_size({"width": 1280, "height": 1000})
    # The picture in the README is refreshed on request only (UPDATE_SCREENSHOTS=1): every
    # run would otherwise leave the working tree modified (the page shows fresh ids).
    shot = (
        ROOT / "docs" / "playground.png"
        if os.environ.get("UPDATE_SCREENSHOTS")
        else tmp_path / "playground.png"
    )
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000  # a rendered page, not an empty frame
    assert external == []  # no CDN, nothing from elsewhere


async def test_the_playground_is_off_unless_asked_for(settings: Settings) -> None:
    async with running(all_in_one.create_app(settings)) as api:
        assert (await api.get("/playground")).status == 404
        assert (await api.post("/playground/api/contact-token", json=ADA)).status == 404
    on = all_in_one.create_app(settings.with_overrides(playground=True))
    build_document(on)  # strict: every playground route is documented
    async with running(on) as api:
        # The demo backend answers only its own page.
        refused = await api.post(
            "/playground/api/contact-token", json=ADA, headers={"Origin": "https://evil.example"}
        )
        assert (refused.status, refused.json["code"]) == (403, "origin_not_allowed")
        first = await api.post(
            "/playground/api/contact-token", json=ADA, headers={"Origin": api.base_url}
        )
        again = await api.post("/playground/api/contact-token", json=ADA)
        assert first.status == again.status == 200
        assert first.json["contactId"] == again.json["contactId"]  # one demo org, found again
