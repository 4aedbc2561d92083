"""Typed app keys for this service's dependencies (built in app.py, used by routes.py)."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from services.token_issuance import queries
from services.token_issuance.keyring import Keyring


class JwksCache:
    """``/.well-known/jwks.json`` is public and polled by every verifier out there: serve it
    from memory, re-read at most every ``ttl`` seconds (and at once after a local change)."""

    def __init__(self, *, ttl: float = 2.0) -> None:
        self._ttl = ttl
        self._entries: dict[str | None, tuple[float, list[dict[str, Any]]]] = {}

    async def keys(self, db: queries.Executor, org_id: str | None) -> list[dict[str, Any]]:
        now = time.monotonic()
        cached = self._entries.get(org_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        keys = await queries.live_public_jwks(db, org_id)
        if len(self._entries) > 1000:
            self._entries.clear()
        self._entries[org_id] = (now + self._ttl, keys)
        return keys

    def clear(self) -> None:
        self._entries.clear()


KEYRING: web.AppKey[Keyring] = web.AppKey("token_issuance_keyring", Keyring)
JWKS: web.AppKey[JwksCache] = web.AppKey("token_issuance_jwks", JwksCache)
