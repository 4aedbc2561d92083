"""Wiring for this service: the one place its routes, dependencies and workers are built."""

from __future__ import annotations

from aiohttp import web

from shared.config import Settings
from shared.service import service_app

NAME = "token-issuance"


def setup(app: web.Application) -> None:
    """Add this service's routes and workers to an app built by ``service_app``."""


def create_app(settings: Settings) -> web.Application:
    app = service_app(settings, name=NAME)
    setup(app)
    return app
