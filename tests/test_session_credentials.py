"""Promise 11: credentials end cleanly — a session ends with every credential it stands on.

A session stands on the widget token that opened it and its org; a verified session also on
the signing key that verified its contact token, the API key that minted that token, and the
contact's tokens not being revoked. Ending any of them through replica A ends the sessions
standing on it on replica B within one second (B had just used them, so only the broadcast
can tell it), in the history service's view of sessions at once, and in introspection; the
sessions that do not stand on it carry on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from shared.config import Settings
from tests.conftest import ADMIN_TOKEN
from tests.support.replicas import ORIGIN, Replicas, two_replicas, within_one_second
from tests.support.server import Api


@dataclass(frozen=True, slots=True)
class Opened:
    session_id: str
    session_token: str


@dataclass
class World:
    replicas: Replicas
    reader_key: str  # an API key that is not the one that minted the contact token
    anonymous: Opened
    verified: Opened
    contact_id: str


async def open_session(api: Api, widget_token: str, **body: Any) -> Opened:
    reply = await api.post(
        "/widget/sessions",
        json={"widgetToken": widget_token, **body},
        headers={"Origin": ORIGIN},
    )
    assert reply.status == 200, reply.body
    return Opened(reply.json["sessionId"], reply.json["sessionToken"])


async def history_status(api: Api, opened: Opened) -> int:
    reply = await api.get(
        f"/widget/sessions/{opened.session_id}/history",
        token=opened.session_token,
        headers={"Origin": ORIGIN},
    )
    return reply.status


@pytest.fixture
async def world(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[World]:
    async with two_replicas(settings, pool) as replicas:
        a, org = replicas.a, replicas.org
        reader = await a.post(
            f"/admin/v1/orgs/{org.org_id}/api-keys",
            json={"scopes": ["history:write", "sessions:read"]},
            token=ADMIN_TOKEN,
        )
        assert reply_ok(reader.status), reader.body
        anonymous = await open_session(a, org.widget_token)
        verified = await open_session(a, org.widget_token, user={"token": replicas.contact_token})
        claims = await a.get(f"/v1/sessions/{verified.session_id}", token=reader.json["key"])
        world = World(replicas, reader.json["key"], anonymous, verified, claims.json["contactId"])
        for opened in (anonymous, verified):  # B uses (and caches) what they stand on
            assert await history_status(replicas.b, opened) == 200
        yield world


def reply_ok(status: int) -> bool:
    return 200 <= status < 300


async def end_widget_token(w: World) -> None:
    await w.replicas.admin("DELETE", f"/widget-tokens/{w.replicas.org.widget_token_id}")


async def disable_org(w: World) -> None:
    await w.replicas.admin("PATCH", "", {"disabled": True})


async def delete_signing_key(w: World) -> None:
    # Rotate first: an org keeps a live key, and only the one that verified the token goes.
    rotated = await w.replicas.a.post(
        f"/admin/v1/orgs/{w.replicas.org.org_id}/signing-keys", token=ADMIN_TOKEN
    )
    assert reply_ok(rotated.status), rotated.body
    await w.replicas.admin("DELETE", f"/signing-keys/{w.replicas.org.kid}")


async def revoke_minting_api_key(w: World) -> None:
    await w.replicas.admin("DELETE", f"/api-keys/{w.replicas.org.api_key_id}")


async def revoke_contact_tokens(w: World) -> None:
    reply = await w.replicas.a.post(
        f"/v1/contacts/{w.contact_id}/revoke-tokens", token=w.replicas.org.api_key
    )
    assert reply_ok(reply.status), reply.body


Ending = Callable[[World], Awaitable[None]]

# credential -> (how it ends, does the anonymous session stand on it too?, the end reason)
CREDENTIALS: dict[str, tuple[Ending, bool, str]] = {
    "widget token": (end_widget_token, True, "widget_token_revoked"),
    "org": (disable_org, True, "org_disabled"),
    "signing key": (delete_signing_key, False, "signing_key_deleted"),
    "minting API key": (revoke_minting_api_key, False, "api_key_revoked"),
    "contact tokens": (revoke_contact_tokens, False, "tokens_revoked"),
}


@pytest.mark.parametrize("credential", list(CREDENTIALS))
async def test_promise_11_a_session_ends_with_each_credential_it_stands_on(
    world: World, credential: str
) -> None:
    end, anonymous_too, reason = CREDENTIALS[credential]
    ended = [world.verified, world.anonymous] if anonymous_too else [world.verified]
    carry_on = [] if anonymous_too else [world.anonymous]
    b = world.replicas.b
    await end(world)

    async def refused_on_b() -> bool:
        statuses = [await history_status(b, opened) for opened in ended]
        return all(status == 401 for status in statuses)

    await within_one_second(world.replicas, refused_on_b)

    for opened in ended:
        # History reads sessions through the view session resolution publishes: it refuses
        # to record anything in the ended session, at once, with no event to wait for.
        recorded = await b.post(
            "/v1/conversations", json={"sessionId": opened.session_id}, token=world.reader_key
        )
        if credential != "org":  # a disabled org's API keys are refused before anything
            assert (recorded.status, recorded.json["code"]) == (409, "session_ended")
        scope = await world.replicas.pool.fetchrow(
            "SELECT ended_at, end_reason FROM session_scopes WHERE session_id = $1::uuid",
            opened.session_id,
        )
        assert scope["ended_at"] is not None and scope["end_reason"] == reason
    for opened in carry_on:
        assert await history_status(b, opened) == 200

    if credential != "org":
        seen = await b.get(f"/v1/sessions/{world.verified.session_id}", token=world.reader_key)
        assert seen.json["active"] is False and seen.json["endReason"] == reason
    # And the contact token itself opens nothing any more.
    again = await b.post(
        "/widget/sessions",
        json={
            "widgetToken": world.replicas.org.widget_token,
            "user": {"token": world.replicas.contact_token},
        },
        headers={"Origin": ORIGIN},
    )
    assert again.status == 401, again.body
