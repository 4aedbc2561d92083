"""Merge records and the moves they make: recording a requested merge, locking it, and
re-pointing (or putting back) every conversation of its source scope in one statement; and
login merge requests not applied yet, read through session resolution's published view
``login_merge_requests``."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TypeAlias

import asyncpg

from services.history.queries import Db, Row

# A merge row as written: id, org id, reason, source visitor id, source contact id, source
# externalId, target contact id, target externalId.
MergeRow: TypeAlias = tuple[str, str, str, str | None, str | None, str, str, str]


async def insert_merge(
    conn: asyncpg.Connection,
    *,
    merge_id: str,
    org_id: str,
    reason: str,
    source_visitor_id: str | None,
    source_contact_id: str | None,
    source_external_id: str,
    target_contact_id: str,
    target_external_id: str,
) -> bool:
    """Record a requested merge as pending; False when that id is already recorded. A login
    merge keeps the time it was requested, not the time it is applied."""
    inserted = await conn.fetchval(
        f"""INSERT INTO merges (id, org_id, reason, source_visitor_id, source_contact_id,
                                source_external_id, target_contact_id, target_external_id,
                                requested_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, {_REQUESTED_AT})
            ON CONFLICT (id) DO NOTHING RETURNING true""",
        merge_id,
        org_id,
        reason,
        source_visitor_id,
        source_contact_id,
        source_external_id,
        target_contact_id,
        target_external_id,
    )
    return bool(inserted)


async def insert_merges(conn: asyncpg.Connection, merges: Sequence[MergeRow]) -> set[str]:
    """``insert_merge`` for many merges in one round trip (in id order, so two transactions
    recording the same ids wait for each other in order); returns the ids inserted."""
    rows = await conn.fetch(
        """INSERT INTO merges (id, org_id, reason, source_visitor_id, source_contact_id,
                               source_external_id, target_contact_id, target_external_id,
                               requested_at)
           SELECT u.*, COALESCE(r.requested_at, now())
           FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::uuid[],
                       $6::text[], $7::uuid[], $8::text[])
                AS u(id, org_id, reason, sv, sc, sx, tc, tx)
           LEFT JOIN login_merge_requests r ON r.merge_id = u.id AND r.org_id = u.org_id
           ORDER BY 1
           ON CONFLICT (id) DO NOTHING RETURNING id""",
        *(list(column) for column in zip(*merges, strict=True)),
    )
    return {str(row["id"]) for row in rows}


# When the merge was requested: a login merge's request row says; otherwise (an explicit
# merge, recorded by the API as it is requested) now. $1 and $2 are the merge and org ids.
_REQUESTED_AT = """COALESCE((SELECT requested_at FROM login_merge_requests
                             WHERE merge_id = $1 AND org_id = $2), now())"""

_MERGE_COLUMNS = (
    "id, org_id, reason, status, source_visitor_id, source_contact_id, source_external_id,"
    " target_contact_id, target_external_id, conversation_ids, error, requested_at,"
    " completed_at, undone_at"
)


async def lock_merge(conn: asyncpg.Connection, merge_id: str) -> Row | None:
    return await conn.fetchrow(
        f"SELECT {_MERGE_COLUMNS} FROM merges WHERE id = $1 FOR UPDATE", merge_id
    )


async def lock_merges(conn: asyncpg.Connection, merge_ids: Sequence[str]) -> list[Row]:
    """``lock_merge`` for many, in id order."""
    rows: list[Row] = await conn.fetch(
        f"""SELECT {_MERGE_COLUMNS} FROM merges WHERE id = ANY($1::uuid[])
            ORDER BY id FOR UPDATE""",
        list(merge_ids),
    )
    return rows


# A login merge requested but not applied yet, in the columns of a merge row.
_REQUEST_AS_MERGE = """
    SELECT r.merge_id AS id, r.org_id, 'login' AS reason, 'pending' AS status,
           r.visitor_id AS source_visitor_id, NULL::uuid AS source_contact_id,
           '' AS source_external_id, r.contact_id AS target_contact_id,
           r.external_id AS target_external_id, '{}'::uuid[] AS conversation_ids,
           NULL::text AS error, r.requested_at, NULL::timestamptz AS completed_at,
           NULL::timestamptz AS undone_at
    FROM login_merge_requests r"""


async def get_merge(db: Db, org_id: str, merge_id: str) -> Row | None:
    """The merge, or the login merge request it will be while not applied yet (one statement,
    one snapshot: never neither, never both)."""
    return await db.fetchrow(
        f"""SELECT {_MERGE_COLUMNS} FROM merges WHERE id = $1 AND org_id = $2
            UNION ALL
            {_REQUEST_AS_MERGE}
            WHERE r.merge_id = $1 AND r.org_id = $2
              AND NOT EXISTS (SELECT 1 FROM merges m WHERE m.id = r.merge_id)""",
        merge_id,
        org_id,
    )


async def overdue_pending_merges(db: Db, older_than: float, limit: int) -> list[Row]:
    """Merges recorded pending (explicit contact merges) longer than ``older_than`` seconds."""
    rows: list[Row] = await db.fetch(
        f"""SELECT {_MERGE_COLUMNS} FROM merges
            WHERE status = 'pending' AND requested_at < now() - make_interval(secs => $1)
            ORDER BY requested_at LIMIT $2""",
        older_than,
        limit,
    )
    return rows


async def overdue_login_requests(
    db: Db,
    *,
    after: tuple[datetime, uuid.UUID],
    older_than: float,
    settled_after: float,
    limit: int,
) -> list[Row]:
    """Login merge requests older than ``older_than`` seconds, in (requested_at, id) order
    after ``after``, each with the status of its merge row (NULL: not applied yet) and
    ``final``: older than ``settled_after`` seconds, so no request before it can still
    commit."""
    rows: list[Row] = await db.fetch(
        """SELECT r.merge_id, r.org_id, r.visitor_id, r.contact_id, r.external_id,
                  r.requested_at, m.status,
                  r.requested_at < now() - make_interval(secs => $4) AS final
           FROM login_merge_requests r LEFT JOIN merges m ON m.id = r.merge_id
           WHERE (r.requested_at, r.merge_id) > ($1, $2)
             AND r.requested_at < now() - make_interval(secs => $3)
           ORDER BY r.requested_at, r.merge_id
           LIMIT $5""",
        after[0],
        after[1],
        older_than,
        settled_after,
        limit,
    )
    return rows


async def record_failed_merge(db: Db, merge: MergeRow, error: str) -> bool:
    """Record a merge that can never be applied as failed, with why (or turn its pending row
    failed); False when it was applied or failed meanwhile."""
    failed = await db.fetchval(
        f"""INSERT INTO merges AS g (id, org_id, reason, source_visitor_id, source_contact_id,
                                     source_external_id, target_contact_id,
                                     target_external_id, requested_at, status, error,
                                     completed_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, {_REQUESTED_AT}, 'failed', $9, now())
            ON CONFLICT (id) DO UPDATE
            SET status = 'failed', error = excluded.error, completed_at = now()
            WHERE g.status = 'pending' AND g.org_id = excluded.org_id
            RETURNING true""",
        *merge,
        error,
    )
    return bool(failed)


# Both moves re-point every conversation of the source scope in one statement and record the
# moved ids in the merge row in the same statement: set-based, one round trip.
_MOVE_TAIL = """
    UPDATE merges SET status = 'done', completed_at = now(), error = NULL,
                      conversation_ids = ARRAY(SELECT id FROM moved ORDER BY id)
    WHERE id = $3
    RETURNING cardinality(conversation_ids)"""


async def move_visitor_scope(
    conn: asyncpg.Connection,
    *,
    org_id: str,
    merge_id: str,
    visitor_id: str,
    target_contact_id: str,
    target_external_id: str,
) -> int:
    moved: int = await conn.fetchval(
        """WITH moved AS (
               UPDATE conversations
               SET visitor_id = NULL, contact_id = $4, external_id = $5,
                   last_merge_id = $3, updated_at = now()
               WHERE org_id = $1 AND visitor_id = $2
               RETURNING id)"""
        + _MOVE_TAIL,
        org_id,
        visitor_id,
        merge_id,
        target_contact_id,
        target_external_id,
    )
    return moved


async def move_contact_scope(
    conn: asyncpg.Connection,
    *,
    org_id: str,
    merge_id: str,
    contact_id: str,
    external_id: str,
    target_contact_id: str,
    target_external_id: str,
) -> int:
    moved: int = await conn.fetchval(
        """WITH moved AS (
               UPDATE conversations
               SET contact_id = $4, external_id = $5, last_merge_id = $3, updated_at = now()
               WHERE org_id = $1 AND contact_id = $2 AND external_id = $6
               RETURNING id)"""
        + _MOVE_TAIL,
        org_id,
        contact_id,
        merge_id,
        target_contact_id,
        target_external_id,
        external_id,
    )
    return moved


async def move_visitor_scopes(
    conn: asyncpg.Connection, moves: Sequence[tuple[str, str, str, str, str]]
) -> dict[str, int]:
    """``move_visitor_scope`` for many login merges at once: (merge id, org id, visitor id,
    target contact id, target externalId) each; returns merge id -> conversations moved.
    The caller makes sure no conversation is in two of the moves' source scopes, so one
    statement does what the moves one after the other would.

    The merge rows (already recorded, and locked by this transaction) are finished through
    ON CONFLICT on their primary key rather than UPDATE ... FROM: that always goes through
    the key, whereas a join may be planned as a scan of ``merges`` (a cached generic plan
    made while the table was small stays in use as it grows, until the next ANALYZE)."""
    rows = await conn.fetch(
        """WITH m AS (
               SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[])
                   AS m(merge_id, org_id, visitor_id, contact_id, external_id)),
           moved AS (
               UPDATE conversations AS c
               SET visitor_id = NULL, contact_id = m.contact_id, external_id = m.external_id,
                   last_merge_id = m.merge_id, updated_at = now()
               FROM m
               WHERE c.org_id = m.org_id AND c.visitor_id = m.visitor_id
                 AND c.visitor_id IS NOT NULL
               RETURNING c.id, m.merge_id),
           per_merge AS (
               SELECT merge_id, array_agg(id ORDER BY id) AS ids FROM moved GROUP BY merge_id)
           INSERT INTO merges AS g (id, org_id, reason, source_visitor_id, target_contact_id,
                                    target_external_id, status, conversation_ids, completed_at)
           SELECT m.merge_id, m.org_id, 'login', m.visitor_id, m.contact_id, m.external_id,
                  'done', COALESCE(per_merge.ids, '{}'), now()
           FROM m LEFT JOIN per_merge USING (merge_id)
           ON CONFLICT (id) DO UPDATE
           SET status = 'done', completed_at = now(), error = NULL,
               conversation_ids = excluded.conversation_ids
           RETURNING g.id, cardinality(g.conversation_ids) AS moved""",
        *(list(column) for column in zip(*moves, strict=True)),
    )
    return {str(r["id"]): r["moved"] for r in rows}


async def fail_merge(conn: asyncpg.Connection, merge_id: str, error: str) -> None:
    await conn.execute(
        """UPDATE merges SET status = 'failed', error = $2, completed_at = now()
           WHERE id = $1""",
        merge_id,
        error,
    )


async def fail_merges(conn: asyncpg.Connection, failures: Sequence[tuple[str, str]]) -> None:
    """``fail_merge`` for many (merge id, error) pairs in one round trip."""
    await conn.execute(
        """UPDATE merges AS m SET status = 'failed', error = f.error, completed_at = now()
           FROM unnest($1::uuid[], $2::text[]) AS f(id, error)
           WHERE m.id = f.id""",
        [merge_id for merge_id, _ in failures],
        [error for _, error in failures],
    )


async def undo_moves(
    conn: asyncpg.Connection,
    *,
    org_id: str,
    merge_id: str,
    conversation_ids: list[uuid.UUID],
    target_contact_id: str,
    target_external_id: str,
    source_visitor_id: str | None,
    source_contact_id: str | None,
    source_external_id: str,
) -> int:
    """Put back exactly the merge's conversations that are still in its target scope."""
    restored: int = await conn.fetchval(
        """WITH restored AS (
               UPDATE conversations
               SET visitor_id = $6::uuid, contact_id = $7::uuid, external_id = $8,
                   updated_at = now()
               WHERE id = ANY($3::uuid[]) AND org_id = $1
                 AND contact_id = $4 AND external_id = $5
               RETURNING id)
           UPDATE merges SET status = 'undone', undone_at = now()
           WHERE id = $2
           RETURNING (SELECT count(*) FROM restored)""",
        org_id,
        merge_id,
        conversation_ids,
        target_contact_id,
        target_external_id,
        source_visitor_id,
        source_contact_id,
        source_external_id,
    )
    return restored
