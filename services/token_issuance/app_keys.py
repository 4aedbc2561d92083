"""Typed app keys for this service's own dependencies (installed by app.py, used by routes.py)."""

from __future__ import annotations

from aiohttp import web

from services.token_issuance.cache import JwksCache
from services.token_issuance.keyring import Keyring

KEYRING: web.AppKey[Keyring] = web.AppKey("token_issuance_keyring", Keyring)
JWKS: web.AppKey[JwksCache] = web.AppKey("token_issuance_jwks", JwksCache)
