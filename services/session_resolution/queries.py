"""All SQL of the session resolution service.

It writes visitors, device_bindings and sessions (its own tables); the widget's history page
reads history's tables through ``shared.scope_history``. Every lookup carries the org
(promise 8).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.session_resolution.identity import Scalar


@dataclass(frozen=True, slots=True)
class VisitorRow:
    id: str
    org_id: str
    attributes: dict[str, Scalar]
    last_seen_at: datetime


@dataclass(frozen=True, slots=True)
class SessionRow:
    id: str
    org_id: str
    visitor_id: str
    widget_token_id: str
    level: str
    contact_id: str | None
    external_id: str
    external_id_verified: bool
    attributes: dict[str, Any]
    fingerprint: str
    token_wrapped: bytes | None
    contact_token_issued_at: datetime | None
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None
    end_reason: str | None


_SESSION_COLUMNS = """id, org_id, visitor_id, widget_token_id, level, contact_id, external_id,
    external_id_verified, attributes, fingerprint, token_wrapped, contact_token_issued_at,
    created_at, expires_at, ended_at, end_reason"""


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _session(row: asyncpg.Record) -> SessionRow:
    return SessionRow(
        id=str(row["id"]),
        org_id=str(row["org_id"]),
        visitor_id=str(row["visitor_id"]),
        widget_token_id=str(row["widget_token_id"]),
        level=row["level"],
        contact_id=_str(row["contact_id"]),
        external_id=row["external_id"],
        external_id_verified=row["external_id_verified"],
        attributes=row["attributes"],
        fingerprint=row["fingerprint"],
        token_wrapped=row["token_wrapped"],
        contact_token_issued_at=row["contact_token_issued_at"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        ended_at=row["ended_at"],
        end_reason=row["end_reason"],
    )


def _visitor(row: asyncpg.Record) -> VisitorRow:
    return VisitorRow(
        id=str(row["id"]),
        org_id=str(row["org_id"]),
        attributes=row["attributes"],
        last_seen_at=row["last_seen_at"],
    )


# --- visitors ---------------------------------------------------------------------------


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


# --- sessions ---------------------------------------------------------------------------


async def current_session(
    conn: asyncpg.Pool | asyncpg.Connection, visitor_id: str
) -> SessionRow | None:
    """The visitor's newest live session: the one a returning visitor may get back."""
    row = await conn.fetchrow(
        f"""SELECT {_SESSION_COLUMNS} FROM sessions
            WHERE visitor_id = $1 AND ended_at IS NULL AND expires_at > now()
            ORDER BY created_at DESC LIMIT 1""",
        uuid.UUID(visitor_id),
    )
    return None if row is None else _session(row)


async def insert_session(
    conn: asyncpg.Connection,
    *,
    session_id: str,
    org_id: str,
    visitor_id: str,
    widget_token_id: str,
    level: str,
    contact_id: str | None,
    external_id: str,
    external_id_verified: bool,
    attributes: dict[str, Any],
    fingerprint: str,
    token_hash: bytes,
    token_wrapped: bytes,
    contact_token_issued_at: datetime | None,
    expires_at: datetime,
) -> datetime:
    created_at: datetime = await conn.fetchval(
        """INSERT INTO sessions (id, org_id, visitor_id, widget_token_id, level, contact_id,
               external_id, external_id_verified, attributes, fingerprint, token_hash,
               token_wrapped, contact_token_issued_at, expires_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
           RETURNING created_at""",
        uuid.UUID(session_id),
        uuid.UUID(org_id),
        uuid.UUID(visitor_id),
        uuid.UUID(widget_token_id),
        level,
        None if contact_id is None else uuid.UUID(contact_id),
        external_id,
        external_id_verified,
        attributes,
        fingerprint,
        token_hash,
        token_wrapped,
        contact_token_issued_at,
        expires_at,
    )
    return created_at


async def session_by_token(pool: asyncpg.Pool, token_hash: bytes) -> SessionRow | None:
    row = await pool.fetchrow(
        f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE token_hash = $1", token_hash
    )
    return None if row is None else _session(row)


async def session_by_id(pool: asyncpg.Pool, org_id: str, session_id: str) -> SessionRow | None:
    row = await pool.fetchrow(
        f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = $1 AND org_id = $2",
        uuid.UUID(session_id),
        uuid.UUID(org_id),
    )
    return None if row is None else _session(row)


@dataclass(frozen=True, slots=True)
class EndedSession:
    id: str
    token_hash: bytes | None
    expires_at: datetime


async def end_live_sessions(
    conn: asyncpg.Connection, visitor_id: str, reason: str
) -> list[EndedSession]:
    rows = await conn.fetch(
        """UPDATE sessions SET ended_at = now(), end_reason = $2
           WHERE visitor_id = $1 AND ended_at IS NULL
           RETURNING id, token_hash, expires_at""",
        uuid.UUID(visitor_id),
        reason,
    )
    return [EndedSession(str(r["id"]), r["token_hash"], r["expires_at"]) for r in rows]


async def end_revoked_sessions(
    conn: asyncpg.Connection, *, org_id: str, contact_id: str, not_before: datetime
) -> list[tuple[str, str]]:
    """End the contact's live sessions verified by tokens issued before ``not_before`` (the
    verifier's rule: iat < not_before). Returns (session id, visitor id) of each."""
    rows = await conn.fetch(
        """UPDATE sessions SET ended_at = now(), end_reason = 'tokens_revoked'
           WHERE org_id = $1 AND contact_id = $2 AND ended_at IS NULL
             AND contact_token_issued_at < $3
           RETURNING id, visitor_id""",
        uuid.UUID(org_id),
        uuid.UUID(contact_id),
        not_before,
    )
    return [(str(r["id"]), str(r["visitor_id"])) for r in rows]


async def live_session_keys(conn: asyncpg.Connection, visitor_id: str) -> list[EndedSession]:
    """The live sessions a logout is about to end (their cache entries go first)."""
    rows = await conn.fetch(
        """SELECT id, token_hash, expires_at FROM sessions
           WHERE visitor_id = $1 AND ended_at IS NULL""",
        uuid.UUID(visitor_id),
    )
    return [EndedSession(str(r["id"]), r["token_hash"], r["expires_at"]) for r in rows]


# --- device bindings and the login merge trigger -------------------------------------------


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
