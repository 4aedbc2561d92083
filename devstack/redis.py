"""The Redis server: start-up and readiness."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from pathlib import Path

from .processes import _await_ready, _RunAs, _spawn

_REDIS_STOP = (signal.SIGTERM, signal.SIGKILL)


def _redis_ready(sock: Path) -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(str(sock))
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")  # -LOADING while it replays the AOF
    return False


def _start_redis(
    binary: Path, workdir: Path, sock: Path, log_file: Path, persistent: bool
) -> subprocess.Popen[bytes]:
    argv = [
        str(binary),
        "--port",
        "0",
        "--unixsocket",
        str(sock),
        "--unixsocketperm",
        "700",
        "--dir",
        str(workdir),
        "--pidfile",
        str(workdir / "redis.pid"),
        "--logfile",
        "",
        "--daemonize",
        "no",
        "--save",
        "",
        "--appendonly",
        "yes" if persistent else "no",
    ]
    proc = _spawn(argv, _RunAs(None, None, ""), log_file, signal.SIGTERM)
    return _await_ready(
        proc, lambda: _redis_ready(sock), what="Redis", log_file=log_file, stop_signals=_REDIS_STOP
    )
