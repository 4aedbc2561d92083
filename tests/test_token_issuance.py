"""POST /widget/authenticate-user, revoke-tokens, signing-key custody and the events they
emit, against the real server, Postgres and Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import jwt
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from services.all_in_one import create_app as create_all_in_one
from services.token_issuance.app import create_app
from services.token_issuance.app_keys import KEYRING
from services.token_issuance.signing_keys import decrypt_private_key, generate_signing_key
from shared.bus.events import EVENT_FIELD, ContactAuthenticated, ContactTokensRevoked, event_decoder
from shared.config import RateLimits, Settings
from shared.errors import ConfigError
from shared.identity.contact_tokens import CONTACT_TOKENS, KID_PATTERN, MAX_TOKEN_BYTES
from shared.identity.org_policy import POLICIES
from tests.conftest import ADMIN_TOKEN
from tests.support.server import Reply, eventually, running
from tests.support.token_env import TokenIssuanceEnv, token_issuance
from tests.support.tokens import mint_contact_token, provision_org


class Env(TokenIssuanceEnv):
    async def authenticate(self, body: Any, *, key: str | None = None) -> Reply:
        return await self.api.post(
            "/widget/authenticate-user", json=body, token=key or self.org.api_key
        )

    async def writes(self) -> int:
        count: int = await self.pool.fetchval(
            "SELECT (SELECT count(*) FROM contacts) + (SELECT count(*) FROM outbox)"
        )
        return count


@pytest.fixture
async def env(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Env]:
    async with token_issuance(settings, pool, Env) as env:
        yield env


def decode(env: Env, token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


async def test_authenticate_user_mints_a_verifiable_token_with_the_server_claims(
    env: Env,
) -> None:
    reply = await env.authenticate(
        {
            "userId": "u-42",
            "email": "  Jane.Doe@Example.COM ",
            "name": "Jane Doe",
            "externalId": "workspace-7",
            "customData": {"plan": "pro", "seats": 5, "trial": False},
            "expiresIn": 900,
        }
    )
    assert reply.status == 200, reply.body
    assert set(reply.json) == {"token", "contactId", "expiresAt"}
    claims = decode(env, reply.json["token"])
    assert claims["sub"] == reply.json["contactId"]
    assert claims["org"] == env.org.org_id
    assert claims["email"] == "jane.doe@example.com"
    assert claims["userId"] == "u-42"
    assert claims["name"] == "Jane Doe"
    assert claims["externalId"] == "workspace-7"
    assert claims["customData"] == {"plan": "pro", "seats": 5, "trial": False}
    assert claims["exp"] - claims["iat"] == 900
    header = jwt.get_unverified_header(reply.json["token"])
    assert header == {"alg": "EdDSA", "typ": "wi-contact+jwt", "kid": env.org.kid}
    verified = await env.app[CONTACT_TOKENS].verify(reply.json["token"], org_id=env.org.org_id)
    assert verified.external_id == "workspace-7"
    assert verified.custom_data == {"plan": "pro", "seats": 5, "trial": False}


async def test_promise_7_server_attributes_are_stored_with_their_provenance(env: Env) -> None:
    minted = await mint_contact_token(
        env.api, env.org, userId="u1", email="a@example.com", name="Ann", customData={"tier": 2}
    )
    row = await env.pool.fetchrow(
        "SELECT org_id, contact_key, user_id, verified_email, attributes FROM contacts WHERE id = $1",
        minted["contactId"],
    )
    assert str(row["org_id"]) == env.org.org_id
    assert row["contact_key"] == "user:u1"
    assert row["verified_email"] == "a@example.com"
    server = {"source": "server", "verified": True}
    assert row["attributes"] == {
        "name": {"value": "Ann", **server},
        "email": {"value": "a@example.com", **server},
        "tier": {"value": 2, **server},
    }


async def test_the_contact_is_keyed_by_user_id_when_given_else_by_normalised_email(
    env: Env,
) -> None:
    first = await mint_contact_token(env.api, env.org, userId="u1", email="old@example.com")
    moved = await mint_contact_token(env.api, env.org, userId="u1", email="new@example.com")
    assert moved["contactId"] == first["contactId"]
    verified_email = await env.pool.fetchval(
        "SELECT verified_email FROM contacts WHERE id = $1", first["contactId"]
    )
    assert verified_email == "new@example.com"
    by_email = await mint_contact_token(env.api, env.org, email="Guest@Example.com")
    again = await mint_contact_token(env.api, env.org, email="  guest@example.COM")
    assert by_email["contactId"] == again["contactId"] != first["contactId"]
    # A name-only update keeps what earlier calls said.
    await mint_contact_token(env.api, env.org, userId="u1", name="Renamed")
    attributes = await env.pool.fetchval(
        "SELECT attributes FROM contacts WHERE id = $1", first["contactId"]
    )
    assert attributes["name"]["value"] == "Renamed"
    assert attributes["email"]["value"] == "new@example.com"


@pytest.mark.parametrize(
    "body",
    [
        {"userId": "racer", "email": "racer@example.com", "name": "R"},
        {"email": "racer@example.com"},
    ],
)
async def test_twenty_concurrent_calls_for_one_user_make_one_contact(
    env: Env, body: dict[str, Any]
) -> None:
    replies = await asyncio.gather(*(env.authenticate(body) for _ in range(20)))
    assert [r.status for r in replies] == [200] * 20, [r.body for r in replies]
    assert len({r.json["contactId"] for r in replies}) == 1
    assert await env.pool.fetchval("SELECT count(*) FROM contacts") == 1


async def test_an_email_verified_for_another_user_id_is_a_409_identity_conflict(
    env: Env,
) -> None:
    owner = await mint_contact_token(env.api, env.org, userId="owner", email="shared@example.com")
    before = await env.writes()
    for body in (
        {"userId": "intruder", "email": "SHARED@example.com"},
        {"email": "shared@example.com"},
    ):
        reply = await env.authenticate(body)
        assert reply.status == 409, reply.body
        assert reply.json["code"] == "identity_conflict"
    assert await env.writes() == before  # no contact, no event, nothing merged
    row = await env.pool.fetchrow(
        "SELECT user_id, verified_email FROM contacts WHERE id = $1", owner["contactId"]
    )
    assert (row["user_id"], row["verified_email"]) == ("owner", "shared@example.com")
    # Another org is another namespace: the same email is free there.
    org_b = await provision_org(env.api, name="Beta")
    assert (
        await mint_contact_token(env.api, org_b, userId="intruder", email="shared@example.com")
    )["token"]


BAD_BODIES: list[tuple[str, Any]] = [
    ("empty", {}),
    ("no identity", {"name": "Ann"}),
    ("bad email", {"email": "not-an-email"}),
    ("email without domain dot", {"email": "a@localhost"}),
    ("userId too long", {"userId": "u" * 257}),
    ("blank userId", {"userId": "   "}),
    ("NUL in userId", {"userId": "a\u0000b"}),
    ("name too long", {"userId": "u", "name": "n" * 201}),
    ("externalId too long", {"userId": "u", "externalId": "e" * 257}),
    ("customData too many keys", {"userId": "u", "customData": {f"k{i}": i for i in range(51)}}),
    ("customData nested", {"userId": "u", "customData": {"a": {"b": 1}}}),
    ("customData list", {"userId": "u", "customData": {"a": [1]}}),
    ("customData too large", {"userId": "u", "customData": {"a": "x" * 4100}}),
    ("customData reserved key", {"userId": "u", "customData": {"email": "x@example.com"}}),
    ("customData bad key", {"userId": "u", "customData": {"a b": 1}}),
    ("customData NUL", {"userId": "u", "customData": {"a": "\u0000"}}),
    ("expiresIn too short", {"userId": "u", "expiresIn": 59}),
    ("expiresIn above policy", {"userId": "u", "expiresIn": 86_401}),
    ("expiresIn wrong type", {"userId": "u", "expiresIn": "3600"}),
    ("org in body", {"userId": "u", "orgId": "00000000-0000-0000-0000-000000000000"}),
    ("not an object", ["userId", "u"]),
]


@pytest.mark.parametrize(("case", "body"), BAD_BODIES, ids=[c for c, _ in BAD_BODIES])
async def test_bad_input_gets_a_clear_422_and_changes_nothing(
    env: Env, case: str, body: Any
) -> None:
    before = await env.writes()
    reply = await env.authenticate(body)
    assert reply.status == 422, (case, reply.body)
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert reply.json["code"] == "validation_failed"
    assert reply.json["detail"]
    assert await env.writes() == before


async def test_malformed_bodies_are_4xx_never_5xx(env: Env) -> None:
    raw = await env.api.post(
        "/widget/authenticate-user",
        data=b"{not json",
        token=env.org.api_key,
        headers={"Content-Type": "application/json"},
    )
    assert (raw.status, raw.json["code"]) == (400, "malformed_json")
    text = await env.api.post(
        "/widget/authenticate-user",
        data="userId=u",
        token=env.org.api_key,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert text.status == 415
    deep = await env.api.post(
        "/widget/authenticate-user",
        data=("[" * 5000 + "]" * 5000).encode(),
        token=env.org.api_key,
        headers={"Content-Type": "application/json"},
    )
    assert 400 <= deep.status < 500
    huge = await env.api.post(
        "/widget/authenticate-user",
        data=json.dumps({"userId": "u", "name": "x" * (1024 * 1024)}).encode(),
        token=env.org.api_key,
        headers={"Content-Type": "application/json"},
    )
    assert huge.status == 413


async def test_the_largest_accepted_claims_still_make_a_token_the_verifier_accepts(
    env: Env,
) -> None:
    custom = {f"k{i:02d}": "v" * 72 for i in range(50)}
    assert 4000 < len(json.dumps(custom, separators=(",", ":"))) <= 4096
    body = {
        "userId": "u" * 256,
        "email": ("e" * 64) + "@" + ("d" * 60) + ".example.com",
        "name": "n" * 200,
        "externalId": "x" * 256,
        "customData": custom,
    }
    reply = await env.authenticate(body)
    assert reply.status == 200, reply.body
    assert len(reply.json["token"]) <= MAX_TOKEN_BYTES
    await env.app[CONTACT_TOKENS].verify(reply.json["token"], org_id=env.org.org_id)
    # Non-ASCII is escaped in a JWT: the same sizes in emoji cannot fit, and are refused
    # instead of minting a token nobody would accept.
    heavy = {**body, "name": "\U0001f600" * 200, "customData": {"a": "\U0001f600" * 1000}}
    refused = await env.authenticate(heavy)
    assert refused.status == 422, refused.body


async def test_expires_in_is_capped_by_the_org_policy(env: Env) -> None:
    org = await provision_org(env.api, policy={"maxTokenLifetime": 600}, name="Short")
    default = await mint_contact_token(env.api, org, userId="u")
    claims = decode(env, default["token"])
    assert claims["exp"] - claims["iat"] == 600  # the default 3600 is capped too
    assert (
        await env.authenticate({"userId": "u", "expiresIn": 600}, key=org.api_key)
    ).status == 200
    over = await env.authenticate({"userId": "u", "expiresIn": 601}, key=org.api_key)
    assert over.status == 422
    assert "600" in over.json["detail"]


async def test_the_lifetime_limit_keeps_answering_to_its_earlier_name(
    env: Env, pool: asyncpg.Pool
) -> None:
    """Policy updates and stored documents written with ``tokenMaxTtlSeconds`` (the name
    before ``maxTokenLifetime``) still mean the same limit."""
    org = await provision_org(env.api, name="Old name")
    patched = await env.api.patch(
        f"/admin/v1/orgs/{org.org_id}",
        json={"policy": {"tokenMaxTtlSeconds": 900}},
        token=ADMIN_TOKEN,
    )
    assert patched.status == 200, patched.body
    shown = await env.api.get(f"/admin/v1/orgs/{org.org_id}", token=ADMIN_TOKEN)
    assert shown.json["policy"]["maxTokenLifetime"] == 900
    assert "tokenMaxTtlSeconds" not in shown.json["policy"]
    # A document stored under the old name (before migration 0010) still reads the same.
    await pool.execute(
        """UPDATE orgs SET policy = (policy - 'maxTokenLifetime')
               || '{"tokenMaxTtlSeconds": 700}'::jsonb WHERE id = $1""",
        uuid.UUID(org.org_id),
    )
    env.app[POLICIES].forget()
    minted = await mint_contact_token(env.api, org, userId="u")
    claims = decode(env, minted["token"])
    assert claims["exp"] - claims["iat"] == 700


async def test_rate_limit_per_key_is_set_by_org_policy(env: Env) -> None:
    org = await provision_org(env.api, policy={"rateLimits": {"authenticatePerKey": 3}}, name="RL")
    statuses = [
        (await env.authenticate({"userId": f"u{i}"}, key=org.api_key)).status for i in range(3)
    ]
    assert statuses == [200, 200, 200]
    limited = await env.authenticate({"userId": "u9"}, key=org.api_key)
    assert limited.status == 429
    assert limited.json["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    # Per key: a second key of the same org has its own budget.
    other = await env.api.post(
        f"/admin/v1/orgs/{org.org_id}/api-keys",
        json={"scopes": ["contacts:authenticate"]},
        token="test-admin-token-" + "x" * 16,
    )
    assert (await env.authenticate({"userId": "u9"}, key=other.json["key"])).status == 200


async def test_rate_limit_defaults_come_from_the_environment(settings: Settings) -> None:
    limited = settings.with_overrides(
        rate_limits=RateLimits(
            authenticate_per_key=2,
            sessions_per_ip=100,
            sessions_per_widget_token=100,
            sessions_per_visitor=100,
        )
    )
    async with running(create_app(limited)) as api:
        org = await provision_org(api)
        for _ in range(2):
            await mint_contact_token(api, org, userId="u")
        reply = await api.post("/widget/authenticate-user", json={"userId": "u"}, token=org.api_key)
        assert reply.status == 429
        assert "Retry-After" in reply.headers


async def read_events(redis: aioredis.Redis, settings: Settings) -> list[Any]:
    entries = await redis.xrange(settings.event_streams[0])
    return [event_decoder.decode(fields[EVENT_FIELD]) for _, fields in entries]


async def test_contact_authenticated_and_tokens_revoked_go_through_the_outbox(
    env: Env, redis: aioredis.Redis
) -> None:
    first = await mint_contact_token(env.api, env.org, userId="u1", email="u1@example.com")
    second = await mint_contact_token(env.api, env.org, userId="u1", externalId="ws-1")
    revoked = await env.api.post(
        f"/v1/contacts/{first['contactId']}/revoke-tokens", token=env.org.api_key
    )
    assert revoked.status == 200, revoked.body

    async def all_published() -> bool:
        return len(await read_events(redis, env.settings)) >= 3

    await eventually(all_published)
    events = await read_events(redis, env.settings)
    authenticated = [e for e in events if isinstance(e, ContactAuthenticated)]
    assert [e.data.jti for e in authenticated] == [
        decode(env, first["token"])["jti"],
        decode(env, second["token"])["jti"],
    ]
    assert [e.data.created for e in authenticated] == [True, False]
    # Computed by the upsert statement that wrote the event: the token's own sub and exp.
    for event, minted in zip(authenticated, (first, second), strict=True):
        claims = decode(env, minted["token"])
        assert event.data.contact_id == claims["sub"] == first["contactId"]
        assert event.data.expires_at.timestamp() == claims["exp"]
        assert event.data.email == claims.get("email")
    assert authenticated[1].data.external_id == "ws-1"
    assert all(e.subject == first["contactId"] and e.org_id == env.org.org_id for e in events)
    assert [e.seq for e in events] == [1, 2, 3]  # per-subject order
    (revocation,) = [e for e in events if isinstance(e, ContactTokensRevoked)]
    assert revocation.data.contact_id == first["contactId"]
    assert revocation.data.not_before.isoformat().startswith(revoked.json["notBefore"][:19])


async def test_revoke_tokens_needs_the_manage_scope_and_a_contact_of_the_key_s_org(
    env: Env,
) -> None:
    minted = await mint_contact_token(env.api, env.org, userId="u1")
    path = f"/v1/contacts/{minted['contactId']}/revoke-tokens"
    narrow = await provision_org(env.api, scopes=("contacts:authenticate",), name="Narrow")
    assert (await env.api.post(path, token=narrow.api_key)).json["code"] == "insufficient_scope"
    org_b = await provision_org(env.api, name="Beta")
    foreign = await env.api.post(path, token=org_b.api_key)
    unknown = await env.api.post(
        "/v1/contacts/00000000-0000-4000-8000-000000000000/revoke-tokens", token=env.org.api_key
    )
    assert (foreign.status, foreign.json["code"]) == (404, "not_found")
    assert foreign.json["detail"] == unknown.json["detail"]  # same as "does not exist"
    assert (
        await env.api.post("/v1/contacts/nope/revoke-tokens", token=env.org.api_key)
    ).status == 404
    assert await env.app[CONTACT_TOKENS].verify(minted["token"], org_id=env.org.org_id)


async def test_private_keys_are_encrypted_at_rest(env: Env) -> None:
    row = await env.pool.fetchrow(
        "SELECT private_key_enc, signing_keys::text AS dump FROM signing_keys WHERE kid = $1",
        env.org.kid,
    )
    assert env.settings.key_encryption_key is not None
    key = decrypt_private_key(env.settings.key_encryption_key, env.org.kid, row["private_key_enc"])
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    stored: bytes = row["private_key_enc"]
    assert seed not in stored and pkcs8 not in stored
    for form in (seed.hex(), pkcs8.hex(), base64.urlsafe_b64encode(seed).decode().rstrip("=")):
        assert form not in row["dump"]
    with pytest.raises(ValueError, match=r".*"):
        serialization.load_der_private_key(stored, password=None)
    # Bound to its kid: the ciphertext does not open under another kid.
    with pytest.raises(ConfigError):
        decrypt_private_key(env.settings.key_encryption_key, "another-kid-123", stored)


def test_kids_match_the_kid_pattern_and_never_read_as_a_cli_option() -> None:
    # A random base64url kid starts with "-" one time in 64; `keys delete --kid -x...` then
    # failed in argparse (seen in CI).
    for alg in ("EdDSA", "ES256"):
        for _ in range(300):
            kid = generate_signing_key(b"k" * 32, alg).kid
            assert KID_PATTERN.match(kid) and kid[0].isalnum(), kid


async def test_signing_keys_are_decrypted_once_not_per_request(env: Env) -> None:
    for i in range(10):
        await mint_contact_token(env.api, env.org, userId=f"u{i}")
    assert env.app[KEYRING].loads == 1


async def test_without_a_key_encryption_key_the_service_refuses_to_start(
    settings: Settings,
) -> None:
    for build in (create_app, create_all_in_one):
        runner = web.AppRunner(build(settings.with_overrides(key_encryption_key=None)))
        try:
            with pytest.raises(ConfigError, match="KEY_ENCRYPTION_KEY"):
                await runner.setup()
        finally:
            await runner.cleanup()


async def test_with_the_wrong_key_encryption_key_the_service_refuses_to_start(
    env: Env,
) -> None:
    runner = web.AppRunner(create_app(env.settings.with_overrides(key_encryption_key=b"k" * 32)))
    try:
        with pytest.raises(ConfigError, match="KEY_ENCRYPTION_KEY"):
            await runner.setup()
    finally:
        await runner.cleanup()
