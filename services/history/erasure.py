"""Erasing a contact (GDPR): its history, its browsers, sessions' copies of its data and its
tokens go in one transaction, leaving a tombstone so nothing can bring them back.

The tombstone (``contacts.erased_at``) is what makes erasure final: merges into or out of an
erased contact fail, conversations cannot be created in its scope, and its history reads as
not found. Tokens are rejected through ``tokens_not_before`` and the ``contact_key`` is
released, so the same user signing in later is a new contact with an empty history.

The person's *browsers* go too: every visitor ever bound to the contact (now or before a
logout) loses its remembered values, its sessions (any level) and their copies, and its own
browser-bound conversations (what was typed before logging in and never merged); it is
marked erased and unbound, so its visitor token no longer resolves and the browser starts
over as a new anonymous visitor. Merge records naming the contact are emptied of what they
carried, and every outbox row naming the contact or those browsers is deleted.

Redis is cleaned after the commit, by the owners of what it holds, from the erasure's
``contact.erased`` event (ids only): session resolution buries its cache entries of those
browsers and drops their token hashes; history's consumer removes the stream entries, using
the stream ids captured here before the outbox rows went (``erasure_scrubs``, see
``services.history.event_scrubber``). Both are consumers, so a Redis outage only delays them.

This module is the one exception to "each service writes only its own tables", and the only
place history writes another service's: erasure is one legal act that must commit as a
whole, so besides history's conversations, messages and merges it ends session resolution's
sessions, erases its visitors, deletes its device bindings, tombstones token issuance's
contact row and scrubs the shared outbox. All of its SQL is here, so that exception stays in
one file.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

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

# The erasure's own events carry ids only and are its audit trail (and what the consumers
# that finish the erasure act on): never scrubbed.
ERASURE_EVENT_TYPES = (ContactTokensRevoked.type_name(), ContactErased.type_name())

# A browser bound to the contact meanwhile makes the lock phase start again; past this many
# rounds the stragglers are locked after the contact (they can only be sessions just bound).
_LOCK_ROUNDS = 5


async def erase_contact(
    conn: asyncpg.Connection, outbox: Outbox, org_id: str, contact_id: str
) -> ErasureReceipt:
    contact_id = str(uuid.UUID(contact_id))
    visitors = await _lock_contact_and_browsers(conn, org_id, contact_id)
    conversations, messages = await _erase_history(conn, org_id, contact_id, visitors)
    bindings, sessions = await _erase_bindings_and_sessions(conn, org_id, contact_id, visitors)
    await _erase_browsers(conn, org_id, visitors)
    await _empty_merges(conn, org_id, contact_id, visitors)
    receipt_id = str(uuid.uuid4())
    await _scrub_outbox(conn, org_id, receipt_id, [contact_id, *visitors])
    erased_at = await _tombstone_contact(conn, org_id, contact_id)
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
        data=ContactErasedData(contact_id=contact_id, receipt_id=receipt_id, visitor_ids=visitors),
    )
    return ErasureReceipt(
        receipt_id=receipt_id,
        contact_id=contact_id,
        erased_at=erased_at,
        conversations_deleted=conversations,
        messages_deleted=messages,
        bindings_removed=bindings,
        sessions_ended=sessions,
        browsers_erased=len(visitors),
    )


async def _lock_contact_and_browsers(
    conn: asyncpg.Connection, org_id: str, contact_id: str
) -> list[str]:
    """Lock the contact's browsers, then its row; return the browsers' visitor ids.

    A session write locks its visitor and then (binding the device) the contact, so the
    browsers are locked first or the two could deadlock. A browser bound between the first
    look and the contact lock is caught by a second look; the round then starts again, its
    locks released with its savepoint. Once the contact is locked no browser can be bound
    to it any more, and writers into its scope (KEY SHARE on its row) have all committed.
    """
    for round_ in range(_LOCK_ROUNDS + 1):
        seen = await _bound_visitors(conn, org_id, contact_id)
        savepoint = conn.transaction()
        await savepoint.start()
        await _lock_visitors(conn, seen)
        if not await lock_live_contact(conn, org_id, contact_id, mode="update"):
            await savepoint.rollback()
            # Missing, another org's, or already erased: all read the same.
            raise not_found("contact")
        now = await _bound_visitors(conn, org_id, contact_id)
        if set(now) <= set(seen) or round_ == _LOCK_ROUNDS:
            await _lock_visitors(conn, sorted(set(now) - set(seen)))
            await savepoint.commit()
            return sorted(set(now) | set(seen))
        await savepoint.rollback()
    raise AssertionError("unreachable")


# --- SQL ---------------------------------------------------------------------------------------


def _uuids(ids: list[str]) -> list[uuid.UUID]:
    return [uuid.UUID(i) for i in ids]


async def _bound_visitors(conn: asyncpg.Connection, org_id: str, contact_id: str) -> list[str]:
    """Every browser bound to the contact, now or before (a logout or a device revocation
    unbinds but keeps the row), and any that ran a session verified as it."""
    rows = await conn.fetch(
        """SELECT visitor_id FROM device_bindings WHERE org_id = $1 AND contact_id = $2
           UNION
           SELECT visitor_id FROM sessions WHERE org_id = $1 AND contact_id = $2
           ORDER BY visitor_id""",
        uuid.UUID(org_id),
        uuid.UUID(contact_id),
    )
    return [str(r["visitor_id"]) for r in rows]


async def _lock_visitors(conn: asyncpg.Connection, visitors: list[str]) -> None:
    # In id order, like every other multi-row lock here.
    await conn.execute(
        "SELECT 1 FROM visitors WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE",
        _uuids(visitors),
    )


async def _erase_history(
    conn: asyncpg.Connection, org_id: str, contact_id: str, visitors: list[str]
) -> tuple[int, int]:
    """Delete every conversation of the contact (all externalIds) and the browser-bound ones
    of its browsers, with their messages; return (conversations, messages)."""
    scope = """org_id = $1 AND (contact_id = $2 OR visitor_id = ANY($3::uuid[]))"""
    args = (uuid.UUID(org_id), uuid.UUID(contact_id), _uuids(visitors))
    # Lock first (waits for writers holding KEY SHARE on these rows); the deletes below then
    # run on fresh snapshots that include everything those writers committed.
    await conn.execute(f"SELECT 1 FROM conversations WHERE {scope} ORDER BY id FOR UPDATE", *args)
    messages: int = await conn.fetchval(
        f"""WITH gone AS (
               DELETE FROM messages WHERE conversation_id IN (
                   SELECT id FROM conversations WHERE {scope})
               RETURNING 1)
           SELECT count(*) FROM gone""",
        *args,
    )
    conversations: int = await conn.fetchval(
        f"""WITH gone AS (DELETE FROM conversations WHERE {scope} RETURNING 1)
           SELECT count(*) FROM gone""",
        *args,
    )
    return conversations, messages


async def _erase_bindings_and_sessions(
    conn: asyncpg.Connection, org_id: str, contact_id: str, visitors: list[str]
) -> tuple[int, int]:
    """Session-resolution tables: remove the contact's device bindings (another contact's
    binding of one of its browsers is only unbound: that browser is unusable now), end every
    session of the contact or its browsers and drop their copies of what was typed or
    vouched for. Returns (bindings removed, sessions ended)."""
    bindings: int = await conn.fetchval(
        """WITH gone AS (
               DELETE FROM device_bindings WHERE org_id = $1 AND contact_id = $2 RETURNING 1)
           SELECT count(*) FROM gone""",
        uuid.UUID(org_id),
        uuid.UUID(contact_id),
    )
    await conn.execute(
        """UPDATE device_bindings SET unbound_at = now()
           WHERE visitor_id = ANY($1::uuid[]) AND unbound_at IS NULL""",
        _uuids(visitors),
    )
    # The token hash stays for session resolution, which buries its cache entries by it and
    # then drops it (its contact.erased consumer); the wrapped token and the fingerprint
    # (derived from the attributes) go now.
    sessions: int = await conn.fetchval(
        """WITH ended AS (
               UPDATE sessions
               SET end_reason = CASE WHEN ended_at IS NULL THEN 'erased' ELSE end_reason END,
                   ended_at = COALESCE(ended_at, now()), attributes = '{}'::jsonb,
                   external_id = '', external_id_verified = false, fingerprint = '',
                   token_wrapped = NULL
               WHERE org_id = $1 AND (contact_id = $2 OR visitor_id = ANY($3::uuid[]))
               RETURNING 1)
           SELECT count(*) FROM ended""",
        uuid.UUID(org_id),
        uuid.UUID(contact_id),
        _uuids(visitors),
    )
    return bindings, sessions


async def _erase_browsers(conn: asyncpg.Connection, org_id: str, visitors: list[str]) -> None:
    """The browsers forget what they were told and stop resolving (their token hash goes
    when session resolution has buried its cache entries)."""
    await conn.execute(
        """UPDATE visitors
           SET attributes = '{}'::jsonb, unbound_at = COALESCE(unbound_at, now()),
               erased_at = now()
           WHERE org_id = $1 AND id = ANY($2::uuid[])""",
        uuid.UUID(org_id),
        _uuids(visitors),
    )


async def _empty_merges(
    conn: asyncpg.Connection, org_id: str, contact_id: str, visitors: list[str]
) -> None:
    """Merge records stay (ids only: undo must still refuse them, replays still find them)
    but lose the externalIds and conversation lists they carried; one still pending fails,
    as the consumer would fail it now."""
    await conn.execute(
        """UPDATE merges
           SET source_external_id = CASE WHEN source_contact_id = $2 OR target_contact_id = $2
                                         THEN '' ELSE source_external_id END,
               target_external_id = CASE WHEN source_contact_id = $2 OR target_contact_id = $2
                                         THEN '' ELSE target_external_id END,
               conversation_ids = CASE WHEN source_contact_id = $2 OR target_contact_id = $2
                                       THEN '{}' ELSE conversation_ids END,
               error = CASE WHEN status = 'pending'
                            THEN 'a contact or browser of this merge was erased'
                            ELSE error END,
               completed_at = CASE WHEN status = 'pending' THEN now() ELSE completed_at END,
               status = CASE WHEN status = 'pending' THEN 'failed' ELSE status END
           WHERE org_id = $1
             AND (target_contact_id = $2 OR source_contact_id = $2
                  OR source_visitor_id = ANY($3::uuid[]))""",
        uuid.UUID(org_id),
        uuid.UUID(contact_id),
        _uuids(visitors),
    )
    # Login merge requests not applied yet (session resolution's table): they keep their id,
    # so the merge still reads (and the overdue-merge worker then fails it: the contact is
    # erased), but lose the externalId.
    await conn.execute(
        """UPDATE merge_requests SET external_id = ''
           WHERE org_id = $1 AND (contact_id = $2 OR visitor_id = ANY($3::uuid[]))""",
        uuid.UUID(org_id),
        uuid.UUID(contact_id),
        _uuids(visitors),
    )


async def _scrub_outbox(
    conn: asyncpg.Connection, org_id: str, receipt_id: str, subjects: list[str]
) -> None:
    """Delete every outbox row naming the contact or its browsers, published or not (an
    unpublished one is then never published), and record where Redis holds the published
    ones: their stream ids, returned by the delete itself (which waits for a relay batch that
    is marking them published), and each stream's newest published id before the delete."""
    await conn.execute(
        """WITH tails AS (
               SELECT DISTINCT ON (stream) stream, stream_ms || '-' || stream_seq AS after
               FROM outbox WHERE stream_ms IS NOT NULL
               ORDER BY stream, stream_ms DESC, stream_seq DESC),
           gone AS (
               DELETE FROM outbox
               WHERE EXISTS (SELECT 1 FROM unnest($3::text[]) AS s (subject)
                             WHERE position(convert_to(s.subject, 'UTF8') IN payload) > 0)
                 AND event_type <> ALL($4::text[])
               RETURNING stream, stream_ms, stream_seq),
           published AS (
               SELECT COALESCE(array_agg(stream ORDER BY stream_ms, stream_seq), '{}') AS streams,
                      COALESCE(array_agg(stream_ms || '-' || stream_seq
                                         ORDER BY stream_ms, stream_seq), '{}') AS entry_ids
               FROM gone WHERE stream_ms IS NOT NULL)
           INSERT INTO erasure_scrubs
               (receipt_id, org_id, subjects, streams, entry_ids, tail_streams, tail_after)
           SELECT $1, $2, $3, published.streams, published.entry_ids,
                  COALESCE((SELECT array_agg(stream) FROM tails), '{}'),
                  COALESCE((SELECT array_agg(after) FROM tails), '{}')
           FROM published""",
        uuid.UUID(receipt_id),
        uuid.UUID(org_id),
        subjects,
        list(ERASURE_EVENT_TYPES),
    )


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
