"""The merge path of ``make bench``: conversations moved per second, event lag under a steady
load, and the time to drain a backlog of merge events (100,000; 10,000 under ``--quick``).

Data is bulk-loaded with SQL (orgs, contacts, visitors, conversations) and merge requests
are emitted through the real outbox; the real relay publishes them and the real merge
consumer (``widget-identity consume history``, its own process) applies them.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg

from shared.bus.events import HistoryMergeRequested, MergeRequestedData
from shared.bus.outbox import Outbox
from shared.bus.relay import OutboxRelay
from shared.config import Settings
from shared.db import create_pool
from shared.redis import Redis, create_redis

ROOT = Path(__file__).resolve().parent.parent


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


async def publish_everything(settings: Settings) -> None:
    redis = create_redis(settings)
    relay = OutboxRelay(settings, redis)
    conn = await asyncpg.connect(settings.database_url)
    try:
        while await relay.publish_batch(conn):
            pass
    finally:
        await conn.close()
        await redis.aclose()


async def wait_done(
    pool: asyncpg.Pool,
    redis: Redis,
    settings: Settings,
    org: str,
    expected: int,
    limit: float,
) -> float:
    """Seconds until the merge consumer group has read and acknowledged every event on the
    stream (it acks only after the effect committed), then checks the org's merges really are
    applied. Polling the consumer group is O(1); counting 100k rows every few ms was not."""
    began = time.perf_counter()
    while time.perf_counter() - began < limit:
        groups = await redis.xinfo_groups(settings.events_stream)
        history = next((g for g in groups if g["name"] in (b"history", "history")), None)
        if history is not None and history["pending"] == 0 and history["lag"] == 0:
            elapsed = time.perf_counter() - began
            done = await pool.fetchval(
                "SELECT count(*) FROM merges WHERE org_id = $1 AND status IN ('done', 'failed')",
                uuid.UUID(org),
            )
            if done >= expected:
                return elapsed
        await asyncio.sleep(0.02)
    raise SystemExit(f"merges not done within {limit} s")


async def new_org(pool: asyncpg.Pool, name: str) -> str:
    # One org per scenario, so each scenario's completion check counts only its own merges.
    return str(
        await pool.fetchval(
            "INSERT INTO orgs (id, name) VALUES (gen_random_uuid(), $1) RETURNING id", name
        )
    )


def start_consumer(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", "consume", "history", "--port", "0"],
            env={**env, "CONSUMER_CLAIM_IDLE_MS": "5000"},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def run_merges(env: dict[str, str], workdir: Path, backlog: int = 100_000) -> list[str]:
    settings = Settings.from_env(env)
    pool = await create_pool(settings)
    outbox = Outbox(settings.events_stream)
    redis = create_redis(settings)
    lines: list[str] = []
    try:
        org = await new_org(pool, "bench-throughput")

        # 1. Throughput: 2,000 merges of 50 conversations each, published up front.
        pairs = await load_scopes(pool, org, 2000, 50)
        ids = list(await request_merges(pool, outbox, org, pairs))
        await publish_everything(settings)
        consumer = start_consumer(env, workdir / "consumer.log")
        try:
            seconds = await wait_done(pool, redis, settings, org, len(ids), limit=600)
            moved = await pool.fetchval(
                "SELECT count(*) FROM conversations WHERE contact_id IS NOT NULL AND org_id = $1",
                uuid.UUID(org),
            )
            lines.append(
                f"  merge consumer: {moved} conversations in {len(pairs)} merges in {seconds:.2f} s"
                f" = {moved / seconds:,.0f} conversations/s (target >= 20,000)"
            )

            # 2. Lag under a steady load: 200 merges/s for 15 s while the consumer runs.
            org = await new_org(pool, "bench-lag")
            pairs = await load_scopes(pool, org, 3000, 5)
            emitted: dict[str, float] = {}
            began = time.perf_counter()
            for i in range(0, len(pairs), 20):
                emitted.update(await request_merges(pool, outbox, org, pairs[i : i + 20]))
                await asyncio.sleep(max(0.0, began + (i + 20) / 200 - time.perf_counter()))
            await wait_done(pool, redis, settings, org, len(emitted), limit=120)
            rows = await pool.fetch(
                "SELECT id, extract(epoch FROM completed_at) AS done FROM merges WHERE id = ANY($1::uuid[])",
                list(emitted),
            )
            lags = sorted(
                (float(r["done"]) - emitted[str(r["id"])]) * 1000
                for r in rows
                if r["done"] is not None
            )
            if lags:
                p99 = lags[min(len(lags) - 1, int(0.99 * len(lags)))]
                lines.append(
                    f"  event lag at 200 merges/s: p50 {statistics.median(lags):.1f} ms, p99 {p99:.1f} ms"
                    f" over {len(lags)} merges (target p99 <= 500 ms)"
                )
        finally:
            stop(consumer)

        # 3. Backlog: merge events waiting in the stream, then one consumer starts.
        org = await new_org(pool, "bench-backlog")
        pairs = await load_scopes(pool, org, backlog, 1)
        ids = list(await request_merges(pool, outbox, org, pairs))
        await publish_everything(settings)
        consumer = start_consumer(env, workdir / "consumer.log")
        try:
            seconds = await wait_done(pool, redis, settings, org, len(ids), limit=900)
            lines.append(
                f"  backlog: {backlog:,} merge events drained in {seconds:.1f} s"
                f" (target: 100,000 in < 120 s)"
            )
        finally:
            stop(consumer)
    finally:
        await pool.close()
        await redis.aclose()
    return lines
