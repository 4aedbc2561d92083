"""Rules for recording and reading history: which scope a session writes into, whether a
message's sender counts as verified, and the opaque page cursor."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from services.history.queries import Db, conversation_rows, scopes
from services.history.schemas import (
    AddMessage,
    ConversationOut,
    CreateConversation,
    CreatedConversation,
    HistoryPage,
    MessageOut,
    Scope,
)
from shared.errors import Problem, not_found, validation_failed
from shared.identity.contacts import contact_is_live, lock_live_contact
from shared.scope_history import (
    After,
    ConversationRow,
    HistoryScope,
    MessageRow,
    ScopePage,
    scope_page,
)
from shared.web.pagination import decode_cursor, encode_cursor, parse_limit

MESSAGES_PER_CONVERSATION = 100
MAX_PAGE = 100


def session_ended() -> Problem:
    return Problem(409, "session_ended", "the session has ended or expired")


@dataclass(frozen=True, slots=True)
class SessionScope:
    """Where a session's history lives right now, and its trust level."""

    visitor_id: str
    verified: bool
    contact_id: str | None
    external_id: str

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> SessionScope:
        verified = row["level"] == "verified"
        return cls(
            visitor_id=str(row["visitor_id"]),
            verified=verified,
            contact_id=str(row["contact_id"]) if verified else None,
            external_id=row["external_id"] if verified else "",
        )

    def owns(self, conversation: asyncpg.Record) -> bool:
        if self.contact_id is not None:
            return (
                str(conversation["contact_id"]) == self.contact_id
                and conversation["external_id"] == self.external_id
            )
        return str(conversation["visitor_id"]) == self.visitor_id


async def live_session(
    conn: asyncpg.Connection, org_id: str, session_id: uuid.UUID
) -> SessionScope:
    # Another org's session reads exactly like a missing one (promise 8).
    row = await scopes.session_scope(conn, org_id, session_id)
    if row is None:
        raise not_found("session")
    if row["ended"]:
        raise session_ended()
    return SessionScope.from_row(row)


def message_out(m: MessageRow) -> MessageOut:
    return MessageOut(
        id=m.id,
        conversation_id=m.conversation_id,
        author=m.author,
        sender_verified=m.sender_verified,
        text=m.body,
        data=m.data,
        created_at=m.created_at,
    )


def sender_verified(author: str, session: SessionScope | None) -> bool:
    """A visitor's message is verified only if its session was verified when it was written;
    agents and bots write with the org's API key, a server-side identity."""
    if author == "visitor":
        return session is not None and session.verified
    return True


def check_data(data: dict[str, Any]) -> None:
    # jsonb rejects NUL in strings; find it before the write rather than as a driver error.
    if b"\\u0000" in msgspec.json.encode(data):
        raise validation_failed("message data must not contain NUL characters")


async def create_conversation(
    conn: asyncpg.Connection, org_id: str, body: CreateConversation
) -> CreatedConversation:
    if body.message is not None:
        check_data(body.message.data)
    session = await live_session(conn, org_id, body.session_id)
    if session.contact_id is not None and not await lock_live_contact(
        conn, org_id, session.contact_id, mode="key share"
    ):
        # The contact was erased after the session resolved: nothing may be written for it.
        raise session_ended()
    row = await conversation_rows.insert_conversation(
        conn,
        org_id=org_id,
        visitor_id=None if session.contact_id is not None else session.visitor_id,
        contact_id=session.contact_id,
        external_id=session.external_id,
        origin_visitor_id=session.visitor_id,
    )
    scope = (
        Scope(type="contact", contact_id=session.contact_id, external_id=session.external_id)
        if session.contact_id is not None
        else Scope(type="visitor", visitor_id=session.visitor_id)
    )
    message = None
    if body.message is not None:
        message = message_out(
            await conversation_rows.insert_message(
                conn,
                org_id=org_id,
                conversation_id=row["id"],
                author=body.message.author,
                sender_verified=sender_verified(body.message.author, session),
                body=body.message.text,
                data=body.message.data,
            )
        )
    return CreatedConversation(
        id=str(row["id"]), scope=scope, created_at=row["created_at"], message=message
    )


async def add_message(
    conn: asyncpg.Connection, org_id: str, conversation_id: str, body: AddMessage
) -> MessageOut:
    check_data(body.data)
    if body.author == "visitor" and body.session_id is None:
        raise validation_failed("a visitor message needs the sessionId it was written in")
    if body.author != "visitor" and body.session_id is not None:
        raise validation_failed("sessionId is only for visitor messages")
    conversation = await conversation_rows.lock_conversation(conn, org_id, conversation_id)
    if conversation is None:
        raise not_found("conversation")
    session = None
    if body.session_id is not None:
        session = await live_session(conn, org_id, body.session_id)
        if not session.owns(conversation):
            raise Problem(
                403,
                "scope_mismatch",
                "the conversation is not in this session's history scope",
            )
    return message_out(
        await conversation_rows.insert_message(
            conn,
            org_id=org_id,
            conversation_id=conversation_id,
            author=body.author,
            sender_verified=sender_verified(body.author, session),
            body=body.text,
            data=body.data,
        )
    )


# --- Reading ---------------------------------------------------------------------------------


def page_params(query: Mapping[str, str]) -> tuple[int, After | None]:
    cursor = query.get("cursor")
    return (
        parse_limit(query.get("limit"), maximum=MAX_PAGE),
        decode_cursor(cursor) if cursor else None,
    )


def history_page(page: ScopePage) -> HistoryPage:
    return HistoryPage(
        conversations=[
            ConversationOut(
                id=c.id,
                scope=_scope_out(c),
                origin_visitor_id=c.origin_visitor_id,
                last_merge_id=c.last_merge_id,
                created_at=c.created_at,
                updated_at=c.updated_at,
                messages=[message_out(m) for m in c.messages],
                messages_truncated=c.messages_truncated,
            )
            for c in page.conversations
        ],
        next_cursor=encode_cursor(*page.next_after) if page.next_after is not None else None,
    )


def _scope_out(conversation: ConversationRow) -> Scope:
    if conversation.contact_id is not None:
        return Scope(
            type="contact",
            contact_id=conversation.contact_id,
            external_id=conversation.external_id,
        )
    return Scope(type="visitor", visitor_id=conversation.visitor_id)


async def contact_history(
    db: Db, org_id: str, contact_id: str, external_id: str, query: Mapping[str, str]
) -> HistoryPage:
    if len(external_id) > 256 or "\x00" in external_id:
        raise validation_failed("externalId is not valid")
    limit, after = page_params(query)
    # An erased contact has no history and reads as not found, like another org's contact.
    if not await contact_is_live(db, org_id, contact_id):
        raise not_found("contact")
    scope = HistoryScope.of_contact(org_id, contact_id, external_id)
    return history_page(
        await scope_page(
            db, scope, limit=limit, after=after, messages_per=MESSAGES_PER_CONVERSATION
        )
    )


async def visitor_history(
    db: Db, org_id: str, visitor_id: str, query: Mapping[str, str]
) -> HistoryPage:
    limit, after = page_params(query)
    if not await scopes.visitor_exists(db, org_id, visitor_id):
        raise not_found("visitor")
    scope = HistoryScope.of_visitor(org_id, visitor_id)
    return history_page(
        await scope_page(
            db, scope, limit=limit, after=after, messages_per=MESSAGES_PER_CONVERSATION
        )
    )
