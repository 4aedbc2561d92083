"""Wiring for this service: the one place its routes, dependencies and consumers are built.

The same names in every service's app.py: ``setup_routes``, ``setup_consumers``,
``create_app`` (what ``serve history`` runs) and ``create_consumer_app`` (what ``consume
history`` runs: this service's consumers run apart from its API).
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from services.history import consumers
from services.history.event_scrubber import EventScrubber
from services.history.overdue_merges import overdue_merges_worker
from services.history.routes import routes
from shared.bus.consumer import add_consumer
from shared.bus.events import Event
from shared.bus.handlers import Handler
from shared.bus.outbox import Outbox
from shared.config import SETTINGS, Settings
from shared.lifecycle import add_worker
from shared.redis import WORKER_REDIS
from shared.service import service_app

NAME = "history"
GROUP = consumers.GROUP


def setup_routes(app: web.Application) -> None:
    """Add this service's routes to an app built by ``service_app``."""
    app.router.add_routes(routes)


def setup_consumers(app: web.Application) -> None:
    """Add this service's event consumers (the merge consumer, which also scrubs an erased
    person's events from Redis) to ``app``, and the worker that applies merge requests whose
    event is overdue straight from Postgres."""

    def handlers(outbox: Outbox) -> Mapping[type[Event], Handler]:
        # Called at start-up, once the app's Redis clients exist.
        return consumers.handlers(outbox, EventScrubber(app[WORKER_REDIS], app[SETTINGS]))

    add_consumer(app, group=GROUP, handlers=handlers)
    add_worker(app, "overdue-merges", overdue_merges_worker)


def create_app(settings: Settings) -> web.Application:
    """The API alone: the merge consumer runs in ``create_consumer_app``."""
    app = service_app(settings, name=NAME)
    setup_routes(app)
    return app


def create_consumer_app(settings: Settings) -> web.Application:
    """``consume history``: the consumers alone, with only probes and metrics over HTTP, so
    they scale on stream lag independently of the API."""
    app = service_app(settings, name=f"{NAME}-consumer")
    setup_consumers(app)
    return app
