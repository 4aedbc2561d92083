"""Sessions and visitors as history may see them: through the views session resolution
publishes (``session_scopes``, ``visitor_scopes``), never its tables."""

from __future__ import annotations

import uuid

from services.history.queries import Db, Row


async def session_scope(db: Db, org_id: str, session_id: uuid.UUID) -> Row | None:
    return await db.fetchrow(
        """SELECT session_id, visitor_id, level, contact_id, external_id,
                  (ended_at IS NOT NULL OR expires_at <= now()) AS ended
           FROM session_scopes WHERE session_id = $1 AND org_id = $2""",
        session_id,
        org_id,
    )


async def visitor_exists(db: Db, org_id: str, visitor_id: str) -> bool:
    """Known to the org, logged out or not: a logged-out browser's history stays readable."""
    return bool(
        await db.fetchval(
            "SELECT true FROM visitor_scopes WHERE org_id = $1 AND visitor_id = $2",
            org_id,
            visitor_id,
        )
    )
