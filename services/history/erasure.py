"""Erasing a contact (GDPR): its history, device bindings, sessions' copies of its data and
its tokens go in one transaction, leaving a tombstone so nothing can bring them back.

The tombstone (``contacts.erased_at``) is what makes erasure final: merges into or out of an
erased contact fail, conversations cannot be created in its scope, and its history reads as
not found. Tokens are rejected through ``tokens_not_before`` and the ``contact_key`` is
released, so the same user signing in later is a new contact with an empty history.
"""

from __future__ import annotations

import uuid

import asyncpg

from services.history import queries
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
    conversations, messages = await queries.erase_history(conn, org_id, contact_id)
    bindings, sessions = await queries.erase_bindings_and_sessions(conn, org_id, contact_id)
    erased_at = await queries.tombstone_contact(conn, org_id, contact_id)
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


async def scrub_event_copies(db: queries.Db, contact_id: str) -> int:
    """After the erasure commits: remove published outbox rows that mention the contact (they
    can hold its email or name). Best effort: the outbox prune removes them within its
    retention anyway, so a crash here leaves nothing behind for long."""
    return await queries.scrub_published_events(db, contact_id)
