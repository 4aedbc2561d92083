"""Wiring for this service: the one place its routes, dependencies and workers are built."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from services.session_resolution import consumers
from services.session_resolution.browser import add_browser_routes
from services.session_resolution.cache import SessionCache
from services.session_resolution.deps import (
    SESSION_CACHE,
    SESSION_CONFIG,
    SESSION_LIMITER,
    SessionConfig,
)
from services.session_resolution.routes import add_routes
from shared.bus.consumer import add_consumer
from shared.config import SETTINGS, Settings
from shared.identity.contact_tokens import install_verifier
from shared.identity.org_policy import install_policies
from shared.identity.widget_tokens import install_widget_tokens
from shared.redis import REDIS
from shared.service import service_app
from shared.web.ratelimit import RateLimiter

NAME = "session-resolution"


def setup(app: web.Application) -> None:
    """Add this service's routes and workers to an app built by ``service_app``.

    Shared dependencies are installed only if absent (all-in-one composes several setups).
    Tests may replace ``SESSION_CONFIG`` before start-up. Every replica also runs the
    revocation consumer (group ``session-resolution``, see consumers.py).
    """
    install_verifier(app)
    install_policies(app)
    install_widget_tokens(app)
    if SESSION_CONFIG not in app:
        app[SESSION_CONFIG] = SessionConfig()

    async def redis_backed(app: web.Application) -> AsyncIterator[None]:
        # Runs after the base app's Redis context opened the client.
        prefix = app[SETTINGS].stream_prefix
        app[SESSION_CACHE] = SessionCache(app[REDIS], prefix)
        app[SESSION_LIMITER] = RateLimiter(app[REDIS], prefix)
        yield

    app.cleanup_ctx.append(redis_backed)
    add_routes(app)
    add_browser_routes(app)

    add_consumer(app, group=consumers.GROUP, handlers=consumers.handlers)


def create_app(settings: Settings) -> web.Application:
    app = service_app(settings, name=NAME)
    setup(app)
    return app
