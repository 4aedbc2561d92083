"""SQL of the ``visitors`` table: one row per browser (its token hash, remembered values),
and what is left of a browser erased with its contact (see ``erased_browsers``).

Every lookup by token carries the org (promise 8); lookups by id serve rows the caller already
reached through an org-scoped path.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
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


@dataclass(frozen=True, slots=True)
class ErasedBrowser:
    visitor_token_hash: bytes | None
    # (session token hash, expires_at) of each of its sessions that still has a hash.
    sessions: list[tuple[bytes, datetime]]


async def erased_browsers(
    conn: asyncpg.Connection, org_id: str, visitor_ids: Sequence[str]
) -> list[ErasedBrowser]:
    """The token hashes still kept for browsers erased with a contact, locked: what the cache
    entries of those browsers are keyed by. Browsers not (or no longer) erased are absent."""
    rows = await conn.fetch(
        """SELECT v.token_hash,
                  COALESCE(array_agg(s.token_hash) FILTER (WHERE s.token_hash IS NOT NULL),
                           '{}') AS session_hashes,
                  COALESCE(array_agg(s.expires_at) FILTER (WHERE s.token_hash IS NOT NULL),
                           '{}') AS session_expiries
           FROM visitors v LEFT JOIN sessions s ON s.visitor_id = v.id
           WHERE v.org_id = $1 AND v.id = ANY($2::uuid[]) AND v.erased_at IS NOT NULL
           GROUP BY v.id, v.token_hash""",
        uuid.UUID(org_id),
        [uuid.UUID(v) for v in visitor_ids],
    )
    return [
        ErasedBrowser(
            r["token_hash"],
            list(zip(r["session_hashes"], r["session_expiries"], strict=True)),
        )
        for r in rows
    ]


async def forget_erased_tokens(
    conn: asyncpg.Connection, org_id: str, visitor_ids: Sequence[str]
) -> None:
    """Drop the token hashes of erased browsers and their sessions: their tokens now read as
    unknown everywhere, Postgres included."""
    ids = [uuid.UUID(v) for v in visitor_ids]
    await conn.execute(
        """UPDATE sessions SET token_hash = NULL
           WHERE org_id = $1 AND visitor_id = ANY($2::uuid[]) AND token_hash IS NOT NULL
             AND visitor_id IN (SELECT id FROM visitors WHERE erased_at IS NOT NULL)""",
        uuid.UUID(org_id),
        ids,
    )
    await conn.execute(
        """UPDATE visitors SET token_hash = NULL
           WHERE org_id = $1 AND id = ANY($2::uuid[]) AND erased_at IS NOT NULL""",
        uuid.UUID(org_id),
        ids,
    )
