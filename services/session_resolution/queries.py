"""SQL of the ``sessions`` table.

The service writes three tables of its own: sessions (here), visitors (visitor_queries.py) and
device_bindings (device_queries.py). The widget's history page reads history's tables through
``shared.scope_history``, history's one published read model. Every lookup carries the org
(promise 8).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg


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
    verified_kid: str | None
    minted_by: str | None


_SESSION_COLUMNS = """id, org_id, visitor_id, widget_token_id, level, contact_id, external_id,
    external_id_verified, attributes, fingerprint, token_wrapped, contact_token_issued_at,
    created_at, expires_at, ended_at, end_reason, verified_kid, minted_by_key"""


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
        verified_kid=row["verified_kid"],
        minted_by=_str(row["minted_by_key"]),
    )


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
    verified_kid: str | None,
    minted_by: str | None,
) -> datetime:
    created_at: datetime = await conn.fetchval(
        """INSERT INTO sessions (id, org_id, visitor_id, widget_token_id, level, contact_id,
               external_id, external_id_verified, attributes, fingerprint, token_hash,
               token_wrapped, contact_token_issued_at, expires_at, verified_kid, minted_by_key)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
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
        verified_kid,
        None if minted_by is None else uuid.UUID(minted_by),
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
