"""The one contact-token verifier every service uses (RFC 8725 in practice).

Order of checks, cheapest and most hostile first:

1. size: more than ``MAX_TOKEN_BYTES`` is rejected before any parsing or crypto;
2. header: ``alg`` must be in the configured list (never taken from the token), ``typ`` must be
   ``wi-contact+jwt``, any ``crit`` is refused (we implement no extensions), ``kid`` must look
   like one of ours; ``jku``/``jwk``/``x5u``/``x5c`` are ignored (never fetched, never used);
3. key: ``kid`` is looked up only among our own live keys (in-process, refreshed from
   Postgres at most once per second for unknown kids), and its algorithm must match;
4. signature, by PyJWT with that one key and that one algorithm;
5. claims: ``iss``/``aud`` equal exactly, ``sub``/``jti``/``org``/``iat``/``exp`` required and
   typed, ``exp``/``nbf``/``iat`` with ``LEEWAY_SECONDS``;
6. org: the claim, the key's org and the caller's org must all be the same (403 org_mismatch);
7. lifetime: ``exp`` no further ahead than the org policy's ``maxTokenLifetime`` (plus
   ``LEEWAY_SECONDS``), the same value that caps ``expiresIn`` at issuance, so a token minted
   elsewhere with the org's key (a leaked key, a customer's own signer) cannot live for a
   century (401 token_lifetime_exceeded);
8. revocation: ``iat`` before the contact's not-before, or an erased contact (401 token_revoked).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import jwt
import msgspec
from aiohttp import web
from prometheus_client import Counter

from shared.config import SETTINGS, Settings
from shared.db import DB_POOL, TRANSIENT_DB_ERRORS
from shared.errors import Problem, db_unavailable
from shared.identity.minting_keys import MintingKeys
from shared.identity.org_policy import POLICIES, PolicyCache, install_policies
from shared.identity.revocation import RevocationCache, install_revocation_feed

log = logging.getLogger(__name__)

TOKEN_TYPE = "wi-contact+jwt"
MAX_TOKEN_BYTES = 8 * 1024
LEEWAY_SECONDS = 30
SUPPORTED_ALGORITHMS = ("EdDSA", "ES256")
KID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

TOKEN_VERIFICATIONS = Counter(
    "wi_contact_token_verifications_total", "Contact token verifications", ["result"]
)

_jws = jwt.PyJWS()

# Signature checks remembered per token (see ContactTokenVerifier._signed_payload): a returning
# visitor presents the same token on every page view. Bounded; tokens are at most 8 KiB.
_VERIFIED_MAX_ENTRIES = 2048


def token_invalid(detail: str) -> Problem:
    return Problem(401, "token_invalid", detail)


def token_expired() -> Problem:
    return Problem(401, "token_expired", "the contact token has expired")


def token_lifetime_exceeded(max_seconds: int) -> Problem:
    return Problem(
        401,
        "token_lifetime_exceeded",
        f"the contact token expires further ahead than the org allows ({max_seconds} s)",
    )


def token_revoked(detail: str = "the contact token has been revoked") -> Problem:
    return Problem(401, "token_revoked", detail)


def org_mismatch() -> Problem:
    return Problem(403, "org_mismatch", "the contact token belongs to another organisation")


@dataclass(frozen=True, slots=True)
class ContactClaims:
    """A verified contact token's claims."""

    contact_id: str
    org_id: str
    jti: str
    issued_at: datetime
    expires_at: datetime
    user_id: str | None
    email: str | None
    name: str | None
    external_id: str | None
    custom_data: dict[str, Any] | None
    # The credentials it stands on: the signing key that verified it and the API key that
    # minted it (None for tokens minted before tokens named it). A session records both.
    kid: str
    minted_by: str | None


class _Claims(msgspec.Struct, frozen=True):
    """The payload as we issue it; anything missing or of the wrong type is token_invalid.
    ``aud`` must be one string (a list naming us and someone else is refused)."""

    iss: str
    aud: str
    sub: str
    org: str
    iat: int
    exp: int
    jti: str
    nbf: int | None = None
    userId: str | None = None
    email: str | None = None
    name: str | None = None
    externalId: str | None = None
    customData: dict[str, Any] | None = None
    akid: str | None = None


