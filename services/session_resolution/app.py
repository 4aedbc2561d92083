"""Wiring for this service: the one place its routes, dependencies and consumers are built.

The same four names in every service's app.py: ``setup_routes``, ``setup_consumers``,
``create_app`` (what ``serve session-resolution`` runs) and, where consumers run apart from
the API, ``create_consumer_app``. This service has none apart: see ``create_app``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from aiohttp import web

from services.session_resolution import api_routes, consumers, widget_routes
from services.session_resolution.app_keys import SESSION_CACHE, SESSION_CONFIG, SESSION_LIMITER
from services.session_resolution.browser import add_browser_routes
from services.session_resolution.cache import SessionCache
from services.session_resolution.config import SessionConfig
from shared.bus.consumer import add_consumer
from shared.bus.events import Event
from shared.bus.handlers import Handler
from shared.bus.outbox import Outbox
from shared.config import SETTINGS, Settings
from shared.identity.contact_tokens import install_verifier
from shared.identity.org_policy import install_policies
from shared.identity.widget_tokens import install_widget_tokens
from shared.redis import REDIS, REDIS_BREAKER, WORKER_REDIS, RedisBreaker
from shared.service import service_app
from shared.web.ratelimit import RATE_LIMITER

NAME = "session-resolution"


def setup_routes(app: web.Application) -> None:
    """Add the widget and internal API routes, and the dependencies they need, to an app built
    by ``service_app``.

    Shared dependencies are installed only if absent (all-in-one composes several services).
    Tests may replace ``SESSION_CONFIG`` before start-up.
    """
    install_verifier(app)
    install_policies(app)
    install_widget_tokens(app)
    if SESSION_CONFIG not in app:
        app[SESSION_CONFIG] = SessionConfig()

    async def redis_backed(app: web.Application) -> AsyncIterator[None]:
        # Runs after the base app's Redis context opened the client.
        prefix = app[SETTINGS].stream_prefix
        app[SESSION_CACHE] = SessionCache(app[REDIS], prefix, app[REDIS_BREAKER])
        app[SESSION_LIMITER] = app[RATE_LIMITER]
        yield

    app.cleanup_ctx.append(redis_backed)
    widget_routes.add_routes(app)
    api_routes.add_routes(app)
    add_browser_routes(app)


def setup_consumers(app: web.Application) -> None:
    """Add the revocation and erasure consumer (group ``session-resolution``, see
    consumers.py)."""

    def handlers(outbox: Outbox) -> Mapping[type[Event], Handler]:
        # Called at start-up, once the app's Redis clients (and any test config) are in place.
        settings = app[SETTINGS]
        # The consumer must really write (it is retried until Redis answers), so its cache
        # gets a breaker that never skips a call and waits the full socket timeout.
        breaker = RedisBreaker(timeout=settings.redis_socket_timeout, cooldown=0.0)
        cache = SessionCache(app[WORKER_REDIS], settings.stream_prefix, breaker)
        return consumers.handlers(outbox, cache, app.get(SESSION_CONFIG) or SessionConfig())

    add_consumer(app, group=consumers.GROUP, handlers=handlers)


def create_app(settings: Settings) -> web.Application:
    app = service_app(settings, name=NAME)
    setup_routes(app)
    # Every replica runs the revocation consumer too, rather than a `consume` deployment of
    # its own: its work is one small UPDATE per "log out everywhere", the consumer group
    # hands each event to one replica only, and the widget endpoints never wait for it (they
    # check revocation themselves), so it needs neither its own scaling nor its own process.
    setup_consumers(app)
    return app
