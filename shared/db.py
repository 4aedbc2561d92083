"""The asyncpg pool: how it is opened, closed and configured, and which errors mean "down"."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from contextvars import ContextVar
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
from aiohttp import web

from shared.config import Settings
from shared.errors import ConfigError
from shared.lifecycle import shutdown_of

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
class DatabaseBusy(asyncio.TimeoutError):
    """No pooled connection came free within DB_ACQUIRE_TIMEOUT for this request's kind."""


TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # reset, broken pipe, refused, a Unix socket gone during a restart
    asyncio.TimeoutError,  # command_timeout, DatabaseBusy
    asyncpg.exceptions.PostgresConnectionError,  # 08xxx: connection does not exist, failed...
    # 57xxx: admin/crash shutdown, starting up; and 57014, statement_timeout
    asyncpg.exceptions.OperatorInterventionError,
    # 55P03, lock_timeout: someone holds a lock we need; retrying later will get it.
    asyncpg.exceptions.LockNotAvailableError,
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


# The transient errors that mean "busy", not "down": a lock or statement timeout, a full
# bulkhead. They get their own code (503 db_busy) so an operator can tell the two apart.
DB_BUSY_ERRORS: tuple[type[BaseException], ...] = (
    DatabaseBusy,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.QueryCanceledError,
)


