"""Wiring for this service: the one place its routes, dependencies and workers are built."""

from __future__ import annotations

from aiohttp import web

from services.history import handlers
from services.history.routes import routes
from shared.bus.consumer import add_consumer
from shared.config import Settings
from shared.service import service_app

NAME = "history"
GROUP = handlers.GROUP


def setup(app: web.Application) -> None:
    """Add this service's routes and workers to an app built by ``service_app``."""
    app.router.add_routes(routes)


def create_app(settings: Settings) -> web.Application:
    app = service_app(settings, name=NAME)
    setup(app)
    return app


def setup_consumers(app: web.Application) -> None:
    """Add this service's event consumers (the merge consumer) to ``app``."""
    add_consumer(app, group=GROUP, handlers=handlers.handlers)


def create_consumer_app(settings: Settings) -> web.Application:
    """``consume history``: the consumers alone, with only probes and metrics over HTTP, so
    they scale on stream lag independently of the API."""
    app = service_app(settings, name=f"{NAME}-consumer")
    setup_consumers(app)
    return app
