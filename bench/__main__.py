"""``make bench``: the hot paths against equal-work floors, the merge consumer, and cost as
the data grows, in one run.

Starts private Postgres and Redis, the all-in-one server and the floor server (bench/floor.py)
as separate processes, each on its own freshly migrated database; provisions both through
their APIs, then drives each path with wrk (bench/wrk.py) when installed, else the Python
generator (bench/load.py) (bench/paths.py). Under each HTTP row, the CPU each process spent
per request inside the measured window. Then the merge consumers (bench/merges.py: 1, 2 and 4
stream partitions with as many consumer processes, each count on its own database) and the
growth section (bench/growth.py: 10^4..10^6 rows, index use of every hot query). Targets are
printed next to the figures; nothing here asserts, because shared machines are noisy: read
the table. ``--quick`` keeps the whole run under five minutes.

``--soak SECONDS`` instead runs the memory soak (bench/soak.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from bench.stack import prepare
from devstack import dev_servers


def partition_counts(text: str) -> tuple[int, ...]:
    """``--partitions 1,2,4``: distinct counts, each 1..1024 (STREAM_PARTITIONS' range)."""
    try:
        counts = tuple(dict.fromkeys(int(part) for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of counts: {text!r}"
        ) from None
    if not counts or not all(1 <= n <= 1024 for n in counts):
        raise argparse.ArgumentTypeError(f"each count must be 1..1024: {text!r}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short runs, growth at 10^4 and 10^5 only, less merge work per partition count"
        " (< 5 minutes)",
    )
    parser.add_argument("--duration", type=float, help="seconds per measured run (10; quick 3)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per run (2; quick 1)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument(
        "--skip-pooling", action="store_true", help="skip the session path through PgBouncer"
    )
    parser.add_argument(
        "--partitions",
        type=partition_counts,
        default=(1, 2, 4),
        metavar="N,N,...",
        help="merge section: stream partition counts, each with as many consumers (1,2,4)",
    )
    parser.add_argument("--skip-growth", action="store_true")
    parser.add_argument(
        "--python-load", action="store_true", help="use bench/load.py even when wrk is installed"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the server under each real path's load; summaries to bench/results/",
    )
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
    started = time.monotonic()
    default_duration = os.environ.get("BENCH_DURATION", "3" if args.quick else "10")
    args.duration = args.duration or float(default_duration)
    args.warmup = args.warmup or (1.0 if args.quick else 2.0)

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
            f"widget-identity bench{' --quick' if args.quick else ''} — {os.cpu_count()} cores,"
            f" concurrency {args.concurrency}, {args.duration:.0f} s per run"
            f" after {args.warmup:.0f} s of warm-up",
            flush=True,
        )
        if not args.skip_http:
            from bench.paths import run_http

            print("paths against their floors (same run, same load generator):", flush=True)
            for line in asyncio.run(run_http(args, env, prepare(servers), workdir)):
                print(line, flush=True)
        if not args.skip_pooling:
            from bench.pooling import run_pooling

            print("the session path through PgBouncer next to direct:", flush=True)
            for line in asyncio.run(run_pooling(args, env, workdir)):
                print(line, flush=True)
        if not args.skip_merge:
            from bench.merges import FULL, QUICK, run_merges

            print("merge consumers, N stream partitions with N consumer processes:", flush=True)
            # A fresh database per count: one count's leases and merges never meet another's.
            envs = {n: prepare(servers) for n in args.partitions}
            scale = QUICK if args.quick else FULL
            for line in asyncio.run(run_merges(envs, workdir, scale)):
                print(line, flush=True)
        if not args.skip_growth:
            from bench.growth import run_growth

            sizes = [10**4, 10**5] if args.quick else [10**4, 10**5, 10**6]
            print("cost as the data grows:", flush=True)
            asyncio.run(run_growth(args, servers, workdir, sizes))
        print(f"(whole run: {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
