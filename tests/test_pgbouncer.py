"""Behind PgBouncer in transaction-pooling mode (README, "Behind PgBouncer"): the services'
pools go through a private PgBouncer (DATABASE_URL, DATABASE_POOL_MODE=transaction), what
needs a Postgres session of its own (migrations, the outbox relay's leader lock and LISTEN)
goes to Postgres itself (DATABASE_DIRECT_URL), and every promise still holds.

PgBouncer gives each database only ``SERVER_CONNECTIONS`` server connections here, fewer
than the clients the tests open, so a statement that needed a session of its own (a kept
prepared statement, a session SET) would meet another client's server connection. Without
the pgbouncer binary these tests skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from devstack import DevServers, PgBouncer, pgbouncer, processes
from services import all_in_one
from services.history.consumers import GROUP
from shared import db
from shared.bus import relay
from shared.config import Settings
from shared.db import create_pool
from tests import test_partitions
from tests.conftest import SERVER_CONNECTIONS
from tests.support.bus import create_effects
from tests.support.journeys import chat_anonymously, log_in, until_merge_done
from tests.support.server import eventually, running
from tests.support.tokens import mint_contact_token, provision_org

DIRECT = "wi-direct"  # application_name of the connections made to DATABASE_DIRECT_URL
ORIGIN = {"Origin": "https://shop.example"}


def with_application_name(url: str, name: str) -> str:
    # asyncpg passes unknown URL parameters to the server as settings.
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query), ("application_name", name)]
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.fixture
def pooled(settings: Settings, bouncer: PgBouncer) -> Settings:
    """This test's settings in the PgBouncer layout; the direct connections are marked so a
    test can tell them from PgBouncer's in pg_stat_activity."""
    return settings.with_overrides(
        database_url=bouncer.url_for(settings.database_url),
        database_direct_url=with_application_name(settings.database_url, DIRECT),
        database_pool_mode="transaction",
    )


