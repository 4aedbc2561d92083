"""The admin API (/admin/v1, bearer ADMIN_TOKEN) and the same operations on the CLI."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from services.token_issuance.app import create_app
from shared.config import Settings
from tests.conftest import ADMIN_TOKEN
from tests.support.cli import cli
from tests.support.server import Api, Reply, running
from tests.support.tokens import provision_org


@dataclass
class Env:
    api: Api
    app: web.Application
    pool: asyncpg.Pool
    settings: Settings

    async def admin(self, method: str, path: str, body: Any = None) -> Reply:
        return await self.api.request(method, "/admin/v1" + path, json=body, token=ADMIN_TOKEN)

    async def count(self, table: str) -> int:
        value: int = await self.pool.fetchval(f"SELECT count(*) FROM {table}")
        return value


@pytest.fixture
async def env(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Env]:
    app = create_app(settings)
    async with running(app) as api:
        yield Env(api=api, app=app, pool=pool, settings=settings)


async def test_the_admin_api_needs_the_admin_token(env: Env) -> None:
    org = await provision_org(env.api)
    routes: list[tuple[str, str, object]] = [
        ("POST", "/admin/v1/orgs", {"name": "X"}),
        ("GET", f"/admin/v1/orgs/{org.org_id}", None),
        ("PATCH", f"/admin/v1/orgs/{org.org_id}", {"policy": {}}),
        ("POST", f"/admin/v1/orgs/{org.org_id}/api-keys", {"scopes": ["history:read"]}),
        ("DELETE", f"/admin/v1/orgs/{org.org_id}/api-keys/{org.api_key_id}", None),
        (
            "POST",
            f"/admin/v1/orgs/{org.org_id}/widget-tokens",
            {"allowedOrigins": ["https://a.example"]},
        ),
        ("POST", f"/admin/v1/orgs/{org.org_id}/signing-keys", None),
        ("DELETE", f"/admin/v1/orgs/{org.org_id}/signing-keys/{org.kid}", None),
        ("GET", "/admin/v1/orgs", None),
        ("GET", f"/admin/v1/orgs/{org.org_id}/api-keys", None),
        ("GET", f"/admin/v1/orgs/{org.org_id}/widget-tokens", None),
        (
            "PATCH",
            f"/admin/v1/orgs/{org.org_id}/widget-tokens/{org.widget_token_id}",
            {"allowedOrigins": ["https://a.example"]},
        ),
        ("DELETE", f"/admin/v1/orgs/{org.org_id}/widget-tokens/{org.widget_token_id}", None),
        ("GET", f"/admin/v1/orgs/{org.org_id}/signing-keys", None),
    ]
    for token in (None, "wrong-" + ADMIN_TOKEN, org.api_key):
        for method, path, body in routes:
            reply = await env.api.request(method, path, json=body, token=token)
            assert reply.status == 401, (method, path, reply.body)
            assert reply.json["code"] == "invalid_admin_token"
    assert await env.count("orgs") == 1
    assert await env.count("signing_keys") == 1
    live = "SELECT count(*) FROM widget_tokens WHERE revoked_at IS NULL"
    assert await env.pool.fetchval(live) == 1


async def test_an_org_is_created_with_its_policy_and_a_signing_key(env: Env) -> None:
    created = await env.admin(
        "POST", "/orgs", {"name": "Acme", "policy": {"mergeAnonymousOnLogin": False}}
    )
    assert created.status == 201, created.body
    assert created.json["policy"] == {
        "mergeAnonymousOnLogin": False,
        "requireSignedExternalId": False,
        "maxTokenLifetime": 86400,
        "rateLimits": {
            "authenticatePerKey": None,
            "sessionsPerIp": None,
            "sessionsPerWidgetToken": None,
            "sessionsPerVisitor": None,
        },
    }
    kid = created.json["signingKey"]["kid"]
    assert created.json["signingKey"]["alg"] == "EdDSA"
    jwks = (await env.api.get(f"/.well-known/jwks.json?org={created.json['id']}")).json
    assert [k["kid"] for k in jwks["keys"]] == [kid]
    shown = await env.admin("GET", f"/orgs/{created.json['id']}")
    assert shown.json["policy"] == created.json["policy"]
    assert (shown.json["disabled"], shown.json["disabledAt"]) == (False, None)


@pytest.mark.parametrize(
    "body",
    [
        {"name": ""},
        {"name": "x" * 201},
        {"name": "   "},
        {"name": "Acme", "policy": {"unknownSwitch": True}},
        {"name": "Acme", "policy": {"maxTokenLifetime": 10}},
        {"name": "Acme", "policy": {"maxTokenLifetime": "600"}},
        {"name": "Acme", "policy": {"rateLimits": {"authenticatePerKey": 0}}},
        {"name": "Acme", "policy": {"rateLimits": {"perMoon": 1}}},
        {"name": "Acme", "policy": []},
        {"name": "Acme", "id": "00000000-0000-4000-8000-000000000000"},
    ],
)
async def test_a_bad_org_is_a_422_and_nothing_is_created(env: Env, body: dict[str, Any]) -> None:
    reply = await env.admin("POST", "/orgs", body)
    assert reply.status == 422, reply.body
    assert reply.json["code"] == "validation_failed"
    assert await env.count("orgs") == 0
    assert await env.count("signing_keys") == 0


async def test_policy_updates_are_merge_patches_validated_as_a_whole(env: Env) -> None:
    org = await provision_org(env.api, policy={"mergeAnonymousOnLogin": False})
    path = f"/orgs/{org.org_id}"
    patched = await env.admin(
        "PATCH", path, {"policy": {"maxTokenLifetime": 600, "rateLimits": {"sessionsPerIp": 7}}}
    )
    assert patched.status == 200, patched.body
    policy = patched.json["policy"]
    assert policy["mergeAnonymousOnLogin"] is False  # untouched
    assert policy["maxTokenLifetime"] == 600
    assert policy["rateLimits"]["sessionsPerIp"] == 7
    # Takes effect at once on this replica.
    too_long = await env.api.post(
        "/widget/authenticate-user", json={"userId": "u", "expiresIn": 601}, token=org.api_key
    )
    assert too_long.status == 422
    reset = await env.admin("PATCH", path, {"policy": {"maxTokenLifetime": None}})
    assert reset.json["policy"]["maxTokenLifetime"] == 86400
    bad = await env.admin("PATCH", path, {"policy": {"maxTokenLifetime": 1}})
    assert bad.status == 422
    unknown = await env.admin("PATCH", path, {"policy": {"newThing": 1}})
    assert unknown.status == 422
    stored = await env.pool.fetchval("SELECT policy FROM orgs WHERE id = $1", org.org_id)
    assert stored == reset.json["policy"]
    renamed = await env.admin("PATCH", path, {"name": "Renamed"})
    assert renamed.json["name"] == "Renamed"


async def test_a_widget_token_is_created_hashed_with_exact_origins_and_settings(
    env: Env,
) -> None:
    org = await provision_org(env.api)
    settings = {
        "collectUserData": True,
        "prefillUserData": {"email": True},
        "extraDataCollectionFields": [
            {"name": "company", "label": "Company", "required": True, "maxLength": 80},
            {"name": "seats", "label": "Seats", "type": "number"},
        ],
    }
    reply = await env.admin(
        "POST",
        f"/orgs/{org.org_id}/widget-tokens",
        {
            "allowedOrigins": [
                "https://Shop.Example:443",
                "http://localhost:3000",
                "https://shop.example",
            ],
            "settings": settings,
        },
    )
    assert reply.status == 201, reply.body
    token = reply.json["token"]
    assert token.startswith("wit_")
    assert reply.json["allowedOrigins"] == ["https://shop.example", "http://localhost:3000"]
    assert reply.json["settings"]["extraDataCollectionFields"][1] == {
        "name": "seats",
        "label": "Seats",
        "type": "number",
        "required": False,
        "maxLength": 200,
    }
    row = await env.pool.fetchrow(
        "SELECT token_hash, display_prefix, allowed_origins, settings, widget_tokens::text AS dump"
        " FROM widget_tokens WHERE id = $1",
        reply.json["id"],
    )
    assert row["token_hash"] == hashlib.sha256(token.encode()).digest()
    assert token not in row["dump"]
    assert row["allowed_origins"] == ["https://shop.example", "http://localhost:3000"]
    assert row["settings"] == reply.json["settings"]


@pytest.mark.parametrize(
    "body",
    [
        {"allowedOrigins": []},
        {"allowedOrigins": ["https://*.example.com"]},
        {"allowedOrigins": ["https://shop.example/path"]},
        {"allowedOrigins": ["https://shop.example?x=1"]},
        {"allowedOrigins": ["ftp://shop.example"]},
        {"allowedOrigins": ["shop.example"]},
        {"allowedOrigins": ["https://user:pw@shop.example"]},
        {"allowedOrigins": ["https://shop.example:99999"]},
        {"allowedOrigins": ["https://a.example"] * 51},
        {"allowedOrigins": ["https://a.example"], "settings": {"collectUserData": "yes"}},
        {"allowedOrigins": ["https://a.example"], "settings": {"theme": "dark"}},
        {"allowedOrigins": ["https://a.example"], "settings": {"prefillUserData": {"phone": True}}},
        {
            "allowedOrigins": ["https://a.example"],
            "settings": {
                "extraDataCollectionFields": [{"name": f"f{i}", "label": "F"} for i in range(11)]
            },
        },
        {
            "allowedOrigins": ["https://a.example"],
            "settings": {"extraDataCollectionFields": [{"name": "1bad", "label": "F"}]},
        },
        {
            "allowedOrigins": ["https://a.example"],
            "settings": {"extraDataCollectionFields": [{"name": "email", "label": "E"}]},
        },
        {
            "allowedOrigins": ["https://a.example"],
            "settings": {
                "extraDataCollectionFields": [
                    {"name": "a", "label": "A"},
                    {"name": "a", "label": "B"},
                ]
            },
        },
        {
            "allowedOrigins": ["https://a.example"],
            "settings": {
                "extraDataCollectionFields": [{"name": "a", "label": "A", "type": "file"}]
            },
        },
        {
            "allowedOrigins": ["https://a.example"],
            "settings": {
                "extraDataCollectionFields": [{"name": "a", "label": "A", "maxLength": 100_000}]
            },
        },
    ],
)
async def test_a_bad_widget_token_is_a_422_and_nothing_is_created(
    env: Env, body: dict[str, Any]
) -> None:
    org = await provision_org(env.api)
    before = await env.count("widget_tokens")
    reply = await env.admin("POST", f"/orgs/{org.org_id}/widget-tokens", body)
    assert reply.status == 422, reply.body
    assert await env.count("widget_tokens") == before


async def test_signing_keys_rotate_and_delete_but_never_the_last_one(env: Env) -> None:
    org = await provision_org(env.api)
    org_b = await provision_org(env.api, name="Beta")
    last = await env.admin("DELETE", f"/orgs/{org.org_id}/signing-keys/{org.kid}")
    assert (last.status, last.json["code"]) == (409, "last_signing_key")
    rotated = await env.admin("POST", f"/orgs/{org.org_id}/signing-keys")
    assert rotated.status == 201
    new_kid = rotated.json["kid"]
    jwks = (await env.api.get(f"/.well-known/jwks.json?org={org.org_id}")).json
    assert {k["kid"] for k in jwks["keys"]} == {org.kid, new_kid}
    # Another org's key through this org's path does not exist.
    foreign = await env.admin("DELETE", f"/orgs/{org.org_id}/signing-keys/{org_b.kid}")
    assert foreign.status == 404
    for bad_kid in ("no-such-kid-123", "../etc", "x"):
        assert (
            await env.admin("DELETE", f"/orgs/{org.org_id}/signing-keys/{bad_kid}")
        ).status == 404
    deleted = await env.admin("DELETE", f"/orgs/{org.org_id}/signing-keys/{org.kid}")
    assert deleted.status == 200, deleted.body
    assert deleted.json["kid"] == org.kid
    jwks = (await env.api.get(f"/.well-known/jwks.json?org={org.org_id}")).json
    assert [k["kid"] for k in jwks["keys"]] == [new_kid]
    wiped = await env.pool.fetchval(
        "SELECT length(private_key_enc) FROM signing_keys WHERE kid = $1", org.kid
    )
    assert wiped == 0
    again = await env.admin("DELETE", f"/orgs/{org.org_id}/signing-keys/{org.kid}")
    assert again.status == 404


async def test_unknown_and_malformed_org_ids_are_404(env: Env) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    calls: list[tuple[str, str, object]] = [
        ("GET", f"/orgs/{missing}", None),
        ("PATCH", f"/orgs/{missing}", {"name": "X"}),
        ("POST", f"/orgs/{missing}/api-keys", {"scopes": ["history:read"]}),
        ("POST", f"/orgs/{missing}/widget-tokens", {"allowedOrigins": ["https://a.example"]}),
        ("POST", f"/orgs/{missing}/signing-keys", None),
        ("GET", "/orgs/not-a-uuid", None),
        ("DELETE", f"/orgs/{missing}/api-keys/also-not-a-uuid", None),
        ("GET", f"/orgs/{missing}/api-keys", None),
        ("GET", f"/orgs/{missing}/widget-tokens", None),
        ("GET", f"/orgs/{missing}/signing-keys", None),
        ("GET", "/orgs/not-a-uuid/api-keys", None),
        ("PATCH", f"/orgs/{missing}/widget-tokens/{missing}", {"settings": {}}),
        ("DELETE", f"/orgs/{missing}/widget-tokens/not-a-uuid", None),
    ]
    for method, path, body in calls:
        reply = await env.admin(method, path, body)
        assert reply.status == 404, (method, path, reply.body)
        assert reply.json["code"] == "not_found"


async def test_the_cli_does_the_same_operations_and_prints_json(env: Env) -> None:
    code, org, err = await cli(
        env.settings, "org", "create", "--name", "CLI Co", "--policy", '{"maxTokenLifetime": 600}'
    )
    assert code == 0, err
    org_id = org["id"]
    assert org["policy"]["maxTokenLifetime"] == 600
    code, key, err = await cli(
        env.settings,
        "api-key",
        "create",
        "--org",
        org_id,
        "--scopes",
        "contacts:authenticate,contacts:manage",
    )
    assert code == 0, err
    assert key["key"].startswith("wik_")
    code, widget, err = await cli(
        env.settings,
        "widget-token",
        "create",
        "--org",
        org_id,
        "--origin",
        "https://a.example",
        "--origin",
        "https://B.example:443",
        "--settings",
        '{"collectUserData": true}',
    )
    assert code == 0, err
    assert widget["allowedOrigins"] == ["https://a.example", "https://b.example"]
    code, patched, err = await cli(
        env.settings,
        "org",
        "update-policy",
        "--org",
        org_id,
        "--policy",
        '{"maxTokenLifetime": 900}',
    )
    assert code == 0, err
    assert patched["policy"]["maxTokenLifetime"] == 900
    code, rotated, err = await cli(env.settings, "keys", "rotate", "--org", org_id)
    assert code == 0, err
    assert rotated["kid"] != org["signingKey"]["kid"]
    # What the CLI made works over HTTP.
    reply = await env.api.post("/widget/authenticate-user", json={"userId": "u1"}, token=key["key"])
    assert reply.status == 200, reply.body
    code, deleted, err = await cli(
        env.settings, "keys", "delete", "--org", org_id, "--kid", org["signingKey"]["kid"]
    )
    assert code == 0, err
    assert deleted["kid"] == org["signingKey"]["kid"]
    jwks = (await env.api.get(f"/.well-known/jwks.json?org={org_id}")).json
    assert [k["kid"] for k in jwks["keys"]] == [rotated["kid"]]
    code, revoked, err = await cli(
        env.settings, "api-key", "revoke", "--org", org_id, "--key-id", key["id"]
    )
    assert code == 0, err
    assert revoked["id"] == key["id"]
    # Refusals are the HTTP API's problems, on stderr, exit 1, nothing written.
    code, _, err = await cli(
        env.settings, "org", "create", "--name", "X", "--policy", '{"bogus": 1}'
    )
    assert code == 1
    assert json.loads(err.strip().splitlines()[-1])["code"] == "validation_failed"
    code, _, err = await cli(
        env.settings, "widget-token", "create", "--org", org_id, "--origin", "https://*.example"
    )
    assert code == 1
    assert await env.count("orgs") == 1


async def test_a_token_minted_by_the_cli_created_org_verifies(env: Env) -> None:
    code, org, err = await cli(env.settings, "org", "create", "--name", "CLI Co")
    assert code == 0, err
    code, key, err = await cli(
        env.settings, "api-key", "create", "--org", org["id"], "--scopes", "contacts:authenticate"
    )
    assert code == 0, err

    minted = await env.api.post(
        "/widget/authenticate-user", json={"userId": "u1"}, token=key["key"]
    )
    assert minted.status == 200, minted.body
    jwks = (await env.api.get("/.well-known/jwks.json")).json
    assert org["signingKey"]["kid"] in {k["kid"] for k in jwks["keys"]}


# --- lifecycle: lists, disabling, widget token changes -------------------------------------


async def collect(env: Env, path: str, limit: int) -> list[dict[str, Any]]:
    """Every item of a paged list, following nextCursor."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = f"?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        page = await env.admin("GET", path + query)
        assert page.status == 200, page.body
        assert len(page.json["items"]) <= limit
        items += page.json["items"]
        cursor = page.json["nextCursor"]
        if cursor is None:
            return items


