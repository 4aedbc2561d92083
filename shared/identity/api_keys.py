"""API keys and the admin token: how internal callers prove who they are, and how guessing
them is throttled per client IP.

API keys are ``wik_`` + 256 random bits, shown once and stored only as SHA-256 (a key is
high-entropy, so a fast hash is safe and lets us look it up by hash in one index probe; a
right-prefix/wrong-secret key costs exactly what a random one does). Every way a key can be
wrong gets the same 401 body. The org always comes from the key, never from a request body.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, get_args

from aiohttp import web

from shared.config import SETTINGS
from shared.db import DB_POOL, TRANSIENT_DB_ERRORS
from shared.errors import Problem, insufficient_scope, invalid_api_key
from shared.identity.credential_cache import CredentialCache
from shared.identity.revocation import CredentialChange
from shared.redis import REDIS, REDIS_BREAKER
from shared.web.http import Handler, bearer_token, client_ip
from shared.web.openapi import SPEC_ATTRIBUTE
from shared.web.ratelimit import FailureThrottle

log = logging.getLogger(__name__)

API_KEY_PREFIX = "wik_"
_API_KEY = re.compile(r"^wik_[A-Za-z0-9_-]{43}$")

# lastUsedAt is written at most once per key per process in this many seconds: it must not
# cost a write per request, and "about a minute ago" is what an admin needs to know.
LAST_USED_INTERVAL = 60.0

# Every scope a key can carry; creating a key with anything else is a 422. A Literal, so
# the create-key request type publishes them as an enum in the OpenAPI document.
Scope = Literal[
    "contacts:authenticate",  # POST /widget/authenticate-user
    "contacts:manage",  # revoke tokens, erase, explicit contact merges
    "sessions:read",  # GET /v1/sessions/{id}
    "history:read",
    "history:write",
]
SCOPES: frozenset[Scope] = frozenset(get_args(Scope))


def hash_secret(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


@dataclass(frozen=True, slots=True)
class NewApiKey:
    key: str  # shown once, never stored
    key_hash: bytes
    display_prefix: str


def generate_api_key() -> NewApiKey:
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    return NewApiKey(key=key, key_hash=hash_secret(key), display_prefix=key[:12])


@dataclass(frozen=True, slots=True)
class ApiKeyPrincipal:
    key_id: str
    org_id: str
    scopes: frozenset[str]
    expires_at: datetime | None


class ApiKeyAuthenticator:
    """Checks bearer API keys, caching good ones so hot paths skip Postgres.

    A revoked key, or any key of a disabled org, stops working on every replica within a
    second: the revocation listener drops it from every process's cache (``changed``). Keys
    seen valid are also remembered (until seen revoked, expired or changed) so that the
    failure throttle never holds them back (``vouches_for``).
    """

    def __init__(self, *, cache_ttl: float = 5.0, max_entries: int = 10_000) -> None:
        self._max = max_entries
        self._cache: CredentialCache[bytes, ApiKeyPrincipal] = CredentialCache(
            ttl=cache_ttl, max_entries=max_entries
        )
        self._vouched: dict[bytes, ApiKeyPrincipal] = {}
        self._used: dict[str, float] = {}  # key id -> when this process last wrote lastUsedAt

    async def authenticate(self, request: web.Request, scope: str) -> ApiKeyPrincipal:
        raw = bearer_token(request)
        if raw is None or not _API_KEY.match(raw):
            raise invalid_api_key()
        key_hash = hash_secret(raw)
        try:
            principal = await self._cache.get(key_hash, lambda: self._load(request, key_hash))
        except Problem:
            self._vouched.pop(key_hash, None)  # revoked since: it vouches for nothing now
            raise
        if principal.expires_at is not None and principal.expires_at <= datetime.now(UTC):
            self._vouched.pop(key_hash, None)
            raise invalid_api_key()
        if len(self._vouched) >= self._max:
            self._vouched.clear()  # bounded memory beats a perfect LRU here
        self._vouched[key_hash] = principal
        await self._record_use(request, principal.key_id)
        if scope not in principal.scopes:
            raise insufficient_scope(scope)
        return principal

    async def _load(self, request: web.Request, key_hash: bytes) -> ApiKeyPrincipal:
        # A disabled org's keys are simply not found: the same 401 as any other bad key.
        row = await request.app[DB_POOL].fetchrow(
            """SELECT k.id, k.org_id, k.scopes, k.expires_at
               FROM api_keys k JOIN orgs o ON o.id = k.org_id
               WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND o.disabled_at IS NULL""",
            key_hash,
        )
        if row is None:
            raise invalid_api_key()
        return ApiKeyPrincipal(
            key_id=str(row["id"]),
            org_id=str(row["org_id"]),
            scopes=frozenset(row["scopes"]),
            expires_at=row["expires_at"],
        )

    async def _record_use(self, request: web.Request, key_id: str) -> None:
        """Stamp lastUsedAt at most once per LAST_USED_INTERVAL per key in this process (so
        N replicas write it at most N times a minute), never once per request."""
        now = time.monotonic()
        if now - self._used.get(key_id, float("-inf")) < LAST_USED_INTERVAL:
            return
        if len(self._used) >= self._max:
            self._used.clear()
        self._used[key_id] = now  # before the write: a failing write is not retried per request
        try:
            await request.app[DB_POOL].execute(
                "UPDATE api_keys SET last_used_at = now() WHERE id = $1", key_id
            )
        except TRANSIENT_DB_ERRORS as exc:
            log.warning("could not record an API key's last use", extra={"error": repr(exc)})

    def vouches_for(self, raw: str) -> bool:
        """True when ``raw`` is a key this process has seen valid (and not since seen
        revoked, expired or changed). No I/O: a dictionary probe on its hash."""
        return _API_KEY.match(raw) is not None and hash_secret(raw) in self._vouched

    @property
    def db_loads(self) -> int:
        return self._cache.loads

    def set_live(self, live: bool) -> None:
        self._cache.set_live(live)

    def changed(self, change: CredentialChange) -> None:
        if change.kind == "api_key":
            self._forget_where(lambda p: p.key_id == change.id)
        elif change.kind == "org":
            self._forget_where(lambda p: p.org_id == change.id)

    def _forget_where(self, stale: Callable[[ApiKeyPrincipal], bool]) -> None:
        self._cache.drop_where(stale)
        for key_hash in [h for h, p in self._vouched.items() if stale(p)]:
            del self._vouched[key_hash]

    def forget(self) -> None:
        """Drop every cached key."""
        self._cache.clear()
        self._vouched.clear()


API_KEYS: web.AppKey[ApiKeyAuthenticator] = web.AppKey("api_keys", ApiKeyAuthenticator)


def _is_admin(request: web.Request) -> bool:
    expected = request.app[SETTINGS].admin_token
    given = bearer_token(request)
    # Constant-time compare; with no ADMIN_TOKEN configured the admin API is simply closed.
    return (
        expected is not None
        and given is not None
        and hmac.compare_digest(given.encode(), expected.encode())
    )


def require_admin(request: web.Request) -> None:
    if not _is_admin(request):
        raise Problem(
            401,
            "invalid_admin_token",
            "the admin token is missing or wrong",
            headers={"WWW-Authenticate": 'Bearer realm="widget-identity-admin"'},
        )


# --- failed attempts are throttled per client IP --------------------------------------------

AUTH_FAILURES: web.AppKey[FailureThrottle] = web.AppKey("auth_failures", FailureThrottle)
_FAILURE_CODES = frozenset({"invalid_api_key", "invalid_admin_token"})


def _vouched_for(request: web.Request, security: str) -> bool:
    """The credential is one we know to be good without any lookup: the admin token, or an
    API key this process has seen work. Such a request is never throttled, so a valid caller
    behind the same NAT as a key-guesser keeps working."""
    if security == "adminToken":
        return _is_admin(request)
    raw = bearer_token(request)
    return raw is not None and request.app[API_KEYS].vouches_for(raw)


@web.middleware
async def auth_failure_throttle(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts 401s of API-key and admin-token operations per client IP; past
    ``AUTH_FAILURES_PER_IP`` a minute, that IP's further attempts are a 429 before the key is
    looked up (a flood of guesses costs one Redis read each, not a Postgres probe)."""
    spec = getattr(request.match_info.handler, SPEC_ATTRIBUTE, None)
    security = spec.security if spec is not None else None
    if security not in ("apiKey", "adminToken"):
        return await handler(request)
    throttle = request.app[AUTH_FAILURES]
    ip = client_ip(request)
    if not _vouched_for(request, security):
        await throttle.check(request.app[REDIS], request.app[REDIS_BREAKER], ip)
    try:
        return await handler(request)
    except Problem as problem:
        if problem.code in _FAILURE_CODES:
            await throttle.record(request.app[REDIS], request.app[REDIS_BREAKER], ip)
        raise


def install_auth_throttle(app: web.Application) -> None:
    """Idempotent; ``service_app`` calls it. Must run before the app starts (middlewares
    freeze then), after ``base_app`` put the problem middleware outside it."""
    if AUTH_FAILURES in app:
        return
    settings = app[SETTINGS]
    app[AUTH_FAILURES] = FailureThrottle(settings.stream_prefix, settings.auth_failures_per_ip)
    app.middlewares.append(auth_failure_throttle)
