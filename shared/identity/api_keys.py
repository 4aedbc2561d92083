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
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from shared.config import SETTINGS
from shared.db import DB_POOL
from shared.errors import Problem, insufficient_scope, invalid_api_key
from shared.redis import REDIS
from shared.web.http import Handler, bearer_token, client_ip
from shared.web.openapi import SPEC_ATTRIBUTE
from shared.web.ratelimit import FailureThrottle

API_KEY_PREFIX = "wik_"
_API_KEY = re.compile(r"^wik_[A-Za-z0-9_-]{43}$")

# Every scope a key can carry; creating a key with anything else is a 422.
SCOPES = frozenset(
    {
        "contacts:authenticate",  # POST /widget/authenticate-user
        "contacts:manage",  # revoke tokens, erase, explicit contact merges
        "sessions:read",  # GET /v1/sessions/{id}
        "history:read",
        "history:write",
    }
)


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
    """Checks bearer API keys, caching good ones briefly so hot paths skip Postgres.

    A revoked key stops working on every replica within ``cache_ttl`` seconds. An entry past
    its TTL is reloaded before use but kept until then: it still tells the failure throttle
    that this key worked here (``vouches_for``).
    """

    def __init__(self, *, cache_ttl: float = 5.0, max_entries: int = 10_000) -> None:
        self._ttl = cache_ttl
        self._max = max_entries
        self._cache: dict[bytes, tuple[float, ApiKeyPrincipal]] = {}
        self.db_loads = 0

    async def authenticate(self, request: web.Request, scope: str) -> ApiKeyPrincipal:
        raw = bearer_token(request)
        if raw is None or not _API_KEY.match(raw):
            raise invalid_api_key()
        key_hash = hash_secret(raw)
        now = time.monotonic()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            try:
                principal = await self._load(request, key_hash)
            except Problem:
                self._cache.pop(key_hash, None)  # revoked since: it vouches for nothing now
                raise
            if len(self._cache) >= self._max:
                self._cache.clear()  # bounded memory beats a perfect LRU here
            self._cache[key_hash] = (now + self._ttl, principal)
        if principal.expires_at is not None and principal.expires_at <= datetime.now(UTC):
            self._cache.pop(key_hash, None)
            raise invalid_api_key()
        if scope not in principal.scopes:
            raise insufficient_scope(scope)
        return principal

    async def _load(self, request: web.Request, key_hash: bytes) -> ApiKeyPrincipal:
        self.db_loads += 1
        row = await request.app[DB_POOL].fetchrow(
            """SELECT id, org_id, scopes, expires_at FROM api_keys
               WHERE key_hash = $1 AND revoked_at IS NULL""",
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

    def vouches_for(self, raw: str) -> bool:
        """True when ``raw`` is a key this process has seen valid (and not since seen
        revoked or expired). No I/O: a dictionary probe on its hash."""
        return _API_KEY.match(raw) is not None and hash_secret(raw) in self._cache

    def forget(self, key_hash: bytes | None = None) -> None:
        """Drop cached keys (all, or one), e.g. right after this process revoked a key."""
        if key_hash is None:
            self._cache.clear()
        else:
            self._cache.pop(key_hash, None)


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
        await throttle.check(request.app[REDIS], ip)
    try:
        return await handler(request)
    except Problem as problem:
        if problem.code in _FAILURE_CODES:
            await throttle.record(request.app[REDIS], ip)
        raise


def install_auth_throttle(app: web.Application) -> None:
    """Idempotent; ``service_app`` calls it. Must run before the app starts (middlewares
    freeze then), after ``base_app`` put the problem middleware outside it."""
    if AUTH_FAILURES in app:
        return
    settings = app[SETTINGS]
    app[AUTH_FAILURES] = FailureThrottle(settings.stream_prefix, settings.auth_failures_per_ip)
    app.middlewares.append(auth_failure_throttle)