async def test_lists_are_paged_oldest_first_and_scoped_to_the_org(env: Env) -> None:
    org = await provision_org(env.api)
    other = await provision_org(env.api, name="Beta")
    for _ in range(2):
        await env.admin("POST", f"/orgs/{org.org_id}/api-keys", {"scopes": ["history:read"]})
        await env.admin(
            "POST", f"/orgs/{org.org_id}/widget-tokens", {"allowedOrigins": ["https://a.example"]}
        )
        await env.admin("POST", f"/orgs/{org.org_id}/signing-keys")

    orgs = await collect(env, "/orgs", 1)
    assert [o["id"] for o in orgs] == [org.org_id, other.org_id]
    keys = await collect(env, f"/orgs/{org.org_id}/api-keys", 2)
    assert len(keys) == 3 and keys[0]["id"] == org.api_key_id
    assert other.api_key_id not in {k["id"] for k in keys}
    widgets = await collect(env, f"/orgs/{org.org_id}/widget-tokens", 2)
    assert len(widgets) == 3 and widgets[0]["id"] == org.widget_token_id
    signing = await collect(env, f"/orgs/{org.org_id}/signing-keys", 1)
    assert len(signing) == 3 and signing[0]["kid"] == org.kid
    assert other.kid not in {k["kid"] for k in signing}


