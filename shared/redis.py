"""The Redis client: created once per process with timeouts, so a stalled Redis never hangs us."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

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
    """A client whose every command times out; blocking reads keep their BLOCK within it
    (``block_within_timeout``)."""
    timeout = socket_timeout or settings.redis_socket_timeout
    try:
        # A blocking pool: at max_connections a burst waits (at most one socket timeout) for
        # a free connection instead of failing at once with MaxConnectionsError, which turned
        # a load spike into 503s while Redis itself was fine.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=settings.redis_socket_timeout,
            max_connections=settings.redis_max_connections,
            health_check_interval=15,
            decode_responses=False,
            # A pooled connection the server closed (a Redis restart) fails its next command
            # once; retry that once on a fresh connection. redis-py 8's pool no longer spots
            # such connections over TCP (RESP3 "maintenance notifications", redis-py #4252),
            # so each one cost a request a 503 after Redis was back. Timeouts are not retried:
            # a slow Redis costs one socket timeout, not two.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        )
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL: malformed ({exc})") from None
    return aioredis.Redis.from_pool(pool)


def block_within_timeout(settings: Settings, block_ms: int) -> int:
    """The BLOCK (ms) a blocking read may ask for so that an idle stream still answers well
    before the socket timeout: a BLOCK as long as the timeout made every idle read fail with
    TimeoutError (and drop its connection), which read as Redis being down."""
    return max(1, min(block_ms, int(settings.redis_socket_timeout * 1000 / 2)))


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
