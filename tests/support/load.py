"""A load and measurement harness for fault-injection tests: an open-model load generator
whose every request ends in an ``Outcome`` (an answer, or none within the client timeout),
scheduled outages on a ``FaultProxy``, and the gauges the tests read while faults are on
(event-loop lag, open Postgres connections, RSS, log lines that mean a bug)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest

from devstack import DevServers
from tests.support.proxy import FaultProxy
from tests.support.server import Api

CLIENT_TIMEOUT = 8.0  # longer than any budget of the fault tests: no answer by then is a hang


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request of a load run. ``status`` 0: no answer (client timeout or reset)."""

    kind: str
    sent_at: float  # seconds since the load started
    elapsed: float
    status: int
    body: Any
    headers: Mapping[str, str]
    expected: str | None = None  # the id this reply must carry (mismatched replies)
    got: str | None = None

    @property
    def is_problem_503(self) -> bool:
        return (
            self.status == 503
            and self.headers.get("Content-Type", "").startswith("application/problem+json")
            and "Retry-After" in self.headers
        )


@asynccontextmanager
async def client(api: Api, *, timeout: float = CLIENT_TIMEOUT) -> AsyncIterator[Api]:
    """A client to ``api``'s server with a total timeout and no connection cap (aiohttp
    allows 100 per session by default, which would queue our concurrency client-side)."""
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout),
        connector=aiohttp.TCPConnector(limit=0),
    ) as session:
        yield Api(session, api.base_url)


async def call(
    api: Api,
    kind: str,
    method: str,
    path: str,
    *,
    t0: float,
    expected: str | None = None,
    pick: Callable[[Any], str | None] = lambda body: None,
    **kw: Any,
) -> Outcome:
    """``api.request(method, path, **kw)`` as an ``Outcome`` of ``kind``; ``pick`` reads the id
    a 2xx reply carries, to compare with ``expected``."""
    sent = time.monotonic()
    try:
        reply = await api.request(method, path, **kw)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Outcome(kind, sent - t0, time.monotonic() - sent, 0, repr(exc), {})
    got = pick(reply.body) if reply.status < 300 else None
    return Outcome(
        kind,
        sent - t0,
        time.monotonic() - sent,
        reply.status,
        reply.body,
        reply.headers,
        expected=expected,
        got=got,
    )


async def steady_load(
    fire: Callable[[int, float], Coroutine[Any, Any, Outcome]],
    *,
    rps: float,
    seconds: float,
    t0: float,
) -> list[Outcome]:
    """Start request ``i`` at ``t0 + i / rps`` whatever the earlier ones are doing (an open
    model: slow answers do not slow the arrivals down), then wait for all of them."""
    tasks: list[asyncio.Task[Outcome]] = []
    for i in range(int(rps * seconds)):
        await asyncio.sleep(max(0.0, t0 + i / rps - time.monotonic()))
        tasks.append(asyncio.create_task(fire(i, t0)))
    return list(await asyncio.gather(*tasks))


async def outage(proxy: FaultProxy, *, t0: float, cut_at: float, restore_at: float) -> float:
    """Cut the proxy at ``t0 + cut_at``, restore it at ``t0 + restore_at``; return when."""
    await asyncio.sleep(max(0.0, t0 + cut_at - time.monotonic()))
    await proxy.cut()
    await asyncio.sleep(max(0.0, t0 + restore_at - time.monotonic()))
    await proxy.restore()
    return time.monotonic()


@asynccontextmanager
async def loop_lag(period: float = 0.02) -> AsyncIterator[list[float]]:
    """How late a ticker on this event loop wakes up, in seconds, tick by tick."""
    lags: list[float] = []

    async def tick() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(period)
            lags.append(time.monotonic() - before - period)

    ticker = asyncio.create_task(tick())
    try:
        yield lags
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)


def bad_log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log lines that mean a bug rather than an outage: unhandled errors, crashed workers,
    an exhausted (or leaking) Redis connection pool."""
    bad = []
    for record in caplog.records:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + repr(record.exc_info[1])
        if (
            "MaxConnectionsError" in text
            or "Too many connections" in text
            or "No connection available" in text
            or record.getMessage() in {"unhandled error", "worker crashed; restarting"}
        ):
            bad.append(text)
    return bad


def by_kind(outcomes: list[Outcome], kind: str) -> list[Outcome]:
    return [o for o in outcomes if o.kind == kind]


@asynccontextmanager
async def backend_counts(servers: DevServers, database_url: str) -> AsyncIterator[list[int]]:
    """Client connections open on the test's database, sampled every 50 ms on the real
    server (not through the proxy) for as long as the context lasts."""
    name = urlsplit(database_url).path.lstrip("/")
    conn = await asyncpg.connect(servers.database_url)
    counts: list[int] = []

    async def sample() -> None:
        while True:
            counts.append(
                await conn.fetchval(
                    """SELECT count(*) FROM pg_stat_activity
                       WHERE datname = $1 AND backend_type = 'client backend'""",
                    name,
                )
            )
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        yield counts
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        await conn.close()


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")
