"""Operations: a process drains on SIGTERM, reports readiness honestly, and stops cleanly
on bad configuration with one line instead of a traceback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

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


@pytest.mark.slow
async def test_sigterm_finishes_in_flight_requests_turns_unready_and_exits_zero(
    settings: Settings,
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.slow_app"],
        env=service_env(settings, port, DRAIN_DELAY="1.5", SHUTDOWN_TIMEOUT="10"),
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
            await asyncio.sleep(0.2)
            async with session.get(base + "/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["status"] == "draining"
            statuses = await asyncio.gather(*in_flight)
        assert statuses == [200] * 50
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_healthz_is_up_while_readyz_reports_a_dead_dependency(settings: Settings) -> None:
    from shared.service import service_app
    from tests.support.server import running

    app = service_app(settings.with_overrides(relay_enabled=False), name="probe-test")
    async with running(app) as api:
        assert (await api.get("/healthz")).status == 200
        ready = await api.get("/readyz")
        assert ready.status == 200
        assert ready.body["checks"] == ["postgres", "redis"]
        # Replace the Redis ping with one that fails, as a dead Redis would.
        from shared.lifecycle import READINESS

        async def dead() -> None:
            raise ConnectionError("redis down")

        app[READINESS].checks["redis"] = dead
        unready = await api.get("/readyz")
        assert unready.status == 503
        assert unready.body["failed"] == {"redis": "ConnectionError"}
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
