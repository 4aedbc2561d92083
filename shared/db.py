"""The asyncpg pool: how it is opened, closed and configured, and which errors mean "down"."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
from aiohttp import web

from shared.config import Settings
from shared.errors import ConfigError

Pool = asyncpg.Pool
Connection = asyncpg.Connection

DB_POOL: web.AppKey[asyncpg.Pool] = web.AppKey("db_pool", asyncpg.Pool)

# Errors that mean "the database is not reachable right now", as opposed to a bug or bad
# data: these become 503 db_unavailable with Retry-After, and consumers retry them. Connection
# loss is not one exception: a killed backend (pg_terminate_backend, a restart, a failover)
# surfaces as the server's message (08xxx, 57Pxx), as the socket's error, or, when it lands in
# the middle of an operation, as the client-side state it leaves behind: asyncpg's
# InterfaceError ("connection is closed", "another operation is in progress") and
# InternalClientError ("cannot switch to state ...; another operation is in progress").
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # reset, broken pipe, refused, a Unix socket gone during a restart
    asyncio.TimeoutError,  # command_timeout, a pool acquire that waited too long
    asyncpg.exceptions.PostgresConnectionError,  # 08xxx: connection does not exist, failed...
    asyncpg.exceptions.OperatorInterventionError,  # 57xxx: admin/crash shutdown, starting up
    asyncpg.exceptions.InsufficientResourcesError,  # 53xxx: too many connections, no memory
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
)

# Subclasses of the above that are a bug in our code, never an outage: a query argument of
# the wrong type or range, a misconfigured client. They must stay a logged 500.
DB_PROGRAMMING_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions.UnsupportedClientFeatureError,
)


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` means the database is unavailable right now (see
    ``TRANSIENT_DB_ERRORS``) and not a bug; a group is transient when all of it is."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_transient(inner) for inner in exc.exceptions)
    return isinstance(exc, TRANSIENT_DB_ERRORS) and not isinstance(exc, DB_PROGRAMMING_ERRORS)


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at another database (tests and the benchmark make many)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def _encode_json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb columns come back as Python objects and go in from them, via msgspec.
    await conn.set_type_codec(
        "jsonb", encoder=_encode_json, decoder=msgspec.json.decode, schema="pg_catalog"
    )


async def _no_session_state(conn: asyncpg.Connection) -> None:
    """Pool reset: nothing to undo. Pool connections never hold session state (LISTEN,
    session advisory locks and SET live only on ``connect()``'s dedicated connections), and
    asyncpg itself still rolls back a transaction left open. asyncpg's default reset costs a
    round trip on every release (UNLISTEN, advisory unlock, RESET ALL): ~5% of a request."""


# Timestamps Postgres renders as text (events' late-bound fields, see shared.bus.outbox) come out
# in UTC whatever the server's or role's TimeZone, like everything msgspec writes.
_SERVER_SETTINGS = {"timezone": "UTC"}


async def create_pool(settings: Settings, *, min_size: int | None = None) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            settings.database_url,
            min_size=settings.db_pool_min if min_size is None else min_size,
            max_size=settings.db_pool_max,
            command_timeout=settings.db_command_timeout,
            init=_init_connection,
            reset=_no_session_state,
            server_settings=_SERVER_SETTINGS,
            # A dead server must not hang start-up or a request forever.
            timeout=10,
        )
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise ConfigError(f"DATABASE_URL: cannot connect ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:  # asyncpg's DSN parser
        raise ConfigError(f"DATABASE_URL: malformed ({exc})") from None
    assert pool is not None
    return pool


async def connect(settings: Settings) -> asyncpg.Connection:
    """One dedicated connection (migrations, LISTEN, advisory-lock holders)."""
    try:
        conn: asyncpg.Connection = await asyncpg.connect(
            settings.database_url, timeout=10, server_settings=_SERVER_SETTINGS
        )
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise ConfigError(f"DATABASE_URL: cannot connect ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        raise ConfigError(f"DATABASE_URL: malformed ({exc})") from None
    await _init_connection(conn)
    return conn


def pool_context(settings: Settings) -> Any:
    """An aiohttp cleanup context that opens the pool at start-up and closes it last."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        pool = await create_pool(settings)
        app[DB_POOL] = pool
        yield
        # Give borrowers a bounded time to return connections, then cut them off.
        try:
            await asyncio.wait_for(pool.close(), timeout=settings.shutdown_timeout)
        except TimeoutError:
            pool.terminate()

    return ctx


async def ping(pool: asyncpg.Pool) -> None:
    async with pool.acquire(timeout=2) as conn:
        await conn.fetchval("SELECT 1", timeout=2)


R = TypeVar("R")

# Worth retrying at once: the transaction lost a race, the database is fine.
RETRYABLE_TX_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
)


async def in_transaction(
    pool: asyncpg.Pool,
    work: Callable[[asyncpg.Connection], Awaitable[R]],
    *,
    attempts: int = 5,
    isolation: str = "read_committed",
) -> R:
    """Run ``work`` in a transaction, retrying serialization failures and deadlocks with
    jittered backoff (concurrent merges into one contact race by design)."""
    for attempt in range(1, attempts + 1):
        try:
            async with pool.acquire() as conn, conn.transaction(isolation=isolation):
                return await work(conn)
        except RETRYABLE_TX_ERRORS:
            if attempt == attempts:
                raise
            await asyncio.sleep(random.uniform(0, 0.01 * 2**attempt))
    raise AssertionError("unreachable")
