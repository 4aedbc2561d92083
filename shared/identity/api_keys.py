"""API keys and the admin token: how internal callers prove who they are.

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
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from shared.config import SETTINGS
from shared.db import DB_POOL, TRANSIENT_DB_ERRORS
from shared.errors import Problem, insufficient_scope, invalid_api_key
from shared.identity.credential_cache import CredentialCache
from shared.identity.revocation import CredentialChange
from shared.web.http import bearer_token

log = logging.getLogger(__name__)

API_KEY_PREFIX = "wik_"
_API_KEY = re.compile(r"^wik_[A-Za-z0-9_-]{43}$")

# lastUsedAt is written at most once per key per process in this many seconds: it must not
# cost a write per request, and "about a minute ago" is what an admin needs to know.
LAST_USED_INTERVAL = 60.0

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
    """Checks bearer API keys, caching good ones so hot paths skip Postgres.

    A revoked key, or any key of a disabled org, stops working on every replica within a
    second: the revocation listener drops it from every process's cache (``changed``).
    """

    def __init__(self, *, cache_ttl: float = 5.0, max_entries: int = 10_000) -> None:
        self._max = max_entries
        self._cache: CredentialCache[bytes, ApiKeyPrincipal] = CredentialCache(
            ttl=cache_ttl, max_entries=max_entries
        )
        self._used: dict[str, float] = {}  # key id -> when this process last wrote lastUsedAt

    async def authenticate(self, request: web.Request, scope: str) -> ApiKeyPrincipal:
        raw = bearer_token(request)
        if raw is None or not _API_KEY.match(raw):
            raise invalid_api_key()
        key_hash = hash_secret(raw)
        principal = await self._cache.get(key_hash, lambda: self._load(request, key_hash))
        if principal.expires_at is not None and principal.expires_at <= datetime.now(UTC):
            raise invalid_api_key()
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

    def set_live(self, live: bool) -> None:
        self._cache.set_live(live)

    def changed(self, change: CredentialChange) -> None:
        if change.kind == "api_key":
            self._cache.drop_where(lambda p: p.key_id == change.id)
        elif change.kind == "org":
            self._cache.drop_where(lambda p: p.org_id == change.id)

    def forget(self) -> None:
        """Drop every cached key."""
        self._cache.clear()


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
