"""The public entry point: start both servers together, stop them together."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

from .binaries import _find_postgres, _find_redis
from .directories import _MARKER, _exclusive, _stale_pidfile, _sweep
from .errors import DevStackError
from .postgres import _PG_STOP, _data_version, _initdb, _persistent_pgdata, _start_postgres
from .processes import _chown, _run_as_for, _start_time, _stop_child
from .redis import _REDIS_STOP, ThrowawayRedis, _start_redis


@contextlib.contextmanager
def throwaway_redis(*, log: Callable[[str], None] = print) -> Iterator[ThrowawayRedis]:
    """A private Redis of its own (for tests that kill it), started; stopped and removed on
    exit."""
    binary, _ = _find_redis(log)
    base = Path(tempfile.mkdtemp(prefix="wi-r-", dir="/tmp"))  # short: socket path limit
    server = ThrowawayRedis(binary, base)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class DevServers:
    database_url: str  # asyncpg-compatible DSN, e.g. postgresql://postgres@/postgres?host=/tmp/wi-x
    redis_url: str  # redis-py URL, e.g. unix:///tmp/wi-x/redis.sock


def _fresh_log(path: Path) -> Path:
    # Persistent logs are appended to (the previous crash stays readable), within reason.
    with contextlib.suppress(OSError):
        if path.stat().st_size > 10 << 20:
            path.unlink()
    return path


@contextlib.contextmanager
def dev_servers(
    data_dir: Path | None, *, log: Callable[[str], None] = print
) -> Iterator[DevServers]:
    """Start private Postgres and Redis servers; stop them (and clean up) on exit.

    data_dir=None: throwaway servers in a fresh temp dir, deleted on exit (tests).
    data_dir given: data kept there between runs (make run); Postgres data in
    data_dir/postgres, Redis AOF in data_dir/redis.
    """
    with contextlib.ExitStack() as stack:
        t0 = time.monotonic()
        if data_dir is not None:
            data_dir = data_dir.expanduser().resolve()
            data_dir.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_exclusive(data_dir))
        _sweep(log)
        redis_bin, redis_version = _find_redis(log)

        # Short and under /tmp whatever TMPDIR says: socket paths are limited to 107 bytes.
        base = Path(tempfile.mkdtemp(prefix="wi-", dir="/tmp"))
        stack.callback(shutil.rmtree, base, True)
        (base / _MARKER).write_text(
            json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid())})
        )

        if data_dir is None:
            pgdata, run_as = base / "pg", _run_as_for(None)
            redis_dir, logs = base, base
        else:
            pgdata, run_as = _persistent_pgdata(data_dir, log)
            redis_dir, logs = data_dir / "redis", data_dir
            redis_dir.mkdir(exist_ok=True)
        _chown(base, run_as)  # Postgres creates its socket here

        bindir, major = _find_postgres(run_as, _data_version(pgdata), log)
        if data_dir is not None:
            _stale_pidfile(pgdata / "postmaster.pid", pgdata, _PG_STOP, "Postgres", log)
            _stale_pidfile(redis_dir / "redis.pid", redis_dir, _REDIS_STOP, "Redis", log)
            with contextlib.suppress(OSError):
                if pgdata.exists() and not any(pgdata.iterdir()):
                    pgdata.rmdir()  # an empty dir someone made: initdb it
        if not pgdata.exists():
            _initdb(bindir, pgdata, run_as, throwaway=data_dir is None)
            log(f"devstack: created a PostgreSQL {major} cluster in {pgdata}")
        elif _data_version(pgdata) is None:
            raise DevStackError(f"{pgdata} exists but is not a PostgreSQL data directory")
        else:
            os.chmod(pgdata, 0o700)  # postgres refuses group/world-accessible data

        pg = _start_postgres(
            bindir,
            pgdata,
            base,
            _fresh_log(logs / "postgres.log"),
            run_as,
            throwaway=data_dir is None,
        )
        stack.callback(_stop_child, pg, _PG_STOP)
        sock = base / "redis.sock"
        redis = _start_redis(
            redis_bin,
            redis_dir,
            sock,
            _fresh_log(logs / "redis.log"),
            persistent=data_dir is not None,
        )
        stack.callback(_stop_child, redis, _REDIS_STOP)
        log(
            f"devstack: PostgreSQL {major} ({bindir}) and Redis {redis_version} ({redis_bin}) "
            f"ready in {time.monotonic() - t0:.1f}s on sockets in {base}"
        )
        host = urllib.parse.quote(str(base), safe="/")
        yield DevServers(
            database_url=f"postgresql://postgres@/postgres?host={host}", redis_url=f"unix://{sock}"
        )
