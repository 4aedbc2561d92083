"""The service's dependencies as typed objects: what handlers and stores are given.

One ``Deps`` per request, built from the app's keys in ``routes._deps``; tests swap pieces by
installing their own values under these keys before start-up (e.g. ``SESSION_CONFIG``).
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from aiohttp import web

from services.session_resolution.cache import SessionCache
from shared.bus.outbox import Outbox
from shared.identity.contact_tokens import ContactTokenVerifier
from shared.web.ratelimit import RateLimiter


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Session timings; tests may install their own in the app before start-up."""

    session_ttl: float = 24 * 3600
    # A session with less left than this is not handed out again: resolve a fresh one.
    reuse_min_remaining: float = 600
    last_seen_interval: float = 3600
    visitor_cache_ttl: float = 24 * 3600
    history_page_max: int = 50
    messages_per_conversation: int = 200


@dataclass(frozen=True, slots=True)
class Deps:
    pool: asyncpg.Pool
    cache: SessionCache
    outbox: Outbox
    verifier: ContactTokenVerifier
    config: SessionConfig


SESSION_CONFIG: web.AppKey[SessionConfig] = web.AppKey("session_config", SessionConfig)
SESSION_CACHE: web.AppKey[SessionCache] = web.AppKey("session_cache", SessionCache)
SESSION_LIMITER: web.AppKey[RateLimiter] = web.AppKey("session_limiter", RateLimiter)
