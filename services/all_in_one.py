"""All-in-one mode: every service, consumer and the outbox relay in one process, one port.

What ``make run`` starts, for development and small installs. It composes the services'
own ``setup`` functions, so the routes and workers are exactly those of the separate
deployments.
"""

from __future__ import annotations

from aiohttp import web

from services.history import app as history
from services.playground import app as playground
from services.session_resolution import app as session_resolution
from services.token_issuance import app as token_issuance
from shared.config import Settings
from shared.service import service_app

NAME = "all"


def create_app(settings: Settings) -> web.Application:
    app = service_app(settings, name=NAME)
    token_issuance.setup(app)
    session_resolution.setup(app)
    history.setup(app)
    history.setup_consumers(app)
    playground.setup(app)  # only when PLAYGROUND=true
    return app
