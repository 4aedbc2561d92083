"""The Redis server: start-up and readiness."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from pathlib import Path

from .processes import _await_ready, _RunAs, _spawn, _stop_child

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


class ThrowawayRedis:
    """One private, non-persistent Redis for fault tests: killed and started again at will on
    the same socket. A restart comes back empty — unless ``SAVE`` wrote ``dump.rdb`` into its
    directory, which it then loads: the state of a replica that lagged behind at that
    moment."""

    def __init__(self, binary: Path, workdir: Path) -> None:
        self._binary = binary
        self.workdir = workdir
        self.sock = workdir / "redis.sock"
        self._log = workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def start(self) -> None:
        self._proc = _start_redis(self._binary, self.workdir, self.sock, self._log, False)

    def kill(self) -> None:
        """SIGKILL: nothing is flushed or saved on the way down."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None

    def stop(self) -> None:
        if self._proc is not None:
            _stop_child(self._proc, _REDIS_STOP)
            self._proc = None
