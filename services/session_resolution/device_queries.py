"""SQL of the ``device_bindings`` table: which browsers verified as which (contact,
externalId), and when each last asked for a login merge; and of ``merge_requests``, the login
merges promised in session responses. Every lookup carries the org (promise 8) or a visitor
already reached through one.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg


async def bind_device(
    conn: asyncpg.Connection, *, org_id: str, contact_id: str, visitor_id: str, external_id: str
) -> bool:
    """Record that this browser verified as (contact, externalId); True when new."""
    inserted = await conn.fetchval(
        """INSERT INTO device_bindings (org_id, contact_id, visitor_id, external_id)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (contact_id, visitor_id, external_id) DO NOTHING
           RETURNING true""",
        uuid.UUID(org_id),
        uuid.UUID(contact_id),
        uuid.UUID(visitor_id),
        external_id,
    )
    return bool(inserted)


async def has_unmerged_browser_sessions(conn: asyncpg.Connection, visitor_id: str) -> bool:
    """Did this browser have a non-verified session after its latest merge request (or ever,
    when none was requested)? Only such sessions can hold browser-bound history to merge."""
    found: bool = await conn.fetchval(
        """SELECT EXISTS (
               SELECT 1 FROM sessions
               WHERE visitor_id = $1 AND level <> 'verified'
                 AND created_at > COALESCE(
                     (SELECT max(last_merge_requested_at) FROM device_bindings
                      WHERE visitor_id = $1), '-infinity'::timestamptz))""",
        uuid.UUID(visitor_id),
    )
    return found


async def mark_merge_requested(
    conn: asyncpg.Connection, *, contact_id: str, visitor_id: str, external_id: str
) -> None:
    # clock_timestamp(), not now(): a browser-bound session committed while this transaction
    # waited for the visitor lock has an earlier created_at than now() would be.
    await conn.execute(
        """UPDATE device_bindings SET last_merge_requested_at = clock_timestamp()
           WHERE contact_id = $1 AND visitor_id = $2 AND external_id = $3""",
        uuid.UUID(contact_id),
        uuid.UUID(visitor_id),
        external_id,
    )


async def insert_merge_request(
    conn: asyncpg.Connection,
    *,
    merge_id: str,
    org_id: str,
    visitor_id: str,
    contact_id: str,
    external_id: str,
) -> None:
    """Record the login merge a session response is about to promise, so history can show it
    pending (and apply it from Postgres) before, or without, its event."""
    await conn.execute(
        """INSERT INTO merge_requests (id, org_id, visitor_id, contact_id, external_id)
           VALUES ($1, $2, $3, $4, $5)""",
        uuid.UUID(merge_id),
        uuid.UUID(org_id),
        uuid.UUID(visitor_id),
        uuid.UUID(contact_id),
        external_id,
    )


@dataclass(frozen=True, slots=True)
class DeviceRow:
    visitor_id: str
    external_id: str
    bound_at: datetime
    last_seen_at: datetime


async def contact_devices(pool: asyncpg.Pool, org_id: str, contact_id: str) -> list[DeviceRow]:
    rows = await pool.fetch(
        """SELECT b.visitor_id, b.external_id, b.bound_at, v.last_seen_at
           FROM device_bindings b JOIN visitors v ON v.id = b.visitor_id
           WHERE b.org_id = $1 AND b.contact_id = $2 AND b.unbound_at IS NULL
           ORDER BY v.last_seen_at DESC, b.visitor_id LIMIT 1000""",
        uuid.UUID(org_id),
        uuid.UUID(contact_id),
    )
    return [
        DeviceRow(str(r["visitor_id"]), r["external_id"], r["bound_at"], r["last_seen_at"])
        for r in rows
    ]


async def lock_bound_visitor(
    conn: asyncpg.Connection, *, org_id: str, contact_id: str, visitor_id: str
) -> bool:
    """Lock a live visitor bound to this contact (for device revocation); False if none."""
    found = await conn.fetchval(
        """SELECT true FROM visitors v
           WHERE v.id = $1 AND v.org_id = $2 AND v.unbound_at IS NULL
             AND EXISTS (SELECT 1 FROM device_bindings b
                         WHERE b.visitor_id = v.id AND b.contact_id = $3
                           AND b.unbound_at IS NULL)
           FOR UPDATE OF v""",
        uuid.UUID(visitor_id),
        uuid.UUID(org_id),
        uuid.UUID(contact_id),
    )
    return bool(found)
