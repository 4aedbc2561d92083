"""The Redis client: created once per process with timeouts, so a stalled Redis never hangs us."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions
from aiohttp import web
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from shared.config import Settings
from shared.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

# What every caller holds: one Redis server, or a Redis Cluster (REDIS_CLUSTER=true). Both
# speak the same commands; what differs is told where it matters (``subscriber``, the rate
# limiter's script, the event streams' hash tags in ``Settings.event_streams``).
Redis: TypeAlias = aioredis.Redis | RedisCluster

# Two clients per process, because they differ in what may be repeated (see create_redis):
# REDIS for request handlers, WORKER_REDIS for the relay, consumers and listeners.
REDIS: web.AppKey[Redis] = web.AppKey("redis")
WORKER_REDIS: web.AppKey[Redis] = web.AppKey("worker_redis")

TRANSIENT_REDIS_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    # A cluster in the middle of a failover or a resharding: the command did not run, and
    # will once the cluster has settled (seconds).
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.RedisClusterUnreachableError,
    OSError,
    asyncio.TimeoutError,
)


class RedisSkipped(redis.exceptions.ConnectionError):
    """Not sent: Redis failed moments ago (``RedisBreaker``). A transient Redis error like any
    other, so whoever cannot do without Redis answers 503 redis_unavailable, at once."""


class RedisBreaker:
    """A circuit breaker for the request path's Redis calls, one per process.

    Each call gets ``timeout`` seconds (a request must not wait a full socket timeout, per
    call, for something it can do without). A failed or late call opens the breaker: for
    ``cooldown`` seconds every call fails at once with ``RedisSkipped``; the first call after
    that tries Redis again. Callers decide what a failure means: the session cache reads
    Postgres instead, rate limits count in this process, burying a session fails (503).
    """

    def __init__(self, *, timeout: float, cooldown: float = 2.0) -> None:
        self.timeout = timeout
        self.cooldown = cooldown
        self._open_until = 0.0
        self.trips = 0

    @property
    def open(self) -> bool:
        return time.monotonic() < self._open_until

    async def call(self, operation: Callable[[], Awaitable[T]], *, short: bool = True) -> T:
        """``operation()``, within ``timeout`` unless not ``short`` (a call the request cannot
        do without gets the socket timeout: giving up early would only fail it sooner)."""
        if self.open:
            raise RedisSkipped("redis failed moments ago; not calling it for a while")
        try:
            async with asyncio.timeout(self.timeout if short else None):
                return await operation()
        except TRANSIENT_REDIS_ERRORS as exc:
            if not self.open:
                self.trips += 1
                log.warning(
                    "redis unreachable; degrading for a while",
                    extra={"error": repr(exc), "seconds": self.cooldown},
                )
            self._open_until = time.monotonic() + self.cooldown
            raise


# The request path's per-call budget: a cache hit or a rate-limit count takes ~1 ms; a call
# still unanswered after this means Redis is in trouble, and Postgres can answer instead.
REQUEST_CALL_TIMEOUT = 0.25

REDIS_BREAKER: web.AppKey[RedisBreaker] = web.AppKey("redis_breaker", RedisBreaker)


def create_redis(
    settings: Settings, *, retry_once: bool = False, socket_timeout: float | None = None
) -> Redis:
    """A client whose every command times out; blocking reads keep their BLOCK within it
    (``block_within_timeout``). A Redis Cluster client when ``settings.redis_cluster``.

    ``retry_once``: a command that fails with a connection error is sent once more on a fresh
    connection. redis-py 8's pool no longer spots pooled connections the server closed over
    TCP (a Redis restart; RESP3 "maintenance notifications", redis-py #4252), so without it
    each such connection cost a request a 503 after Redis was back. Only for clients whose
    commands are safe to repeat when the first attempt ran but its reply was lost: the request
    path's are (cache GET/SET, a rate-limit count one too high during a fault, idempotent
    invalidation messages). The workers' are not: a repeated XREADGROUP ">" would skip the
    entries the lost reply held and break per-subject order, a repeated XAUTOCLAIM would
    count a delivery twice. Timeouts are never retried: a slow Redis costs one timeout.
    """
    timeout = socket_timeout or settings.redis_socket_timeout
    if settings.redis_cluster:
        return _create_cluster(settings, retry_once=retry_once, timeout=timeout)
    retry = (
        Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        if retry_once
        else Retry(NoBackoff(), 0)
    )
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
            retry=retry,
        )
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL: malformed ({exc})") from None
    return aioredis.Redis.from_pool(pool)


class _RequestPathCluster(RedisCluster):
    """The request path's cluster client: redis-py retries a cluster command after a
    timeout too, and here a slow Redis must cost one timeout, as on a single server. (Its
    pipelines, which only bury session tokens, still retry one: redis-py reads that list off
    RedisCluster itself. Writing a tombstone twice is harmless.)"""

    ERRORS_ALLOW_RETRY = (  # type: ignore[assignment]  # typed as exactly redis-py's four
        redis.exceptions.ConnectionError,
        redis.exceptions.ClusterDownError,
        redis.exceptions.SlotNotCoveredError,
    )


def _create_cluster(settings: Settings, *, retry_once: bool, timeout: float) -> RedisCluster:
    """REDIS_URL names one node of the cluster, or several, comma-separated (any reachable
    one lets the client start; it finds the others itself). Credentials and TLS come from
    the first.

    The same timeouts and retries as on one server, with the cluster's own differences: the
    retry is the cluster client's (it refreshes the topology before it, so a command after a
    failover reaches the new primary), and besides connection errors it covers CLUSTERDOWN
    and an uncovered slot (the command did not run). With retries 0, the workers' client still
    follows MOVED/ASK redirects: the node that answered them ran nothing. There is no
    blocking pool: ``redis_max_connections`` is per node, and past it a command fails at once
    with MaxConnectionsError (a connection error: callers degrade or answer 503)."""
    first, *others = settings.redis_url.split(",")
    seeds = []
    for url in others:
        parts = urlsplit(url)
        seeds.append(ClusterNode(parts.hostname or "localhost", parts.port or 6379))
    cls = _RequestPathCluster if retry_once else RedisCluster
    try:
        return cls.from_url(
            first,
            startup_nodes=seeds,
            socket_timeout=timeout,
            socket_connect_timeout=settings.redis_socket_timeout,
            max_connections=settings.redis_max_connections,
            health_check_interval=15,
            decode_responses=False,
            retry=Retry(NoBackoff(), 1 if retry_once else 0),
        )
    except (ValueError, redis.exceptions.RedisClusterException) as exc:
        raise ConfigError(f"REDIS_URL: not usable for a cluster ({exc})") from None


async def subscriber(client: Redis) -> PubSub:
    """A connection for classic pub/sub channels, not yet subscribed to any.

    On a cluster, a classic PUBLISH reaches every node, so one connection to any node hears
    every channel: to a primary picked at random among those the client knows. Callers that
    lose it (the node died) call this again and most likely land on another; the cluster
    client refreshes what it knows on its own commands' errors."""
    if isinstance(client, RedisCluster):
        await client.initialize()
        return client.pubsub(node=random.choice(client.get_primaries()))
    return client.pubsub()


