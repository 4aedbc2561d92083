"""The HTTP half of ``make bench``: each hot path next to its floor (bench/floor.py), measured
in the same run with the same load generator, with the targets printed beside the figures.

Paths: authenticate-user (returning contacts), a returning visitor's session (half of them
verified), a new visitor's first session, a login with its merge (an anonymous visitor
presenting a contact token for the first time), and the widget's history page.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.procstat import postmaster_pid, redis_pid
from bench.provision import ORIGIN, provision
from bench.runner import Window, run_load, settle
from bench.stack import all_in_one_argv, free_port, process, wait_ready
from bench.wrk import available, run_wrk
from shared.config import Settings

THROUGHPUT_TARGET, P99_TARGET = 0.9, 1.5


def row(name: str, window: Window) -> list[str]:
    result = window.result
    errors = sum(v for k, v in result["statuses"].items() if not str(k).startswith("2"))
    us = window.per_request_us
    return [
        f"  {name:<38} {result['rps']:>8.0f} req/s   p50 {result['p50_ms']:>7.2f} ms"
        f"   p99 {result['p99_ms']:>7.2f} ms   non-2xx {errors}",
        f"      CPU per request: server {us('server'):>6,.0f} µs ({window.cores('server'):.2f} cores)"
        f"   Postgres {us('postgres'):>5,.0f} µs   Redis {us('redis'):>4,.0f} µs"
        f"   (load generator {us('load'):,.0f} µs)",
    ]


def verdict(real: Window, floor: Window) -> str:
    ratio = real.result["rps"] / max(floor.result["rps"], 1e-9)
    p99 = real.result["p99_ms"] / max(floor.result["p99_ms"], 1e-9)
    ok = ratio >= THROUGHPUT_TARGET and p99 <= P99_TARGET
    return (
        f"    -> throughput {ratio:.2f}x floor (target >= {THROUGHPUT_TARGET:.2f}x),"
        f" p99 {p99:.2f}x floor (target <= {P99_TARGET:.2f}x): {'met' if ok else 'MISSED'}"
    )


async def _post_all(
    base: str, bodies: list[dict[str, Any]], path: str, headers: dict[str, str], width: int = 16
) -> list[dict[str, Any]]:
    """POST each body (``width`` at a time); the JSON replies, in order."""
    out: list[dict[str, Any]] = [{}] * len(bodies)
    queue = iter(range(len(bodies)))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            for i in queue:
                async with session.post(base + path, json=bodies[i], headers=headers) as resp:
                    if resp.status != 200:
                        raise SystemExit(f"{path} -> {resp.status}: {await resp.text()}")
                    out[i] = await resp.json()

        await asyncio.gather(*(worker() for _ in range(width)))
    return out


async def provision_floor(
    floor: str, key: str, widget: str, users: int, anonymous: int
) -> dict[str, Any]:
    """Through the floor's own endpoints, as the real service is provisioned through its API."""
    auth = {"Authorization": f"Bearer {key}"}
    tokens = [
        r["token"]
        for r in await _post_all(
            floor,
            [{"userId": f"user-{i}", "email": f"user{i}@bench.example"} for i in range(users)],
            "/floor/authenticate",
            auth,
        )
    ]
    fresh = await _post_all(
        floor, [{"widgetToken": widget}] * (anonymous + users), "/floor/sessions/new", {}
    )
    anon = [{"widgetToken": widget, "visitorToken": r["visitorToken"]} for r in fresh[:anonymous]]
    verified = [
        {"widgetToken": widget, "visitorToken": r["visitorToken"], "user": {"token": t}}
        for r, t in zip(fresh[anonymous:], tokens, strict=True)
    ]
    await _post_all(floor, verified, "/floor/sessions/login", {})
    return {
        "tokens": tokens,
        "anonymous": anon,
        "verified": verified,
        "sessions": fresh[:anonymous],
    }


