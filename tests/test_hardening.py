"""What the server tells a stranger: every error is problem+json with a stable code, nothing
of the request is echoed back, no version is announced, a database failure is a 503, and
guessing API keys or the admin token is throttled per client IP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from aiohttp import web

from services.token_issuance.app import create_app
from shared.config import Settings
from shared.web.http import SERVER_NAME
from tests.conftest import ADMIN_TOKEN
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
