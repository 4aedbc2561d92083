"""The app keys of this service's dependencies, and ``Deps``: the same dependencies as one
typed value, which the use cases (resolution, session access) are given.

app.py installs the values; handlers build one ``Deps`` per request with ``Deps.from_app``.
Tests swap pieces by installing their own values under these keys before start-up (e.g.
``SESSION_CONFIG``).
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from aiohttp import web

from services.session_resolution.cache import SessionCache
from services.session_resolution.config import SessionConfig
from shared.bus.outbox import OUTBOX, Outbox
from shared.db import DB_POOL
from shared.identity.contact_tokens import CONTACT_TOKENS, ContactTokenVerifier
from shared.identity.widget_tokens import WIDGET_TOKENS, WidgetTokenDirectory
from shared.web.ratelimit import RateLimiter

SESSION_CONFIG: web.AppKey[SessionConfig] = web.AppKey("session_config", SessionConfig)
SESSION_CACHE: web.AppKey[SessionCache] = web.AppKey("session_cache", SessionCache)
SESSION_LIMITER: web.AppKey[RateLimiter] = web.AppKey("session_limiter", RateLimiter)


@dataclass(frozen=True, slots=True)
class Deps:
    pool: asyncpg.Pool
    cache: SessionCache
    outbox: Outbox
    verifier: ContactTokenVerifier
    widget_tokens: WidgetTokenDirectory
    config: SessionConfig

    @classmethod
    def from_app(cls, app: web.Application) -> Deps:
        return cls(
            pool=app[DB_POOL],
            cache=app[SESSION_CACHE],
            outbox=app[OUTBOX],
            verifier=app[CONTACT_TOKENS],
            widget_tokens=app[WIDGET_TOKENS],
            config=app[SESSION_CONFIG],
        )
