"""The merge path of ``make bench``, once per stream partition count (``--partitions``, 1, 2
and 4 by default) with as many consumer processes: conversations moved per second, event lag
under a steady load, and the time to drain a backlog of merge events, one row per count.

Each count gets its own freshly migrated database and stream prefix, so one row's events,
partition leases and consumer members never meet another's. Data is bulk-loaded with SQL
(orgs, contacts, visitors, conversations) and merge requests are emitted through the real
outbox, which routes each to its subject's partition; the real merge consumers
(``widget-identity consume history``, one process each) apply them.

The consumers run without a relay of their own (RELAY_ENABLED=false), and they are started,
and their partitions dealt out, before anything is timed; the bench's relay (the real
``OutboxRelay``, in this process) publishes, and each clock starts when it does. So a row
measures N consumers working, not N Python processes starting up on shared cores, and every
row is published by the same single relay. For throughput and the backlog the relay starts
with every request already in the outbox; under the steady load it publishes each as it is
emitted, so the lag is emit to applied, relay included.

Nothing here asserts a timing: the table is printed with the machine's core count and the
CPU each row kept busy, because more consumer processes than cores compete with Postgres
(and each other) for the same CPUs, and a shared machine gives some of them to others.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from subprocess import Popen

import asyncpg
from redis.exceptions import ResponseError

from bench.procstat import cpu_sample, machine_busy_seconds, postmaster_pid, redis_pid
from bench.stack import process
from shared.bus.events import HistoryMergeRequested, MergeRequestedData
from shared.bus.outbox import Outbox
from shared.bus.relay import OutboxRelay
from shared.config import Settings
from shared.db import create_pool
from shared.redis import Redis, create_redis

GROUP = "history"  # the merge consumer's group (services/history/consumers.py)
LAG_RATE = 200  # merges/s of the steady load


@dataclasses.dataclass(frozen=True)
class MergeScale:
    """How much work each partition count gets."""

    merges: int  # throughput: merges of ``conversations_each`` conversations, queued at once
    conversations_each: int
    lag_seconds: float  # the steady load lasts this long at LAG_RATE merges/s
    backlog: int  # merge events (one conversation each) queued before the drain


FULL = MergeScale(merges=2000, conversations_each=50, lag_seconds=15, backlog=100_000)
# --quick runs every partition count, so each gets a fraction of the full work.
QUICK = MergeScale(merges=2000, conversations_each=50, lag_seconds=5, backlog=5_000)


@dataclasses.dataclass(frozen=True)
class MergeRow:
    partitions: int
    consumers: int
    moved: int  # conversations moved by the throughput merges
    seconds: float  # ... in this long
    # CPU cores busy during the throughput window: consumers, Postgres, Redis, and the whole
    # machine (theirs, this process's relay, and anyone else's on a shared machine)
    cores: dict[str, float]
    lags: list[float]  # ms from emit to applied, sorted
    drained: float  # seconds to drain the backlog

    @property
    def rate(self) -> float:
        return self.moved / self.seconds


async def load_scopes(
    pool: asyncpg.Pool, org: str, visitors: int, conversations_each: int
) -> list[tuple[str, str]]:
    """Visitors with browser-bound conversations, each paired with a contact to merge into."""
    pairs = [(str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(visitors)]
    async with pool.acquire() as conn, conn.transaction():
        await conn.copy_records_to_table(
            "contacts",
            records=[(uuid.UUID(c), uuid.UUID(org), f"user:{c}") for _v, c in pairs],
            columns=["id", "org_id", "contact_key"],
        )
        await conn.copy_records_to_table(
            "visitors",
            records=[
                (uuid.UUID(v), uuid.UUID(org), uuid.uuid4().bytes + uuid.uuid4().bytes)
                for v, _c in pairs
            ],
            columns=["id", "org_id", "token_hash"],
        )
        await conn.copy_records_to_table(
            "conversations",
            records=[
                (uuid.uuid4(), uuid.UUID(org), uuid.UUID(v), uuid.UUID(v))
                for v, _c in pairs
                for _ in range(conversations_each)
            ],
            columns=["id", "org_id", "visitor_id", "origin_visitor_id"],
        )
    return pairs


async def request_merges(
    pool: asyncpg.Pool, outbox: Outbox, org: str, pairs: list[tuple[str, str]]
) -> dict[str, float]:
    emitted: dict[str, float] = {}
    for start in range(0, len(pairs), 1000):
        async with pool.acquire() as conn, conn.transaction():
            for visitor, contact in pairs[start : start + 1000]:
                merge_id = str(uuid.uuid4())
                await outbox.emit(
                    conn,
                    HistoryMergeRequested,
                    org_id=org,
                    subject=visitor,
                    data=MergeRequestedData(
                        merge_id=merge_id,
                        reason="login",
                        source_visitor_id=visitor,
                        target_contact_id=contact,
                    ),
                )
                emitted[merge_id] = time.time()
    return emitted


@contextlib.asynccontextmanager
async def relaying(settings: Settings, redis: Redis) -> AsyncIterator[None]:
    """The real relay, publishing every partition while the block runs. (Its ``run`` takes
    the partitions' advisory locks itself; a bare ``publish_batch`` publishes only the
    partitions held.)"""
    stop = asyncio.Event()
    task = asyncio.create_task(OutboxRelay(settings, redis, poll_interval=0.1).run(stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def group_backlog(redis: Redis, streams: Sequence[str]) -> int | None:
    """Entries of ``streams`` the merge group has not acknowledged yet (lag + pending, summed
    over the partitions, one XINFO each); None while a stream or its group does not exist."""
    total = 0
    for stream in streams:
        try:
            groups = await redis.xinfo_groups(stream)
        except ResponseError:  # no stream yet
            return None
        group = next((g for g in groups if g["name"] in (GROUP.encode(), GROUP)), None)
        if group is None or group["lag"] is None:
            return None
        total += int(group["lag"]) + int(group["pending"])
    return total


def check_alive(consumers: Sequence[Popen[bytes]], logs: Sequence[Path]) -> None:
    for proc, log in zip(consumers, logs, strict=True):
        if proc.poll() is not None:
            raise SystemExit(f"merge consumer exited; see {log}:\n{log.read_text()[-2000:]}")


async def wait_done(
    pool: asyncpg.Pool,
    redis: Redis,
    settings: Settings,
    org: str,
    expected: int,
    *,
    began: float,
    limit: float,
) -> float:
    """Seconds since ``began`` until the merge group has read and acknowledged every event on
    every partition (it acks only after the effect committed), then checks the org's merges
    really are applied. Polling the group is O(partitions); counting 100k rows every few ms
    was not."""
    while time.perf_counter() - began < limit:
        if await group_backlog(redis, settings.event_streams) == 0:
            elapsed = time.perf_counter() - began
            done = await pool.fetchval(
                "SELECT count(*) FROM merges WHERE org_id = $1 AND status IN ('done', 'failed')",
                uuid.UUID(org),
            )
            if done >= expected:
                return elapsed
        await asyncio.sleep(0.02)
    raise SystemExit(f"merges not done within {limit} s")


async def wait_dealt(
    pool: asyncpg.Pool,
    redis: Redis,
    settings: Settings,
    consumers: Sequence[Popen[bytes]],
    logs: Sequence[Path],
) -> None:
    """Until every consumer reads: each partition's group exists and, with partitions, each
    is owned and every consumer owns its share (one owner per partition: the leases)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        check_alive(consumers, logs)
        if await group_backlog(redis, settings.event_streams) is not None:
            if settings.stream_partitions == 1:
                return
            owned, owners = await pool.fetchrow(
                """SELECT count(*), count(DISTINCT owner) FROM partition_leases
                   WHERE consumer_group = $1 AND owner IS NOT NULL AND partition < $2""",
                GROUP,
                settings.stream_partitions,
            )
            if owned == settings.stream_partitions and owners == min(owned, len(consumers)):
                return
        await asyncio.sleep(0.1)
    raise SystemExit("merge consumers did not share out the partitions within 120 s")


