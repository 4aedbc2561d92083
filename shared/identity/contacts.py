"""Reads and row locks on ``contacts`` that more than one service needs (token issuance
owns the table; history locks a contact before writing into its scope or erasing it).

Lock order: whoever writes into a contact's scope takes KEY SHARE on its row; erasure and
revocation take FOR UPDATE, so they wait for those writers and keep new ones out until they
commit. An erased contact is never "live".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import asyncpg

_LOCKS = {"update": "FOR UPDATE", "key share": "FOR KEY SHARE"}


async def lock_live_contact(
    conn: asyncpg.Connection,
    org_id: str,
    contact_id: str,
    *,
    mode: Literal["update", "key share"],
) -> bool:
    """Lock the contact's row if it is live in ``org_id``; False when missing or erased."""
    found = await conn.fetchval(
        f"""SELECT true FROM contacts WHERE org_id = $1 AND id = $2 AND erased_at IS NULL
            {_LOCKS[mode]}""",
        org_id,
        contact_id,
    )
    return bool(found)


async def contact_is_live(
    db: asyncpg.Pool | asyncpg.Connection, org_id: str, contact_id: str
) -> bool:
    return bool(
        await db.fetchval(
            "SELECT true FROM contacts WHERE org_id = $1 AND id = $2 AND erased_at IS NULL",
            org_id,
            contact_id,
        )
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
