"""What the server tells a stranger: every error is problem+json with a stable code, nothing
of the request is echoed back, no version is announced, a database failure is a 503, and
guessing API keys or the admin token is throttled per client IP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from aiohttp import web

from devstack import DevServers
from services.token_issuance.app import create_app
from shared.config import Settings
from shared.identity.api_keys import API_KEYS
from shared.web.http import SERVER_NAME
from tests.conftest import ADMIN_TOKEN
from tests.support.proxy import fault_proxy
from tests.support.server import Api, running
from tests.support.tokens import OrgFixture, provision_org

MARKER = "Zq9xEchoMe"


@dataclass(frozen=True, slots=True)
class RawReply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def problem(self) -> dict[str, Any]:
        assert self.headers["content-type"].startswith("application/problem+json"), self
        doc: dict[str, Any] = json.loads(self.body)
        return doc


async def send_raw(base_url: str, raw: bytes) -> RawReply:
    """Write ``raw`` to the server as is and read the one answer (the server closes after
    an error)."""
    parts = urlsplit(base_url)
    assert parts.hostname is not None and parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(raw)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return RawReply(int(status_line.split()[1]), headers, body)
    finally:
        writer.close()


@dataclass
class Env:
    api: Api
    app: web.Application
    org: OrgFixture
    settings: Settings


@pytest.fixture
async def env(settings: Settings) -> AsyncIterator[Env]:
    app = create_app(settings)
    async with running(app) as api:
        org = await provision_org(api)
        yield Env(api=api, app=app, org=org, settings=settings)


# --- what aiohttp itself answers ------------------------------------------------------------


MALFORMED = {
    "100 KB header line": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + MARKER.encode() * 10_000 + b"\r\n\r\n",
        "line_too_long",
    ),
    "100 KB request line": (
        b"GET /" + MARKER.encode() * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "line_too_long",
    ),
    "bad request line": (f"<script>{MARKER}</script>\r\n\r\n".encode(), "malformed_request"),
    "bad method": (f"G{MARKER}@ / HTTP/1.1\r\nHost: x\r\n\r\n".encode(), "malformed_request"),
    "invalid header name": (
        f"GET /healthz HTTP/1.1\r\nHost: x\r\n<{MARKER}>: v\r\n\r\n".encode(),
        "malformed_request",
    ),
    "bad chunked encoding": (
        b"POST /admin/v1/orgs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\n" + MARKER.encode() + b"\r\n\r\n",
        "malformed_request",
    ),
    "too many headers": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: %s\r\n" % (i, MARKER.encode()) for i in range(200))
        + b"\r\n",
        "malformed_request",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_a_request_aiohttp_cannot_parse_gets_problem_json_that_echoes_nothing(
    env: Env, case: str
) -> None:
    raw, code = MALFORMED[case]
    reply = await send_raw(env.api.base_url, raw)
    assert reply.status == 400
    assert reply.problem["code"] == code
    assert reply.problem["status"] == 400
    assert MARKER.encode() not in reply.body
    assert MARKER.lower().encode() not in reply.body.lower()
    assert reply.headers["server"] == SERVER_NAME


async def test_the_server_header_names_no_versions_on_any_response(env: Env) -> None:
    replies = [
        await env.api.get("/healthz"),
        await env.api.get("/metrics"),
        await env.api.get("/openapi.json"),
        await env.api.get("/no-such-page"),
        await env.api.post("/admin/v1/orgs", json={"name": "x"}, token="wrong-admin-token"),
        await env.api.post(
            "/admin/v1/orgs",
            data="{",
            token=ADMIN_TOKEN,
            headers={"Content-Type": "application/json"},
        ),
        await env.api.request("PUT", "/healthz"),
    ]
    assert [r.status for r in replies] == [200, 200, 200, 404, 401, 400, 405]
    assert {r.headers["Server"] for r in replies} == {SERVER_NAME}


# --- a database failure is a 503, a bug stays a 500 -----------------------------------------


async def test_connection_loss_is_a_503_and_a_programming_error_stays_a_500(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings)

    async def lost(request: web.Request) -> web.Response:
        raise asyncpg.exceptions.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress"
        )

    async def bug(request: web.Request) -> web.Response:
        raise asyncpg.exceptions.DataError("invalid input for query argument $1")

    app.router.add_get("/test/lost", lost)
    app.router.add_get("/test/bug", bug)
    async with running(app) as api:
        lost_reply = await api.get("/test/lost")
        bug_reply = await api.get("/test/bug")
    assert (lost_reply.status, lost_reply.json["code"]) == (503, "db_unavailable")
    assert "Retry-After" in lost_reply.headers
    assert (bug_reply.status, bug_reply.json["code"]) == (500, "internal_error")
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == ["unhandled error"]


# --- guessing credentials is throttled per client IP ----------------------------------------

LIMIT = 5
WRONG_KEY = "wik_" + "A" * 43  # well-formed, unknown: each one would cost a Postgres probe


@pytest.fixture
async def throttled(settings: Settings) -> AsyncIterator[Env]:
    """The service behind one trusted proxy (so tests speak as several client IPs through
    X-Forwarded-For), with a small failure limit."""
    app = create_app(settings.with_overrides(auth_failures_per_ip=LIMIT, trusted_proxy_hops=1))
    async with running(app) as api:
        org = await provision_org(api)
        yield Env(api=api, app=app, org=org, settings=settings)


def as_ip(ip: str) -> dict[str, str]:
    return {"X-Forwarded-For": ip}


async def mint(env: Env, key: str, ip: str) -> int:
    reply = await env.api.post(
        "/widget/authenticate-user", json={"userId": "u-1"}, token=key, headers=as_ip(ip)
    )
    return reply.status


async def test_failed_api_key_attempts_from_one_ip_get_429_before_any_key_lookup(
    throttled: Env,
) -> None:
    env = throttled
    attacker = "203.0.113.7"
    assert [await mint(env, WRONG_KEY, attacker) for _ in range(LIMIT)] == [401] * LIMIT
    loads = env.app[API_KEYS].db_loads
    blocked = await env.api.post(
        "/widget/authenticate-user", json={"userId": "u"}, token=WRONG_KEY, headers=as_ip(attacker)
    )
    assert (blocked.status, blocked.json["code"]) == (429, "rate_limited")
    assert blocked.headers["Content-Type"].startswith("application/problem+json")
    assert 1 <= int(blocked.headers["Retry-After"]) <= 61
    # Malformed, missing or well-formed: no more lookups for this IP in this window.
    assert await mint(env, "wik_" + "B" * 43, attacker) == 429
    assert await mint(env, "not-a-key", attacker) == 429
    assert env.app[API_KEYS].db_loads == loads


async def test_a_valid_key_is_never_locked_out_by_anyone_elses_failures(throttled: Env) -> None:
    env = throttled
    attacker, customer = "203.0.113.7", "198.51.100.20"
    for _ in range(LIMIT + 3):
        await mint(env, WRONG_KEY, attacker)
    assert await mint(env, WRONG_KEY, attacker) == 429
    # Another IP: its own mistakes are still 401s, and its valid key works.
    assert await mint(env, WRONG_KEY, customer) == 401
    assert await mint(env, env.org.api_key, customer) == 200
    # The same IP as the attacker (one NAT): a key this process has seen work still passes.
    assert await mint(env, env.org.api_key, attacker) == 200
    # ...while a valid key it has never seen waits like a guess would (no lookup for it).
    other = await env.api.post(
        f"/admin/v1/orgs/{env.org.org_id}/api-keys",
        json={"scopes": ["contacts:authenticate"]},
        token=ADMIN_TOKEN,
        headers=as_ip(customer),
    )
    assert other.status == 201, other.body
    assert await mint(env, other.json["key"], attacker) == 429
    assert await mint(env, other.json["key"], customer) == 200


async def test_failed_admin_token_attempts_are_throttled_but_the_admin_token_works(
    throttled: Env,
) -> None:
    env = throttled
    attacker = "203.0.113.9"
    path = f"/admin/v1/orgs/{env.org.org_id}"

    async def admin_get(token: str, ip: str) -> int:
        return (await env.api.get(path, token=token, headers=as_ip(ip))).status

    guesses = [await admin_get(f"guess-{i}-" + "x" * 20, attacker) for i in range(LIMIT + 1)]
    assert guesses == [401] * LIMIT + [429]
    assert await admin_get(ADMIN_TOKEN, attacker) == 200
    assert await admin_get("guess-from-elsewhere-xxxxxxx", "198.51.100.1") == 401


async def test_with_redis_unreachable_failures_are_counted_in_the_process(
    settings: Settings, servers: DevServers
) -> None:
    async with fault_proxy(servers.redis_url) as (proxy, redis_url):
        app = create_app(
            settings.with_overrides(
                redis_url=redis_url,
                auth_failures_per_ip=LIMIT,
                trusted_proxy_hops=1,
                redis_socket_timeout=1.0,
            )
        )
        async with running(app) as api:
            org = await provision_org(api)
            env = Env(api=api, app=app, org=org, settings=settings)
            await proxy.cut()
            try:
                statuses = [await mint(env, WRONG_KEY, "203.0.113.7") for _ in range(LIMIT + 1)]
                assert statuses == [401] * LIMIT + [429]
                # Not a 503: the throttle never fails a request over Redis.
                assert await mint(env, WRONG_KEY, "198.51.100.5") == 401
            finally:
                await proxy.restore()


def test_the_failure_limit_default_is_what_the_readme_says() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `AUTH_FAILURES_PER_IP`"))
    default = Settings.from_env({"DATABASE_URL": "postgresql://u@db/wi", "REDIS_URL": "redis://r"})
    assert f"`{default.auth_failures_per_ip}` per minute" in row
