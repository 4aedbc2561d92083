"""How an admin change that ends or alters a credential reaches every process.

The rule modules call an ``Announce`` right after their transaction commits; the HTTP
routes and the CLI only differ in which one they pass, so neither can forget it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from shared.config import SETTINGS, Settings
from shared.identity.revocation import REVOCATION_FEED, CredentialChange, announce_change
from shared.redis import REDIS, create_redis

Announce = Callable[[CredentialChange], Awaitable[None]]


def from_app(app: web.Application) -> Announce:
    """For a serving process: drop the stale entries here at once (the next request must not
    wait for our own broadcast), then tell every other process."""

    async def announce(change: CredentialChange) -> None:
        app[REVOCATION_FEED].changed(change)
        await announce_change(app[REDIS], app[SETTINGS], change)

    return announce


def from_settings(settings: Settings) -> Announce:
    """For the CLI, which caches nothing itself: only tell the serving processes."""

    async def announce(change: CredentialChange) -> None:
        redis = create_redis(settings)
        try:
            await announce_change(redis, settings, change)
        finally:
            await redis.aclose()

    return announce
