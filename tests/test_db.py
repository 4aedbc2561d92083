"""The connection pool: what a request leaves behind is never seen by the next one."""

from __future__ import annotations

import asyncio

import pytest

from shared.config import Settings
from shared.db import create_pool


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
