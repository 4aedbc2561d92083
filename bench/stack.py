"""The stack a bench run measures: private Postgres and Redis, a fresh database migrated by
the real CLI, the environment every server process gets, and server processes themselves."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import asyncpg

from devstack import DevServers
from shared.db import with_database

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


async def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited early; see {log}:\n{log.read_text()[-2000:]}")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"server not ready; see {log}")


async def _create_database(servers_url: str) -> str:
    name = f"wi_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(servers_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return with_database(servers_url, name)


def prepare(servers: DevServers) -> dict[str, str]:
    """A fresh migrated database; returns the environment for every server process."""
    env = {
        **os.environ,
        "DATABASE_URL": asyncio.run(_create_database(servers.database_url)),
        "REDIS_URL": servers.redis_url,
        "ADMIN_TOKEN": secrets.token_urlsafe(24),
        "KEY_ENCRYPTION_KEY": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        "LOG_LEVEL": "WARNING",
        "HOST": "127.0.0.1",
        "DB_POOL_MAX": "10",
        "RATE_AUTHENTICATE_PER_KEY": "100000000",
        "RATE_SESSIONS_PER_IP": "100000000",
        "RATE_SESSIONS_PER_WIDGET_TOKEN": "100000000",
        "RATE_SESSIONS_PER_VISITOR": "100000000",
    }
    subprocess.run(
        [sys.executable, "-m", "services.cli", "migrate"],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return env


def all_in_one_argv(traced: bool = False) -> list[str]:
    """The all-in-one server (every service, its consumers and the outbox relay), optionally
    under bench/traced.py, which can report what its heap holds."""
    wrapper = ["-m", "bench.traced"] if traced else []
    return [sys.executable, *wrapper, "-m", "services.cli", "serve", "all"]
