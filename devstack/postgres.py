"""The PostgreSQL server: where its data lives, initdb, and start-up."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from .errors import DevStackError
from .processes import (
    Log,
    _await_ready,
    _chown,
    _run,
    _run_as_for,
    _RunAs,
    _spawn,
)

_PG_STOP = (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL)  # fast, immediate, kill


def _reachable(path: Path, run_as: _RunAs, *, writable: bool) -> bool:
    # Asked of the user itself: permission bits of every ancestor, ACLs and mounts all count.
    if run_as.uid is None:
        return True
    test = 'test -x "$1" -a -w "$1"' if writable else 'test -x "$1"'
    return _run(["/bin/sh", "-c", test, "sh", str(path)], run_as, 30)[0] == 0


def _persistent_pgdata(data_dir: Path, log: Log) -> tuple[Path, _RunAs]:
    pgdata = data_dir / "postgres"
    run_as = _run_as_for(pgdata.stat().st_uid if pgdata.exists() else None)
    # A new cluster is made by us (root) and handed over, so the user only needs to pass
    # through data_dir; an existing one it must be able to write.
    if pgdata.exists() and _reachable(pgdata, run_as, writable=True):
        return pgdata, run_as
    if not pgdata.exists() and _reachable(data_dir, run_as, writable=False):
        return pgdata, run_as
    # e.g. a checkout under /root (mode 700): keep the cluster where that user can reach it,
    # at a stable place per requested dir so the data survives between runs.
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    fallback = Path("/var/tmp") / f"wi-devstack-{digest}"
    fallback.mkdir(mode=0o755, exist_ok=True)
    st = fallback.lstat()
    if st.st_uid != os.geteuid() or not fallback.is_dir() or fallback.is_symlink():
        raise DevStackError(f"{fallback} exists but is not ours; remove it")
    os.chmod(fallback, 0o755)
    pgdata = fallback / "postgres"
    run_as = _run_as_for(pgdata.stat().st_uid if pgdata.exists() else None)
    log(
        f"devstack: user {run_as.name} cannot reach {data_dir}; "
        f"keeping its Postgres data in {pgdata} instead"
    )
    return pgdata, run_as


def _data_version(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "PG_VERSION").read_text().strip())
    except (OSError, ValueError):
        return None


def _initdb(bindir: Path, pgdata: Path, run_as: _RunAs, throwaway: bool) -> None:
    # Into a side directory, renamed when complete: a run killed mid-initdb leaves no
    # half-made cluster that would fail every later start.
    tmp = pgdata.with_name(pgdata.name + ".initdb-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    _chown(tmp, run_as)
    argv = [
        str(bindir / "initdb"),
        "-D",
        str(tmp),
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--locale=C",
    ]  # C: exists everywhere, unlike the caller's locale
    code, out = _run(argv + (["--no-sync"] if throwaway else []), run_as)
    if code != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = next((line for line in reversed(out.splitlines()) if line.strip()), "")
        raise DevStackError(f"initdb failed (exit {code}): {last}\n{out[-3000:]}")
    os.rename(tmp, pgdata)


def _start_postgres(
    bindir: Path, pgdata: Path, sockdir: Path, log_file: Path, run_as: _RunAs, throwaway: bool
) -> subprocess.Popen[bytes]:
    settings = {
        "listen_addresses": "",
        "unix_socket_directories": str(sockdir),
        "max_connections": "200",
    }
    if throwaway:  # durability is pointless for data deleted at exit
        settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
    argv = [str(bindir / "postgres"), "-D", str(pgdata)]
    for name, value in settings.items():
        argv += ["-c", f"{name}={value}"]
    proc = _spawn(argv, run_as, log_file, signal.SIGINT)
    pidfile, sock = pgdata / "postmaster.pid", sockdir / ".s.PGSQL.5432"

    def ready() -> bool:
        # pg_ctl -w's test: line 8 of postmaster.pid says "ready" once connections work.
        with contextlib.suppress(OSError):
            lines = pidfile.read_text().splitlines()
            return len(lines) >= 8 and lines[7].strip() == "ready" and sock.exists()
        return False

    return _await_ready(proc, ready, what="PostgreSQL", log_file=log_file, stop_signals=_PG_STOP)
