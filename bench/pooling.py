"""The pooled layout of ``make bench``: the session path with Postgres behind PgBouncer in
transaction mode (``DATABASE_POOL_MODE=transaction``) next to the same server on a direct
connection, same machine, same load, one after the other.

What it shows is the price of the pooler per request (an extra hop, no prepared statements,
timeouts set per transaction), not what it buys: the pooler pays off when many replicas
would otherwise open more Postgres connections than the server can run, which one machine
cannot show. Skipped when no ``pgbouncer`` binary is found.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.paths import interleave, row, use_wrk
from bench.procstat import postmaster_pid, redis_pid
from bench.provision import ORIGIN, provision
from bench.runner import Window, run_load, settle
from bench.stack import all_in_one_argv, free_port, process, wait_ready
from bench.wrk import run_wrk
from devstack import DevStackError, pgbouncer
from devstack.binaries import find_pgbouncer
from shared.config import Settings

# As many server connections as the server process's own pool: the comparison is of the
# path, not of a starved pooler.
SERVER_CONNECTIONS = 10


async def run_pooling(args: argparse.Namespace, env: dict[str, str], workdir: Path) -> list[str]:
    try:
        find_pgbouncer()
    except DevStackError as exc:
        return [f"  skipped: {exc} (apt-get install pgbouncer)"]
    lines = [
        f"  (transaction pooling, {SERVER_CONNECTIONS} server connections;"
        f" the server's pool: {env.get('DB_POOL_MAX', '10')} connections either way)"
    ]
    figures: dict[str, dict[str, Window]] = {}
    with pgbouncer(env["DATABASE_URL"], pool_size=SERVER_CONNECTIONS, log=lambda _: None) as pgb:
        layouts = {
            "direct": env,
            "PgBouncer": {
                **env,
                "DATABASE_URL": pgb.url_for(env["DATABASE_URL"]),
                "DATABASE_DIRECT_URL": env["DATABASE_URL"],
                "DATABASE_POOL_MODE": "transaction",
            },
        }
        for layout, layout_env in layouts.items():
            figures[layout] = await _measure(args, layout_env, env, workdir, layout)
            for path, window in figures[layout].items():
                lines.extend(row(f"{path}, {layout}", window))
    for path in figures["direct"]:
        direct, pooled = figures["direct"][path], figures["PgBouncer"][path]
        lines.append(
            f"    -> {path}: PgBouncer {pooled.result['rps'] / max(direct.result['rps'], 1e-9):.2f}x"
            f" direct's throughput, p99 {pooled.result['p99_ms']:.1f} vs"
            f" {direct.result['p99_ms']:.1f} ms"
        )
    return lines


async def _measure(
    args: argparse.Namespace,
    layout_env: dict[str, str],
    env: dict[str, str],
    workdir: Path,
    layout: str,
) -> dict[str, Window]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = workdir / f"server-{layout.lower()}.log"
    stream = Settings.from_env(env).event_streams[0]
    with process(all_in_one_argv(), {**layout_env, "PORT": str(port)}, log) as app:
        await wait_ready(base + "/readyz", app, log)
        data = await provision(base, env["ADMIN_TOKEN"], users=200, anonymous=200)
        # Postgres and Redis are measured directly; PgBouncer's own CPU shows in neither.
        shared = {
            "postgres": await postmaster_pid(env["DATABASE_URL"]),
            "redis": await redis_pid(env["REDIS_URL"]),
        }
        common = {"concurrency": args.concurrency, "duration": args.duration, "warmup": args.warmup}
        origin = {"Origin": ORIGIN}
        specs: dict[str, dict[str, Any]] = {
            "POST /widget/sessions (returning, 50% verified)": {
                "requests": [
                    {"path": "/widget/sessions", "body": b, "headers": origin}
                    for b in interleave(data["anonymous"], data["verified"])
                ]
            },
            "POST /widget/sessions (new visitor)": {
                "requests": [
                    {
                        "path": "/widget/sessions",
                        "body": {"widgetToken": data["widget"]},
                        "headers": origin,
                    }
                ]
            },
        }
        windows: dict[str, Window] = {}
        for path, spec in specs.items():
            await settle(env["DATABASE_URL"], env["REDIS_URL"], stream)
            full = {**common, **spec, "base_url": base}
            measured = {"server": app.pid, **shared}
            windows[path] = await (
                run_wrk(full, workdir, measured)
                if use_wrk(args)
                else run_load(full, workdir, measured)
            )
        return windows
