"""Session resolution's own tunables: session lifetimes, cache lifetimes, page sizes.

Not read from the environment: the defaults are the product's promises. Tests may install
their own ``SessionConfig`` under ``app_keys.SESSION_CONFIG`` before start-up.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SessionConfig:
    session_ttl: float = 24 * 3600
    # A session with less left than this is not handed out again: resolve a fresh one.
    reuse_min_remaining: float = 600
    last_seen_interval: float = 3600
    visitor_cache_ttl: float = 24 * 3600
    history_page_max: int = 50
    messages_per_conversation: int = 200
