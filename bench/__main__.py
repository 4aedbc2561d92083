"""``make bench``: measure the hot paths against a floor measured in the same run.

Starts private Postgres and Redis, the all-in-one server and the floor server (bench/floor.py)
as separate processes, provisions an org through the real admin API, then drives each path
with the closed-loop load generator (bench/load.py) in its own process. Under each HTTP row,
the CPU each process spent per request inside the measured window (bench/runner.py).
Targets (docs/promises.md, "Targets") are printed next to the figures; nothing here asserts, because
shared machines are noisy: read the table.

``--soak SECONDS`` instead runs the memory soak (bench/soak.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.procstat import postmaster_pid, redis_pid
from bench.provision import ORIGIN, provision
from bench.runner import Window, run_load, settle
from bench.stack import all_in_one_argv, free_port, prepare, process, wait_ready
from devstack import dev_servers
from shared.config import Settings


def row(name: str, window: Window) -> list[str]:
    result = window.result
    errors = sum(v for k, v in result["statuses"].items() if not str(k).startswith("2"))
    us = window.per_request_us
    return [
        f"  {name:<34} {result['rps']:>9.0f} req/s   p50 {result['p50_ms']:>7.2f} ms   p99 {result['p99_ms']:>7.2f} ms   non-2xx {errors}",
        f"      CPU per request: server {us('server'):>6,.0f} µs ({window.cores('server'):.2f} cores)"
        f"   Postgres {us('postgres'):>5,.0f} µs   Redis {us('redis'):>4,.0f} µs"
        f"   (load generator {us('load'):,.0f} µs)",
    ]


async def run_http(args: argparse.Namespace, env: dict[str, str], workdir: Path) -> list[str]:
    app_port, floor_port = free_port(), free_port()
    base, floor = f"http://127.0.0.1:{app_port}", f"http://127.0.0.1:{floor_port}"
    stream = Settings.from_env(env).events_stream
    lines: list[str] = []
    with (
        process(all_in_one_argv(), {**env, "PORT": str(app_port)}, workdir / "server.log") as app,
        process(
            [sys.executable, "-m", "bench.floor"],
            {**env, "PORT": str(floor_port)},
            workdir / "floor.log",
        ) as floor_proc,
    ):
        await wait_ready(base + "/readyz", app, workdir / "server.log")
        await wait_ready(floor + "/healthz", floor_proc, workdir / "floor.log")
        data = await provision(base, env["ADMIN_TOKEN"], users=200, anonymous=200)
        shared = {
            "postgres": await postmaster_pid(env["DATABASE_URL"]),
            "redis": await redis_pid(env["REDIS_URL"]),
        }

        common = {"concurrency": args.concurrency, "duration": args.duration, "warmup": args.warmup}

        async def measure(server: int, spec: dict[str, Any]) -> Window:
            # The previous run's events must not be relayed and consumed in this window.
            if not await settle(env["DATABASE_URL"], env["REDIS_URL"], stream):
                lines.append("  (warning: events of the previous run still pending)")
            return await run_load({**common, **spec}, workdir, {"server": server, **shared})

        auth_key = {"Authorization": f"Bearer {data['key']}"}
        floor_auth = await measure(
            floor_proc.pid,
            {
                "base_url": floor,
                "requests": [
                    {"path": "/floor/authenticate", "body": {"id": f"user-{i}"}} for i in range(200)
                ],
            },
        )
        auth = await measure(
            app.pid,
            {
                "base_url": base,
                "requests": [
                    {
                        "path": "/widget/authenticate-user",
                        "body": {"userId": f"user-{i}", "email": f"user{i}@bench.example"},
                        "headers": auth_key,
                    }
                    for i in range(200)
                ],
            },
        )
        mix = [b for pair in zip(data["anonymous"], data["verified"], strict=True) for b in pair]
        floor_session = await measure(
            floor_proc.pid,
            {
                "base_url": floor,
                "requests": [
                    {"path": "/floor/session", "body": {"id": f"v-{i}"}} for i in range(400)
                ],
            },
        )
        sessions = await measure(
            app.pid,
            {
                "base_url": base,
                "requests": [
                    {"path": "/widget/sessions", "body": b, "headers": {"Origin": ORIGIN}}
                    for b in mix
                ],
            },
        )

        lines += row("floor: authenticate", floor_auth)
        lines += row("POST /widget/authenticate-user", auth)
        lines.append(
            f"    -> throughput {auth.result['rps'] / floor_auth.result['rps']:.2f}x floor (target >= 0.80x)"
        )
        lines += row("floor: session", floor_session)
        lines += row("POST /widget/sessions (50% verified)", sessions)
        lines.append(
            f"    -> throughput {sessions.result['rps'] / floor_session.result['rps']:.2f}x floor (target >= 1.00x); "
            f"p99 {sessions.result['p99_ms'] / max(floor_session.result['p99_ms'], 1e-9):.2f}x floor (target <= 1.50x)"
        )
    lines.append(
        "  (CPU: utime+stime from /proc of each process tree, sampled at the edges of the"
        " measured window; the all-in-one server's includes its outbox relay and consumers)"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument(
        "--duration", type=float, default=float(os.environ.get("BENCH_DURATION", "10"))
    )
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument(
        "--soak",
        type=float,
        metavar="SECONDS",
        help="run only the memory soak for SECONDS (make soak: 600)",
    )
    parser.add_argument(
        "--soak-warmup", type=float, default=60.0, help="soak warm-up seconds (default 60)"
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        default=os.environ.get("BENCH_TRACEMALLOC") == "1",
        help="soak: run the server under tracemalloc and print what grew (slow; BENCH_TRACEMALLOC=1)",
    )
    args = parser.parse_args()

    with (
        dev_servers(None, log=lambda line: None) as servers,
        tempfile.TemporaryDirectory(prefix="wi-bench-") as tmp,
    ):
        workdir = Path(tmp)
        env = prepare(servers)
        if args.soak is not None:
            from bench.soak import run_soak

            print(
                f"widget-identity soak — {os.cpu_count()} cores, concurrency {args.concurrency}, "
                f"{args.soak:.0f} s after a {args.soak_warmup:.0f} s warm-up",
                flush=True,
            )
            asyncio.run(run_soak(args, env, workdir))
            return
        print(
            f"widget-identity bench — {os.cpu_count()} cores, concurrency {args.concurrency}, {args.duration:.0f} s per run"
        )
        if not args.skip_http:
            for line in asyncio.run(run_http(args, env, workdir)):
                print(line)
        if not args.skip_merge:
            from bench.merges import run_merges

            for line in asyncio.run(run_merges(env, workdir)):
                print(line)


if __name__ == "__main__":
    main()
