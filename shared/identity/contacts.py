"""Reads and row locks on ``contacts`` that more than one service needs (token issuance
owns the table; history locks a contact before writing into its scope or erasing it).

Lock order: whoever writes into a contact's scope takes KEY SHARE on its row; erasure and
revocation take FOR UPDATE, so they wait for those writers and keep new ones out until they
commit. An erased contact is never "live".
"""

from __future__ import annotations

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
