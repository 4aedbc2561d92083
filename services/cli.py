"""The operator CLI, ``widget-identity``: serve, consume, migrate, dev, dlq, admin commands.

Commands a program would read print JSON on stdout; logs go to stderr. A configuration,
connection or start-up problem ends the command with one line on stderr and exit code 2
(``--debug`` or LOG_LEVEL=DEBUG adds the traceback); SIGTERM, like Ctrl-C, stops a command at
any point, and whatever it started (``dev``'s private servers) stops with it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import asyncpg
import msgspec
from aiohttp import web

from services import all_in_one
from services.cli_support import (
    DEV_DATA_DIR,
    DEV_ENV_FILE,
    Interrupted,
    check_port,
    dev_env_file,
    load_settings,
    print_json,
    run_async,
    serve_app,
    stop_on_signals,
)
from services.history import app as history
from services.session_resolution import app as session_resolution
from services.token_issuance import app as token_issuance
from services.token_issuance import cli as token_issuance_cli
from shared import db, migrate
from shared.bus import dead_letters, stream_status
from shared.config import Settings
from shared.errors import ConfigError
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
    serve_app(APPS[args.service](settings), settings, args.port)


def _cmd_consume(args: argparse.Namespace) -> None:
    settings = load_settings()
    serve_app(CONSUMERS[args.service](settings), settings, args.port)


async def _migrate(settings: Settings) -> list[int]:
    conn = await db.connect(settings)
    try:
        return await migrate.migrate(conn)
    except asyncpg.PostgresError as exc:
        raise ConfigError(
            f"{db.session_url_name(settings)}: migrating failed ({type(exc).__name__}: {exc}); "
            "check that its user may create tables"
        ) from None
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
    from devstack import DevStackError, dev_servers, ensure_free  # only development needs it

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
    # The admin token above is printed and kept in a file: other machines get no way in.
    env.setdefault("HOST", "127.0.0.1")
    env.setdefault("PLAYGROUND", "true")  # try the widget options live, see README
    # Long enough to see /readyz answer 503 on Ctrl-C, short enough to stay snappy.
    env.setdefault("DRAIN_DELAY", "1")
    external = bool(env.get("DATABASE_URL")) and bool(env.get("REDIS_URL"))
    if bool(env.get("DATABASE_URL")) != bool(env.get("REDIS_URL")):
        raise ConfigError(
            "set both DATABASE_URL and REDIS_URL, or neither (then private servers start)"
        )
    # Everything that can be checked before a server starts is: each failure is one line,
    # not servers started only to be stopped again.
    planned = Settings.from_env(
        {"DATABASE_URL": "postgresql://dev", "REDIS_URL": "unix:///dev", **env}
    )
    port = args.port if args.port is not None else planned.port
    servers_dir = data_dir / "servers"
    try:
        if not external:
            ensure_free(servers_dir)
        check_port(planned.host, port)
        if external:
            _serve_dev(env, data_dir, port)
            return
        with dev_servers(servers_dir, log=lambda line: print(line, file=sys.stderr)) as servers:
            env["DATABASE_URL"], env["REDIS_URL"] = servers.database_url, servers.redis_url
            _serve_dev(env, data_dir, port)
    except DevStackError as exc:
        raise ConfigError(str(exc)) from exc


def _serve_dev(env: dict[str, str], data_dir: Path, port: int) -> None:
    settings = Settings.from_env(env)
    configure_logging(settings.log_level, json=settings.log_json)
    run_async(_check_redis(settings))
    applied = run_async(_migrate(settings))
    shown = "127.0.0.1" if settings.host in ("", "0.0.0.0", "::") else settings.host
    base = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"
    token = env["ADMIN_TOKEN"]
    published = {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "KEY_ENCRYPTION_KEY": env["KEY_ENCRYPTION_KEY"],
        "ADMIN_TOKEN": token,
        "WIDGET_IDENTITY_URL": base,
    }
    with dev_env_file(data_dir, published) as env_file:
        lines = [
            f"\nwidget-identity (all-in-one) on {base}  (migrations applied now: {applied or 'none'})",
            *(
                [f"  listening on all interfaces (HOST={settings.host})"]
                if shown != settings.host
                else []
            ),
            f"  health:  curl {base}/readyz",
            f"  playground: {f'{base}/playground' if settings.playground else 'off'}",
            f"  admin token: {token}",
            f"  first org:   curl -s -X POST {base}/admin/v1/orgs -H 'Authorization: Bearer {token}' "
            "-H 'Content-Type: application/json' -d '{\"name\": \"Acme\"}'",
            f"  DATABASE_URL={settings.database_url}",
            f"  REDIS_URL={settings.redis_url}",
            f"  (both kept in {_relative(env_file)} while this runs: `widget-identity org list` and",
            "  the client's event example in this checkout use them by themselves)",
            "  Ctrl-C stops the server and the private Postgres and Redis.\n",
        ]
        print("\n".join(lines), file=sys.stderr, flush=True)
        try:
            serve_app(all_in_one.create_app(settings), settings, port)
        finally:
            stop_on_signals()  # the server loop reset them; the private servers still stop


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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


# `streams status --check` exits with this while some stream is not drained (0 when all are;
# 2 stays the configuration error it is everywhere).
NOT_DRAINED = 3


def _cmd_streams_status(args: argparse.Namespace) -> None:
    settings = load_settings()
    if args.partitions is not None:
        if not 1 <= args.partitions <= 1024:
            raise ConfigError("--partitions: must be between 1 and 1024")
        settings = settings.with_overrides(stream_partitions=args.partitions)

    async def go() -> list[stream_status.StreamStatus]:
        pool = await db.create_pool(settings, min_size=1)
        client = create_redis(settings)
        try:
            return await stream_status.stream_status(pool, client, settings.event_streams)
        finally:
            await client.aclose()
            await pool.close()

    streams = run_async(go())
    drained = all(status.drained for status in streams)
    print_json(
        {
            "drained": drained,
            "streams": [{**msgspec.to_builtins(s), "drained": s.drained} for s in streams],
        }
    )
    if args.check and not drained:
        raise SystemExit(NOT_DRAINED)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="widget-identity",
        description="Widget identity service: serve, consume events, migrate, operate.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (or LOG_LEVEL=DEBUG)"
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
    p.add_argument(
        "--data-dir",
        default=DEV_DATA_DIR,
        help=f"where dev data is kept between runs; {DEV_ENV_FILE} there says how to reach it",
    )
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

    streams = sub.add_parser("streams", help="the event streams").add_subparsers(
        dest="streams_command", required=True, metavar="ACTION"
    )
    p = streams.add_parser(
        "status",
        help="per stream: unpublished outbox rows, each group's lag and pending; drained or not",
    )
    p.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="look at the streams of this partition count (default: $STREAM_PARTITIONS)",
    )
    p.add_argument(
        "--check", action="store_true", help=f"exit {NOT_DRAINED} unless every stream is drained"
    )
    p.set_defaults(func=_cmd_streams_status)

    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("LOG_LEVEL", "").strip().upper() == "DEBUG"
    stop_on_signals()
    try:
        args.func(args)
    except Interrupted as exc:
        print(f"widget-identity: stopped by {exc}", file=sys.stderr)
        raise SystemExit(128 + exc.signum) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except ConfigError as exc:
        _fail(exc, str(exc), debug, code=2)
    except Exception as exc:
        # A bug or a failure nobody named yet: still one line, the traceback on request.
        what = f"unexpected {type(exc).__name__}: {exc}"
        _fail(exc, what + " (run with --debug for the traceback)", debug, code=1)


def _fail(exc: BaseException, message: str, debug: bool, *, code: int) -> None:
    first, _, rest = message.partition("\n")
    if debug:
        traceback.print_exception(exc)
    elif rest:
        first += " (--debug shows more)"
    print(f"widget-identity: error: {first}", file=sys.stderr)
    if debug and rest:
        print(rest, file=sys.stderr)
    raise SystemExit(code) from None


if __name__ == "__main__":
    main()
