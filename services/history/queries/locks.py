"""The locks merges and undo take before they move history (see the lock order in this
package's docstring): scope advisory locks here, then the contacts' rows
(``shared.identity.contacts``, whose table token issuance owns)."""

from __future__ import annotations

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