def is_busy(exc: BaseException) -> bool:
    return isinstance(exc, DB_BUSY_ERRORS)


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
    session advisory locks and SET live only on ``connect()``'s dedicated connections; behind
    a transaction pooler the timeouts are ``SET LOCAL``), and asyncpg itself still rolls back
    a transaction left open. asyncpg's default reset costs a round trip on every release
    (UNLISTEN, advisory unlock, RESET ALL): ~5% of a request."""


# Timestamps Postgres renders as text (events' late-bound fields, see shared.bus.outbox) come out
# in UTC whatever the server's or role's TimeZone, like everything msgspec writes. PgBouncer
# tracks TimeZone per client, so this one holds through a transaction pooler too.
_SERVER_SETTINGS = {"timezone": "UTC"}


def _pool_timeouts(settings: Settings) -> dict[str, str]:
    """Only the pool's connections get the lock and statement timeouts: the dedicated ones
    (migrations, the relay's advisory lock, LISTEN) may rightly wait or run long."""
    return {
        "lock_timeout": f"{int(settings.db_lock_timeout * 1000)}ms",
        "statement_timeout": f"{int(settings.db_statement_timeout * 1000)}ms",
    }


class TransactionPooledConnection(asyncpg.Connection):  # type: ignore[misc]
    """A pool connection to a transaction pooler (DATABASE_POOL_MODE=transaction).

    The pooler hands each transaction whichever server connection is free, so a session
    setting would reach one server connection and stay there for other clients, and a
    startup parameter is refused (PgBouncer: "unsupported startup parameter"). The pool's
    timeouts are therefore set per transaction instead: every transaction's first message
    carries ``SET LOCAL`` for both (no extra round trip), and a statement outside a
    transaction runs in one of its own, which costs two round trips (BEGIN, COMMIT) but keeps
    DB_LOCK_TIMEOUT a promise on this path too (tests/test_pgbouncer.py). asyncpg's type
    introspection, which sets ``jit`` for the session and back, runs inside that transaction
    too, so it leaves nothing behind on a server connection.
    """

    # Set on the subclass ``create_pool`` makes per pool: asyncpg builds connections itself,
    # passing no arguments of ours.
    set_local: str = ""

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109 - asyncpg's signature
        if args or self.is_in_transaction():
            return await super().execute(query, *args, timeout=timeout)  # type: ignore[no-any-return]
        # One simple query is one implicit transaction, in which SET LOCAL holds for the rest
        # of it. asyncpg's Transaction.start() sends exactly "BEGIN ...;": the SETs follow it.
        if query.startswith("BEGIN"):
            query = f"{query} {self.set_local}"
        else:
            query = f"{self.set_local} {query}"
        return await super().execute(query, timeout=timeout)  # type: ignore[no-any-return]

    # asyncpg's one path for fetch, fetchrow, fetchval and execute with arguments, and the one
    # for executemany and fetchmany.
    async def _execute(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_in_transaction():
            return await super()._execute(*args, **kwargs)
        async with self.transaction():
            return await super()._execute(*args, **kwargs)

    async def _executemany(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_in_transaction():
            return await super()._executemany(*args, **kwargs)
        async with self.transaction():
            return await super()._executemany(*args, **kwargs)


def _connection_options(settings: Settings) -> dict[str, Any]:
    """How the pool's connections are made, by DATABASE_POOL_MODE."""
    if settings.database_pool_mode != "transaction":
        return {
            "connection_class": asyncpg.Connection,
            "server_settings": {**_SERVER_SETTINGS, **_pool_timeouts(settings)},
        }
    set_local = "".join(f"SET LOCAL {k} = '{v}';" for k, v in _pool_timeouts(settings).items())
    return {
        "connection_class": type(
            "TransactionPooledConnection",
            (TransactionPooledConnection,),
            {"set_local": set_local},
        ),
        "server_settings": _SERVER_SETTINGS,
        # Unnamed statements only, parsed again at every execution: a named one prepared in
        # one transaction would be missing ("prepared statement ... does not exist") or
        # already there ("... already exists") on the server connection of the next one.
        "statement_cache_size": 0,
    }


# Bulkheads. Who is using the pool: a request of some kind (set by shared.web.http from the
# path, refined by a handler with ``use_bulkhead``) or the process's own workers.
ROUTE_KIND: ContextVar[str] = ContextVar("route_kind", default="background")


def use_bulkhead(kind: str) -> None:
    """From here on, this request's connections come out of ``kind``'s share of the pool: a
    handler that learns from the body what it will touch says so before touching it."""
    ROUTE_KIND.set(kind)


def bulkhead_caps(pool_max: int) -> dict[str, int]:
    """How many of the pool's connections each kind of caller may hold at once.

    Kinds: ``widget`` (browser endpoints), ``identity`` (whatever verifies or writes a
    contact: verified logins, authenticate-user), ``api`` (customer backends and platform
    services), ``admin`` (the operator), ``background`` (this process's workers).

    Why semaphores in front of one pool rather than a pool per kind: the connection budget
    (sum over replicas of DB_POOL_MAX, README "Scale-out") stays what it is, and an idle
    kind's connections serve the others. Why these caps: a hot lock parks every request
    that needs the locked table on a connection for up to DB_LOCK_TIMEOUT. Uncapped, the
    parked requests took the whole pool and every endpoint queued behind them; split by path
    alone (widget vs API) it was no better, since verified logins and anonymous sessions share
    a path. ``contacts`` is the table every identity path shares and the one its own
    operations lock hardest (erasure, revocation, merges of contacts), so identity work gets
    its own bulkhead of half the pool: parked there, it leaves the other half to anonymous
    sessions, history and the workers. Any other kind may take three quarters, so whatever
    it does, a quarter is left for the rest (admin, rare and operator-driven, a quarter).
    """
    quarter = max(1, pool_max // 4)
    most = max(1, pool_max - quarter)
    return {
        "widget": most,
        "api": most,
        "background": most,
        "identity": max(1, pool_max // 2),
        "admin": quarter,
    }


class _Acquire:
    """``pool.acquire()`` through the caller's bulkhead, awaitable or ``async with``."""

    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, pool: GuardedPool, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: Any = None

    async def _get(self) -> Any:
        pool = self._pool
        kind = ROUTE_KIND.get()
        slots = pool.bulkheads.get(kind) or pool.bulkheads["background"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        try:
            async with asyncio.timeout_at(deadline):
                await slots.acquire()
        except TimeoutError:
            raise DatabaseBusy(f"no {kind} database slot within {self._timeout} s") from None
        try:
            conn = await asyncpg.Pool.acquire(pool, timeout=max(0.001, deadline - loop.time()))
        except TimeoutError:
            slots.release()
            raise DatabaseBusy(f"no database connection within {self._timeout} s") from None
        except BaseException:
            slots.release()
            raise
        pool.held[conn] = slots
        return conn

    def __await__(self) -> Generator[Any, None, Any]:
        return self._get().__await__()

    async def __aenter__(self) -> Any:
        self._conn = await self._get()
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        await self._pool.release(conn)


class GuardedPool(asyncpg.Pool):  # type: ignore[misc]
    """An asyncpg pool whose every acquire waits at most DB_ACQUIRE_TIMEOUT (asyncpg waits
    forever by default) and goes through the caller's bulkhead (``bulkhead_caps``)."""

    __slots__ = ("acquire_timeout", "bulkheads", "held")

    def __init__(self, *args: Any, acquire_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acquire_timeout = acquire_timeout
        self.bulkheads = {
            kind: asyncio.Semaphore(n) for kind, n in bulkhead_caps(kwargs["max_size"]).items()
        }
        self.held: dict[Any, asyncio.Semaphore] = {}

    def acquire(self, *, timeout: float | None = None) -> _Acquire:
        return _Acquire(self, self.acquire_timeout if timeout is None else timeout)

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 - asyncpg's signature
        try:
            await super().release(connection, timeout=timeout)
        finally:
            slots = self.held.pop(connection, None)
            if slots is not None:
                slots.release()


async def create_pool(settings: Settings, *, min_size: int | None = None) -> asyncpg.Pool:
    try:
        # asyncpg.create_pool's own body, with our pool class (it takes no pool_class).
        pool = GuardedPool(
            settings.database_url,
            acquire_timeout=settings.db_acquire_timeout,
            record_class=asyncpg.Record,
            min_size=settings.db_pool_min if min_size is None else min_size,
            max_size=settings.db_pool_max,
            max_queries=50000,
            max_inactive_connection_lifetime=300.0,
            loop=None,
            command_timeout=settings.db_command_timeout,
            init=_init_connection,
            reset=_no_session_state,
            **_connection_options(settings),
            # A dead server must not hang start-up or a request forever.
            timeout=10,
        )
        await pool
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise ConfigError(f"DATABASE_URL: cannot connect ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:  # asyncpg's DSN parser
        raise ConfigError(f"DATABASE_URL: malformed ({exc})") from None
    return pool


def session_url_name(settings: Settings) -> str:
    """The variable ``connect()`` takes its URL from, for messages that name it."""
    return "DATABASE_DIRECT_URL" if settings.database_direct_url else "DATABASE_URL"


async def connect(settings: Settings) -> asyncpg.Connection:
    """One dedicated connection (migrations, LISTEN, advisory-lock holders): a Postgres
    session of its own, so DATABASE_DIRECT_URL when given."""
    name = session_url_name(settings)
    try:
        conn: asyncpg.Connection = await asyncpg.connect(
            settings.database_session_url, timeout=10, server_settings=_SERVER_SETTINGS
        )
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise ConfigError(f"{name}: cannot connect ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        raise ConfigError(f"{name}: malformed ({exc})") from None
    await _init_connection(conn)
    return conn


def pool_context(settings: Settings) -> Any:
    """An aiohttp cleanup context that opens the pool at start-up and closes it last."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        pool = await create_pool(settings)
        app[DB_POOL] = pool
        yield
        # Give borrowers what is left of the shutdown budget to return connections, then cut
        # them off.
        try:
            left = shutdown_of(app).left(settings.shutdown_timeout)
            await asyncio.wait_for(pool.close(), timeout=max(0.1, left))
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