async def test_listed_credentials_never_show_a_secret(env: Env) -> None:
    org = await provision_org(env.api)
    key = (await env.admin("GET", f"/orgs/{org.org_id}/api-keys")).json["items"][0]
    assert set(key) == {
        "id",
        "displayPrefix",
        "scopes",
        "createdAt",
        "lastUsedAt",
        "expiresAt",
        "revokedAt",
    }
    assert key["displayPrefix"] == org.api_key[:12]
    widget = (await env.admin("GET", f"/orgs/{org.org_id}/widget-tokens")).json["items"][0]
    assert set(widget) == {
        "id",
        "displayPrefix",
        "allowedOrigins",
        "settings",
        "createdAt",
        "revokedAt",
    }
    listed = json.dumps([key, widget])
    assert org.api_key not in listed and org.widget_token not in listed
    stored_hash = await env.pool.fetchval(
        "SELECT key_hash FROM api_keys WHERE id = $1", org.api_key_id
    )
    assert stored_hash.hex() not in listed


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=101", "limit=x", "cursor=!!!", "cursor=" + "A" * 201, "limit=1&cursor=e30"],
)
async def test_a_bad_limit_or_cursor_is_a_422(env: Env, query: str) -> None:
    org = await provision_org(env.api)
    for path in ("/orgs", f"/orgs/{org.org_id}/api-keys", f"/orgs/{org.org_id}/signing-keys"):
        reply = await env.admin("GET", f"{path}?{query}")
        assert (reply.status, reply.json["code"]) == (422, "validation_failed"), (path, reply.body)
        assert reply.headers["Content-Type"].startswith("application/problem+json")


