"""The in-memory cache behind ``/.well-known/jwks.json``."""

from __future__ import annotations

import time
from typing import Any

from services.token_issuance import queries


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
