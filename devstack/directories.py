"""Data and temporary directories: the exclusive lock, stale pid files, leftover sweeps."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from .errors import DevStackError
from .postgres import _PG_STOP
from .processes import Log, _alive, _kill_orphan, _runs_in, _start_time
from .redis import _REDIS_STOP

_MARKER = "devstack.json"


@contextlib.contextmanager
def _exclusive(data_dir: Path) -> Iterator[None]:
    # Held while servers run; the kernel drops it when we die, so anything still running
    # on this data dir when we get the lock is an orphan and may be stopped.
    fd = os.open(data_dir / ".devstack.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise DevStackError(
                f"{data_dir} is in use by another devstack (pid {other}), e.g. a `make run` "
                "in this checkout: stop that one, or give this one its own --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def ensure_free(data_dir: Path) -> None:
    """Raise now what ``dev_servers(data_dir)`` would raise on another devstack's data dir,
    before the caller does anything else."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(data_dir):
        pass


def _stale_pidfile(
    pidfile: Path, workdir: Path, sigs: tuple[signal.Signals, ...], what: str, log: Log
) -> None:
    """Stop an orphan server on `workdir`, then drop its pid file.

    Postgres itself refuses to start while the recorded pid is alive, and a SIGKILLed run's
    pid may be a not-yet-reaped zombie or reused by an unrelated process.
    """
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if _alive(pid) and _runs_in(pid, workdir):
        _kill_orphan(pid, sigs, what, log)
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()


def _sweep(log: Log) -> None:
    """Delete /tmp/wi-* dirs whose creating process is gone (a killed test session)."""
    for marker in Path("/tmp").glob(f"wi-*/{_MARKER}"):
        try:
            if marker.stat().st_uid != os.geteuid():
                continue
            owner = json.loads(marker.read_text())
            if _alive(owner["pid"]) and _start_time(owner["pid"]) == owner["start"]:
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        base = marker.parent
        _stale_pidfile(base / "pg" / "postmaster.pid", base / "pg", _PG_STOP, "Postgres", log)
        _stale_pidfile(base / "redis.pid", base, _REDIS_STOP, "Redis", log)
        for pidfile in base.glob("node-*/redis.pid"):  # a throwaway Redis Cluster's nodes
            _stale_pidfile(pidfile, pidfile.parent, _REDIS_STOP, "Redis", log)
        shutil.rmtree(base, ignore_errors=True)
        log(f"devstack: removed {base} left by a killed run")
