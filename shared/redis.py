"""The Redis client: created once per process with timeouts, so a stalled Redis never hangs us."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from aiohttp import web

from shared.config import Settings
from shared.errors import ConfigError

Redis = aioredis.Redis

REDIS: web.AppKey[aioredis.Redis] = web.AppKey("redis", aioredis.Redis)

TRANSIENT_REDIS_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    OSError,
    asyncio.TimeoutError,
)


def create_redis(settings: Settings, *, socket_timeout: float | None = None) -> aioredis.Redis:
    """A client whose every command times out; blocking reads pass a longer timeout."""
    try:
        client: aioredis.Redis = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=socket_timeout or settings.redis_socket_timeout,
            socket_connect_timeout=settings.redis_socket_timeout,
            max_connections=settings.redis_max_connections,
            health_check_interval=15,
            decode_responses=False,
        )
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL: malformed ({exc})") from None
    return client


async def check_reachable(client: aioredis.Redis) -> None:
    try:
        await client.ping()
    except TRANSIENT_REDIS_ERRORS as exc:
        raise ConfigError(f"REDIS_URL: cannot connect ({type(exc).__name__}: {exc})") from None


def redis_context(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        client = create_redis(settings)
        await check_reachable(client)
        app[REDIS] = client
        yield
        await client.aclose()

    return ctx


async def ping(client: aioredis.Redis) -> None:
    await asyncio.wait_for(client.ping(), timeout=2)


def as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