_claims_decoder = msgspec.json.Decoder(_Claims)


@dataclass(frozen=True, slots=True)
class PublicKey:
    kid: str
    org_id: str
    alg: str
    key: Any  # a cryptography public key object, parsed once
    jwk: dict[str, Any]


def public_key_from_jwk(kid: str, org_id: str, alg: str, jwk: dict[str, Any]) -> PublicKey:
    return PublicKey(kid=kid, org_id=org_id, alg=alg, key=jwt.PyJWK(jwk, alg).key, jwk=jwk)


class KeyStore:
    """Every org's live public keys, by kid, in memory.

    Refreshed from Postgres in the background every ``max_age`` seconds, and on demand when an
    unknown kid shows up, at most once per ``min_refresh_interval``: a flood of made-up kids
    costs a handful of DB reads, not one each. If Postgres is down, the last good keys stay.
    """

    def __init__(self, *, max_age: float = 30.0, min_refresh_interval: float = 1.0) -> None:
        self._max_age = max_age
        self._min_interval = min_refresh_interval
        self._keys: dict[str, PublicKey] = {}
        self._loaded_at: float | None = None
        self._attempted_at = float("-inf")
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        self._deleted: set[str] = set()
        self._unreachable = False  # the last refresh failed: "unknown" may just be "unread"
        self.db_loads = 0

    async def get(self, pool: asyncpg.Pool, kid: str) -> PublicKey | None:
        now = time.monotonic()
        key = self._keys.get(kid)
        if key is not None:
            stale = self._loaded_at is None or now - self._loaded_at > self._max_age
            if stale and (self._background is None or self._background.done()):
                self._background = asyncio.create_task(self._refresh_quietly(pool))
            return key
        if kid in self._deleted:
            return None
        if self._lock.locked():
            # A refresh is in flight (e.g. the first burst after a restart): wait for it rather
            # than calling a real key "unknown" because someone else is loading it.
            async with self._lock:
                pass
        elif now - self._attempted_at >= self._min_interval:
            await self.refresh(pool)
        key = self._keys.get(kid)
        if key is None and self._unreachable:
            # We could not ask Postgres: the kid may be a brand-new key. Telling its user
            # "invalid token" would sign them out over an outage.
            raise db_unavailable()
        return key

    async def _refresh_quietly(self, pool: asyncpg.Pool) -> None:
        try:
            await self.refresh(pool)
        except TRANSIENT_DB_ERRORS as exc:
            log.warning(
                "signing keys refresh failed; keeping last good keys", extra={"error": repr(exc)}
            )

    async def refresh(self, pool: asyncpg.Pool) -> None:
        requested = time.monotonic()
        async with self._lock:
            if self._attempted_at >= requested:
                return  # someone refreshed while we waited
            self._attempted_at = time.monotonic()
            self.db_loads += 1
            try:
                rows = await pool.fetch(
                    """SELECT kid, org_id, alg, public_jwk FROM signing_keys
                       WHERE deleted_at IS NULL"""
                )
            except TRANSIENT_DB_ERRORS:
                self._unreachable = True
                if self._loaded_at is None:
                    raise  # nothing good to fall back on
                log.warning("signing keys unavailable; keeping last good keys")
                return
            self._unreachable = False
            fresh: dict[str, PublicKey] = {}
            for row in rows:
                kid = row["kid"]
                if kid in self._deleted:
                    continue
                existing = self._keys.get(kid)
                fresh[kid] = existing or public_key_from_jwk(
                    kid, str(row["org_id"]), row["alg"], row["public_jwk"]
                )
            self._keys = fresh
            self._loaded_at = time.monotonic()

    def forget(self, kid: str) -> None:
        """A key was deleted: stop accepting it now, and never bring it back."""
        self._deleted.add(kid)
        self._keys.pop(kid, None)

    def expire(self) -> None:
        """Make the next lookup refresh (e.g. after this process rotated a key)."""
        self._loaded_at = None
        self._attempted_at = float("-inf")

    def snapshot(self) -> list[PublicKey]:
        return list(self._keys.values())

    def snapshot_kids(self) -> frozenset[str]:
        return frozenset(self._keys)