async def test_last_used_at_is_recorded_without_a_write_per_request(env: Env) -> None:
    org = await provision_org(env.api)

    async def last_used() -> Any:
        keys = (await env.admin("GET", f"/orgs/{org.org_id}/api-keys")).json["items"]
        return keys[0]["lastUsedAt"]

    assert await last_used() is None
    for _ in range(3):
        reply = await env.api.post(
            "/widget/authenticate-user", json={"userId": "u"}, token=org.api_key
        )
        assert reply.status == 200
    first = await last_used()
    assert first is not None
    # Within the minute, further requests do not write it again.
    await env.pool.execute(
        "UPDATE api_keys SET last_used_at = last_used_at - interval '1 hour' WHERE id = $1",
        org.api_key_id,
    )
    marked = await last_used()
    await env.api.post("/widget/authenticate-user", json={"userId": "u"}, token=org.api_key)
    assert await last_used() == marked


async def test_disabling_an_org_shows_and_refuses_its_credentials_then_enabling_restores(
    env: Env,
) -> None:
    org = await provision_org(env.api)
    path = f"/orgs/{org.org_id}"
    disabled = await env.admin("PATCH", path, {"disabled": True})
    assert disabled.status == 200, disabled.body
    assert disabled.json["disabled"] is True and disabled.json["disabledAt"] is not None
    again = await env.admin("PATCH", path, {"disabled": True})
    assert again.json["disabledAt"] == disabled.json["disabledAt"]  # the first time stays
    assert (await env.admin("GET", path)).json["disabled"] is True
    refused = await env.api.post(
        "/widget/authenticate-user", json={"userId": "u"}, token=org.api_key
    )
    assert (refused.status, refused.json["code"]) == (401, "invalid_api_key")
    # Still administrable while disabled.
    assert (await env.admin("GET", f"{path}/api-keys")).status == 200
    enabled = await env.admin("PATCH", path, {"disabled": False})
    assert (enabled.json["disabled"], enabled.json["disabledAt"]) == (False, None)
    ok = await env.api.post("/widget/authenticate-user", json={"userId": "u"}, token=org.api_key)
    assert ok.status == 200, ok.body
    bad = await env.admin("PATCH", path, {"disabled": "yes"})
    assert bad.status == 422


