"""The operator CLI, ``widget-identity``: serve, consume, migrate, dev, dlq, admin commands.

Commands a program would read print JSON on stdout; logs go to stderr. A configuration or
connection problem ends the command with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web

from services import all_in_one
from services.cli_support import load_settings, print_json, run_async
from services.history import app as history
from services.session_resolution import app as session_resolution
from services.token_issuance import app as token_issuance
from services.token_issuance import cli as token_issuance_cli
from shared import db, migrate
from shared.bus import dead_letters
from shared.config import Settings
from shared.errors import ConfigError
from shared.lifecycle import serve
from shared.observability import configure_logging
from shared.redis import check_reachable, create_redis

# ``serve <name>`` runs a service's create_app; ``consume <name>`` its create_consumer_app,
# for the services whose consumers run apart from their API.
APPS: dict[str, Callable[[Settings], web.Application]] = {
    "all": all_in_one.create_app,
    token_issuance.NAME: token_issuance.create_app,
    session_resolution.NAME: session_resolution.create_app,
    history.NAME: history.create_app,
}
CONSUMERS: dict[str, Callable[[Settings], web.Application]] = {
    history.NAME: history.create_consumer_app,
}

# Extra command groups (admin, keys, ...) register themselves here from their service.
CommandRegistrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]
REGISTRARS: list[CommandRegistrar] = [token_issuance_cli.register]


def _cmd_serve(args: argparse.Namespace) -> None:
    settings = load_settings()
    serve(APPS[args.service](settings), settings, port=args.port)


def _cmd_consume(args: argparse.Namespace) -> None:
    settings = load_settings()
    serve(CONSUMERS[args.service](settings), settings, port=args.port)


async def _migrate(settings: Settings) -> list[int]:
    conn = await db.connect(settings)
    try:
        return await migrate.migrate(conn)
    finally:
        await conn.close()


def _cmd_migrate(args: argparse.Namespace) -> None:
    settings = load_settings()
    print_json({"applied": run_async(_migrate(settings))})


async def _check_redis(settings: Settings) -> None:
    client = create_redis(settings)
    try:
        await check_reachable(client)
    finally:
        await client.aclose()


def _cmd_dev(args: argparse.Namespace) -> None:
    """``make run``: private Postgres and Redis unless URLs are given, migrate, serve all."""
    from devstack import dev_servers  # only development needs it

    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # Development secrets are generated once and kept with the dev data, so tokens minted
    # yesterday still verify today.
    env.setdefault("ADMIN_TOKEN", _dev_secret(data_dir / "admin-token", secrets.token_urlsafe(24)))
    env.setdefault(
        "KEY_ENCRYPTION_KEY",
        _dev_secret(data_dir / "key-encryption-key", secrets.token_urlsafe(32)),
    )
    env.setdefault("LOG_JSON", "false")
    # Long enough to see /readyz answer 503 on Ctrl-C, short enough to stay snappy.
    env.setdefault("DRAIN_DELAY", "1")
    external = bool(env.get("DATABASE_URL")) and bool(env.get("REDIS_URL"))
    if bool(env.get("DATABASE_URL")) != bool(env.get("REDIS_URL")):
        raise ConfigError(
            "set both DATABASE_URL and REDIS_URL, or neither (then private servers start)"
        )

    def run(database_url: str, redis_url: str) -> None:
        env["DATABASE_URL"], env["REDIS_URL"] = database_url, redis_url
        settings = Settings.from_env(env)
        configure_logging(settings.log_level, json=settings.log_json)
        run_async(_check_redis(settings))
        applied = run_async(_migrate(settings))
        port = args.port if args.port is not None else settings.port
        base = f"http://127.0.0.1:{port}"
        print(
            f"\nwidget-identity (all-in-one) on {base}  "
            f"(migrations applied now: {applied or 'none'})\n"
            f"  health:  curl {base}/readyz\n"
            f"  admin token: {env['ADMIN_TOKEN']}\n"
            f"  first org:   curl -s -X POST {base}/admin/v1/orgs "
            f"-H 'Authorization: Bearer {env['ADMIN_TOKEN']}' "
            "-H 'Content-Type: application/json' -d '{\"name\": \"Acme\"}'\n"
            "  Ctrl-C stops the server and the private Postgres and Redis.\n",
            file=sys.stderr,
            flush=True,
        )
        serve(all_in_one.create_app(settings), settings, port=port)

    if external:
        run(env["DATABASE_URL"], env["REDIS_URL"])
        return
    with dev_servers(
        data_dir / "servers", log=lambda line: print(line, file=sys.stderr)
    ) as servers:
        run(servers.database_url, servers.redis_url)


def _dev_secret(path: Path, fresh: str) -> str:
    if path.exists():
        return path.read_text().strip()
    path.write_text(fresh + "\n")
    path.chmod(0o600)
    return fresh


def _cmd_dlq_list(args: argparse.Namespace) -> None:
    settings = load_settings()

    async def go() -> list[dict[str, str]]:
        client = create_redis(settings)
        try:
            return await dead_letters.dead_letters(client, settings, args.group, count=args.count)
        finally:
            await client.aclose()

    print_json(run_async(go()))


def _cmd_dlq_replay(args: argparse.Namespace) -> None:
    settings = load_settings()

    async def go() -> int:
        client = create_redis(settings)
        try:
            return await dead_letters.replay_dead_letters(
                client, settings, args.group, count=args.count
            )
        finally:
            await client.aclose()

    print_json({"group": args.group, "replayed": run_async(go())})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="widget-identity",
        description="Widget identity service: serve, consume events, migrate, operate.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="serve one service's HTTP API (or all of them)")
    p.add_argument("service", choices=sorted(APPS))
    p.add_argument("--port", type=int, default=None, help="default: $PORT or 8080")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("consume", help="run a service's event consumers")
    p.add_argument("service", choices=sorted(CONSUMERS))
    p.add_argument("--port", type=int, default=None, help="probe/metrics port (default $PORT)")
    p.set_defaults(func=_cmd_consume)

    p = sub.add_parser("migrate", help="apply database migrations (safe to run concurrently)")
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser(
        "dev", help="development: private Postgres/Redis (unless URLs set), migrate, serve all"
    )
    p.add_argument("--data-dir", default=".devdata", help="where dev data is kept between runs")
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=_cmd_dev)

    dlq = sub.add_parser("dlq", help="dead-letter streams").add_subparsers(
        dest="dlq_command", required=True, metavar="ACTION"
    )
    p = dlq.add_parser("list", help="show dead letters of a consumer group")
    p.add_argument("--group", required=True)
    p.add_argument("--count", type=int, default=100)
    p.set_defaults(func=_cmd_dlq_list)
    p = dlq.add_parser("replay", help="put dead letters back on the events stream")
    p.add_argument("--group", required=True)
    p.add_argument("--count", type=int, default=None, help="default: all")
    p.set_defaults(func=_cmd_dlq_replay)

    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as exc:
        print(f"widget-identity: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