class ContactTokenVerifier:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool | None = None,
        *,
        keys: KeyStore | None = None,
        revocations: RevocationCache | None = None,
        policies: PolicyCache | None = None,
    ) -> None:
        algorithms = tuple(settings.token_algorithms)
        unsupported = set(algorithms) - set(SUPPORTED_ALGORITHMS)
        if not algorithms or unsupported:
            raise ValueError(f"token algorithms must be among {SUPPORTED_ALGORITHMS}")
        self._algorithms = frozenset(algorithms)
        self._issuer = settings.token_issuer
        self._audience = settings.token_audience
        self._pool = pool
        self.keys = keys or KeyStore()
        self.revocations = revocations or RevocationCache()
        self.policies = policies or PolicyCache()
        self.minting_keys = MintingKeys()
        self._key_deleted_hooks: list[Callable[[str], None]] = []
        self._verified: dict[str, tuple[PublicKey, bytes]] = {}

    def bind(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    def on_key_deleted(self, hook: Callable[[str], None]) -> None:
        """Also call ``hook(kid)`` when any process deletes a signing key (e.g. a signer's
        private-key cache)."""
        self._key_deleted_hooks.append(hook)

    def key_added(self, kid: str) -> None:
        """Some process created signing key ``kid``: look it up on next sight."""
        if kid not in self.keys.snapshot_kids():
            self.keys.expire()

    def key_deleted(self, kid: str) -> None:
        self.keys.forget(kid)
        self._verified.clear()  # rare; belt and braces on top of the key-identity check
        for hook in self._key_deleted_hooks:
            hook(kid)

    async def verify(self, token: str, *, org_id: str) -> ContactClaims:
        """Raises Problem: 401 token_invalid / token_expired / token_lifetime_exceeded /
        token_revoked, 403 org_mismatch; 503 db_unavailable when it cannot be checked."""
        try:
            claims = await self._verify(token, org_id)
        except Problem as problem:
            TOKEN_VERIFICATIONS.labels(problem.code).inc()
            raise
        TOKEN_VERIFICATIONS.labels("ok").inc()
        return claims

    async def _verify(self, token: str, org_id: str) -> ContactClaims:
        if self._pool is None:
            raise RuntimeError("ContactTokenVerifier used before bind(pool)")
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES or not token.isascii():
            raise token_invalid("the contact token is malformed or too large")
        try:
            header = _jws.get_unverified_header(token)
        except jwt.PyJWTError:
            raise token_invalid("the contact token is malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise token_invalid("the contact token's algorithm is not accepted")
        if header.get("typ") != TOKEN_TYPE:
            raise token_invalid(f"the contact token's typ must be {TOKEN_TYPE!r}")
        if "crit" in header or "b64" in header:
            raise token_invalid("the contact token uses unsupported critical extensions")
        kid = header.get("kid")
        if not isinstance(kid, str) or not KID_PATTERN.match(kid):
            raise token_invalid("the contact token has no valid key id")
        key = await self.keys.get(self._pool, kid)
        if key is None or key.alg != alg:
            raise token_invalid("the contact token was not signed by a live key")
        try:
            payload = self._signed_payload(token, key)
            claims = _claims_decoder.decode(payload)
        except (jwt.PyJWTError, msgspec.DecodeError):
            raise token_invalid("the contact token's signature or claims are invalid") from None
        self._check_claims(claims)
        if claims.org != key.org_id or claims.org != org_id:
            raise org_mismatch()
        policy = await self.policies.get(self._pool, org_id)
        if claims.exp - time.time() > policy.max_token_lifetime + LEEWAY_SECONDS:
            raise token_lifetime_exceeded(policy.max_token_lifetime)
        state = await self.revocations.state(self._pool, org_id, claims.sub)
        # A disabled org's tokens read as revoked: the org's admin withdrew them, and every
        # client already treats token_revoked as "get a new token" (token_invalid would blame
        # the token itself, which is well-formed and signed by a live key).
        if state.revokes(claims.iat) or state.org_disabled:
            raise token_revoked()
        if claims.akid is not None and not await self.minting_keys.live(
            self._pool, org_id, claims.akid
        ):
            raise token_revoked("the API key that minted the contact token has been revoked")
        return ContactClaims(
            contact_id=claims.sub,
            org_id=claims.org,
            jti=claims.jti,
            issued_at=datetime.fromtimestamp(claims.iat, UTC),
            expires_at=datetime.fromtimestamp(claims.exp, UTC),
            user_id=claims.userId,
            email=claims.email,
            name=claims.name,
            external_id=claims.externalId,
            custom_data=claims.customData,
            kid=kid,
            minted_by=claims.akid,
        )

    def _signed_payload(self, token: str, key: PublicKey) -> bytes:
        """The payload once the signature checks out with ``key``. A signature check depends only
        on the exact token and the key, so a good one is remembered for that same key object;
        a deleted key never reaches here (KeyStore.get returns None) and a refreshed store keeps
        or replaces the object, so a stale entry can only miss. Every other check (header, key
        liveness, claims, expiry, org, revocation) still runs on every call."""
        hit = self._verified.get(token)
        if hit is not None and hit[0] is key:
            return hit[1]
        payload: bytes = _jws.decode_complete(token, key.key, algorithms=[key.alg])["payload"]
        if len(self._verified) >= _VERIFIED_MAX_ENTRIES:
            self._verified.clear()  # bounded memory beats a perfect LRU here
        self._verified[token] = (key, payload)
        return payload

    def _check_claims(self, claims: _Claims) -> None:
        # Exact comparisons only: no prefix, substring or list membership.
        if claims.iss != self._issuer:
            raise token_invalid("the contact token's issuer is wrong")
        if claims.aud != self._audience:
            raise token_invalid("the contact token's audience is wrong")
        try:
            uuid.UUID(claims.sub)
        except ValueError:
            raise token_invalid("the contact token's subject is malformed") from None
        if not claims.jti or not claims.org:
            raise token_invalid("the contact token lacks a jti or org")
        now = time.time()
        if claims.exp <= now - LEEWAY_SECONDS:
            raise token_expired()
        if claims.iat > now + LEEWAY_SECONDS:
            raise token_invalid("the contact token is issued in the future")
        if claims.nbf is not None and claims.nbf > now + LEEWAY_SECONDS:
            raise token_invalid("the contact token is not valid yet")
        if claims.exp <= claims.iat:
            raise token_invalid("the contact token expires before it is issued")


CONTACT_TOKENS: web.AppKey[ContactTokenVerifier] = web.AppKey(
    "contact_tokens", ContactTokenVerifier
)


def install_verifier(app: web.Application) -> None:
    """Idempotent. Adds ``app[CONTACT_TOKENS]`` to an app built by ``service_app`` and
    registers its caches with the app's revocation listener; the verifier binds to the app's
    pool at start-up."""
    if CONTACT_TOKENS in app:
        return
    settings = app[SETTINGS]
    install_policies(app)
    # The app's own policy cache: a policy change made through this process applies at once.
    verifier = ContactTokenVerifier(settings, policies=app[POLICIES])
    app[CONTACT_TOKENS] = verifier

    async def bind(app: web.Application) -> AsyncIterator[None]:
        verifier.bind(app[DB_POOL])
        yield

    app.cleanup_ctx.append(bind)
    feed = install_revocation_feed(app)
    feed.watch_contacts(verifier.revocations)
    feed.watch(verifier.minting_keys)
    feed.on_key_deleted(verifier.key_deleted)
    feed.on_key_added(verifier.key_added)