async def test_a_widget_token_is_updated_validated_like_creation_and_revoked(env: Env) -> None:
    org = await provision_org(env.api)
    path = f"/orgs/{org.org_id}/widget-tokens/{org.widget_token_id}"
    updated = await env.admin(
        "PATCH", path, {"allowedOrigins": ["https://New.example:443", "https://new.example"]}
    )
    assert updated.status == 200, updated.body
    assert updated.json["allowedOrigins"] == ["https://new.example"]
    assert updated.json["settings"]["collectUserData"] is False  # untouched
    settings = {"collectUserData": True, "prefillUserData": {"name": True}}
    updated = await env.admin("PATCH", path, {"settings": settings})
    assert updated.json["allowedOrigins"] == ["https://new.example"]
    assert updated.json["settings"]["prefillUserData"] == {"name": True, "email": False}
    assert "token" not in updated.json

    revoked = await env.admin("DELETE", path)
    assert revoked.status == 200 and revoked.json["id"] == org.widget_token_id
    repeat = await env.admin("DELETE", path)
    assert repeat.json["revokedAt"] == revoked.json["revokedAt"]
    refused = await env.admin("PATCH", path, {"settings": {}})
    assert (refused.status, refused.json["code"]) == (409, "widget_token_revoked")
    listed = (await env.admin("GET", f"/orgs/{org.org_id}/widget-tokens")).json["items"]
    assert listed[0]["revokedAt"] == revoked.json["revokedAt"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"allowedOrigins": []},
        {"allowedOrigins": ["https://*.example.com"]},
        {"allowedOrigins": ["https://shop.example/path"]},
        {"allowedOrigins": ["https://a.example"] * 51},
        {"settings": {"collectUserData": "yes"}},
        {"settings": {"theme": "dark"}},
        {"settings": {"extraDataCollectionFields": [{"name": "email", "label": "E"}]}},
        {"token": "wit_x"},
    ],
)
async def test_a_bad_widget_token_update_is_a_422_and_changes_nothing(
    env: Env, body: dict[str, Any]
) -> None:
    org = await provision_org(env.api)
    query = "SELECT allowed_origins, settings FROM widget_tokens WHERE id = $1"
    before = await env.pool.fetchrow(query, org.widget_token_id)
    path = f"/orgs/{org.org_id}/widget-tokens/{org.widget_token_id}"
    reply = await env.admin("PATCH", path, body)
    assert (reply.status, reply.json["code"]) == (422, "validation_failed"), reply.body
    assert await env.pool.fetchrow(query, org.widget_token_id) == before


