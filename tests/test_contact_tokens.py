"""The contact-token verifier under attack (RFC 8725, OWASP JWT cheat sheet, PyJWT CVEs),
rotation, revocation across replicas, and verification by an outside JOSE library.

Hostile tokens are built by hand and, where the point is a claim or header check, signed
with the org's real private key (decrypted with the test's key-encryption key): a test that
only proves "bad signatures fail" would pass even if every claim check were missing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import jwt
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from devstack import DevServers
from services.token_issuance.app import create_app
from services.token_issuance.signing_keys import PrivateKey, decrypt_private_key
from shared.bus.events import ContactErased, ContactErasedData
from shared.bus.outbox import OUTBOX
from shared.config import Settings
from shared.errors import Problem
from shared.identity.contact_tokens import CONTACT_TOKENS, ContactTokenVerifier
from tests.conftest import ADMIN_TOKEN
from tests.support.server import Api, eventually, running
from tests.support.tokens import OrgFixture, mint_contact_token, provision_org


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: Any, sign: Callable[[bytes], bytes] | None) -> str:
    head = b64(json.dumps(header).encode())
    body = b64(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    signing_input = f"{head}.{body}".encode()
    signature = b64(sign(signing_input)) if sign is not None else ""
    return f"{head}.{body}.{signature}"


@dataclass
class Env:
    settings: Settings
    api: Api
    app: web.Application
    org: OrgFixture
    contact_id: str
    token: str
    private_key: PrivateKey
    pool: asyncpg.Pool

    @property
    def verifier(self) -> ContactTokenVerifier:
        return self.app[CONTACT_TOKENS]

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.settings.token_issuer,
            "aud": self.settings.token_audience,
            "sub": self.contact_id,
            "org": self.org.org_id,
            "iat": now,
            "exp": now + 600,
            "jti": str(uuid.uuid4()),
        }
        for name, value in changes.items():
            if value is _DROP:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def header(self, **changes: Any) -> dict[str, Any]:
        header: dict[str, Any] = {"alg": "EdDSA", "typ": "wi-contact+jwt", "kid": self.org.kid}
        for name, value in changes.items():
            if value is _DROP:
                header.pop(name, None)
            else:
                header[name] = value
        return header

    def signed(self, claims: Any = None, **header: Any) -> str:
        key = self.private_key
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        return forge(self.header(**header), claims or self.claims(), key.sign)

    async def verdict(self, token: str, org_id: str | None = None) -> str:
        try:
            await self.verifier.verify(token, org_id=org_id or self.org.org_id)
        except Problem as problem:
            return f"{problem.status} {problem.code}"
        return "ok"


_DROP = object()


async def private_key_of(pool: asyncpg.Pool, settings: Settings, kid: str) -> PrivateKey:
    row = await pool.fetchrow("SELECT private_key_enc FROM signing_keys WHERE kid = $1", kid)
    assert settings.key_encryption_key is not None
    return decrypt_private_key(settings.key_encryption_key, kid, row["private_key_enc"])


async def live(app: web.Application) -> None:
    async def listening() -> bool:
        return app[CONTACT_TOKENS].revocations.live

    await eventually(listening)


@pytest.fixture
async def env(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Env]:
    app = create_app(settings)
    async with running(app) as api:
        await live(app)
        org = await provision_org(api)
        minted = await mint_contact_token(api, org, userId="alice", email="alice@example.com")
        yield Env(
            settings=settings,
            api=api,
            app=app,
            org=org,
            contact_id=minted["contactId"],
            token=minted["token"],
            private_key=await private_key_of(pool, settings, org.kid),
            pool=pool,
        )


async def test_promise_1_a_genuine_contact_token_verifies(env: Env) -> None:
    claims = await env.verifier.verify(env.token, org_id=env.org.org_id)
    assert claims.contact_id == env.contact_id
    assert claims.org_id == env.org.org_id
    assert claims.user_id == "alice"
    assert claims.email == "alice@example.com"
    assert await env.verdict(env.signed()) == "ok"  # the forging helper itself is sound


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_in_any_casing_is_rejected_without_writes(env: Env, alg: str) -> None:
    before = await env.pool.fetchval(
        "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM contacts)"
    )
    unsigned = forge(env.header(alg=alg), env.claims(), None)
    assert await env.verdict(unsigned) == "401 token_invalid"
    after = await env.pool.fetchval(
        "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM contacts)"
    )
    assert after == before


async def test_hs256_signed_with_our_public_key_is_rejected(env: Env) -> None:
    public = env.private_key.public_key()
    assert isinstance(public, ed25519.Ed25519PublicKey)
    jwks = (await env.api.get("/.well-known/jwks.json")).json
    forms = [
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        json.dumps(jwks["keys"][0]).encode(),
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
    ]
    for secret in forms:
        token = forge(
            env.header(alg="HS256"),
            env.claims(),
            lambda data, secret=secret: hmac.new(secret, data, hashlib.sha256).digest(),
        )
        assert await env.verdict(token) == "401 token_invalid"


async def test_a_tampered_payload_is_rejected(env: Env) -> None:
    head, _, signature = env.token.split(".")
    other_contact = str(uuid.uuid4())
    for claims in (env.claims(sub=other_contact), env.claims(exp=int(time.time()) + 10**8)):
        tampered = f"{head}.{b64(json.dumps(claims).encode())}.{signature}"
        assert await env.verdict(tampered) == "401 token_invalid"
    # Flipping one bit of the signature is enough.
    raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
    raw[0] ^= 1
    assert await env.verdict(f"{head}.{env.token.split('.')[1]}.{b64(bytes(raw))}") == (
        "401 token_invalid"
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"exp": _DROP}, "401 token_invalid"),
        ({"iat": _DROP}, "401 token_invalid"),
        ({"jti": _DROP}, "401 token_invalid"),
        ({"sub": _DROP}, "401 token_invalid"),
        ({"iss": _DROP}, "401 token_invalid"),
        ({"aud": _DROP}, "401 token_invalid"),
        ({"org": _DROP}, "401 token_invalid"),
        ({"iss": "widget-identity-evil"}, "401 token_invalid"),
        ({"iss": "widget"}, "401 token_invalid"),
        ({"aud": ["widget-identity:widget", "someone-else"]}, "401 token_invalid"),
        ({"aud": "widget-identity:widget:other"}, "401 token_invalid"),
        ({"sub": "not-a-contact-id"}, "401 token_invalid"),
        ({"exp": "9999999999"}, "401 token_invalid"),
        ({"exp": int(time.time()) - 3600}, "401 token_expired"),
        ({"nbf": int(time.time()) + 3600}, "401 token_invalid"),
        ({"iat": int(time.time()) + 3600}, "401 token_invalid"),
    ],
)
async def test_claims_matrix(env: Env, changes: dict[str, Any], expected: str) -> None:
    assert await env.verdict(env.signed(env.claims(**changes))) == expected


async def test_clock_leeway_edges(env: Env) -> None:
    now = int(time.time())
    assert await env.verdict(env.signed(env.claims(exp=now - 10, iat=now - 600))) == "ok"
    assert await env.verdict(env.signed(env.claims(exp=now - 60, iat=now - 600))) == (
        "401 token_expired"
    )
    assert await env.verdict(env.signed(env.claims(nbf=now + 10))) == "ok"
    assert await env.verdict(env.signed(env.claims(nbf=now + 60))) == "401 token_invalid"


# The default org policy's maxTokenLifetime, the longest a contact token may live.
DEFAULT_MAX_LIFETIME = 86_400


async def test_a_token_living_longer_than_the_org_allows_is_refused_whoever_signed_it(
    env: Env,
) -> None:
    now = int(time.time())
    century = env.signed(env.claims(exp=now + 100 * 365 * 86_400))
    assert await env.verdict(century) == "401 token_lifetime_exceeded"
    an_hour_over = env.signed(env.claims(exp=now + DEFAULT_MAX_LIFETIME + 3600))
    assert await env.verdict(an_hour_over) == "401 token_lifetime_exceeded"
    # Exactly at the limit (and within the clock leeway past it) is fine.
    assert await env.verdict(env.signed(env.claims(exp=now + DEFAULT_MAX_LIFETIME))) == "ok"
    assert await env.verdict(env.signed(env.claims(exp=now + DEFAULT_MAX_LIFETIME + 20))) == "ok"


async def test_the_lifetime_limit_is_each_orgs_own_policy(env: Env, pool: asyncpg.Pool) -> None:
    strict = await provision_org(env.api, name="Strict", policy={"maxTokenLifetime": 600})
    strict_key = await private_key_of(pool, env.settings, strict.kid)
    assert isinstance(strict_key, ed25519.Ed25519PrivateKey)
    contact = await mint_contact_token(env.api, strict, userId="sam", expiresIn=600)
    now = int(time.time())

    def strict_token(exp: int) -> str:
        claims = env.claims(sub=contact["contactId"], org=strict.org_id, exp=exp)
        return forge(env.header(kid=strict.kid), claims, strict_key.sign)

    assert await env.verdict(strict_token(now + 600), strict.org_id) == "ok"
    assert await env.verdict(strict_token(now + 3600), strict.org_id) == (
        "401 token_lifetime_exceeded"
    )
    # The same hour is fine for an org on the default day.
    assert await env.verdict(env.signed(env.claims(exp=now + 3600))) == "ok"


async def test_issuance_and_verification_share_one_limit_and_lowering_it_ends_longer_tokens(
    env: Env,
) -> None:
    day = await mint_contact_token(env.api, env.org, userId="dora", expiresIn=DEFAULT_MAX_LIFETIME)
    assert await env.verdict(day["token"]) == "ok"
    lowered = await env.api.patch(
        f"/admin/v1/orgs/{env.org.org_id}",
        json={"policy": {"maxTokenLifetime": 600}},
        token=ADMIN_TOKEN,
    )
    assert lowered.status == 200, lowered.body
    # Seen at once by this process: the verifier reads the policy cache the admin API clears.
    assert await env.verdict(day["token"]) == "401 token_lifetime_exceeded"
    refused = await env.api.post(
        "/widget/authenticate-user",
        json={"userId": "dora", "expiresIn": 601},
        token=env.org.api_key,
    )
    assert refused.status == 422
    short = await mint_contact_token(env.api, env.org, userId="dora", expiresIn=600)
    assert await env.verdict(short["token"]) == "ok"


@pytest.mark.parametrize("typ", [_DROP, "JWT", "at+jwt", "WI-CONTACT+JWT", ""])
async def test_a_wrong_or_missing_typ_is_rejected(env: Env, typ: Any) -> None:
    assert await env.verdict(env.signed(typ=typ)) == "401 token_invalid"


async def test_an_algorithm_outside_the_configured_list_is_rejected(env: Env) -> None:
    # Validly shaped ES256 header on our EdDSA key: the alg must be ours *and* the key's.
    assert await env.verdict(env.signed(alg="ES256")) == "401 token_invalid"
    assert await env.verdict(env.signed(alg="RS256")) == "401 token_invalid"


async def test_unknown_kid_floods_cost_a_handful_of_db_reads(env: Env) -> None:
    await env.verifier.verify(env.token, org_id=env.org.org_id)  # keys loaded
    loads = env.verifier.keys.db_loads
    same = env.signed(kid="unknown-kid-0001")
    for _ in range(1000):
        assert await env.verdict(same) == "401 token_invalid"
    for _ in range(1000):
        assert await env.verdict(env.signed(kid=secrets.token_urlsafe(12))) == "401 token_invalid"
    assert env.verifier.keys.db_loads - loads <= 3


@pytest.mark.parametrize("kid", ["../../dev/null", "x' OR '1'='1", "k" * 65, 12345, None, ""])
async def test_hostile_kids_are_rejected_without_any_lookup(env: Env, kid: Any) -> None:
    await env.verifier.verify(env.token, org_id=env.org.org_id)
    loads = env.verifier.keys.db_loads
    assert await env.verdict(env.signed(kid=kid)) == "401 token_invalid"
    assert env.verifier.keys.db_loads == loads


async def test_a_token_announcing_its_own_key_is_rejected_and_nothing_is_fetched(
    env: Env,
) -> None:
    attacker = ed25519.Ed25519PrivateKey.generate()
    attacker_jwk = {
        **jwt.algorithms.OKPAlgorithm.to_jwk(attacker.public_key(), as_dict=True),
        "kid": "attacker-key-1",
    }
    hits: list[str] = []

    async def serve_jwks(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"keys": [attacker_jwk]})

    trap = web.Application()
    trap.router.add_get("/{tail:.*}", serve_jwks)
    async with running(trap) as trap_api:
        url = trap_api.base_url + "/jwks.json"
        headers: list[dict[str, Any]] = [
            {"jwk": attacker_jwk, "kid": "attacker-key-1"},
            {"jwk": attacker_jwk},  # our kid, attacker's key
            {"jku": url, "kid": "attacker-key-1"},
            {"jku": url},
            {"x5u": url},
            {"x5c": ["MIIB"], "kid": "attacker-key-1"},
        ]
        for extra in headers:
            token = forge(env.header(**extra), env.claims(), attacker.sign)
            assert await env.verdict(token) == "401 token_invalid", extra
        # Our own, valid signature with a jku header: the header is simply ignored.
        assert await env.verdict(env.signed(jku=url)) == "ok"
    assert hits == []


async def test_unknown_crit_is_rejected(env: Env) -> None:
    assert await env.verdict(env.signed(crit=["exp"])) == "401 token_invalid"
    assert (
        await env.verdict(
            env.signed(crit=["https://example.com/ext"], **{"https://example.com/ext": 1})
        )
        == "401 token_invalid"
    )
    assert await env.verdict(env.signed(crit=["b64"], b64=False)) == "401 token_invalid"


async def test_a_1_mb_token_is_rejected_before_any_parsing(env: Env) -> None:
    loads = env.verifier.keys.db_loads
    header = b64(json.dumps(env.header()).encode())
    huge = f"{header}.{'A' * (1024 * 1024)}.{'B' * 86}"
    for _ in range(100):
        assert await env.verdict(huge) == "401 token_invalid"
    # Rejected on size alone: no key was looked up. (How fast is `make bench`'s business.)
    assert env.verifier.keys.db_loads == loads
    # Over HTTP the same token cannot even be smuggled in a body past the 64 KiB limit.


async def test_promise_8_a_token_of_org_b_is_useless_with_org_a(
    env: Env, pool: asyncpg.Pool
) -> None:
    org_b = await provision_org(env.api, name="Beta")
    minted_b = await mint_contact_token(env.api, org_b, userId="bob")
    assert await env.verdict(minted_b["token"], org_id=env.org.org_id) == "403 org_mismatch"
    assert await env.verdict(minted_b["token"], org_id=org_b.org_id) == "ok"
    # Signed by org B's key but claiming org A: the key's org decides.
    key_b = await private_key_of(pool, env.settings, org_b.kid)
    assert isinstance(key_b, ed25519.Ed25519PrivateKey)
    claiming_a = forge(env.header(kid=org_b.kid), env.claims(), key_b.sign)
    assert await env.verdict(claiming_a) == "403 org_mismatch"


async def test_rotation_never_breaks_a_signed_in_user_and_deletion_ends_old_tokens(
    env: Env,
) -> None:
    app_b = create_app(env.settings)  # a second replica
    async with running(app_b) as api_b:
        await live(app_b)
        verifier_b = app_b[CONTACT_TOKENS]
        rotated = await env.api.post(
            f"/admin/v1/orgs/{env.org.org_id}/signing-keys", token=ADMIN_TOKEN
        )
        assert rotated.status == 201, rotated.body
        new_kid = rotated.json["kid"]
        fresh = await mint_contact_token(env.api, env.org, userId="alice")
        assert jwt.get_unverified_header(fresh["token"])["kid"] == new_kid
        for token in (env.token, fresh["token"]):
            assert await env.verdict(token) == "ok"
            await verifier_b.verify(token, org_id=env.org.org_id)
        deleted = await env.api.delete(
            f"/admin/v1/orgs/{env.org.org_id}/signing-keys/{env.org.kid}", token=ADMIN_TOKEN
        )
        assert deleted.status == 200, deleted.body
        assert await env.verdict(env.token) == "401 token_invalid"
        assert await env.verdict(fresh["token"]) == "ok"

        async def rejected_on_b() -> bool:
            try:
                await verifier_b.verify(env.token, org_id=env.org.org_id)
            except Problem as problem:
                return problem.code == "token_invalid"
            return False

        await eventually(rejected_on_b, timeout=2.0)
        # The deleting replica's signer moved on too: new tokens use the new key.
        again = await mint_contact_token(api_b, env.org, userId="alice")
        assert jwt.get_unverified_header(again["token"])["kid"] == new_kid


async def test_promise_10_revocation_reaches_every_replica_within_one_second(env: Env) -> None:
    app_b = create_app(env.settings)
    async with running(app_b) as _:
        await live(app_b)
        verifier_b = app_b[CONTACT_TOKENS]
        await verifier_b.verify(env.token, org_id=env.org.org_id)  # cached as fine on B
        revoked = await env.api.post(
            f"/v1/contacts/{env.contact_id}/revoke-tokens", token=env.org.api_key
        )
        assert revoked.status == 200, revoked.body
        assert await env.verdict(env.token) == "401 token_revoked"

        async def rejected_on_b() -> bool:
            try:
                await verifier_b.verify(env.token, org_id=env.org.org_id)
            except Problem as problem:
                return problem.code == "token_revoked"
            return False

        await eventually(rejected_on_b, timeout=1.0, interval=0.01)
        # Signing in again afterwards works at once, even within the same second.
        fresh = await mint_contact_token(env.api, env.org, userId="alice")
        assert await env.verdict(fresh["token"]) == "ok"
        await verifier_b.verify(fresh["token"], org_id=env.org.org_id)


async def test_back_to_back_revocations_each_end_every_token_issued_before_them(
    env: Env,
) -> None:
    # Sign in, log out everywhere, sign in again, log out everywhere again: typically all
    # within one second, which is exactly where whole-second iat rounding could leave a hole.
    revoke = f"/v1/contacts/{env.contact_id}/revoke-tokens"
    tokens = [env.token]
    for _ in range(3):
        assert (await env.api.post(revoke, token=env.org.api_key)).status == 200
        tokens.append((await mint_contact_token(env.api, env.org, userId="alice"))["token"])
    assert (await env.api.post(revoke, token=env.org.api_key)).status == 200
    for token in tokens:
        assert await env.verdict(token) == "401 token_revoked"
    after = await mint_contact_token(env.api, env.org, userId="alice")
    assert await env.verdict(after["token"]) == "ok"


async def test_an_erased_contact_event_from_another_service_revokes_on_every_replica(
    env: Env,
) -> None:
    await env.verifier.verify(env.token, org_id=env.org.org_id)

    async def erase(conn: asyncpg.Connection) -> None:
        # What the history service's erasure does: tombstone the row, emit contact.erased.
        await conn.execute(
            """UPDATE contacts SET erased_at = now(), contact_key = 'erased:' || id::text
               WHERE id = $1""",
            env.contact_id,
        )
        await env.app[OUTBOX].emit(
            conn,
            ContactErased,
            org_id=env.org.org_id,
            subject=env.contact_id,
            data=ContactErasedData(contact_id=env.contact_id, receipt_id=str(uuid.uuid4())),
        )

    async with env.pool.acquire() as conn, conn.transaction():
        await erase(conn)

    async def rejected() -> bool:
        return await env.verdict(env.token) == "401 token_revoked"

    await eventually(rejected, timeout=2.0)


async def test_a_listener_that_lost_its_connection_trusts_nothing_it_cached(
    env: Env, redis: aioredis.Redis
) -> None:
    await env.verifier.verify(env.token, org_id=env.org.org_id)
    # A revocation this process never hears about (written behind the services' backs)...
    await env.pool.execute(
        "UPDATE contacts SET tokens_not_before = clock_timestamp() + interval '1 second'"
        " WHERE id = $1",
        env.contact_id,
    )
    assert await env.verdict(env.token) == "ok"  # ...so the cache still says fine...
    revocations = env.verifier.revocations
    resets = revocations.resets
    await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")

    async def reconnected() -> bool:
        return revocations.live and revocations.resets > resets

    # ...until the connection drops: the cache is wiped and Postgres is asked again.
    await eventually(reconnected, timeout=5.0)
    assert await env.verdict(env.token) == "401 token_revoked"


async def test_the_hot_path_makes_no_round_trips_for_a_token_that_is_fine(env: Env) -> None:
    await env.verifier.verify(env.token, org_id=env.org.org_id)
    reads, loads = env.verifier.revocations.db_reads, env.verifier.keys.db_loads
    for _ in range(200):
        await env.verifier.verify(env.token, org_id=env.org.org_id)
    assert env.verifier.revocations.db_reads == reads
    assert env.verifier.keys.db_loads == loads


async def test_with_postgres_down_cached_keys_still_verify_and_nothing_unknown_does(
    env: Env, servers: DevServers, settings: Settings
) -> None:
    await env.verifier.verify(env.token, org_id=env.org.org_id)
    other = await mint_contact_token(env.api, env.org, userId="carol")
    db_name = urlsplit(settings.database_url).path.lstrip("/")
    admin = await asyncpg.connect(servers.database_url)
    try:
        await admin.execute(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", db_name
        )
        assert await env.verdict(env.token) == "ok"  # last good keys, cached revocation state
        # Never seen before: it cannot be checked for revocation, so it is not accepted (the
        # exact exception depends on how the connection died; over HTTP it is a 5xx).
        try:
            await env.verifier.verify(other["token"], org_id=env.org.org_id)
        except Exception as exc:
            outcome = type(exc).__name__
        else:
            outcome = "verified"
        assert outcome != "verified"
    finally:
        await admin.execute(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS true')
        await admin.close()


async def test_a_token_verifies_with_a_standard_jose_library_using_only_the_jwks(
    env: Env,
) -> None:
    document = (await env.api.get("/.well-known/jwks.json")).json
    keyset = jwt.PyJWKSet.from_dict(document)
    kid = jwt.get_unverified_header(env.token)["kid"]
    claims = jwt.decode(
        env.token,
        keyset[kid].key,
        algorithms=["EdDSA"],
        audience=env.settings.token_audience,
        issuer=env.settings.token_issuer,
        options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
    )
    assert claims["sub"] == env.contact_id
    assert claims["org"] == env.org.org_id
    assert jwt.get_unverified_header(env.token)["typ"] == "wi-contact+jwt"
    private = [k for k in document["keys"] if "d" in k]
    assert private == []


async def test_a_cold_replica_verifies_a_burst_of_logins_without_false_rejections(env: Env) -> None:
    # A replica that just started has no keys cached; the first burst of widget loads must
    # wait for the one key load in flight, not be told their real key is unknown.
    import asyncio

    cold = ContactTokenVerifier(env.settings, env.pool)
    verdicts = await asyncio.gather(
        *(cold.verify(env.token, org_id=env.org.org_id) for _ in range(30)), return_exceptions=True
    )
    assert [v for v in verdicts if isinstance(v, BaseException)] == []
    assert cold.keys.db_loads == 1


async def test_a_brand_new_org_verifies_at_once_on_a_replica_that_just_refreshed(env: Env) -> None:
    app_b = create_app(env.settings)
    async with running(app_b) as _:
        await live(app_b)
        verifier_b = app_b[CONTACT_TOKENS]
        # B refreshed its keys a moment ago (and would back off before the next refresh)...
        await verifier_b.verify(env.token, org_id=env.org.org_id)
        await verifier_b.keys.refresh(env.pool)
        # ...when another replica creates an org and mints its first token.
        newcomer = await provision_org(env.api, name="Newcomer")
        minted = await mint_contact_token(env.api, newcomer, userId="first-user")

        async def accepted_on_b() -> bool:
            try:
                await verifier_b.verify(minted["token"], org_id=newcomer.org_id)
            except Problem:
                return False
            return True

        # Announced over the revocation channel: no one-second blind spot for new keys.
        await eventually(accepted_on_b, timeout=0.5, interval=0.01)
