"""Wiring: the Playground exists only in the all-in-one process, which has token issuance and
history beside session resolution (it composes them; services never import each other)."""

from __future__ import annotations

from aiohttp import web

from services.playground.routes import add_playground_routes
from services.token_issuance.app_keys import KEYRING
from shared.config import SETTINGS
from shared.errors import ConfigError


def setup(app: web.Application) -> None:
    """Serve ``/playground`` when ``PLAYGROUND`` is on; after the services' own ``setup``."""
    if not app[SETTINGS].playground:
        return
    if KEYRING not in app:
        raise ConfigError("PLAYGROUND: needs token issuance in the same process (serve all)")
    add_playground_routes(app)
