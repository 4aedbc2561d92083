"""SQL of the ``visitors`` table: one row per browser (its token hash, remembered values).

Every lookup by token carries the org (promise 8); lookups by id serve rows the caller already
reached through an org-scoped path.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.session_resolution.identity import Scalar


@dataclass(frozen=True, slots=True)
class VisitorRow:
    id: str
    org_id: str
    attributes: dict[str, Scalar]
    last_seen_at: datetime


def _visitor(row: asyncpg.Record) -> VisitorRow:
    return VisitorRow(
        id=str(row["id"]),
        org_id=str(row["org_id"]),
        attributes=row["attributes"],
        last_seen_at=row["last_seen_at"],
    )


async def find_live_visitor(
    conn: asyncpg.Pool | asyncpg.Connection, org_id: str, token_hash: bytes
) -> VisitorRow | None:
    """A bound visitor of this org. Unknown, other-org and logged-out tokens all read as None."""
    row = await conn.fetchrow(
        """SELECT id, org_id, attributes, last_seen_at FROM visitors
           WHERE token_hash = $1 AND org_id = $2 AND unbound_at IS NULL""",
        token_hash,
        uuid.UUID(org_id),
    )
    return None if row is None else _visitor(row)


async def lock_live_visitor(conn: asyncpg.Connection, visitor_id: str) -> VisitorRow | None:
    """Serialises every state change of one browser (resolution, merge trigger, logout)."""
    row = await conn.fetchrow(
        """SELECT id, org_id, attributes, last_seen_at FROM visitors
           WHERE id = $1 AND unbound_at IS NULL FOR UPDATE""",
        uuid.UUID(visitor_id),
    )
    return None if row is None else _visitor(row)


async def insert_visitor(
    conn: asyncpg.Connection,
    *,
    visitor_id: str,
    org_id: str,
    token_hash: bytes,
    attributes: dict[str, Scalar],
) -> datetime:
    last_seen: datetime = await conn.fetchval(
        """INSERT INTO visitors (id, org_id, token_hash, attributes) VALUES ($1, $2, $3, $4)
           RETURNING last_seen_at""",
        uuid.UUID(visitor_id),
        uuid.UUID(org_id),
        token_hash,
        attributes,
    )
    return last_seen


async def update_visitor(
    conn: asyncpg.Connection, visitor_id: str, attributes: dict[str, Scalar]
) -> datetime:
    last_seen: datetime = await conn.fetchval(
        """UPDATE visitors SET attributes = $2, last_seen_at = now() WHERE id = $1
           RETURNING last_seen_at""",
        uuid.UUID(visitor_id),
        attributes,
    )
    return last_seen


async def touch_visitor(pool: asyncpg.Pool, visitor_id: str) -> datetime | None:
    last_seen: datetime | None = await pool.fetchval(
        """UPDATE visitors SET last_seen_at = now() WHERE id = $1 AND unbound_at IS NULL
           RETURNING last_seen_at""",
        uuid.UUID(visitor_id),
    )
    return last_seen


async def unbind_visitor(conn: asyncpg.Connection, visitor_id: str) -> None:
    await conn.execute(
        "UPDATE visitors SET unbound_at = now() WHERE id = $1 AND unbound_at IS NULL",
        uuid.UUID(visitor_id),
    )
    await conn.execute(
        """UPDATE device_bindings SET unbound_at = now()
           WHERE visitor_id = $1 AND unbound_at IS NULL""",
        uuid.UUID(visitor_id),
    )


async def visitor_token_hash(conn: asyncpg.Connection, visitor_id: str) -> bytes | None:
    value: bytes | None = await conn.fetchval(
        "SELECT token_hash FROM visitors WHERE id = $1", uuid.UUID(visitor_id)
    )
    return value
