"""API keys and the admin token: how internal callers prove who they are.

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
from shared.web.http import bearer_token

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

    A revoked key stops working on every replica within ``cache_ttl`` seconds.
    """

    def __init__(self, *, cache_ttl: float = 5.0, max_entries: int = 10_000) -> None:
        self._ttl = cache_ttl
        self._max = max_entries
        self._cache: dict[bytes, tuple[float, ApiKeyPrincipal]] = {}

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
            principal = await self._load(request, key_hash)
            if len(self._cache) >= self._max:
                self._cache.clear()  # bounded memory beats a perfect LRU here
            self._cache[key_hash] = (now + self._ttl, principal)
        if principal.expires_at is not None and principal.expires_at <= datetime.now(UTC):
            raise invalid_api_key()
        if scope not in principal.scopes:
            raise insufficient_scope(scope)
        return principal

    async def _load(self, request: web.Request, key_hash: bytes) -> ApiKeyPrincipal:
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

    def forget(self, key_hash: bytes | None = None) -> None:
        """Drop cached keys (all, or one), e.g. right after this process revoked a key."""
        if key_hash is None:
            self._cache.clear()
        else:
            self._cache.pop(key_hash, None)


API_KEYS: web.AppKey[ApiKeyAuthenticator] = web.AppKey("api_keys", ApiKeyAuthenticator)


def require_admin(request: web.Request) -> None:
    expected = request.app[SETTINGS].admin_token
    given = bearer_token(request)
    # Constant-time compare; with no ADMIN_TOKEN configured the admin API is simply closed.
    if (
        expected is None
        or given is None
        or not hmac.compare_digest(given.encode(), expected.encode())
    ):
        raise Problem(
            401,
            "invalid_admin_token",
            "the admin token is missing or wrong",
            headers={"WWW-Authenticate": 'Bearer realm="widget-identity-admin"'},
        )
