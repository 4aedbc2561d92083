"""The connection pool: what a request leaves behind is never seen by the next one, and a
database that drops connections is only ever a 503 to clients."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Coroutine
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from devstack import DevServers
from services import all_in_one
from shared.config import Settings
from shared.db import create_pool, is_transient
from tests.conftest import ADMIN_TOKEN
from tests.support.load import Outcome, bad_log_lines, call, client
from tests.support.server import Api, eventually, running
from tests.support.tokens import OrgFixture, mint_contact_token, provision_org


async def test_a_connection_abandoned_mid_transaction_comes_back_rolled_back(
    settings: Settings,
) -> None:
    pool = await create_pool(settings.with_overrides(db_pool_min=1, db_pool_max=1))
    try:
        await pool.execute("CREATE TABLE pool_probe (n int)")
        started = asyncio.Event()

        async def interrupted() -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("INSERT INTO pool_probe VALUES (1)")
                started.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(interrupted())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Also a transaction opened by hand and never closed.
        async with pool.acquire() as conn:
            await conn.execute("BEGIN; INSERT INTO pool_probe VALUES (2)")
        async with pool.acquire() as conn:  # the pool's only connection, both times
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM pool_probe") == 0
    finally:
        await pool.close()


# --- every database failure a client can see is a 503 ---------------------------------------


def _mixed_request(
    api: Api, org: OrgFixture, contact_id: str, session_id: str, contact_token: str, i: int
) -> Coroutine[Any, Any, Outcome]:
    """One of seven calls that each reach Postgres differently: reads, writes in a
    transaction, the outbox, the admin API, and a login that verifies a contact token."""
    origin = {"Origin": org.origins[0]}
    kind = i % 7
    if kind == 0:
        return call(
            api,
            "session",
            "POST",
            "/widget/sessions",
            t0=0,
            headers=origin,
            json={"widgetToken": org.widget_token},
        )
    if kind == 1:
        return call(
            api, "history", "GET", f"/v1/contacts/{contact_id}/history", t0=0, token=org.api_key
        )
    if kind == 2:
        return call(
            api,
            "mint",
            "POST",
            "/widget/authenticate-user",
            t0=0,
            token=org.api_key,
            json={"userId": f"u-{i}"},
        )
    if kind == 3:
        return call(
            api,
            "message",
            "POST",
            "/v1/conversations",
            t0=0,
            token=org.api_key,
            json={"sessionId": session_id, "message": {"text": f"hello {i}"}},
        )
    if kind == 4:
        return call(api, "admin", "GET", f"/admin/v1/orgs/{org.org_id}", t0=0, token=ADMIN_TOKEN)
    if kind == 5:
        return call(
            api, "session-read", "GET", f"/v1/sessions/{session_id}", t0=0, token=org.api_key
        )
    return call(
        api,
        "login",
        "POST",
        "/widget/sessions",
        t0=0,
        headers=origin,
        json={"widgetToken": org.widget_token, "user": {"token": contact_token}},
    )


@pytest.mark.slow
async def test_backends_killed_under_load_give_only_2xx_or_503_with_retry_after(
    settings: Settings, servers: DevServers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    db_name = urlsplit(settings.database_url).path.lstrip("/")
    app = all_in_one.create_app(settings.with_overrides(db_pool_max=10))
    async with running(app) as started, client(started, timeout=30.0) as api:
        org = await provision_org(api)
        minted = await mint_contact_token(api, org, userId="u-kill", email="k@example.com")
        session = await api.post(
            "/widget/sessions",
            json={"widgetToken": org.widget_token},
            headers={"Origin": org.origins[0]},
        )
        assert session.status == 200, session.body
        args = (org, minted["contactId"], session.json["sessionId"], minted["token"])

        killer_conn = await asyncpg.connect(servers.database_url)
        stop = asyncio.Event()
        kills = 0

        async def killer() -> None:
            nonlocal kills
            while not stop.is_set():
                kills += await killer_conn.fetchval(
                    """SELECT count(*) FROM (
                         SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE datname = $1 AND pid <> pg_backend_pid()) AS killed""",
                    db_name,
                )
                await asyncio.sleep(0.1)

        killing = asyncio.create_task(killer())
        try:
            outcomes: list[Outcome] = []
            for _ in range(3):
                outcomes += await asyncio.gather(
                    *(_mixed_request(api, *args, i) for i in range(140))
                )
        finally:
            stop.set()
            await killing
            await killer_conn.close()

        # Once the killing stops, every kind of call succeeds again within a few seconds.
        async def all_kinds_succeed() -> bool:
            replies = await asyncio.gather(*(_mixed_request(api, *args, i) for i in range(7)))
            return all(200 <= r.status < 300 for r in replies)

        await eventually(all_kinds_succeed, timeout=10.0, interval=0.2)

    answers = Counter(
        (o.kind, o.status, o.body.get("code", "") if isinstance(o.body, dict) else "")
        for o in outcomes
    )
    print(f"\n{kills} backends killed; answers {dict(sorted(answers.items()))}")
    assert kills > 0
    wrong = [
        (o.kind, o.status, o.body)
        for o in outcomes
        if not (200 <= o.status < 300 or (o.is_problem_503 and o.body["code"] == "db_unavailable"))
    ]
    assert wrong == []
    assert [line for line in bad_log_lines(caplog) if "worker" not in line] == []


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress"
        ),
        asyncpg.exceptions.InterfaceError("connection is closed"),
        asyncpg.exceptions.InterfaceError(
            "cannot perform operation: another operation is in progress"
        ),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle"),
        asyncpg.exceptions.ConnectionFailureError("connection failure"),
        asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        ConnectionResetError(104, "Connection reset by peer"),
        BrokenPipeError(32, "Broken pipe"),
        TimeoutError(),  # a pool acquire or command timeout
        ExceptionGroup("both", [ConnectionResetError(), TimeoutError()]),
    ],
    ids=type,
)
def test_connection_loss_in_any_form_is_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.DataError("invalid input for query argument $1"),
        asyncpg.exceptions.UndefinedColumnError("column does not exist"),
        asyncpg.exceptions.UniqueViolationError("duplicate key"),
        ValueError("a bug"),
        KeyError("a bug"),
        ExceptionGroup("mixed", [ConnectionResetError(), KeyError("a bug")]),
    ],
    ids=type,
)
def test_a_bug_is_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc)


async def test_lock_and_statement_timeouts_free_the_connection_as_transient_busy_errors(
    settings: Settings,
) -> None:
    """A pool connection waits at most DB_LOCK_TIMEOUT for a lock and runs a statement at
    most DB_STATEMENT_TIMEOUT; both failures are transient (503 db_busy, consumers retry),
    and the pool's connections keep working afterwards."""
    from shared.db import is_busy

    pool = await create_pool(
        settings.with_overrides(db_lock_timeout=0.2, db_statement_timeout=0.5, db_pool_max=2)
    )
    holder = await asyncpg.connect(settings.database_url)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE orgs IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(asyncpg.exceptions.LockNotAvailableError) as locked:
                await pool.fetchval("SELECT count(*) FROM orgs")
        with pytest.raises(asyncpg.exceptions.QueryCanceledError) as slow:
            await pool.execute("SELECT pg_sleep(2)")
        for caught in (locked.value, slow.value):
            assert is_transient(caught) and is_busy(caught)
        assert await pool.fetchval("SELECT count(*) FROM orgs") == 0
    finally:
        await holder.close()
        await pool.close()


async def test_a_full_bulkhead_is_a_transient_busy_error_for_its_kind_only(
    settings: Settings,
) -> None:
    """A kind of caller holding its whole share waits at most DB_ACQUIRE_TIMEOUT for more,
    then gets DatabaseBusy; another kind still gets a connection at once."""
    from shared.db import ROUTE_KIND, DatabaseBusy, bulkhead_caps, is_busy

    pool = await create_pool(settings.with_overrides(db_pool_max=4, db_acquire_timeout=0.3))
    share = bulkhead_caps(4)["identity"]
    try:
        token = ROUTE_KIND.set("identity")
        held = [await pool.acquire() for _ in range(share)]
        with pytest.raises(DatabaseBusy) as full:
            await pool.acquire()
        assert is_transient(full.value) and is_busy(full.value)
        ROUTE_KIND.reset(token)
        assert await pool.fetchval("SELECT 1") == 1  # another kind (background)
        for conn in held:
            await pool.release(conn)
        token = ROUTE_KIND.set("identity")
        assert await pool.fetchval("SELECT 1") == 1  # the share is back
        ROUTE_KIND.reset(token)
    finally:
        await pool.close()
