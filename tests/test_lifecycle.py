"""Operations: a process drains on SIGTERM, reports readiness honestly, and stops cleanly
on bad configuration with one line instead of a traceback."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from base64 import urlsafe_b64encode

import aiohttp
import pytest

from devstack import DevServers
from shared.config import Settings
from tests.support.server import eventually

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(settings: Settings, port: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "STREAM_PREFIX": settings.stream_prefix,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "LOG_JSON": "false",
        **extra,
    }


# Interpreter start-up aside, what exiting may take beyond SHUTDOWN_TIMEOUT.
EXIT_SLACK = 2.0


@pytest.mark.slow
async def test_sigterm_finishes_in_flight_requests_turns_unready_and_exits_zero(
    settings: Settings,
) -> None:
    """The process also runs a worker that ignores its stop: it is cancelled in time, and the
    whole shutdown fits in SHUTDOWN_TIMEOUT (it once took 31 s against a budget of 25)."""
    port = free_port()
    shutdown_timeout = 6.0
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.slow_app"],
        env=service_env(settings, port, DRAIN_DELAY="1.5", SHUTDOWN_TIMEOUT=str(shutdown_timeout)),
        cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                try:
                    async with session.get(base + "/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(ready, timeout=30)

            async def slow_call() -> int:
                async with session.get(base + "/slow?seconds=1.0") as resp:
                    return resp.status

            in_flight = [asyncio.create_task(slow_call()) for _ in range(50)]
            await asyncio.sleep(0.3)  # all fifty are now inside the handler
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.2)
            async with session.get(base + "/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["status"] == "draining"
            statuses = await asyncio.gather(*in_flight)
        assert statuses == [200] * 50
        assert await asyncio.to_thread(proc.wait, 30) == 0
        took = time.monotonic() - signalled
        print(f"\nSIGTERM to exit: {took:.1f} s (SHUTDOWN_TIMEOUT {shutdown_timeout:g} s)")
        assert took < shutdown_timeout + EXIT_SLACK
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
async def test_sigterm_under_keep_alive_load_drains_cleanly_and_exits_zero_in_budget(
    settings: Settings,
) -> None:
    """``widget-identity serve all`` under keep-alive load, then SIGTERM: /readyz answers 503
    at once and for the whole drain delay while requests still succeed; every answer from
    then on says ``Connection: close``, so no keep-alive client has a request cut under it;
    the process exits 0 within SHUTDOWN_TIMEOUT.

    The clients behave like a load balancer's: once told ``Connection: close`` (or once the
    drain delay is nearly over) they take their next request elsewhere."""
    port = free_port()
    drain_delay, shutdown_timeout = 2.0, 8.0
    env = service_env(
        settings,
        port,
        DRAIN_DELAY=str(drain_delay),
        SHUTDOWN_TIMEOUT=str(shutdown_timeout),
        ADMIN_TOKEN="admin-" + secrets.token_hex(16),
        KEY_ENCRYPTION_KEY=urlsafe_b64encode(secrets.token_bytes(32)).decode(),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "all"], env=env, cwd=ROOT
    )
    base = f"http://127.0.0.1:{port}"
    signalled: float | None = None
    try:
        async with aiohttp.ClientSession() as probes:

            async def ready() -> bool:
                try:
                    async with probes.get(base + "/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(ready, timeout=30)

            # (seconds after SIGTERM or None before it, status, Connection header)
            answers: list[tuple[float | None, int, str]] = []
            failures: list[str] = []
            sigterm_sent = asyncio.Event()

            def since() -> float | None:
                return None if signalled is None else time.monotonic() - signalled

            async def keep_alive_client() -> None:
                connector = aiohttp.TCPConnector(limit=1)  # one connection, reused
                async with aiohttp.ClientSession(connector=connector) as session:
                    while True:
                        try:
                            async with session.get(base + "/.well-known/jwks.json") as resp:
                                await resp.read()
                                answers.append(
                                    (since(), resp.status, resp.headers.get("Connection", ""))
                                )
                                if resp.headers.get("Connection", "").lower() == "close":
                                    return  # reconnect elsewhere
                        except aiohttp.ClientError as exc:
                            failures.append(repr(exc))
                            return

            async def readiness() -> list[tuple[float, int, str]]:
                seen: list[tuple[float, int, str]] = []
                while True:
                    after = since()
                    if after is not None and after > drain_delay - 0.3:
                        return seen
                    async with probes.get(base + "/readyz") as resp:
                        if after is not None:
                            seen.append((after, resp.status, (await resp.json())["status"]))
                    await asyncio.sleep(0.1)

            async def late_request() -> int:
                """A request on a new connection in the middle of the drain delay."""
                await sigterm_sent.wait()
                await asyncio.sleep(drain_delay / 2)
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(base + "/.well-known/jwks.json") as resp,
                ):
                    assert resp.headers.get("Connection", "").lower() == "close"
                    return resp.status

            clients = [asyncio.create_task(keep_alive_client()) for _ in range(20)]
            polls = asyncio.create_task(readiness())
            late = asyncio.create_task(late_request())
            await asyncio.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            sigterm_sent.set()
            await asyncio.gather(*clients)
            draining = await polls
            assert await late == 200
        code = await asyncio.to_thread(proc.wait, 30)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()

    before = [a for a in answers if a[0] is None]
    after = [a for a in answers if a[0] is not None]
    print(
        f"\nSIGTERM under keep-alive load: {len(before)} answers before it, {len(after)} after "
        f"(Connection: {sorted({c for _, _, c in after})}); /readyz {sorted({s for _, s, _ in draining})} "
        f"from {draining[0][0]:.2f} s to {draining[-1][0]:.2f} s after it; exit {code} after {took:.1f} s"
    )
    assert failures == [], "a keep-alive client had a request cut"
    assert {status for _, status, _ in answers} == {200}
    assert before, "no load before SIGTERM"
    # Every client was told to close (that is how each one stopped) once the signal had
    # reached the server; only an answer already on its way then may not say so.
    assert len([a for a in after if a[2].lower() == "close"]) == len(clients)
    assert [t for t, _, c in after if c.lower() != "close" and t is not None and t > 0.2] == []
    assert {(status, body) for _, status, body in draining} == {(503, "draining")}
    assert draining[0][0] < 0.5 and draining[-1][0] > drain_delay - 0.6
    assert code == 0
    assert took < shutdown_timeout + EXIT_SLACK


async def test_healthz_is_up_while_readyz_reports_a_dead_dependency(settings: Settings) -> None:
    from shared.service import service_app
    from tests.support.server import running

    app = service_app(settings.with_overrides(relay_enabled=False), name="probe-test")
    async with running(app) as api:
        assert (await api.get("/healthz")).status == 200
        ready = await api.get("/readyz")
        assert ready.status == 200
        assert ready.body["checks"] == ["postgres", "redis"]
        from shared.lifecycle import READINESS

        async def dead() -> None:
            raise ConnectionError("down")

        # A dead Redis: still ready, degraded (sessions answer from Postgres).
        redis_check = app[READINESS].checks["redis"]
        app[READINESS].checks["redis"] = dead
        degraded = await api.get("/readyz")
        assert degraded.status == 200
        assert degraded.body["status"] == "degraded"
        assert degraded.body["degraded"] == {"redis": "ConnectionError"}
        # A dead Postgres: nothing can be served.
        app[READINESS].checks["redis"] = redis_check
        app[READINESS].checks["postgres"] = dead
        unready = await api.get("/readyz")
        assert unready.status == 503
        assert unready.body["failed"] == {"postgres": "ConnectionError"}
        assert (await api.get("/healthz")).status == 200
        metrics = await api.get("/metrics")
        assert 'wi_http_requests_total{method="GET",route="/readyz",status="503"}' in metrics.body


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATABASE_URL": "not a url"}, "DATABASE_URL: scheme"),
        ({"DATABASE_URL": "postgresql://u@127.0.0.1:1/db"}, "DATABASE_URL: cannot connect"),
        ({"PORT": "eighty"}, "PORT: cannot parse"),
        ({"KEY_ENCRYPTION_KEY": "c2hvcnQ"}, "KEY_ENCRYPTION_KEY: must decode to 32 bytes"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL: scheme"),
    ],
)
def test_bad_configuration_stops_with_one_clear_line(
    servers: DevServers, env: dict[str, str], message: str
) -> None:
    full = {
        **os.environ,
        "DATABASE_URL": servers.database_url,
        "REDIS_URL": servers.redis_url,
        "LOG_JSON": "false",
        **env,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "migrate"],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("widget-identity: error: ")
    assert message in lines[0]
    assert "Traceback" not in proc.stderr


def test_unreachable_redis_stops_serve_with_one_clear_line(settings: Settings) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "all"],
        env=service_env(settings, free_port(), REDIS_URL="redis://127.0.0.1:1/0"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "widget-identity: error: REDIS_URL: cannot connect" in proc.stderr
    assert "Traceback" not in proc.stderr