async def test_another_orgs_credentials_read_as_not_found(env: Env) -> None:
    org = await provision_org(env.api)
    other = await provision_org(env.api, name="Beta")
    widget = f"/orgs/{org.org_id}/widget-tokens/{other.widget_token_id}"
    for method, body in (("PATCH", {"settings": {}}), ("DELETE", None)):
        reply = await env.admin(method, widget, body)
        assert (reply.status, reply.json["code"]) == (404, "not_found"), reply.body
    assert await env.pool.fetchval(
        "SELECT revoked_at IS NULL FROM widget_tokens WHERE id = $1", other.widget_token_id
    )


async def test_the_cli_lists_disables_enables_and_changes_widget_tokens(env: Env) -> None:
    org = await provision_org(env.api)
    code, listed, err = await cli(env.settings, "org", "list", "--limit", "1")
    assert code == 0, err
    assert [o["id"] for o in listed["items"]] == [org.org_id] and listed["nextCursor"] is None
    code, shown, err = await cli(env.settings, "org", "disable", "--org", org.org_id)
    assert code == 0, err
    assert shown["disabled"] is True
    code, shown, err = await cli(env.settings, "org", "show", "--org", org.org_id)
    assert shown["disabled"] is True
    code, shown, err = await cli(env.settings, "org", "enable", "--org", org.org_id)
    assert code == 0 and shown["disabled"] is False, err

    code, keys, err = await cli(env.settings, "api-key", "list", "--org", org.org_id)
    assert code == 0, err
    assert [k["id"] for k in keys["items"]] == [org.api_key_id]
    assert org.api_key not in json.dumps(keys)
    code, signing, err = await cli(env.settings, "keys", "list", "--org", org.org_id)
    assert code == 0 and [k["kid"] for k in signing["items"]] == [org.kid], err

    widget = ("--org", org.org_id, "--id", org.widget_token_id)
    code, updated, err = await cli(
        env.settings, "widget-token", "update", *widget, "--origin", "https://B.example"
    )
    assert code == 0, err
    assert updated["allowedOrigins"] == ["https://b.example"]
    # The same validation as the API: refused, problem on stderr, nothing changed.
    code, _, err = await cli(
        env.settings, "widget-token", "update", *widget, "--origin", "https://*.example"
    )
    assert code == 1
    assert json.loads(err.strip().splitlines()[-1])["code"] == "validation_failed"
    code, widgets, err = await cli(env.settings, "widget-token", "list", "--org", org.org_id)
    assert widgets["items"][0]["allowedOrigins"] == ["https://b.example"]
    code, revoked, err = await cli(env.settings, "widget-token", "revoke", *widget)
    assert code == 0 and revoked["id"] == org.widget_token_id, err
    code, _, err = await cli(env.settings, "api-key", "list", "--org", org.org_id, "--limit", "0")
    assert code == 1
    assert json.loads(err.strip().splitlines()[-1])["code"] == "validation_failed"
    code, _, err = await cli(
        env.settings, "widget-token", "revoke", "--org", org.org_id, "--id", "not-a-uuid"
    )
    assert code == 1
    assert json.loads(err.strip().splitlines()[-1])["code"] == "not_found"
