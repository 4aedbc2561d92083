"""Recording history: conversations and their messages."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from services.history.queries import Row
from shared.scope_history import MessageRow


async def insert_conversation(
    conn: asyncpg.Connection,
    *,
    org_id: str,
    visitor_id: str | None,
    contact_id: str | None,
    external_id: str,
    origin_visitor_id: str,
) -> Row:
    row: Row = await conn.fetchrow(
        """INSERT INTO conversations
               (id, org_id, visitor_id, contact_id, external_id, origin_visitor_id)
           VALUES ($1, $2, $3, $4, $5, $6)
           RETURNING id, created_at""",
        uuid.uuid4(),
        org_id,
        visitor_id,
        contact_id,
        external_id,
        origin_visitor_id,
    )
    return row


async def lock_conversation(
    conn: asyncpg.Connection, org_id: str, conversation_id: str
) -> Row | None:
    """KEY SHARE: a message can be added while a merge re-points the conversation (the merge's
    UPDATE does not conflict), but erasure's delete waits for it."""
    return await conn.fetchrow(
        """SELECT id, visitor_id, contact_id, external_id FROM conversations
           WHERE id = $1 AND org_id = $2 FOR KEY SHARE""",
        conversation_id,
        org_id,
    )


async def insert_message(
    conn: asyncpg.Connection,
    *,
    org_id: str,
    conversation_id: str,
    author: str,
    sender_verified: bool,
    body: str,
    data: dict[str, Any],
) -> MessageRow:
    row: Row = await conn.fetchrow(
        """INSERT INTO messages (id, org_id, conversation_id, author, sender_verified, body, data)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           RETURNING id, conversation_id, author, sender_verified, body, data, created_at""",
        uuid.uuid4(),
        org_id,
        conversation_id,
        author,
        sender_verified,
        body,
        data,
    )
    return MessageRow.from_record(row)
