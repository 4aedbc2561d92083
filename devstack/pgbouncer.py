"""A private PgBouncer in transaction-pooling mode in front of a given Postgres.

For the tests and the benchmark of the "behind PgBouncer" layout (README): the services'
DATABASE_URL goes through it, DATABASE_DIRECT_URL goes to Postgres itself. It listens on
127.0.0.1 only, on a free port, and lets in only clients that know the password in its URL:
a TCP port is reachable by every local user, unlike devstack's Postgres socket directory. As
root it runs as the same unprivileged user as devstack's Postgres (it refuses root, and that
user can reach Postgres's socket directory); it stops when the context exits or, through
PR_SET_PDEATHSIG, when our process dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from .binaries import find_pgbouncer
from .directories import _MARKER
from .errors import DevStackError
from .processes import _await_ready, _chown, _run_as_for, _RunAs, _spawn, _start_time, _stop_child

# SIGTERM is PgBouncer's immediate shutdown; SIGINT would wait for clients to let go.
_PGB_STOP = (signal.SIGTERM, signal.SIGKILL)
_PORT_TRIES = 5  # a free port may be taken between our probe and PgBouncer's bind


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where PgBouncer reaches Postgres, read from an asyncpg-style URL."""

    host: str  # a hostname, or a Unix socket directory
    port: int
    user: str
    password: str | None
    database: str

    @classmethod
    def from_url(cls, url: str) -> Upstream:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        host = query.get("host", [parts.hostname or ""])[0]
        port = int(query.get("port", [str(parts.port or 5432)])[0])
        user = parts.username or os.environ.get("USER", "postgres")
        if not host:
            raise DevStackError(
                f"{url}: no host (nor ?host=socket-dir) to put PgBouncer in front of"
            )
        database = parts.path.lstrip("/") or user
        return cls(host, port, user, parts.password, database)


@dataclass(frozen=True, slots=True)
class PgBouncer:
    """A running PgBouncer: ``url`` reaches the database it was started for, ``url_for`` any
    other database of the same server (each gets its own pool of ``pool_size`` server
    connections)."""

    port: int
    user: str
    password: str
    database: str
    pool_size: int
    log_file: Path
    pid: int

    @property
    def url(self) -> str:
        return self._url(self.database)

    def url_for(self, database_url: str) -> str:
        """The database of ``database_url`` (same server), through this PgBouncer."""
        return self._url(Upstream.from_url(database_url).database)

    def _url(self, database: str) -> str:
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@127.0.0.1:{self.port}/{quote(database, safe='')}"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _quoted(value: str) -> str:
    # pgbouncer.ini and auth_file quote with double quotes, doubling any inside.
    return '"' + value.replace('"', '""') + '"'


def _write_config(
    workdir: Path, upstream: Upstream, password: str, port: int, pool_size: int
) -> Path:
    auth_file = workdir / "userlist.txt"
    # The client's password is also the one PgBouncer logs in to Postgres with (a trust
    # Postgres, like devstack's, ignores it; another one needs its own).
    auth_file.write_text(f"{_quoted(upstream.user)} {_quoted(password)}\n")
    host = f"host={upstream.host} port={upstream.port}"
    settings = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(port),
        "unix_socket_dir": "",  # TCP only: nothing to clean up, nothing to collide with
        "auth_type": "scram-sha-256",
        "auth_file": str(auth_file),
        "pool_mode": "transaction",
        "default_pool_size": str(pool_size),
        "min_pool_size": "0",
        "reserve_pool_size": "0",
        "max_client_conn": "1000",
        "admin_users": upstream.user,  # SHOW POOLS for whoever debugs a test
        "logfile": "",  # stderr, into log_file
        "log_connections": "0",
        "log_disconnections": "0",
    }
    config = workdir / "pgbouncer.ini"
    config.write_text(
        "[databases]\n"
        # Any database name a client asks for, under that name on the upstream server: each
        # test's own database goes through the one PgBouncer.
        f"* = {host}\n\n[pgbouncer]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
    )
    return config


def _start(
    binary: Path, config: Path, port: int, log_file: Path, run_as: _RunAs
) -> subprocess.Popen[bytes]:
    proc = _spawn([str(binary), str(config)], run_as, log_file, signal.SIGTERM)
    return _await_ready(
        proc,
        lambda: _listening(port),
        what="PgBouncer",
        log_file=log_file,
        stop_signals=_PGB_STOP,
    )


@contextlib.contextmanager
def pgbouncer(
    database_url: str, *, pool_size: int = 20, log: Callable[[str], None] = print
) -> Iterator[PgBouncer]:
    """Start a PgBouncer (transaction pooling, ``pool_size`` server connections per database)
    in front of ``database_url``'s server; stop it and remove its files on exit."""
    binary = find_pgbouncer()
    upstream = Upstream.from_url(database_url)
    password = upstream.password or secrets.token_urlsafe(18)
    run_as = _run_as_for(None)
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="wi-pgb-", dir="/tmp"))
        stack.callback(shutil.rmtree, workdir, True)
        # devstack's sweep removes the directory of a killed run.
        (workdir / _MARKER).write_text(
            json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid())})
        )
        log_file = workdir / "pgbouncer.log"
        for attempt in range(1, _PORT_TRIES + 1):
            port = _free_port()
            config = _write_config(workdir, upstream, password, port, pool_size)
            for path in (workdir, config, workdir / "userlist.txt"):
                _chown(path, run_as)
            try:
                proc = _start(binary, config, port, log_file, run_as)
            except DevStackError as exc:
                if "Address already in use" in str(exc) and attempt < _PORT_TRIES:
                    continue
                raise
            break
        stack.callback(_stop_child, proc, _PGB_STOP)
        log(f"devstack: PgBouncer ({binary}, transaction pooling) on 127.0.0.1:{port}")
        yield PgBouncer(
            port, upstream.user, password, upstream.database, pool_size, log_file, proc.pid
        )
