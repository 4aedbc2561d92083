"""All-in-one mode: every service, consumer and the outbox relay in one process, one port.

What ``make run`` starts, for development and small installs. It composes every service's
own ``setup_routes`` and ``setup_consumers``, the same way for each, so the routes and
consumers are exactly those of the separate deployments.
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from services.history import app as history
from services.playground import app as playground
from services.session_resolution import app as session_resolution
from services.token_issuance import app as token_issuance
from shared.config import Settings
from shared.service import service_app

NAME = "all"


class Service(Protocol):
    """What every service's app.py offers for composition."""

    def setup_routes(self, app: web.Application) -> None: ...

    def setup_consumers(self, app: web.Application) -> None: ...


SERVICES: tuple[Service, ...] = (token_issuance, session_resolution, history)


def create_app(settings: Settings) -> web.Application:
    app = service_app(settings, name=NAME)
    for service in SERVICES:
        service.setup_routes(app)
        service.setup_consumers(app)
    playground.setup(app)  # only when PLAYGROUND=true
    return app
