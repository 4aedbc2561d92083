"""A visitor's journey through the real widget endpoints, shared by the tests that need a
login with browser history behind it (merges, tracing, promised merges)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.support.server import Api, Reply, eventually
from tests.support.tokens import OrgFixture


@dataclass(frozen=True, slots=True)
class AnonymousChat:
    session: dict[str, Any]  # the anonymous session's response body
    conversation_id: str  # what the browser said before logging in


async def chat_anonymously(api: Api, org: OrgFixture) -> AnonymousChat:
    """A new browser opens a session and says something (a conversation recorded through the
    history API), while still anonymous."""
    first = await api.post(
        "/widget/sessions",
        json={"widgetToken": org.widget_token},
        headers={"Origin": org.origins[0]},
    )
    assert first.status == 200, first.body
    said = await api.post(
        "/v1/conversations",
        json={"sessionId": first.body["sessionId"], "message": {"text": "before login"}},
        token=org.api_key,
    )
    assert said.status == 201, said.body
    return AnonymousChat(first.body, said.body["id"])


async def log_in(api: Api, org: OrgFixture, visitor_token: str, contact_token: str) -> Reply:
    """The same browser presents a contact token: the login (its reply, unchecked)."""
    return await api.post(
        "/widget/sessions",
        json={
            "widgetToken": org.widget_token,
            "visitorToken": visitor_token,
            "user": {"token": contact_token},
        },
        headers={"Origin": org.origins[0]},
    )


async def until_merge_done(api: Api, org: OrgFixture, merge_id: str, *, timeout: float) -> None:
    """Wait until ``GET /v1/merges/{id}`` says the login's merge is done (its event went
    through the relay and the merge consumer)."""

    async def done() -> bool:
        reply = await api.get(f"/v1/merges/{merge_id}", token=org.api_key)
        return reply.status == 200 and reply.json["status"] == "done"

    await eventually(done, timeout=timeout)
