"""Rows the history tests stand on (orgs, keys, visitors, contacts, sessions, conversations),
written straight into Postgres so history tests do not depend on the other services' APIs,
plus merge-request events as the session service would emit them."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

from services.history import app as history
from shared.bus.events import EVENT_FIELD, HistoryMergeRequested, MergeRequestedData, encode_event
from shared.bus.outbox import Outbox
from shared.bus.partitions import stream_of
from shared.config import Settings
from shared.identity.api_keys import generate_api_key
from shared.service import service_app

ALL_SCOPES = ("history:read", "history:write", "contacts:manage")


@dataclass(frozen=True)
class Org:
    id: str
    key: str  # an API key with ALL_SCOPES
    widget_token_id: str


async def make_api_key(pool: asyncpg.Pool, org_id: str, scopes: Iterable[str]) -> str:
    new = generate_api_key()
    await pool.execute(
        """INSERT INTO api_keys (id, org_id, key_hash, display_prefix, scopes)
           VALUES ($1, $2, $3, $4, $5)""",
        uuid.uuid4(),
        org_id,
        new.key_hash,
        new.display_prefix,
        list(scopes),
    )
    return new.key


async def make_org(pool: asyncpg.Pool, org_id: str | None = None) -> Org:
    org_id = org_id or str(uuid.uuid4())
    await pool.execute("INSERT INTO orgs (id, name) VALUES ($1, 'Acme')", org_id)
    widget_token_id = str(uuid.uuid4())
    await pool.execute(
        """INSERT INTO widget_tokens (id, org_id, token_hash, display_prefix)
           VALUES ($1, $2, $3, 'wt_test')""",
        widget_token_id,
        org_id,
        os.urandom(32),
    )
    return Org(org_id, await make_api_key(pool, org_id, ALL_SCOPES), widget_token_id)


async def make_visitor(pool: asyncpg.Pool, org: Org, *, visitor_id: str | None = None) -> str:
    visitor_id = visitor_id or str(uuid.uuid4())
    await pool.execute(
        "INSERT INTO visitors (id, org_id, token_hash) VALUES ($1, $2, $3)",
        visitor_id,
        org.id,
        os.urandom(32),
    )
    return visitor_id


async def make_visitors(pool: asyncpg.Pool, org: Org, count: int) -> list[str]:
    ids = [uuid.uuid4() for _ in range(count)]
    await pool.execute(
        """INSERT INTO visitors (id, org_id, token_hash)
           SELECT v, $2, sha256(v::text::bytea) FROM unnest($1::uuid[]) AS v""",
        ids,
        org.id,
    )
    return [str(i) for i in ids]


async def make_contact(
    pool: asyncpg.Pool, org: Org, *, email: str | None = None, contact_id: str | None = None
) -> str:
    contact_id = contact_id or str(uuid.uuid4())
    user_id = f"user-{secrets.token_hex(4)}"
    attributes = {"name": {"value": "Ada Lovelace", "source": "server", "verified": True}}
    if email:
        attributes["email"] = {"value": email, "source": "server", "verified": True}
    await pool.execute(
        """INSERT INTO contacts (id, org_id, contact_key, user_id, verified_email, attributes)
           VALUES ($1, $2, $3, $4, $5, $6)""",
        contact_id,
        org.id,
        f"user:{user_id}",
        user_id,
        email,
        attributes,
    )
    return contact_id


async def make_session(
    pool: asyncpg.Pool,
    org: Org,
    visitor_id: str,
    *,
    contact_id: str | None = None,
    external_id: str = "",
    level: str | None = None,
    expired: bool = False,
    ended: bool = False,
    attributes: Mapping[str, object] | None = None,
) -> str:
    session_id = str(uuid.uuid4())
    await pool.execute(
        """INSERT INTO sessions (id, org_id, visitor_id, widget_token_id, level, contact_id,
                                 external_id, attributes, expires_at, ended_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8,
                   now() + CASE WHEN $9 THEN interval '-1 minute' ELSE interval '1 hour' END,
                   CASE WHEN $10 THEN now() END)""",
        session_id,
        org.id,
        visitor_id,
        org.widget_token_id,
        level or ("verified" if contact_id else "anonymous"),
        contact_id,
        external_id,
        attributes or {},
        expired,
        ended,
    )
    return session_id


async def bind_device(
    pool: asyncpg.Pool, org: Org, contact_id: str, visitor_id: str, external_id: str = ""
) -> None:
    await pool.execute(
        """INSERT INTO device_bindings (org_id, contact_id, visitor_id, external_id)
           VALUES ($1, $2, $3, $4)""",
        org.id,
        contact_id,
        visitor_id,
        external_id,
    )


async def add_conversations(
    pool: asyncpg.Pool,
    org: Org,
    *,
    visitor_id: str | None = None,
    contact_id: str | None = None,
    external_id: str = "",
    origin_visitor_id: str | None = None,
    count: int = 1,
    messages: int = 1,
) -> list[str]:
    """``count`` conversations in one scope, each with ``messages`` messages (set-based)."""
    origin = origin_visitor_id or visitor_id
    assert origin is not None
    ids = [uuid.uuid4() for _ in range(count)]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """INSERT INTO conversations
                   (id, org_id, visitor_id, contact_id, external_id, origin_visitor_id, created_at)
               SELECT c, $2, $3, $4, $5, $6, now() - make_interval(secs => n)
               FROM unnest($1::uuid[]) WITH ORDINALITY AS t(c, n)""",
            ids,
            org.id,
            visitor_id,
            contact_id,
            external_id,
            origin,
        )
        if messages:
            await conn.execute(
                """INSERT INTO messages (id, org_id, conversation_id, author, sender_verified, body)
                   SELECT gen_random_uuid(), $2, c, 'visitor', $4, 'hello ' || i
                   FROM unnest($1::uuid[]) AS c, generate_series(1, $3) AS i""",
                ids,
                org.id,
                messages,
                contact_id is not None,
            )
    return [str(i) for i in ids]


def merge_request(
    org: Org,
    *,
    target_contact_id: str,
    target_external_id: str = "",
    source_visitor_id: str | None = None,
    source_contact_id: str | None = None,
    source_external_id: str = "",
    merge_id: str | None = None,
    reason: str | None = None,
) -> MergeRequestedData:
    return MergeRequestedData(
        merge_id=merge_id or str(uuid.uuid4()),
        reason=reason or ("login" if source_visitor_id else "admin"),
        target_contact_id=target_contact_id,
        target_external_id=target_external_id,
        source_visitor_id=source_visitor_id,
        source_contact_id=source_contact_id,
        source_external_id=source_external_id,
    )


def merge_event(
    org: Org, data: MergeRequestedData, *, subject: str | None = None
) -> HistoryMergeRequested:
    """The event as a publisher would build it (a fresh event id each call)."""
    return HistoryMergeRequested(
        id=str(uuid.uuid4()),
        org_id=org.id,
        subject=subject or data.source_visitor_id or data.target_contact_id,
        seq=1,
        occurred_at=datetime.now(UTC),
        data=data,
    )


async def emit_merge_requests(
    pool: asyncpg.Pool, settings: Settings, org: Org, requests: Iterable[MergeRequestedData]
) -> None:
    """Commit merge requests through the outbox, as the session service does on login."""
    outbox = Outbox(settings.event_streams[0])
    async with pool.acquire() as conn, conn.transaction():
        for data in requests:
            await outbox.emit(
                conn,
                HistoryMergeRequested,
                org_id=org.id,
                subject=data.source_visitor_id or data.target_contact_id,
                data=data,
            )


async def publish(
    redis: aioredis.Redis, settings: Settings, events: Iterable[HistoryMergeRequested]
) -> None:
    """Put events straight on their subject's partition (to deliver one event several
    times)."""
    pipe = redis.pipeline(transaction=False)
    for event in events:
        stream = stream_of(event.subject, settings.event_streams)
        pipe.xadd(stream, {EVENT_FIELD: encode_event(event)})
    await pipe.execute()


def history_app(settings: Settings, *, consumer: bool = True) -> web.Application:
    """The history service alone, with (by default) its merge consumer in the same process."""
    app = service_app(settings, name="history-test")
    history.setup_routes(app)
    if consumer:
        history.setup_consumers(app)
    return app
