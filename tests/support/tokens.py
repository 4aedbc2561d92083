"""Provisioning helpers for tests that need an org and verified contacts.

Everything goes through the real admin HTTP API and ``POST /widget/authenticate-user``, so a
test that uses them exercises the same paths a customer does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.identity.api_keys import SCOPES
from tests.conftest import ADMIN_TOKEN
from tests.support.server import Api


@dataclass(frozen=True, slots=True)
class OrgFixture:
    org_id: str
    api_key: str  # carries every scope in shared.identity.api_keys.SCOPES
    api_key_id: str
    widget_token: str
    widget_token_id: str
    kid: str  # the org's first signing key
    origins: tuple[str, ...]


async def provision_org(
    api: Api,
    *,
    policy: dict[str, Any] | None = None,
    origins: tuple[str, ...] = ("https://shop.example",),
    settings: dict[str, Any] | None = None,
    scopes: tuple[str, ...] | None = None,
    name: str = "Acme",
) -> OrgFixture:
    """Create an org (with ``policy``), an API key (all scopes unless given), and a widget
    token for ``origins`` with widget ``settings``; fail the test on any non-2xx."""
    body: dict[str, Any] = {"name": name}
    if policy is not None:
        body["policy"] = policy
    org = await api.post("/admin/v1/orgs", json=body, token=ADMIN_TOKEN)
    assert org.status == 201, org.body
    org_id = org.json["id"]
    key = await api.post(
        f"/admin/v1/orgs/{org_id}/api-keys",
        json={"scopes": sorted(scopes if scopes is not None else SCOPES)},
        token=ADMIN_TOKEN,
    )
    assert key.status == 201, key.body
    widget = await api.post(
        f"/admin/v1/orgs/{org_id}/widget-tokens",
        json={"allowedOrigins": list(origins), "settings": settings or {}},
        token=ADMIN_TOKEN,
    )
    assert widget.status == 201, widget.body
    return OrgFixture(
        org_id=org_id,
        api_key=key.json["key"],
        api_key_id=key.json["id"],
        widget_token=widget.json["token"],
        widget_token_id=widget.json["id"],
        kid=org.json["signingKey"]["kid"],
        origins=tuple(widget.json["allowedOrigins"]),
    )


async def mint_contact_token(api: Api, org: OrgFixture, **body: Any) -> dict[str, Any]:
    """``POST /widget/authenticate-user`` with the org's API key; ``body`` uses the wire names
    (``userId=``, ``email=``, ``name=``, ``externalId=``, ``customData=``, ``expiresIn=``).
    Returns ``{"token", "contactId", "expiresAt"}``; fails the test on a non-200."""
    reply = await api.post("/widget/authenticate-user", json=body, token=org.api_key)
    assert reply.status == 200, reply.body
    result: dict[str, Any] = reply.json
    return result
