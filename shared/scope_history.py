"""A history scope's conversations, newest first, with their latest messages: the one read
model of ``conversations`` and ``messages`` for a history page.

Owned by the history service, which writes those tables (change this module together with
them). Every history page reads through it: history's API pages (a contact + externalId, or
a visitor) and session resolution's widget page, which may not read history's tables itself.
Each service shapes the rows into its own response.

Index use: a page is one range scan of the scope's index (``conversations_contact_scope`` or
``conversations_visitor_scope``) and one of ``messages_conversation`` per conversation. The
first page and the next ones are different statements rather than ``$n IS NULL OR
(created_at, id) < ...``: a cached generic plan for that form cannot use the cursor as an
index bound, and reads the scope from its start on every page.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg

Db: TypeAlias = asyncpg.Pool | asyncpg.Connection
# A page cursor: the (created_at, id) of the last conversation already seen.
After: TypeAlias = tuple[datetime, uuid.UUID]


@dataclass(frozen=True, slots=True)
class HistoryScope:
    """Where history lives: a contact + externalId (verified), else one visitor's browser."""

    org_id: str
    visitor_id: str | None = None
    contact_id: str | None = None
    external_id: str = ""

    @classmethod
    def of_contact(cls, org_id: str, contact_id: str, external_id: str) -> HistoryScope:
        return cls(org_id=org_id, contact_id=contact_id, external_id=external_id)

    @classmethod
    def of_visitor(cls, org_id: str, visitor_id: str) -> HistoryScope:
        return cls(org_id=org_id, visitor_id=visitor_id)


@dataclass(frozen=True, slots=True)
class MessageRow:
    id: str
    conversation_id: str
    author: str
    sender_verified: bool
    body: str
    data: dict[str, Any]
    created_at: datetime

    @classmethod
    def from_record(cls, row: asyncpg.Record) -> MessageRow:
        """From a row of ``messages``' columns (a page, or a message just written)."""
        return cls(
            id=str(row["id"]),
            conversation_id=str(row["conversation_id"]),
            author=row["author"],
            sender_verified=row["sender_verified"],
            body=row["body"],
            data=row["data"],
            created_at=row["created_at"],
        )


@dataclass(frozen=True, slots=True)
class ConversationRow:
    id: str
    visitor_id: str | None
    contact_id: str | None
    external_id: str
    origin_visitor_id: str
    last_merge_id: str | None
    created_at: datetime
    updated_at: datetime
    messages: list[MessageRow]  # the latest ones, oldest first
    messages_truncated: bool  # it has more than ``messages`` holds


@dataclass(frozen=True, slots=True)
class ScopePage:
    conversations: list[ConversationRow]
    # The cursor of the next page; None on the last one.
    next_after: After | None


async def scope_page(
    db: Db, scope: HistoryScope, *, limit: int, after: After | None, messages_per: int
) -> ScopePage:
    """Up to ``limit`` conversations of ``scope`` older than ``after`` (all, from the newest,
    when None), each with its latest ``messages_per`` messages."""
    rows = await _conversations(db, scope, limit=limit + 1, after=after)
    # The extra row only says "there is more".
    page = rows[:limit]
    latest: dict[uuid.UUID, list[MessageRow]] = {}
    for m in await _latest_messages(db, [r["id"] for r in page], messages_per + 1):
        latest.setdefault(m["conversation_id"], []).append(MessageRow.from_record(m))
    conversations = []
    for r in page:
        newest_first = latest.get(r["id"], [])
        conversations.append(
            ConversationRow(
                id=str(r["id"]),
                visitor_id=_str(r["visitor_id"]),
                contact_id=_str(r["contact_id"]),
                external_id=r["external_id"],
                origin_visitor_id=str(r["origin_visitor_id"]),
                last_merge_id=_str(r["last_merge_id"]),
                created_at=r["created_at"],
                updated_at=r["updated_at"],
                messages=newest_first[:messages_per][::-1],
                messages_truncated=len(newest_first) > messages_per,
            )
        )
    more = len(rows) > limit
    return ScopePage(
        conversations=conversations,
        next_after=(page[-1]["created_at"], page[-1]["id"]) if more else None,
    )


_CONVERSATION_COLUMNS = (
    "id, visitor_id, contact_id, external_id, origin_visitor_id, last_merge_id,"
    " created_at, updated_at"
)


async def _conversations(
    db: Db, scope: HistoryScope, *, limit: int, after: After | None
) -> list[asyncpg.Record]:
    where: str
    args: list[Any]
    if scope.contact_id is not None:
        where = "org_id = $1 AND contact_id = $2 AND external_id = $3"
        args = [scope.org_id, scope.contact_id, scope.external_id]
    else:
        where = "org_id = $1 AND visitor_id = $2"
        args = [scope.org_id, scope.visitor_id]
    n = len(args)
    args.append(limit)
    if after is not None:
        where += f" AND (created_at, id) < (${n + 2}, ${n + 3})"
        args.extend(after)
    rows: list[asyncpg.Record] = await db.fetch(
        f"""SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE {where}
            ORDER BY created_at DESC, id DESC LIMIT ${n + 1}""",
        *args,
    )
    return rows


async def _latest_messages(
    db: Db, conversation_ids: list[uuid.UUID], per: int
) -> list[asyncpg.Record]:
    """Up to ``per`` newest messages of each conversation, newest first, in one round trip."""
    if not conversation_ids:
        return []
    rows: list[asyncpg.Record] = await db.fetch(
        """SELECT m.id, m.conversation_id, m.author, m.sender_verified, m.body, m.data,
                  m.created_at
           FROM unnest($1::uuid[]) AS c(id)
           CROSS JOIN LATERAL (
               SELECT * FROM messages WHERE conversation_id = c.id
               ORDER BY created_at DESC, id DESC LIMIT $2) AS m""",
        conversation_ids,
        per,
    )
    return rows


def _str(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)
