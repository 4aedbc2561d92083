"""SQL of the ``sessions`` table, and the widget history page's read-only reads.

The service writes three tables of its own: sessions (here), visitors (visitor_queries.py) and
device_bindings (device_queries.py). Conversations and messages belong to the history service
and are only read here, for the widget's history endpoint. Every lookup carries the org
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


# --- history (read-only; the history service owns these tables) ----------------------------


@dataclass(frozen=True, slots=True)
class MessageRow:
    id: str
    conversation_id: str
    author: str
    body: str
    sender_verified: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ConversationRow:
    id: str
    created_at: datetime


async def scope_conversations(
    pool: asyncpg.Pool,
    *,
    org_id: str,
    visitor_id: str,
    contact_id: str | None,
    external_id: str,
    before: tuple[datetime, str] | None,
    limit: int,
) -> list[ConversationRow]:
    """The scope's conversations, newest first, keyset-paginated on (created_at, id).

    Verified scope: (contact, externalId). Otherwise: this visitor's own conversations only.
    """
    cursor_at, cursor_id = before if before is not None else (None, None)
    page = """AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
              ORDER BY created_at DESC, id DESC LIMIT $5"""
    common = (cursor_at, None if cursor_id is None else uuid.UUID(cursor_id), limit)
    if contact_id is not None:
        rows = await pool.fetch(
            f"""SELECT id, created_at FROM conversations
                WHERE org_id = $1 AND contact_id = $2 AND external_id = $6 {page}""",
            uuid.UUID(org_id),
            uuid.UUID(contact_id),
            *common,
            external_id,
        )
    else:
        rows = await pool.fetch(
            f"""SELECT id, created_at FROM conversations
                WHERE org_id = $1 AND visitor_id = $2 {page}""",
            uuid.UUID(org_id),
            uuid.UUID(visitor_id),
            *common,
        )
    return [ConversationRow(str(r["id"]), r["created_at"]) for r in rows]


async def conversation_messages(
    pool: asyncpg.Pool, org_id: str, conversation_ids: list[str], per_conversation: int
) -> list[MessageRow]:
    """The latest ``per_conversation`` messages of each conversation, oldest first."""
    if not conversation_ids:
        return []
    rows = await pool.fetch(
        """SELECT id, conversation_id, author, body, sender_verified, created_at FROM (
               SELECT m.*, row_number() OVER (
                   PARTITION BY conversation_id ORDER BY created_at DESC, id DESC) AS rn
               FROM messages m
               WHERE m.org_id = $1 AND m.conversation_id = ANY($2::uuid[])) latest
           WHERE rn <= $3
           ORDER BY conversation_id, created_at, id""",
        uuid.UUID(org_id),
        [uuid.UUID(c) for c in conversation_ids],
        per_conversation,
    )
    return [
        MessageRow(
            str(r["id"]),
            str(r["conversation_id"]),
            r["author"],
            r["body"],
            r["sender_verified"],
            r["created_at"],
        )
        for r in rows
    ]
