"""Runs the load generator (bench/load.py) in its own process and measures around its
measured window: the CPU each process tree spent between the two edges the load generator
signals (after its warm-up, after its last response), and optional periodic ticks inside the
window (the soak samples memory with them)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bench.procstat import cpu_sample

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Window:
    result: dict[str, Any]  # what bench/load.py printed
    seconds: float  # wall time between the two CPU samples
    cpu: dict[str, float]  # CPU seconds per named process tree inside the window

    def per_request_us(self, name: str) -> float:
        return self.cpu[name] * 1e6 / max(int(self.result["requests"]), 1)

    def cores(self, name: str) -> float:
        return self.cpu[name] / self.seconds


async def run_load(
    spec: dict[str, Any],
    workdir: Path,
    measured: Mapping[str, int],
    *,
    tick: Callable[[float], None] | None = None,
    every: float = 10.0,
) -> Window:
    """Run one load; ``measured`` names the process trees whose CPU to report (the load
    generator itself is added as ``load``). ``tick(seconds into the window)`` is called
    every ``every`` seconds while the window lasts, the first time at its start."""
    path = workdir / f"spec-{secrets.token_hex(4)}.json"
    path.write_text(json.dumps({**spec, "handshake": True}))
    log = workdir / f"{path.stem}.stderr"
    err = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.load",
            str(path),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
    finally:
        os.close(err)
    assert proc.stdin is not None
    assert proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    roots = {**measured, "load": proc.pid}

    async def failed(what: str) -> SystemExit:
        proc.kill()
        await proc.wait()
        return SystemExit(f"load generator: {what}; see {log}:\n{log.read_text()[-2000:]}")

    async def edge(word: str, line: bytes) -> tuple[float, dict[str, float]]:
        if line.strip() != word.encode():
            raise await failed(f"expected {word!r}, got {line[-200:]!r}")
        sample = time.monotonic(), cpu_sample(roots)
        stdin.write(b"go\n")
        await stdin.drain()
        return sample

    began, before = await edge("warm", await stdout.readline())
    pending = asyncio.ensure_future(stdout.readline())
    next_tick = began
    while tick is not None:
        done, _ = await asyncio.wait({pending}, timeout=max(0.0, next_tick - time.monotonic()))
        if done:
            break
        tick(time.monotonic() - began)
        next_tick += every
    ended, after = await edge("done", await pending)
    rest = await stdout.read()
    if await proc.wait() != 0 or not rest.strip():
        raise await failed(f"exit status {proc.returncode}")
    result: dict[str, Any] = json.loads(rest.strip().splitlines()[-1])
    return Window(result, ended - began, {k: after[k] - before[k] for k in roots})


async def settle(
    database_url: str, redis_url: str, streams: Sequence[str], limit: float = 60.0
) -> bool:
    """Wait until the outbox is published and every consumer group has caught up on every
    partition's stream, so one run's events are not processed (and their CPU counted) inside
    the next run's window. False if still busy after ``limit`` seconds."""
    conn = await asyncpg.connect(database_url)
    redis = aioredis.Redis.from_url(redis_url)
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            unpublished = await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL"
            )
            groups = []
            for stream in streams:
                with contextlib.suppress(ResponseError):  # no stream yet: nothing to consume
                    groups += await redis.xinfo_groups(stream)
            if unpublished == 0 and all(
                g["pending"] == 0 and g["lag"] in (0, None) for g in groups
            ):
                return True
            await asyncio.sleep(0.1)
        return False
    finally:
        await conn.close()
        await redis.aclose()
