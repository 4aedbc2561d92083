"""Wiring for this service: the one place its routes, dependencies and consumers are built.

The same names in every service's app.py: ``setup_routes``, ``setup_consumers`` and
``create_app`` (what ``serve token-issuance`` runs). Token issuance consumes no events.
"""

from __future__ import annotations

from aiohttp import web

from services.token_issuance import routes
from services.token_issuance.app_keys import JWKS, KEYRING
from services.token_issuance.cache import JwksCache
from services.token_issuance.keyring import Keyring
from shared.config import SETTINGS, Settings
from shared.db import DB_POOL
from shared.errors import ConfigError
from shared.identity.contact_tokens import CONTACT_TOKENS, install_verifier
from shared.identity.org_policy import install_policies
from shared.service import service_app

NAME = "token-issuance"


def setup_routes(app: web.Application) -> None:
    """Add this service's routes, and the dependencies they need, to an app built by
    ``service_app``. Every dependency is installed only if absent (all-in-one composes
    several services into one app)."""
    install_policies(app)
    install_verifier(app)
    _install_keyring(app)
    if JWKS not in app:
        app[JWKS] = JwksCache()
    routes.add_routes(app.router)


def setup_consumers(app: web.Application) -> None:
    """None: token issuance reads no events (all-in-one still calls it, like every service's)."""


def create_app(settings: Settings) -> web.Application:
    app = service_app(settings, name=NAME)
    setup_routes(app)
    setup_consumers(app)
    return app


def _install_keyring(app: web.Application) -> None:
    if KEYRING in app:
        return
    settings = app[SETTINGS]
    keyring = Keyring(settings.key_encryption_key)
    app[KEYRING] = keyring
    # A key deleted by any replica must stop signing here too, not only stop verifying.
    app[CONTACT_TOKENS].on_key_deleted(keyring.forget_kid)

    async def check_key_encryption_key(app: web.Application) -> None:
        # Refuse to start rather than fail on the first sign-in: no KEK, or the wrong one.
        if settings.key_encryption_key is None:
            raise ConfigError(
                "KEY_ENCRYPTION_KEY: not set; token issuance needs it to encrypt signing keys "
                "(32 random bytes, base64url)"
            )
        await keyring.check_kek(app[DB_POOL])

    app.on_startup.append(check_key_encryption_key)
