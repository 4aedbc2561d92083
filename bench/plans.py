"""Do the hot paths' queries use indexes once the tables are big? Used by the growth section
of ``make bench`` and by tests/test_bench_indexes.py.

- ``bulk_load``: n rows in every hot table, generated in Postgres (generate_series), then
  ANALYZE, so the planner sees realistic sizes.
- ``capture``: drive each hot path once, in-process against the real all-in-one app (every
  service, its relay and consumers), a login merge and an erasure through their use-case
  functions, and record every statement with its arguments (asyncpg's query logging). The
  statements come from the code, so the check follows it.
- ``seq_scans``: EXPLAIN (FORMAT JSON) each distinct statement with its recorded arguments
  and list every Seq Scan on a hot table.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

import shared.db
from shared.config import Settings

HOT_TABLES = frozenset(
    {
        "contacts",
        "visitors",
        "sessions",
        "device_bindings",
        "merge_requests",
        "conversations",
        "messages",
        "merges",
        "outbox",
        "processed_events",
        "subject_seqs",
    }
)
ORIGIN = "https://plans.example"
# Statements allowed a Seq Scan on a hot table, each with the reason. Keep this short.
KNOWN_SCANS: dict[str, str] = {
    "position(convert_to(s.subject, 'UTF8') IN payload)": (
        "erasure's outbox scrub (every row naming the person, and each stream's newest"
        " published id): a substring search no index serves, once per erasure; the outbox"
        " is bounded by its retention prune"
    ),
}


@dataclass(frozen=True, slots=True)
class Statement:
    query: str
    args: tuple[Any, ...]


async def bulk_load(conn: asyncpg.Connection, n: int) -> str:
    """A fresh org with n contacts, visitors (one anonymous session, device binding,
    browser-bound conversation and message each), merges, merge requests, outbox rows and
    processed events; returns the org id."""
    org = str(uuid.uuid4())
    widget = uuid.uuid4()
    await conn.execute("INSERT INTO orgs (id, name) VALUES ($1, 'bulk')", uuid.UUID(org))
    await conn.execute(
        """INSERT INTO widget_tokens (id, org_id, token_hash, display_prefix)
           VALUES ($1, $2, $3, 'bulk')""",
        widget,
        uuid.UUID(org),
        secrets.token_bytes(32),
    )
    tag = secrets.token_hex(4)  # unique keys when loading several times into one database
    await conn.execute(
        f"""CREATE TEMP TABLE bulk AS
            SELECT i, gen_random_uuid() AS contact, gen_random_uuid() AS visitor,
                   gen_random_uuid() AS conversation
            FROM generate_series(1, {int(n)}) AS i;
        INSERT INTO contacts (id, org_id, contact_key, user_id, verified_email)
            SELECT contact, $1, 'user:{tag}-' || i, '{tag}-' || i, '{tag}-' || i || '@bulk.example'
            FROM bulk;
        INSERT INTO visitors (id, org_id, token_hash)
            SELECT visitor, $1, sha256(convert_to('{tag}' || i, 'UTF8')) FROM bulk;
        INSERT INTO sessions (id, org_id, visitor_id, widget_token_id, level, token_hash,
                              expires_at)
            SELECT gen_random_uuid(), $1, visitor, $2, 'anonymous',
                   sha256(convert_to('s{tag}' || i, 'UTF8')), now() + interval '1 day'
            FROM bulk;
        INSERT INTO device_bindings (org_id, contact_id, visitor_id) SELECT $1, contact, visitor FROM bulk;
        INSERT INTO conversations (id, org_id, visitor_id, origin_visitor_id, created_at)
            SELECT conversation, $1, visitor, visitor, now() - i * interval '1 second' FROM bulk;
        INSERT INTO messages (id, org_id, conversation_id, author, sender_verified, body)
            SELECT gen_random_uuid(), $1, conversation, 'visitor', false, 'bulk' FROM bulk;
        INSERT INTO merges (id, org_id, reason, status, source_visitor_id, target_contact_id,
                            completed_at)
            SELECT gen_random_uuid(), $1, 'login', 'done', visitor, contact, now() FROM bulk;
        INSERT INTO merge_requests (id, org_id, visitor_id, contact_id)
            SELECT gen_random_uuid(), $1, visitor, contact FROM bulk;
        INSERT INTO outbox (event_id, stream, event_type, payload, published_at)
            SELECT gen_random_uuid(), 'bulk', 'bulk.loaded', convert_to(contact::text, 'UTF8'), now()
            FROM bulk;
        INSERT INTO processed_events (consumer, event_id)
            SELECT 'bulk', gen_random_uuid() FROM bulk;
        INSERT INTO subject_seqs (subject, seq) SELECT visitor::text, 1 FROM bulk;
        DROP TABLE bulk;""".replace("$1", f"'{org}'::uuid").replace("$2", f"'{widget}'::uuid"),
        timeout=3600,
    )
    await conn.execute("ANALYZE", timeout=3600)
    return org


@contextmanager
def _logging_pools(found: list[Statement]) -> Iterator[None]:
    """Every pool shared.db creates while inside logs its statements into ``found``."""
    original = shared.db._init_connection

    async def init(conn: asyncpg.Connection) -> None:
        await original(conn)
        conn.add_query_logger(lambda q: found.append(Statement(q.query, tuple(q.args or ()))))

    shared.db._init_connection = init
    try:
        yield
    finally:
        shared.db._init_connection = original


@asynccontextmanager
async def _served(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None, **headers: str
) -> Any:
    async with http.request(method, url, json=body, headers=headers) as resp:
        data = await resp.json(content_type=None)
        if resp.status >= 300:
            raise RuntimeError(f"{method} {url} -> {resp.status}: {data}")
        return data


async def capture(settings: Settings, admin_token: str) -> list[Statement]:
    """Drive every hot path once; the statements they ran (provisioning excluded)."""
    from services import all_in_one
    from services.history.erasure import erase_contact
    from services.history.merges import apply_requested_merge
    from shared.bus.events import MergeRequestedData
    from shared.bus.outbox import Outbox
    from shared.redis import create_redis

    found: list[Statement] = []
    with _logging_pools(found):
        app = all_in_one.create_app(settings)
        async with _served(app) as base, aiohttp.ClientSession() as http:
            admin = {"Authorization": f"Bearer {admin_token}"}
            org = await _call(http, "POST", f"{base}/admin/v1/orgs", {"name": "plans"}, **admin)
            key = await _call(
                http,
                "POST",
                f"{base}/admin/v1/orgs/{org['id']}/api-keys",
                {"scopes": ["contacts:authenticate", "history:write", "history:read"]},
                **admin,
            )
            widget = await _call(
                http,
                "POST",
                f"{base}/admin/v1/orgs/{org['id']}/widget-tokens",
                {"allowedOrigins": [ORIGIN], "settings": {}},
                **admin,
            )
            found.clear()
            api = {"Authorization": f"Bearer {key['key']}"}
            person = {"userId": "plans-1", "email": "plans1@plans.example"}
            url = f"{base}/widget/authenticate-user"
            await _call(http, "POST", url, person, **api)  # a new contact
            user = await _call(http, "POST", url, person, **api)  # a returning one
            sessions, o = f"{base}/widget/sessions", {"Origin": ORIGIN}
            anon = await _call(http, "POST", sessions, {"widgetToken": widget["token"]}, **o)
            for _ in range(2):
                await _call(
                    http,
                    "POST",
                    f"{base}/v1/conversations",
                    {"sessionId": anon["sessionId"], "message": {"text": "hi"}},
                    **api,
                )
            redis = create_redis(settings)
            try:
                # Cache misses, so the Postgres side of each lookup runs too. (SCAN: on a
                # cluster it walks every primary.)
                async for k in redis.scan_iter(match=f"{settings.stream_prefix}sr:*"):
                    await redis.delete(k)
            finally:
                await redis.aclose()
            returning = {"widgetToken": widget["token"], "visitorToken": anon["visitorToken"]}
            await _call(http, "POST", sessions, returning, **o)
            bearer = {**o, "Authorization": f"Bearer {anon['sessionToken']}"}
            history = f"{sessions}/{anon['sessionId']}/history"
            page = await _call(http, "GET", f"{history}?limit=1", **bearer)
            await _call(http, "GET", f"{history}?limit=1&cursor={page['nextCursor']}", **bearer)
            login = await _call(
                http, "POST", sessions, {**returning, "user": {"token": user["token"]}}, **o
            )
            verified = {**o, "Authorization": f"Bearer {login['sessionToken']}"}
            await _call(http, "GET", f"{sessions}/{login['sessionId']}/history", **verified)
            # The login merge and an erasure, through their use-case functions.
            pool = await shared.db.create_pool(settings)
            outbox = Outbox(settings.events_stream)
            try:
                async with pool.acquire() as conn, conn.transaction():
                    await apply_requested_merge(
                        conn,
                        outbox,
                        org["id"],
                        MergeRequestedData(
                            merge_id=str(uuid.uuid4()),
                            reason="login",
                            source_visitor_id=login["identity"]["visitorId"],
                            target_contact_id=user["contactId"],
                        ),
                    )
                async with pool.acquire() as conn, conn.transaction():
                    await erase_contact(conn, outbox, org["id"], user["contactId"])
            finally:
                await pool.close()
    return found


def _scans(node: dict[str, Any]) -> Iterator[str]:
    if node.get("Node Type") == "Seq Scan":
        yield str(node.get("Relation Name"))
    for child in node.get("Plans", []):
        yield from _scans(child)


_PLANNED = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")


async def seq_scans(conn: asyncpg.Connection, statements: list[Statement]) -> list[tuple[str, str]]:
    """(hot table, statement) for every Seq Scan on a hot table in the statements' plans."""
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for s in statements:
        text = s.query.strip()
        if text in seen or not text.upper().startswith(_PLANNED):
            continue
        seen.add(text)
        plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {text}", *s.args)
        tree = (plan if isinstance(plan, list) else json.loads(plan))[0]["Plan"]
        found += sorted({(table, text) for table in _scans(tree) if table in HOT_TABLES})
    return found


def known(statement: str) -> str | None:
    """Why this statement's Seq Scan is accepted, or None."""
    return next((why for needle, why in KNOWN_SCANS.items() if needle in statement), None)
