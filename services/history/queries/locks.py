"""The locks merges and undo take before they move history (see the lock order in this
package's docstring): scope advisory locks, then the contacts' rows."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg


async def advisory_locks(conn: asyncpg.Connection, keys: list[tuple[int, bool]]) -> None:
    """Take transaction-level advisory locks (key, shared) in the given order, one round trip.
    Rows come out of unnest in array order, so the locks are taken in that order."""
    await conn.execute(
        """SELECT CASE WHEN shared THEN pg_advisory_xact_lock_shared(key)
                       ELSE pg_advisory_xact_lock(key) END
           FROM unnest($1::bigint[], $2::boolean[]) WITH ORDINALITY AS t(key, shared, n)
           ORDER BY n""",
        [k for k, _ in keys],
        [shared for _, shared in keys],
    )


async def lock_contacts(
    conn: asyncpg.Connection, org_id: str, contact_ids: list[str]
) -> dict[str, bool]:
    """KEY SHARE the contacts in id order; map id -> live (not erased). Missing ids are absent."""
    rows = await conn.fetch(
        """SELECT id, erased_at IS NULL AS live FROM contacts
           WHERE org_id = $1 AND id = ANY($2::uuid[]) ORDER BY id FOR KEY SHARE""",
        org_id,
        contact_ids,
    )
    return {str(r["id"]): r["live"] for r in rows}


async def lock_contacts_of_orgs(
    conn: asyncpg.Connection, contacts: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], bool]:
    """``lock_contacts`` for (org id, contact id) pairs of any orgs, in one round trip: KEY
    SHARE in contact id order; map (org id, contact id) -> live. Missing pairs are absent."""
    rows = await conn.fetch(
        """SELECT c.org_id, c.id, c.erased_at IS NULL AS live FROM contacts AS c
           WHERE (c.org_id, c.id) IN (SELECT * FROM unnest($1::uuid[], $2::uuid[]))
           ORDER BY c.id FOR KEY SHARE OF c""",
        [org for org, _ in contacts],
        [contact for _, contact in contacts],
    )
    return {(str(r["org_id"]), str(r["id"])): r["live"] for r in rows}
