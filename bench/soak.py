"""``make soak``: does the all-in-one server's memory stay flat under a long mixed load?

The target (docs/promises.md, "Targets"): "no unbounded memory growth over a 10-minute soak". The all-in-one
server (every service, its consumers and the outbox relay in one process) gets a closed-loop
mix of authenticate-user (new and returning contacts), POST /widget/sessions (new anonymous,
returning anonymous, returning verified visitors) and session history reads. Its RSS is
sampled every 10 s from the end of the warm-up to the end.

Verdict: a one-time growth (pools, caches filling, allocator arenas) is not a leak, so the
verdict uses the least-squares slope over the second half of the run only, extrapolated to
10 minutes: "flat" when that is below FLAT_PERCENT of the final RSS.

``--tracemalloc`` (or BENCH_TRACEMALLOC=1) runs the server under bench/traced.py and prints
the allocation sites and object types that grew between the end of the warm-up and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tracemalloc
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench.procstat import rss_bytes, tree
from bench.provision import ORIGIN, provision
from bench.runner import run_load
from bench.stack import all_in_one_argv, free_port, process, wait_ready
from bench.traced import load_types

SAMPLE_EVERY = 10.0
FLAT_PERCENT = 5.0  # of the final RSS per 10 minutes, from the second half's slope
MB = 1 << 20


def mix(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """One request of each kind per step, each kind cycling through its own visitors."""
    auth = {"Authorization": f"Bearer {key}"}
    origin = {"Origin": ORIGIN}
    requests: list[dict[str, Any]] = []
    for i, (session_id, token) in enumerate(data["sessions"]):
        u = i % len(data["verified"])
        requests += [
            {
                "path": "/widget/authenticate-user",
                "body": {"userId": "soak-{n}", "email": "soak{n}@bench.example"},
                "headers": auth,
                "unique": True,
            },
            {
                "path": "/widget/authenticate-user",
                "body": {"userId": f"user-{u}", "email": f"user{u}@bench.example"},
                "headers": auth,
            },
            {
                "path": "/widget/sessions",
                "body": {"widgetToken": data["widget"]},
                "headers": origin,
            },
            {
                "path": "/widget/sessions",
                "body": data["anonymous"][i % len(data["anonymous"])],
                "headers": origin,
            },
            {"path": "/widget/sessions", "body": data["verified"][u], "headers": origin},
            {
                "method": "GET",
                "path": f"/widget/sessions/{session_id}/history",
                "headers": {**origin, "Authorization": f"Bearer {token}"},
            },
        ]
    return requests


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def report(samples: list[tuple[float, float]], seconds: float) -> list[str]:
    """``samples``: (seconds since the end of the warm-up, RSS in MB)."""
    lines, row = ["  server RSS (MB), every minute and at the end:"], []
    marks = {
        min(samples, key=lambda s: abs(s[0] - m * 60)) for m in range(int(samples[-1][0] // 60) + 1)
    }
    labels = {f"{int(t) // 60:>2}:{int(t) % 60:02d}": mb for t, mb in sorted(marks | {samples[-1]})}
    for label, mb in labels.items():  # the last sample wins a label it shares with a mark
        row.append(f"{label} {mb:7.1f}")
        if len(row) == 6:
            lines.append("    " + "  |".join(row))
            row = []
    if row:
        lines.append("    " + "  |".join(row))
    start, end = samples[0][1], samples[-1][1]
    half = [s for s in samples if s[0] >= samples[-1][0] / 2]
    late = slope(half) * 600 if len(half) >= 3 else float("nan")
    verdict = "flat" if late * 100 / end < FLAT_PERCENT else "GROWING"
    if seconds < 300:
        verdict = f"no verdict: {seconds:.0f} s is too short a run to judge"
    lines += [
        f"  RSS at the end of warm-up {start:.1f} MB, at the end {end:.1f} MB: "
        f"{end - start:+.1f} MB in {seconds:.0f} s = {(end - start) * 600 / seconds:+.1f} MB per 10 min",
        f"  second half ({len(half)} samples) slope {late:+.2f} MB per 10 min"
        f" = {late * 100 / end:+.2f}% of RSS",
        f"  -> {verdict}"
        f" (flat = second-half slope under {FLAT_PERCENT:.0f}% of RSS per 10 min;"
        " target: no unbounded memory growth over a 10-minute soak)",
    ]
    return lines


async def redis_memory(url: str) -> tuple[float, int]:
    """Redis's used memory in MB and the events stream's length: the stream is the one
    thing there that grows with traffic by design, unless something trims it."""
    client = aioredis.Redis.from_url(url)
    try:
        info = await client.info("memory")
        length = await client.xlen("wi:events")
    finally:
        await client.aclose()
    return int(info["used_memory"]) / MB, int(length)


async def snapshot(pid: int, trace_dir: Path, n: int) -> None:
    """Ask bench/traced.py in the server for its n-th heap snapshot; wait until written."""
    os.kill(pid, signal.SIGUSR2)
    for _ in range(1200):
        if (trace_dir / f"types-{n}.json").exists():
            return
        await asyncio.sleep(0.1)
    raise SystemExit("the traced server wrote no snapshot within 120 s")


def growth(trace_dir: Path) -> list[str]:
    first = tracemalloc.Snapshot.load(str(trace_dir / "heap-0.pickle"))
    last = tracemalloc.Snapshot.load(str(trace_dir / "heap-1.pickle"))
    lines = ["  tracemalloc: allocation sites that grew most (end of warm-up -> end):"]
    for stat in last.compare_to(first, "lineno")[:15]:
        frame = stat.traceback[0]
        lines.append(
            f"    {stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks"
            f"  {frame.filename}:{frame.lineno}"
        )
    before, after = load_types(trace_dir / "types-0.json"), load_types(trace_dir / "types-1.json")
    grown = sorted(((after[t] - before.get(t, 0), t) for t in after), reverse=True)[:15]
    lines.append("  gc-tracked objects by type that grew most:")
    lines += [f"    {d:+9d}  {t} (now {after[t]})" for d, t in grown if d > 0]
    return lines


async def run_soak(args: argparse.Namespace, env: dict[str, str], workdir: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    trace_dir = workdir / "trace"
    trace_dir.mkdir()
    # At soak rates (every request an event) the default one-hour stream retention would hold
    # gigabytes; two minutes shows the trimming keeps Redis bounded within the soak.
    server_env = {
        **env,
        "PORT": str(port),
        "BENCH_TRACE_DIR": str(trace_dir),
        "STREAM_RETENTION_SECONDS": "120",
    }
    log = workdir / "soak-server.log"
    with process(all_in_one_argv(traced=args.tracemalloc), server_env, log) as server:
        await wait_ready(base + "/readyz", server, log)
        data = await provision(
            base, env["ADMIN_TOKEN"], users=200, anonymous=200, conversations=True
        )
        samples: list[tuple[float, float]] = []
        snaps: list[asyncio.Task[None]] = []

        def sample(t: float) -> None:
            samples.append((t, rss_bytes(tree(server.pid)) / MB))
            if args.tracemalloc and not snaps:
                snaps.append(asyncio.ensure_future(snapshot(server.pid, trace_dir, 0)))

        redis_before = await redis_memory(env["REDIS_URL"])
        window = await run_load(
            {
                "base_url": base,
                "concurrency": args.concurrency,
                "duration": args.soak,
                "warmup": args.soak_warmup,
                "requests": mix(data, data["key"]),
            },
            workdir,
            {"server": server.pid},
            tick=sample,
            every=SAMPLE_EVERY,
        )
        sample(window.seconds)
        if args.tracemalloc:
            await asyncio.gather(*snaps)
            await snapshot(server.pid, trace_dir, 1)
        redis_after = await redis_memory(env["REDIS_URL"])
        if server.poll() is not None:
            raise SystemExit(f"the server died during the soak; see {log}")

    result = window.result
    bad = {k: v for k, v in result["statuses"].items() if not k.startswith("2")}
    lines = [
        f"  load: {result['requests']:,} requests in {window.seconds:.0f} s = {result['rps']:.0f} req/s"
        f" (p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms), non-2xx/errors {bad or 0};"
        f" server CPU {window.per_request_us('server'):,.0f} µs/request",
        *report(samples, window.seconds),
        f"  (Redis used_memory {redis_before[0]:.1f} -> {redis_after[0]:.1f} MB,"
        f" events stream {redis_before[1]:,} -> {redis_after[1]:,} entries)",
    ]
    if args.tracemalloc:
        lines += growth(trace_dir)
    for line in lines:
        print(line)
