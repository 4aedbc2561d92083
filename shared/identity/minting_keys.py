"""Which API keys still stand behind the contact tokens they minted.

A contact token records the API key that minted it (claim ``akid``). Revoking that key — the
remedy for a leaked key, which could mint a token for anyone — ends every token it minted and
every session those tokens verified, on every replica within a second: this cache answers
"is key X of org O still live?" without a round trip, and the revocation listener drops an
entry the moment its key is revoked or its org changes (``changed``).
"""

from __future__ import annotations

import uuid

import asyncpg

from shared.identity.credential_cache import CredentialCache
from shared.identity.revocation import CredentialChange


class MintingKeys:
    def __init__(self, *, ttl: float = 60.0, max_entries: int = 10_000) -> None:
        # key id -> (its org, live); None when no such key exists.
        self._cache: CredentialCache[str, tuple[str, bool] | None] = CredentialCache(
            ttl=ttl, max_entries=max_entries
        )

    async def live(self, pool: asyncpg.Pool, org_id: str, key_id: str) -> bool:
        """True when ``key_id`` is an unrevoked API key of ``org_id``."""
        try:
            parsed = uuid.UUID(key_id)
        except ValueError:
            return False

        async def load() -> tuple[str, bool] | None:
            row = await pool.fetchrow(
                "SELECT org_id, revoked_at IS NULL AS live FROM api_keys WHERE id = $1", parsed
            )
            return None if row is None else (str(row["org_id"]), bool(row["live"]))

        found = await self._cache.get(key_id, load)
        return found is not None and found[0] == org_id and found[1]

    def set_live(self, live: bool) -> None:
        self._cache.set_live(live)

    def changed(self, change: CredentialChange) -> None:
        if change.kind == "api_key":
            self._cache.drop(change.id)
        elif change.kind == "org":
            self._cache.drop_where(lambda found: found is None or found[0] == change.id)