def node_demoted(exc: BaseException) -> bool:
    """A blocking read (XREAD, XREADGROUP BLOCK) cut short because its node stopped being a
    primary: a Redis Cluster failover answers it "UNBLOCKED ... (master -> replica?)". The
    read returned nothing, and the next one goes to the new primary (after a MOVED or a
    connection error): a disconnection, not a bug."""
    return (
        isinstance(exc, redis.exceptions.ResponseError)
        and getattr(exc, "status_code", None) == "UNBLOCKED"
    )


def block_within_timeout(settings: Settings, block_ms: int) -> int:
    """The BLOCK (ms) a blocking read may ask for so that an idle stream still answers well
    before the socket timeout: a BLOCK as long as the timeout made every idle read fail with
    TimeoutError (and drop its connection), which read as Redis being down."""
    return max(1, min(block_ms, int(settings.redis_socket_timeout * 1000 / 2)))


# RedisClusterException: no seed node answered, or the server is no cluster node.
_UNREACHABLE: tuple[type[BaseException], ...] = (
    *TRANSIENT_REDIS_ERRORS,
    redis.exceptions.RedisClusterException,
)


async def check_reachable(client: Redis) -> None:
    try:
        await client.ping()
    except _UNREACHABLE as exc:
        raise ConfigError(f"REDIS_URL: cannot connect ({type(exc).__name__}: {exc})") from None


def redis_context(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        client = create_redis(settings, retry_once=True)
        await check_reachable(client)
        app[REDIS] = client
        app[REDIS_BREAKER] = RedisBreaker(
            timeout=min(REQUEST_CALL_TIMEOUT, settings.redis_socket_timeout)
        )
        app[WORKER_REDIS] = create_redis(settings)
        yield
        await client.aclose()
        await app[WORKER_REDIS].aclose()

    return ctx


async def ping(client: Redis) -> None:
    await asyncio.wait_for(client.ping(), timeout=2)


def as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
