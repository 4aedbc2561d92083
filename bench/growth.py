"""Cost as the data grows: for 10^4, 10^5 (and 10^6 without ``--quick``) visitors and contacts
loaded in bulk (bench/plans.py ``bulk_load``, generate_series in Postgres, not the API):

- session throughput for new and returning visitors (the all-in-one server under load);
- the history page's read (``shared.scope_history.scope_page``, first page) for a person
  with 10, 1,000 and 10,000 conversations, median of repeated calls, in-process;
- the time to apply a login merge of 10,000 conversations (``apply_requested_merge``);
- the time to erase a person with 10,000 conversations (``erase_contact`` + the scrub);
- at 10^5: every hot statement EXPLAINed, each Seq Scan on a hot table printed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from bench.plans import bulk_load, capture, known, seq_scans
from bench.provision import ORIGIN, provision
from bench.runner import run_load
from bench.stack import all_in_one_argv, free_port, prepare, process, wait_ready
from bench.wrk import available, run_wrk
from devstack import DevServers
from services.history.erasure import erase_contact
from services.history.merges import apply_requested_merge
from shared.bus.events import MergeRequestedData
from shared.bus.outbox import Outbox
from shared.config import Settings
from shared.db import create_pool
from shared.scope_history import HistoryScope, scope_page

PEOPLE = (10, 1_000, 10_000)
MERGED = 10_000  # the merge moves a visitor's 10,000 into the 1,000-conversation person


async def _person(conn: asyncpg.Connection, org: str, conversations: int, *, contact: bool) -> str:
    """A contact (or a visitor) of ``org`` with that many conversations of one message each."""
    person = uuid.uuid4()
    visitor = uuid.uuid4() if contact else person
    await conn.execute(
        "INSERT INTO visitors (id, org_id, token_hash) VALUES ($1, $2, $3)",
        visitor,
        uuid.UUID(org),
        uuid.uuid4().bytes * 2,
    )
    if contact:
        await conn.execute(
            "INSERT INTO contacts (id, org_id, contact_key) VALUES ($1, $2, $3)",
            person,
            uuid.UUID(org),
            f"user:growth-{person}",
        )
    await conn.execute(
        """WITH c AS (
               INSERT INTO conversations (id, org_id, visitor_id, contact_id, origin_visitor_id,
                                          created_at)
               SELECT gen_random_uuid(), $1, $2, $3, $4, now() - i * interval '1 second'
               FROM generate_series(1, $5) AS i RETURNING id)
           INSERT INTO messages (id, org_id, conversation_id, author, sender_verified, body)
           SELECT gen_random_uuid(), $1, id, 'visitor', false, 'growth' FROM c""",
        uuid.UUID(org),
        None if contact else visitor,
        person if contact else None,
        visitor,
        conversations,
        timeout=600,
    )
    return str(person)


async def _sessions(args: argparse.Namespace, env: dict[str, str], workdir: Path) -> list[float]:
    """Requests per second for new, then returning visitors, against the all-in-one server."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = workdir / "growth-server.log"
    with process(all_in_one_argv(), {**env, "PORT": str(port)}, log) as server:
        await wait_ready(base + "/readyz", server, log)
        data = await provision(base, env["ADMIN_TOKEN"], users=0, anonymous=200)
        origin = {"Origin": ORIGIN}
        specs: list[list[dict[str, Any]]] = [
            [
                {
                    "path": "/widget/sessions",
                    "body": {"widgetToken": data["widget"]},
                    "headers": origin,
                }
            ],
            [{"path": "/widget/sessions", "body": b, "headers": origin} for b in data["anonymous"]],
        ]
        rates = []
        for requests in specs:
            spec = {
                "base_url": base,
                "concurrency": args.concurrency,
                "duration": args.duration,
                "warmup": args.warmup,
                "requests": requests,
            }
            measured = {"server": server.pid}
            window = await (
                run_wrk(spec, workdir, measured)
                if available() and not args.python_load
                else run_load(spec, workdir, measured)
            )
            rates.append(float(window.result["rps"]))
    return rates


async def _timed(pool: asyncpg.Pool, settings: Settings, org: str) -> list[str]:
    lines = []
    outbox = Outbox(settings.events_stream)
    async with pool.acquire() as conn:
        people = {k: await _person(conn, org, k, contact=True) for k in PEOPLE}
        source = await _person(conn, org, MERGED, contact=False)
        await conn.execute("ANALYZE conversations, messages")
    reads = []
    for k, contact in people.items():
        scope = HistoryScope.of_contact(org, contact, "")
        times = []
        for _ in range(15):
            began = time.perf_counter()
            await scope_page(pool, scope, limit=20, after=None, messages_per=200)
            times.append((time.perf_counter() - began) * 1000)
        reads.append(f"{k:,}: {statistics.median(times):.2f} ms")
    lines.append(
        "      history page (first page, median of 15) for a person with " + ", ".join(reads)
    )
    async with pool.acquire() as conn:
        began = time.perf_counter()
        async with conn.transaction():
            outcome = await apply_requested_merge(
                conn,
                outbox,
                org,
                MergeRequestedData(
                    merge_id=str(uuid.uuid4()),
                    reason="login",
                    source_visitor_id=source,
                    target_contact_id=people[PEOPLE[1]],
                ),
            )
        merged = time.perf_counter() - began
        began = time.perf_counter()
        async with conn.transaction():
            receipt = await erase_contact(conn, outbox, org, people[PEOPLE[-1]])
        erased = time.perf_counter() - began
    lines.append(
        f"      merge of {outcome.moved:,} conversations: {merged * 1000:,.0f} ms;"
        f" erasure of a person with {receipt.conversations_deleted:,} conversations"
        f" ({receipt.messages_deleted:,} messages): {erased * 1000:,.0f} ms"
    )
    return lines


async def run_growth(
    args: argparse.Namespace, servers: DevServers, workdir: Path, sizes: list[int]
) -> None:
    for n in sizes:
        env = await asyncio.to_thread(prepare, servers)
        settings = Settings.from_env(env)
        pool = await create_pool(settings)
        try:
            began = time.perf_counter()
            async with pool.acquire() as conn:
                org = await bulk_load(conn, n)
            print(
                f"  {n:>9,} visitors and contacts (+ sessions, conversations, messages, merges,"
                f" outbox rows; loaded in {time.perf_counter() - began:.0f} s):",
                flush=True,
            )
            new, returning = await _sessions(args, env, workdir)
            print(
                f"      sessions: new visitor {new:,.0f} req/s, returning visitor {returning:,.0f} req/s",
                flush=True,
            )
            for line in await _timed(pool, settings, org):
                print(line, flush=True)
            if n == 10**5:
                statements = await capture(settings, env["ADMIN_TOKEN"])
                async with pool.acquire() as conn:
                    scans = await seq_scans(conn, statements)
                distinct = len({s.query for s in statements})
                print(
                    f"      index check: {distinct} distinct statements of the hot paths EXPLAINed;"
                    f" Seq Scans on hot tables: {len(scans) or 'none'}",
                    flush=True,
                )
                for table, query in scans:
                    why = known(query)
                    first = " ".join(query.split())[:140]
                    print(
                        f"        Seq Scan on {table}{' (known: ' + why + ')' if why else ''}:"
                        f" {first}",
                        flush=True,
                    )
        finally:
            await pool.close()