async def new_org(pool: asyncpg.Pool, name: str) -> str:
    # One org per scenario, so each scenario's completion check counts only its own merges.
    return str(
        await pool.fetchval(
            "INSERT INTO orgs (id, name) VALUES (gen_random_uuid(), $1) RETURNING id", name
        )
    )


@contextlib.contextmanager
def started(env: dict[str, str], count: int, logs: Sequence[Path]) -> Iterator[list[Popen[bytes]]]:
    """``count`` merge consumer processes, stopped (SIGTERM, then waited for) on exit."""
    argv = [sys.executable, "-m", "services.cli", "consume", "history", "--port", "0"]
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(process(argv, env, log)) for log in logs[:count]]


async def measure(env: dict[str, str], workdir: Path, scale: MergeScale) -> MergeRow:
    """Throughput, lag and backlog drain with the partitions and consumers ``env`` asks for."""
    settings = Settings.from_env(env)
    partitions = settings.stream_partitions
    pool = await create_pool(settings)
    outbox = Outbox(settings.event_streams)
    redis = create_redis(settings)
    logs = [workdir / f"consumer-p{partitions}-{i}.log" for i in range(partitions)]
    roots = {
        "Postgres": await postmaster_pid(settings.database_url),
        "Redis": await redis_pid(settings.redis_url),
    }
    try:
        with started(env, partitions, logs) as consumers:
            await wait_dealt(pool, redis, settings, consumers, logs)
            roots |= {f"consumer {i}": proc.pid for i, proc in enumerate(consumers)}

            # 1. Throughput: merges of 50 conversations each, all in the outbox at the start.
            org = await new_org(pool, "bench-throughput")
            pairs = await load_scopes(pool, org, scale.merges, scale.conversations_each)
            ids = await request_merges(pool, outbox, org, pairs)
            before, machine = cpu_sample(roots), machine_busy_seconds()
            began = time.perf_counter()
            async with relaying(settings, redis):
                seconds = await wait_done(
                    pool, redis, settings, org, len(ids), began=began, limit=600
                )
                after, machine = cpu_sample(roots), machine_busy_seconds() - machine
            busy = {name: (after[name] - before[name]) / seconds for name in roots}
            cores = {
                "consumers": sum(v for k, v in busy.items() if k.startswith("consumer ")),
                "Postgres": busy["Postgres"],
                "Redis": busy["Redis"],
                "machine": machine / seconds,
            }
            moved = await pool.fetchval(
                "SELECT count(*) FROM conversations WHERE contact_id IS NOT NULL AND org_id = $1",
                uuid.UUID(org),
            )
            if moved != scale.merges * scale.conversations_each:
                # A failed merge is "done" for the wait: the rate would count work not done.
                raise SystemExit(
                    f"{partitions} partitions: {moved} conversations moved, expected"
                    f" {scale.merges * scale.conversations_each}; see {logs[0].parent}"
                )

            # 2. Lag under a steady load: LAG_RATE merges/s, each published as it commits.
            org = await new_org(pool, "bench-lag")
            pairs = await load_scopes(pool, org, int(LAG_RATE * scale.lag_seconds), 5)
            emitted: dict[str, float] = {}
            async with relaying(settings, redis):
                began = time.perf_counter()
                for i in range(0, len(pairs), 20):
                    emitted.update(await request_merges(pool, outbox, org, pairs[i : i + 20]))
                    await asyncio.sleep(max(0.0, began + (i + 20) / LAG_RATE - time.perf_counter()))
                await wait_done(pool, redis, settings, org, len(emitted), began=began, limit=120)
            rows = await pool.fetch(
                "SELECT id, extract(epoch FROM completed_at) AS done FROM merges WHERE id = ANY($1::uuid[])",
                list(emitted),
            )
            lags = sorted(
                (float(r["done"]) - emitted[str(r["id"])]) * 1000
                for r in rows
                if r["done"] is not None
            )

            # 3. Backlog: merge events all in the outbox, then the relay starts.
            org = await new_org(pool, "bench-backlog")
            pairs = await load_scopes(pool, org, scale.backlog, 1)
            ids = await request_merges(pool, outbox, org, pairs)
            began = time.perf_counter()
            async with relaying(settings, redis):
                drained = await wait_done(
                    pool, redis, settings, org, len(ids), began=began, limit=900
                )
            check_alive(consumers, logs)
    finally:
        await pool.close()
        await redis.aclose()
    return MergeRow(partitions, partitions, moved, seconds, cores, lags, drained)


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def table(rows: list[MergeRow], scale: MergeScale) -> list[str]:
    cpus = os.cpu_count() or 1
    base = next((r.rate for r in rows if r.partitions == 1), None)
    head = (
        "partitions",
        "consumers",
        "conversations/s",
        "vs 1",
        "lag p50",
        "lag p99",
        "backlog drain",
        "cores busy: consumers+Postgres+Redis / machine",
    )
    body = []
    for r in rows:
        lag50 = f"{statistics.median(r.lags):.1f} ms" if r.lags else "-"
        lag99 = f"{percentile(r.lags, 0.99):.1f} ms" if r.lags else "-"
        body.append(
            (
                str(r.partitions),
                str(r.consumers),
                f"{r.rate:,.0f}",
                f"{r.rate / base:.2f}x" if base else "-",
                lag50,
                lag99,
                f"{r.drained:.1f} s ({scale.backlog / r.drained:,.0f}/s)",
                f"{r.cores['consumers']:.2f}+{r.cores['Postgres']:.2f}+{r.cores['Redis']:.2f}"
                f" / {r.cores['machine']:.2f} of {cpus}",
            )
        )
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = [
        f"  {cpus} cores on this machine: consumer processes beyond that share them with"
        " Postgres, Redis and the relay (last column: CPU during the throughput run)"
    ]
    for line in [head, *body]:
        lines.append("  " + "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
    lines += [
        f"  throughput: {scale.merges:,} merges of {scale.conversations_each} conversations"
        f" queued at once; lag: {LAG_RATE} merges/s for {scale.lag_seconds:.0f} s;"
        f" backlog: {scale.backlog:,} merge events queued at once",
        "  targets: >= 20,000 conversations/s, lag p99 <= 500 ms, 100,000 merge events"
        " drained in < 120 s (one partition, one consumer)",
    ]
    return lines


async def run_merges(
    envs: Mapping[int, dict[str, str]], workdir: Path, scale: MergeScale = FULL
) -> list[str]:
    """One row per partition count in ``envs``, each a fresh database's environment."""
    rows = []
    for partitions, env in envs.items():
        env = {
            **env,
            "STREAM_PARTITIONS": str(partitions),
            "STREAM_PREFIX": f"wi-bench-p{partitions}:",
            "RELAY_ENABLED": "false",
            "CONSUMER_CLAIM_IDLE_MS": "5000",
        }
        rows.append(await measure(env, workdir, scale))
    return table(rows, scale)
