"""What a process (tree) costs, read from Linux /proc: CPU seconds and resident memory.

CPU is ``utime + stime`` from ``/proc/<pid>/stat`` (all threads of the process, in clock
ticks of 1/SC_CLK_TCK s), plus ``cutime + cstime`` (children it has already reaped), plus the
same for every live descendant. So a Postgres backend that exits inside a measured window is
still counted: its time moves into the postmaster's ``cutime`` when the postmaster reaps it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

_TICK = float(os.sysconf("SC_CLK_TCK"))
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _fields(pid: int) -> list[str]:
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    # Index i here is field i + 3 of proc(5): 1 ppid, 11 utime, 12 stime, 13 cutime, 14 cstime.
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def _parents() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(_fields(int(entry.name))[1])
            except (OSError, IndexError):
                continue  # exited while we looked
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree(root: int, children: Mapping[int, list[int]] | None = None) -> list[int]:
    """``root`` and every live descendant."""
    children = _parents() if children is None else children
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(root: int, children: Mapping[int, list[int]] | None = None) -> float:
    """CPU (user + system) used so far by ``root``, its reaped children and live descendants."""
    total = 0
    for pid in tree(root, children):
        try:
            f = _fields(pid)
        except OSError:
            continue  # exited between the scan and now: counted by its parent once reaped
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / _TICK


def cpu_sample(roots: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process tree (one scan of /proc for all of them)."""
    children = _parents()
    return {name: cpu_seconds(pid, children) for name, pid in roots.items()}


def machine_busy_seconds() -> float:
    """CPU seconds all the machine's cores have been busy so far (``/proc/stat``: everything
    but idle and iowait), whoever ran: what a window's own processes did not use of it went to
    someone else's."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    # user nice system idle iowait irq softirq steal; guest time is already inside user/nice.
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICK


def rss_bytes(pids: Iterable[int]) -> int:
    """Resident set size (VmRSS) summed over ``pids``."""
    total = 0
    for pid in pids:
        try:
            total += int(_fields(pid)[21]) * _PAGE
        except OSError:
            continue
    return total


async def postmaster_pid(database_url: str) -> int:
    """The Postgres server's parent process: the parent of the backend serving us. (The
    private dev server exposes only its URL; asking the server itself works for any local
    Postgres.)"""
    conn = await asyncpg.connect(database_url)
    try:
        backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        return int(_fields(backend)[1])  # while the backend still exists
    finally:
        await conn.close()


async def redis_pid(redis_url: str) -> int:
    client = aioredis.Redis.from_url(redis_url)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    return int(info["process_id"])
