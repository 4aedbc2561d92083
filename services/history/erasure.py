"""Erasing a contact (GDPR): its history, device bindings, sessions' copies of its data and
its tokens go in one transaction, leaving a tombstone so nothing can bring them back.

The tombstone (``contacts.erased_at``) is what makes erasure final: merges into or out of an
erased contact fail, conversations cannot be created in its scope, and its history reads as
not found. Tokens are rejected through ``tokens_not_before`` and the ``contact_key`` is
released, so the same user signing in later is a new contact with an empty history.

This module is the one exception to "each service writes only its own tables", and the only
place history writes another service's: erasure is one legal act that must commit as a
whole, so besides history's conversations and messages it ends session resolution's sessions
(dropping their copies of the contact's attributes), deletes its device bindings, tombstones
token issuance's contact row, and afterwards scrubs the shared outbox. All of its SQL is
here, so that exception stays in one file.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

from services.history.queries import Db
from services.history.schemas import ErasureReceipt
from shared.bus.events import (
    ContactErased,
    ContactErasedData,
    ContactTokensRevoked,
    TokensRevokedData,
)
from shared.bus.outbox import Outbox
from shared.errors import not_found
from shared.identity.contacts import lock_live_contact


async def erase_contact(
    conn: asyncpg.Connection, outbox: Outbox, org_id: str, contact_id: str
) -> ErasureReceipt:
    # Lock first: writers into this contact's scope hold KEY SHARE on the row, so after this
    # every one of them has committed (and is deleted below) and no new one can start.
    if not await lock_live_contact(conn, org_id, contact_id, mode="update"):
        # Missing, another org's, or already erased: all read the same.
        raise not_found("contact")
    conversations, messages = await _erase_history(conn, org_id, contact_id)
    bindings, sessions = await _erase_bindings_and_sessions(conn, org_id, contact_id)
    erased_at = await _tombstone_contact(conn, org_id, contact_id)
    receipt_id = str(uuid.uuid4())
    # Token caches on other replicas learn of the revocation from the usual event.
    await outbox.emit(
        conn,
        ContactTokensRevoked,
        org_id=org_id,
        subject=contact_id,
        data=TokensRevokedData(contact_id=contact_id, not_before=erased_at),
    )
    await outbox.emit(
        conn,
        ContactErased,
        org_id=org_id,
        subject=contact_id,
        data=ContactErasedData(contact_id=contact_id, receipt_id=receipt_id),
    )
    return ErasureReceipt(
        receipt_id=receipt_id,
        contact_id=contact_id,
        erased_at=erased_at,
        conversations_deleted=conversations,
        messages_deleted=messages,
        bindings_removed=bindings,
        sessions_ended=sessions,
    )


async def scrub_event_copies(db: Db, contact_id: str) -> int:
    """After the erasure commits: remove published outbox rows that mention the contact (they
    can hold its email or name). Best effort: the outbox prune removes them within its
    retention anyway, so a crash here leaves nothing behind for long."""
    return await _scrub_published_events(db, contact_id)


# --- SQL ---------------------------------------------------------------------------------------


async def _erase_history(conn: asyncpg.Connection, org_id: str, contact_id: str) -> tuple[int, int]:
    """Delete every conversation of the contact (all externalIds) and their messages;
    return (conversations, messages)."""
    # Lock first (waits for writers holding KEY SHARE on these rows); the deletes below then
    # run on fresh snapshots that include everything those writers committed.
    await conn.execute(
        """SELECT 1 FROM conversations WHERE org_id = $1 AND contact_id = $2 FOR UPDATE""",
        org_id,
        contact_id,
    )
    messages: int = await conn.fetchval(
        """WITH gone AS (
               DELETE FROM messages WHERE conversation_id IN (
                   SELECT id FROM conversations WHERE org_id = $1 AND contact_id = $2)
               RETURNING 1)
           SELECT count(*) FROM gone""",
        org_id,
        contact_id,
    )
    conversations: int = await conn.fetchval(
        """WITH gone AS (
               DELETE FROM conversations WHERE org_id = $1 AND contact_id = $2 RETURNING 1)
           SELECT count(*) FROM gone""",
        org_id,
        contact_id,
    )
    return conversations, messages


async def _erase_bindings_and_sessions(
    conn: asyncpg.Connection, org_id: str, contact_id: str
) -> tuple[int, int]:
    """Session-resolution tables, written here because erasure is one legal act that must
    commit as a whole: remove the device bindings, end the sessions and drop their copies of
    the contact's attributes. Returns (bindings removed, sessions ended)."""
    bindings: int = await conn.fetchval(
        """WITH gone AS (
               DELETE FROM device_bindings WHERE org_id = $1 AND contact_id = $2 RETURNING 1)
           SELECT count(*) FROM gone""",
        org_id,
        contact_id,
    )
    sessions: int = await conn.fetchval(
        """WITH ended AS (
               UPDATE sessions
               SET ended_at = COALESCE(ended_at, now()), attributes = '{}'::jsonb,
                   external_id = ''
               WHERE org_id = $1 AND contact_id = $2
               RETURNING 1)
           SELECT count(*) FROM ended""",
        org_id,
        contact_id,
    )
    return bindings, sessions


async def _tombstone_contact(conn: asyncpg.Connection, org_id: str, contact_id: str) -> datetime:
    """Keep the row (so replays find it erased) but nothing personal; reject every token."""
    erased_at: datetime = await conn.fetchval(
        """UPDATE contacts
           SET erased_at = now(), tokens_not_before = now(), updated_at = now(),
               contact_key = 'erased:' || id::text, user_id = NULL, verified_email = NULL,
               attributes = '{}'::jsonb
           WHERE org_id = $1 AND id = $2
           RETURNING erased_at""",
        org_id,
        contact_id,
    )
    return erased_at


async def _scrub_published_events(db: Db, contact_id: str, *, batch: int = 5000) -> int:
    """Delete already-published outbox rows that mention the contact (they may carry its
    email or name). Unpublished rows are left for the relay; the prune removes them later."""
    deleted = 0
    needle = contact_id.encode()
    while True:
        status: str = await db.execute(
            """DELETE FROM outbox WHERE id IN (
                   SELECT id FROM outbox
                   WHERE published_at IS NOT NULL AND position($1::bytea IN payload) > 0
                     -- The erasure's own events carry no personal data and are its audit
                     -- trail; a relay that published them first must not see them vanish.
                     AND event_type NOT IN ('contact.tokens_revoked', 'contact.erased')
                   LIMIT $2)""",
            needle,
            batch,
        )
        count = int(status.split()[-1])
        deleted += count
        if count < batch:
            return deleted
