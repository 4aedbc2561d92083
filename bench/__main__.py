"""``make bench``: measure the hot paths against a floor measured in the same run.

Starts private Postgres and Redis, the all-in-one server and the floor server (bench/floor.py)
as separate processes, provisions an org through the real admin API, then drives each path
with the closed-loop load generator (bench/load.py) in its own process. Targets (DESIGN.md
section 7) are printed next to the figures; nothing here asserts, because shared machines
are noisy: read the table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from shared.db import with_database
from shared.devstack import dev_servers

ROOT = Path(__file__).resolve().parent.parent
ORIGIN = "https://bench.example"


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


def load(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    path = workdir / f"spec-{secrets.token_hex(4)}.json"
    path.write_text(json.dumps(spec))
    out = subprocess.run(
        [sys.executable, "-m", "bench.load", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str, admin: str) -> None:
        self.session, self.base, self.admin = session, base, admin

    async def call(self, method: str, path: str, body: Any, token: str, **headers: str) -> Any:
        async with self.session.request(
            method,
            self.base + path,
            json=body,
            headers={"Authorization": f"Bearer {token}", **headers},
        ) as resp:
            data = await resp.json(content_type=None)
            if resp.status >= 300:
                raise SystemExit(f"{method} {path} -> {resp.status}: {data}")
            return data


async def provision(base: str, admin: str, users: int, anonymous: int) -> dict[str, Any]:
    """An org, its API key and widget token, contact tokens, and returning visitors."""
    async with aiohttp.ClientSession() as session:
        c = Client(session, base, admin)
        org = await c.call("POST", "/admin/v1/orgs", {"name": "bench"}, admin)
        key = await c.call(
            "POST",
            f"/admin/v1/orgs/{org['id']}/api-keys",
            {
                "scopes": [
                    "contacts:authenticate",
                    "contacts:manage",
                    "history:read",
                    "history:write",
                    "sessions:read",
                ]
            },
            admin,
        )
        widget = await c.call(
            "POST",
            f"/admin/v1/orgs/{org['id']}/widget-tokens",
            {"allowedOrigins": [ORIGIN], "settings": {}},
            admin,
        )
        tokens = [
            (
                await c.call(
                    "POST",
                    "/widget/authenticate-user",
                    {"userId": f"user-{i}", "email": f"user{i}@bench.example"},
                    key["key"],
                )
            )["token"]
            for i in range(users)
        ]
        verified = []
        for token in tokens:
            body = {"widgetToken": widget["token"], "user": {"token": token}}
            reply = await c.call("POST", "/widget/sessions", body, "", Origin=ORIGIN)
            verified.append(
                {
                    "widgetToken": widget["token"],
                    "visitorToken": reply["visitorToken"],
                    "user": {"token": token},
                }
            )
        anon = []
        for _ in range(anonymous):
            reply = await c.call(
                "POST", "/widget/sessions", {"widgetToken": widget["token"]}, "", Origin=ORIGIN
            )
            anon.append({"widgetToken": widget["token"], "visitorToken": reply["visitorToken"]})
    return {
        "org": org,
        "key": key["key"],
        "widget": widget["token"],
        "verified": verified,
        "anonymous": anon,
    }


def row(name: str, result: dict[str, Any]) -> str:
    errors = sum(v for k, v in result["statuses"].items() if not str(k).startswith("2"))
    return f"  {name:<34} {result['rps']:>9.0f} req/s   p50 {result['p50_ms']:>7.2f} ms   p99 {result['p99_ms']:>7.2f} ms   non-2xx {errors}"


async def run_http(args: argparse.Namespace, env: dict[str, str], workdir: Path) -> list[str]:
    app_port, floor_port = free_port(), free_port()
    base, floor = f"http://127.0.0.1:{app_port}", f"http://127.0.0.1:{floor_port}"
    lines: list[str] = []
    with (
        process(
            [sys.executable, "-m", "services.cli", "serve", "all"],
            {**env, "PORT": str(app_port)},
            workdir / "server.log",
        ) as app,
        process(
            [sys.executable, "-m", "bench.floor"],
            {**env, "PORT": str(floor_port)},
            workdir / "floor.log",
        ) as floor_proc,
    ):
        await wait_ready(base + "/readyz", app, workdir / "server.log")
        await wait_ready(floor + "/healthz", floor_proc, workdir / "floor.log")
        data = await provision(base, env["ADMIN_TOKEN"], users=200, anonymous=200)

        common = {"concurrency": args.concurrency, "duration": args.duration, "warmup": args.warmup}
        auth_key = {"Authorization": f"Bearer {data['key']}"}
        floor_auth = load(
            {
                **common,
                "base_url": floor,
                "requests": [
                    {"path": "/floor/authenticate", "body": {"id": f"user-{i}"}} for i in range(200)
                ],
            },
            workdir,
        )
        auth = load(
            {
                **common,
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
            workdir,
        )
        mix = [b for pair in zip(data["anonymous"], data["verified"], strict=True) for b in pair]
        floor_session = load(
            {
                **common,
                "base_url": floor,
                "requests": [
                    {"path": "/floor/session", "body": {"id": f"v-{i}"}} for i in range(400)
                ],
            },
            workdir,
        )
        sessions = load(
            {
                **common,
                "base_url": base,
                "requests": [
                    {"path": "/widget/sessions", "body": b, "headers": {"Origin": ORIGIN}}
                    for b in mix
                ],
            },
            workdir,
        )

        lines.append(row("floor: authenticate", floor_auth))
        lines.append(row("POST /widget/authenticate-user", auth))
        lines.append(
            f"    -> throughput {auth['rps'] / floor_auth['rps']:.2f}x floor (target >= 0.80x)"
        )
        lines.append(row("floor: session", floor_session))
        lines.append(row("POST /widget/sessions (50% verified)", sessions))
        lines.append(
            f"    -> throughput {sessions['rps'] / floor_session['rps']:.2f}x floor (target >= 1.00x); "
            f"p99 {sessions['p99_ms'] / max(floor_session['p99_ms'], 1e-9):.2f}x floor (target <= 1.50x)"
        )
    return lines


async def prepare_database(servers_url: str) -> str:
    name = f"wi_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(servers_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return with_database(servers_url, name)


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument(
        "--duration", type=float, default=float(os.environ.get("BENCH_DURATION", "10"))
    )
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-merge", action="store_true")
    args = parser.parse_args()

    with (
        dev_servers(None, log=lambda line: None) as servers,
        tempfile.TemporaryDirectory(prefix="wi-bench-") as tmp,
    ):
        workdir = Path(tmp)
        database_url = asyncio.run(prepare_database(servers.database_url))
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
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