@pytest.fixture
async def observer(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test's database, for what only Postgres can tell."""
    conn = await asyncpg.connect(with_application_name(settings.database_url, "wi-observer"))
    yield conn
    await conn.close()


async def pooler_backends(observer: asyncpg.Connection) -> int:
    """Postgres backends of this database that are PgBouncer's server connections."""
    count: int = await observer.fetchval(
        """SELECT count(*) FROM pg_stat_activity
           WHERE datname = current_database() AND backend_type = 'client backend'
             AND application_name NOT IN ($1, 'wi-observer')""",
        DIRECT,
    )
    return count


def no_prepared_statement_errors(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r.getMessage() for r in caplog.records if "prepared statement" in str(r.__dict__)]
    assert bad == [], bad


async def test_a_login_merges_the_browsers_history_once_relayed_over_the_direct_url(
    pooled: Settings, observer: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """Session resolution (anonymous, then a verified login), the history API, the login
    merge applied once by the history consumer from the bus, and erasure: request paths
    through PgBouncer, the relay on DATABASE_DIRECT_URL."""
    caplog.set_level(logging.WARNING)
    async with running(all_in_one.create_app(pooled)) as api:
        org = await provision_org(api)
        chat = await chat_anonymously(api, org)
        assert chat.session["identity"]["level"] == "anonymous"
        minted = await mint_contact_token(api, org, userId="ada", email="ada@example.com")
        login = await log_in(api, org, chat.session["visitorToken"], minted["token"])
        assert login.status == 200, login.body
        assert login.body["identity"]["level"] == "verified"
        assert login.body["identity"]["contactId"] == minted["contactId"]
        merge = login.body["merge"]
        assert merge is not None and merge["status"] == "pending"

        # The overdue-merges worker waits a minute: done before that is the consumer's work,
        # from the event the relay published.
        await until_merge_done(api, org, merge["id"], timeout=15)
        contact = minted["contactId"]
        history = await api.get(f"/v1/contacts/{contact}/history", token=org.api_key)
        assert [c["id"] for c in history.body["conversations"]] == [chat.conversation_id]
        widget = await api.get(
            f"/widget/sessions/{login.body['sessionId']}/history",
            token=login.body["sessionToken"],
            headers=ORIGIN,
        )
        assert widget.status == 200, widget.body
        assert chat.conversation_id in str(widget.body)

        # Once: one merge-requested event, applied once by the consumer, one merged event.
        counts = await observer.fetchrow(
            """SELECT
                 (SELECT count(*) FROM outbox WHERE event_type = 'history.merge_requested')
                   AS requested,
                 (SELECT count(*) FROM outbox WHERE event_type = 'history.merged') AS merged,
                 (SELECT count(*) FROM merges) AS merges,
                 (SELECT count(*) FROM processed_events pe JOIN outbox o
                    ON o.event_id = pe.event_id
                  WHERE pe.consumer = $1 AND o.event_type = 'history.merge_requested')
                   AS applied""",
            GROUP,
        )
        assert dict(counts) == {"requested": 1, "merged": 1, "merges": 1, "applied": 1}

        # The relay leads from a direct connection: the advisory lock is held by a backend
        # that PgBouncer did not open.
        holders = await observer.fetch(
            """SELECT a.application_name FROM pg_locks l
               JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE l.locktype = 'advisory' AND l.database = a.datid
                 AND a.datname = current_database() AND l.objsubid = 1
                 AND ((l.classid::bigint << 32) | l.objid::bigint) = $1""",
            relay._RELAY_LOCK_KEY,
        )
        assert [h["application_name"] for h in holders] == [DIRECT]

        erased = await api.delete(f"/v1/contacts/{contact}", token=org.api_key)
        assert erased.status == 200, erased.body
        assert erased.body["conversationsDeleted"] == 1
        gone = await api.get(f"/v1/contacts/{contact}/history", token=org.api_key)
        assert gone.status == 404, gone.body
        widget = await api.get(
            f"/widget/sessions/{login.body['sessionId']}/history",
            token=login.body["sessionToken"],
            headers=ORIGIN,
        )
        assert widget.status in (401, 404), widget.body

        async def relayed() -> bool:
            unpublished: int = await observer.fetchval(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL"
            )
            return unpublished == 0

        await eventually(relayed, timeout=15)
        assert await observer.fetchval(
            "SELECT count(*) FROM outbox WHERE event_type = 'contact.erased'"
        )
    no_prepared_statement_errors(caplog)


async def test_many_clients_share_few_server_connections_and_every_statement_works(
    pooled: Settings, observer: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """Twelve pooled connections and forty concurrent requests on three server connections:
    every request answers, and no statement meets a prepared statement it did not make."""
    caplog.set_level(logging.WARNING)
    clients = 12
    app_settings = pooled.with_overrides(db_pool_min=clients, db_pool_max=clients)
    async with running(all_in_one.create_app(app_settings)) as api:
        org = await provision_org(api)
        minted = await mint_contact_token(api, org, userId="grace")
        chat = await chat_anonymously(api, org)

        async def one(i: int) -> int:
            if i % 4 == 0:
                reply = await log_in(api, org, chat.session["visitorToken"], minted["token"])
            elif i % 4 == 1:
                reply = await api.post(
                    "/widget/sessions", json={"widgetToken": org.widget_token}, headers=ORIGIN
                )
            elif i % 4 == 2:
                reply = await api.get(
                    f"/v1/visitors/{chat.session['identity']['visitorId']}/history",
                    token=org.api_key,
                )
            else:
                reply = await api.post(
                    "/widget/authenticate-user", json={"userId": f"u{i}"}, token=org.api_key
                )
            assert reply.status == 200, reply.body
            return reply.status

        assert await asyncio.gather(*(one(i) for i in range(40))) == [200] * 40
        assert 1 <= await pooler_backends(observer) <= SERVER_CONNECTIONS
    no_prepared_statement_errors(caplog)


async def test_a_pooled_connections_transactions_run_on_whichever_server_connection_is_free(
    pooled: Settings, observer: asyncpg.Connection
) -> None:
    """The pool's connections really are multiplexed: more clients than backends, so some
    backend served more than one client. Every kind of statement (parameters,
    simple queries, executemany, type introspection) works on whichever it gets."""
    pool = await db.create_pool(pooled.with_overrides(db_pool_min=6, db_pool_max=6))
    try:
        await pool.execute("CREATE TYPE mood AS ENUM ('calm', 'busy')")

        async def work(conn: asyncpg.Connection) -> tuple[int, int]:
            await conn.executemany("SELECT $1::int + $2::int", [(1, 2), (3, 4)])
            assert await conn.fetchval("SELECT 'busy'::mood") == "busy"  # a type to introspect
            assert await conn.execute("SELECT 1") == "SELECT 1"
            backend: int = await conn.fetchval("SELECT pg_backend_pid()")
            await asyncio.sleep(0.01)  # hold the server connection so the others queue
            # The startup's backend key names the client connection: PgBouncer makes one up
            # for each client, unlike pg_backend_pid(), the server connection it runs on.
            client: int = conn.get_server_pid()
            return client, backend

        async def borrowed() -> tuple[int, int]:
            return await db.in_transaction(pool, work)

        pairs = await asyncio.gather(*(borrowed() for _ in range(60)))
        # Outside transactions too: each statement on its own, wherever it lands.
        assert await asyncio.gather(*(pool.fetchval("SELECT $1::int", i) for i in range(60))) == [
            *range(60)
        ]
    finally:
        await pool.close()
    clients, backends = {c for c, _ in pairs}, {b for _, b in pairs}
    # The pool's bulkhead lets this (background) caller hold five of the six at once.
    assert len(backends) <= SERVER_CONNECTIONS < len(clients)


async def test_the_pool_timeouts_hold_per_transaction_and_leave_no_session_setting_behind(
    pooled: Settings, bouncer: PgBouncer
) -> None:
    """DB_LOCK_TIMEOUT and DB_STATEMENT_TIMEOUT bound pooled statements inside and outside
    transactions, as on the direct path (tests/test_db.py), and a plain client of the same
    PgBouncer sees Postgres's defaults: nothing leaked onto the server connections."""
    pool = await db.create_pool(
        pooled.with_overrides(db_lock_timeout=0.2, db_statement_timeout=0.5, db_pool_max=2)
    )
    holder = await asyncpg.connect(pooled.database_session_url)
    plain = await asyncpg.connect(pooled.database_url, statement_cache_size=0)
    try:
        async with pool.acquire() as conn, conn.transaction():
            assert await conn.fetchval("SHOW lock_timeout") == "200ms"
            assert await conn.fetchval("SHOW statement_timeout") == "500ms"
        assert await pool.fetchval("SHOW lock_timeout") == "200ms"
        async with holder.transaction():
            await holder.execute("LOCK TABLE orgs IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(asyncpg.exceptions.LockNotAvailableError) as locked:
                await pool.fetchval("SELECT count(*) FROM orgs")
            with pytest.raises(asyncpg.exceptions.LockNotAvailableError):
                await pool.execute("DELETE FROM orgs")  # the simple-query path
            with pytest.raises(asyncpg.exceptions.LockNotAvailableError):
                await db.in_transaction(pool, lambda c: c.fetchval("SELECT count(*) FROM orgs"))
        with pytest.raises(asyncpg.exceptions.QueryCanceledError) as slow:
            await pool.execute("SELECT pg_sleep(2)")
        assert db.is_busy(locked.value) and db.is_busy(slow.value)
        assert await pool.fetchval("SELECT count(*) FROM orgs") == 0
        for _ in range(SERVER_CONNECTIONS * 2):  # whichever server connection it gets
            assert await plain.fetchval("SHOW lock_timeout") == "0"
            assert await plain.fetchval("SHOW statement_timeout") == "0"
    finally:
        await asyncio.gather(holder.close(), plain.close())
        await pool.close()


async def test_the_pools_time_zone_is_utc_through_pgbouncer_whatever_the_databases_is(
    pooled: Settings, observer: asyncpg.Connection
) -> None:
    """Events render late-bound timestamps in the session's zone (shared.bus.outbox): the
    pool's TimeZone=UTC is a startup parameter PgBouncer keeps per client and sets on
    whichever server connection the client's transaction gets."""
    database = await observer.fetchval("SELECT current_database()")
    await observer.execute(f"ALTER DATABASE \"{database}\" SET timezone TO 'Asia/Kathmandu'")
    other = await asyncpg.connect(
        pooled.database_url, statement_cache_size=0, server_settings={"timezone": "Asia/Tokyo"}
    )
    pool = await db.create_pool(pooled.with_overrides(db_pool_min=4, db_pool_max=4))
    try:
        for _ in range(SERVER_CONNECTIONS * 2):
            zones = await asyncio.gather(
                *(pool.fetchval("SELECT current_setting('TimeZone')") for _ in range(4)),
                other.fetchval("SELECT current_setting('TimeZone')"),
            )
            assert zones == ["UTC"] * 4 + ["Asia/Tokyo"]
    finally:
        await other.close()
        await pool.close()


async def test_migrations_and_dedicated_connections_use_the_direct_url(
    pooled: Settings,
) -> None:
    conn = await db.connect(pooled)
    try:
        assert await conn.fetchval("SHOW application_name") == DIRECT
    finally:
        await conn.close()


def test_devstack_runs_pgbouncer_unprivileged_and_stops_it_without_a_trace(
    servers: DevServers, bouncer: PgBouncer
) -> None:
    """What the benchmark reuses: ``pgbouncer(url)`` starts one on a free port, as the
    devstack user when we are root, and leaves neither process nor files behind."""
    with pgbouncer(servers.database_url, log=lambda _: None) as second:
        assert second.port != bouncer.port
        assert second.url.startswith(f"postgresql://{second.user}:")
        if os.geteuid() == 0:
            assert os.stat(f"/proc/{second.pid}").st_uid != 0
        workdir = second.log_file.parent
        assert processes._alive(second.pid)
    assert not processes._alive(second.pid)
    assert not workdir.exists()


async def test_partitioned_consumers_share_partitions_through_pgbouncer(
    pooled: Settings, redis: aioredis.Redis
) -> None:
    # Leases, heartbeats and the fence in every apply transaction hold no session state, so
    # the partitioned members work with their pools behind the pooler.
    partitioned = pooled.with_overrides(stream_partitions=4, consumer_lease_seconds=2.0)
    pool = await create_pool(partitioned)
    try:
        await test_partitions.test_consumers_scaled_1_3_1_mid_load_apply_every_event_once_in_subject_order(
            partitioned, await create_effects(pool), redis
        )
    finally:
        await pool.close()
