"""The in-process cache under every credential lookup (API keys, widget tokens, org
policies), kept honest by the revocation listener (shared.identity.revocation).

While the listener is connected (``live``) an entry is served until its TTL, unless a
broadcast drops it first: that is how a revocation reaches every replica within a second,
and the TTL is only the fallback for a broadcast lost on the publisher's side. While the
listener is not connected, invalidations may be missed, so nothing is cached or served:
every lookup reads Postgres. A load that raced with an invalidation is not cached (it may
have read the row just before the change committed).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class CredentialCache(Generic[K, V]):
    def __init__(
        self, *, ttl: float, negative_ttl: float | None = None, max_entries: int = 10_000
    ) -> None:
        self._ttl = ttl
        self._negative_ttl = ttl if negative_ttl is None else negative_ttl
        self._max = max_entries
        self._entries: dict[K, tuple[float, V]] = {}
        self._generation = 0  # bumped by every invalidation
        self.live = False
        self.loads = 0

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        """The cached value, else ``load()``'s (cached when that is safe). A None value is
        cached for ``negative_ttl``; an exception from ``load`` caches nothing."""
        now = time.monotonic()
        if self.live:
            cached = self._entries.get(key)
            if cached is not None and cached[0] > now:
                return cached[1]
        generation = self._generation
        self.loads += 1
        value = await load()
        if self.live and generation == self._generation:
            if len(self._entries) >= self._max:
                self._entries.clear()  # bounded memory beats a perfect LRU here
            ttl = self._ttl if value is not None else self._negative_ttl
            self._entries[key] = (now + ttl, value)
        return value

    def drop(self, key: K) -> None:
        self._generation += 1
        self._entries.pop(key, None)

    def drop_where(self, stale: Callable[[V], bool]) -> None:
        """Drop every entry whose value is ``stale`` (a scan: changes are rare, reads are not)."""
        self._generation += 1
        for key in [k for k, (_, v) in self._entries.items() if stale(v)]:
            del self._entries[key]

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()

    def set_live(self, live: bool) -> None:
        """Called by the revocation listener: False on disconnect, True once subscribed
        again. Either way what is cached may have missed invalidations: drop it."""
        self.live = live
        self.clear()

    def __len__(self) -> int:
        return len(self._entries)
