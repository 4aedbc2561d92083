"""Provisioning through the real admin and public APIs: an org, its API key and widget
token, contact tokens, returning anonymous and verified visitors with open sessions, and a
conversation in each session so history reads return something."""

from __future__ import annotations

from typing import Any

import aiohttp

ORIGIN = "https://bench.example"
SCOPES = [
    "contacts:authenticate",
    "contacts:manage",
    "history:read",
    "history:write",
    "sessions:read",
]


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base

    async def call(self, method: str, path: str, body: Any, token: str, **headers: str) -> Any:
        async with self.session.request(
            method,
            self.base + path,
            json=body,
            headers={"Authorization": f"Bearer {token}", **headers},
        ) as resp:
            data = await resp.json(content_type=None)
            if resp.status >= 300:
                raise SystemExit(f"{method} {path} -> {resp.status}: {data}")
            return data


async def provision(
    base: str, admin: str, users: int, anonymous: int, conversations: bool = False
) -> dict[str, Any]:
    """``verified``/``anonymous``: bodies for returning visitors' POST /widget/sessions;
    ``tokens``: the users' contact tokens; ``sessions``: (sessionId, sessionToken) of every
    session opened here, the verified ones first."""
    async with aiohttp.ClientSession() as session:
        c = Client(session, base)
        org = await c.call("POST", "/admin/v1/orgs", {"name": "bench"}, admin)
        key = await c.call(
            "POST", f"/admin/v1/orgs/{org['id']}/api-keys", {"scopes": SCOPES}, admin
        )
        widget = await c.call(
            "POST",
            f"/admin/v1/orgs/{org['id']}/widget-tokens",
            {"allowedOrigins": [ORIGIN], "settings": {}},
            admin,
        )
        tokens = [
            (
                await c.call(
                    "POST",
                    "/widget/authenticate-user",
                    {"userId": f"user-{i}", "email": f"user{i}@bench.example"},
                    key["key"],
                )
            )["token"]
            for i in range(users)
        ]
        verified, anon, sessions = [], [], []
        for token in tokens:
            body = {"widgetToken": widget["token"], "user": {"token": token}}
            reply = await c.call("POST", "/widget/sessions", body, "", Origin=ORIGIN)
            verified.append({**body, "visitorToken": reply["visitorToken"]})
            sessions.append((reply["sessionId"], reply["sessionToken"]))
        for _ in range(anonymous):
            body = {"widgetToken": widget["token"]}
            reply = await c.call("POST", "/widget/sessions", body, "", Origin=ORIGIN)
            anon.append({**body, "visitorToken": reply["visitorToken"]})
            sessions.append((reply["sessionId"], reply["sessionToken"]))
        if conversations:
            for session_id, _token in sessions:
                body = {"sessionId": session_id, "message": {"text": "hello from the bench"}}
                await c.call("POST", "/v1/conversations", body, key["key"])
    return {
        "org": org,
        "key": key["key"],
        "widget": widget["token"],
        "tokens": tokens,
        "verified": verified,
        "anonymous": anon,
        "sessions": sessions,
    }
