"""What every ``widget-identity`` command group shares: settings with logging configured
(from the environment, or from a running ``make run``), JSON on stdout, running a coroutine
to completion, serving on a port that is checked first, and stopping on SIGTERM like Ctrl-C.

Its own module so that the service CLIs (e.g. ``services.token_issuance.cli``) and the top
level ``services.cli``, which registers them, both import it and never each other back.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import sys
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from aiohttp import web

from shared.config import Settings
from shared.errors import ConfigError
from shared.lifecycle import serve
from shared.observability import configure_logging

# Where `make run` (``widget-identity dev``) tells other tools how to reach its servers, for
# as long as it runs; relative to the data dir, found from the current directory upwards.
DEV_ENV_FILE = "env"
DEV_DATA_DIR = ".devdata"
_DEV_PID = "WIDGET_IDENTITY_DEV_PID"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived outside the server loop (e.g. while private servers start)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> None:
    """SIGTERM unwinds like Ctrl-C, so every ``with`` that started something stops it.

    The server loop installs its own handlers while it serves (drain, then return).
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, interrupt)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
    sys.stdout.flush()


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def load_settings() -> Settings:
    env: Mapping[str, str] = os.environ
    if not env.get("DATABASE_URL") and not env.get("REDIS_URL"):
        found = find_dev_env()
        if found is None:
            raise ConfigError(
                "DATABASE_URL and REDIS_URL: not set, and no running `make run` was found "
                f"({DEV_DATA_DIR}/{DEV_ENV_FILE}); set both, or start `make run` in this checkout"
            )
        path, values = found
        print(f"widget-identity: using the dev stack of `make run` ({path})", file=sys.stderr)
        env = {**values, **{k: v for k, v in os.environ.items() if v}}
    settings = Settings.from_env(env)
    configure_logging(settings.log_level, json=settings.log_json)
    return settings


def check_port(host: str, port: int) -> None:
    """Fail with one line before anything starts if the server could not listen there."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"HOST: cannot resolve {host!r} ({exc.strerror})") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            # As the server binds: SO_REUSEADDR, so only a listener (not TIME_WAIT) is a clash.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise _listen_error(host, port, exc) from None


def _listen_error(host: str, port: int, exc: OSError) -> ConfigError:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(
            f"PORT: {where} is already in use by another process; stop it, or choose "
            "another port with PORT=... (or --port)"
        )
    if exc.errno == errno.EACCES:
        return ConfigError(f"PORT: not allowed to listen on {where}; choose a port above 1023")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"HOST: {host} is not an address of this machine")
    return ConfigError(f"PORT: cannot listen on {where} ({exc.strerror})")


def serve_app(app: web.Application, settings: Settings, port: int | None) -> None:
    """``serve`` with the port checked first and a failed bind as one line, not a traceback."""
    port = settings.port if port is None else port
    check_port(settings.host, port)
    try:
        serve(app, settings, port=port)
    except OSError as exc:
        # Taken between the check and the bind; anything else is not ours to explain.
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise _listen_error(settings.host, port, exc) from None
        raise


@contextlib.contextmanager
def dev_env_file(data_dir: Path, values: Mapping[str, str]) -> Iterator[Path]:
    """Publish how to reach the running dev stack in ``data_dir/env`` (shell syntax, mode
    0600: it holds the dev secrets); removed on exit, when the servers are gone too."""
    path = data_dir / DEV_ENV_FILE
    lines = [
        "# Written by `make run` (widget-identity dev) while it runs; removed when it stops.",
        "# `widget-identity` commands in this checkout read it when DATABASE_URL/REDIS_URL are",
        "# unset; a shell can too: set -a; . .devdata/env; set +a",
        *(
            f"{name}={_quote(value)}"
            for name, value in {**values, _DEV_PID: str(os.getpid())}.items()
        ),
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    try:
        yield path
    finally:
        # Only ours: a second run that failed on the data dir's lock never wrote one.
        found = _read_env(path)
        if found is not None and found.get(_DEV_PID) == str(os.getpid()):
            path.unlink(missing_ok=True)


def find_dev_env(start: Path | None = None) -> tuple[Path, dict[str, str]] | None:
    """The env file of a `make run` that is still running, from ``start`` upwards."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        path = directory / DEV_DATA_DIR / DEV_ENV_FILE
        values = _read_env(path)
        if values is None:
            continue
        if not _alive(values.pop(_DEV_PID, "")):
            return None  # left by a killed run: its sockets are gone with it
        return path, values
    return None


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def _read_env(path: Path) -> dict[str, str] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    values: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            value = value.strip().removeprefix("'").removesuffix("'")
            values[name.strip()] = value.replace("'\\''", "'")
    return values


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