async def _seed_floor_history(
    database_url: str, org_id: str, sessions: list[dict[str, Any]]
) -> None:
    """One conversation with one message per anonymous floor session, as provision() posts."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """WITH s AS (SELECT visitor_id, gen_random_uuid() AS cid FROM sessions
                          WHERE id = ANY($2::uuid[])),
                    c AS (INSERT INTO conversations (id, org_id, visitor_id, origin_visitor_id)
                          SELECT cid, $1, visitor_id, visitor_id FROM s)
               INSERT INTO messages (id, org_id, conversation_id, author, sender_verified, body)
               SELECT gen_random_uuid(), $1, cid, 'visitor', false, 'hello from the bench' FROM s""",
            org_id,
            [s["sessionId"] for s in sessions],
        )
    finally:
        await conn.close()


async def run_http(
    args: argparse.Namespace, env: dict[str, str], floor_env: dict[str, str], workdir: Path
) -> list[str]:
    app_port, floor_port = free_port(), free_port()
    base, floor = f"http://127.0.0.1:{app_port}", f"http://127.0.0.1:{floor_port}"
    streams = Settings.from_env(env).event_streams
    floor_key, floor_widget = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    lines = [f"  (load generator: {'wrk' if use_wrk(args) else 'bench/load.py (Python)'})"]
    with (
        process(all_in_one_argv(), {**env, "PORT": str(app_port)}, workdir / "server.log") as app,
        process(
            [sys.executable, "-m", "bench.floor"],
            {
                **floor_env,
                "PORT": str(floor_port),
                "FLOOR_API_KEY": floor_key,
                "FLOOR_WIDGET_TOKEN": floor_widget,
            },
            workdir / "floor.log",
        ) as floor_proc,
    ):
        await wait_ready(base + "/readyz", app, workdir / "server.log")
        await wait_ready(floor + "/healthz", floor_proc, workdir / "floor.log")
        async with aiohttp.ClientSession() as s, s.get(floor + "/healthz") as r:
            floor_org = (await r.json())["orgId"]
        users = 200
        data = await provision(
            base, env["ADMIN_TOKEN"], users=users, anonymous=200, conversations=True
        )
        fdata = await provision_floor(floor, floor_key, floor_widget, users=users, anonymous=200)
        await _seed_floor_history(floor_env["DATABASE_URL"], floor_org, fdata["sessions"])
        shared = {
            "postgres": await postmaster_pid(env["DATABASE_URL"]),
            "redis": await redis_pid(env["REDIS_URL"]),
        }
        common = {"concurrency": args.concurrency, "duration": args.duration, "warmup": args.warmup}

        async def measure(server: int, spec: dict[str, Any]) -> Window:
            # The previous run's events must not be relayed and consumed in this window.
            if not await settle(env["DATABASE_URL"], env["REDIS_URL"], streams):
                lines.append("  (warning: events of the previous run still pending)")
            full = {**common, **spec}
            measured = {"server": server, **shared}
            if use_wrk(args):
                return await run_wrk(full, workdir, measured)
            return await run_load(full, workdir, measured)

        async def pair(
            name: str,
            floor_spec: dict[str, Any],
            real_spec: dict[str, Any],
            check: Callable[[], Awaitable[str]] | None = None,
        ) -> tuple[Window, Window]:
            f = await measure(floor_proc.pid, {"base_url": floor, **floor_spec})
            r = await measure(app.pid, {"base_url": base, **real_spec})
            lines.extend(row(f"floor: {name}", f))
            lines.extend(row(name, r))
            lines.append(verdict(r, f))
            if check is not None:
                lines.append(await check())
            return f, r

        origin = {"Origin": ORIGIN}
        # 1. authenticate-user, returning contacts.
        await pair(
            "POST /widget/authenticate-user",
            {
                "requests": [
                    {
                        "path": "/floor/authenticate",
                        "body": {"userId": f"user-{i}", "email": f"user{i}@bench.example"},
                        "headers": {"Authorization": f"Bearer {floor_key}"},
                    }
                    for i in range(users)
                ]
            },
            {
                "requests": [
                    {
                        "path": "/widget/authenticate-user",
                        "body": {"userId": f"user-{i}", "email": f"user{i}@bench.example"},
                        "headers": {"Authorization": f"Bearer {data['key']}"},
                    }
                    for i in range(users)
                ]
            },
        )
        # 2. A returning visitor's session, half of them verified.
        await pair(
            "POST /widget/sessions (returning, 50% verified)",
            {
                "requests": [
                    {"path": "/floor/sessions/returning", "body": b}
                    for b in interleave(fdata["anonymous"], fdata["verified"])
                ]
            },
            {
                "requests": [
                    {"path": "/widget/sessions", "body": b, "headers": origin}
                    for b in interleave(data["anonymous"], data["verified"])
                ]
            },
        )
        # 3. A new visitor's first session.
        f_new, r_new = await pair(
            "POST /widget/sessions (new visitor)",
            {"requests": [{"path": "/floor/sessions/new", "body": {"widgetToken": floor_widget}}]},
            {
                "requests": [
                    {
                        "path": "/widget/sessions",
                        "body": {"widgetToken": data["widget"]},
                        "headers": origin,
                    }
                ]
            },
        )
        # 4. A login with its merge: each visitor once, so enough of them for both windows.
        span = args.warmup + args.duration
        n = max(500, int(max(f_new.result["rps"], r_new.result["rps"]) * span * 1.3))
        real_visitors = await _post_all(
            base, [{"widgetToken": data["widget"]}] * n, "/widget/sessions", origin
        )
        floor_visitors = await _post_all(
            floor, [{"widgetToken": floor_widget}] * n, "/floor/sessions/new", {}
        )
        warm_share = args.warmup / span
        real_tokens = data["tokens"]
        await pair(
            "POST /widget/sessions (login + merge)",
            {
                "warm_share": warm_share,
                "requests": [
                    {
                        "path": "/floor/sessions/login",
                        "body": {
                            "widgetToken": floor_widget,
                            "visitorToken": v["visitorToken"],
                            "user": {"token": fdata["tokens"][i % users]},
                        },
                    }
                    for i, v in enumerate(floor_visitors)
                ],
            },
            {
                "warm_share": warm_share,
                "requests": [
                    {
                        "path": "/widget/sessions",
                        "body": {
                            "widgetToken": data["widget"],
                            "visitorToken": v["visitorToken"],
                            "user": {"token": real_tokens[i % users]},
                        },
                        "headers": origin,
                    }
                    for i, v in enumerate(real_visitors)
                ],
            },
            check=lambda: _merges_recorded(env["DATABASE_URL"], floor_env["DATABASE_URL"], n),
        )
        # 5. The widget's history page (browser-bound sessions, one conversation each).
        anon_sessions = data["sessions"][users:]
        await pair(
            "GET /widget/sessions/{id}/history",
            {
                "requests": [
                    {
                        "method": "GET",
                        "path": f"/floor/sessions/{s['sessionId']}/history",
                        "headers": {"Authorization": f"Bearer {s['sessionToken']}"},
                    }
                    for s in fdata["sessions"]
                ]
            },
            {
                "requests": [
                    {
                        "method": "GET",
                        "path": f"/widget/sessions/{sid}/history",
                        "headers": {**origin, "Authorization": f"Bearer {token}"},
                    }
                    for sid, token in anon_sessions
                ]
            },
        )
        if args.profile:
            from bench.profile import profile_server

            lines += await profile_server(app.pid, base, data, workdir, args)
    lines.append(
        "  (CPU: utime+stime from /proc of each process tree, sampled at the edges of the"
        " measured window; the all-in-one server's includes its outbox relay and consumers)"
    )
    return lines


async def _merges_recorded(real_url: str, floor_url: str, offered: int) -> str:
    counts = []
    for url in (real_url, floor_url):
        conn = await asyncpg.connect(url)
        try:
            counts.append(await conn.fetchval("SELECT count(*) FROM merge_requests"))
        finally:
            await conn.close()
    return (
        f"    (login merges recorded: real {counts[0]:,}, floor {counts[1]:,}, of {offered:,}"
        " one-shot visitors each; past them a login repeats and is a returning visitor)"
    )


def interleave(a: list[Any], b: list[Any]) -> list[Any]:
    return [x for pair in zip(a, b, strict=True) for x in pair]


def use_wrk(args: argparse.Namespace) -> bool:
    return available() and not args.python_load
