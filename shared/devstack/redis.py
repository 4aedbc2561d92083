"""The Redis server: start-up and readiness."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from pathlib import Path

from .errors import DevStackError
from .processes import _START_TIMEOUT, _log_tail, _RunAs, _spawn, _stop_child

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
    deadline = time.monotonic() + _START_TIMEOUT
    try:  # not yet on the caller's exit stack: stop it here on failure or Ctrl-C
        while not _redis_ready(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DevStackError(f"Redis did not start; {_log_tail(log_file, proc)}")
            time.sleep(0.02)
    except BaseException:
        _stop_child(proc, _REDIS_STOP)
        raise
    return proc
