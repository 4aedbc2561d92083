"""The session service's event consumer: "log out everywhere" also ends verified sessions.

The widget endpoints already refuse a session whose contact token was revoked (they ask the
verifier's revocation cache on every use), so this consumer is not what makes revocation
fast. It makes it *recorded*: such sessions get ``ended_at`` / ``end_reason =
'tokens_revoked'`` and a ``session.ended`` event, so ``session_scopes`` (read by the history
service) and GET /v1/sessions/{id} show them ended too, without each reader re-checking
revocation. Idempotent: it ends only sessions still live and verified by a token issued before
the revocation, inside the consumer's exactly-once transaction.
"""

from __future__ import annotations

import asyncpg

from services.session_resolution import queries
from shared.bus.events import ContactTokensRevoked, Event, SessionEnded, SessionEndedData
from shared.bus.handlers import Handler
from shared.bus.outbox import Outbox

GROUP = "session-resolution"


def tokens_revoked_handler(outbox: Outbox) -> Handler:
    async def handle(event: ContactTokensRevoked, conn: asyncpg.Connection) -> None:
        ended = await queries.end_revoked_sessions(
            conn,
            org_id=event.org_id,
            contact_id=event.data.contact_id,
            not_before=event.data.not_before,
        )
        for session_id, visitor_id in ended:
            await outbox.emit(
                conn,
                SessionEnded,
                org_id=event.org_id,
                subject=visitor_id,
                data=SessionEndedData(
                    session_id=session_id, visitor_id=visitor_id, reason="tokens_revoked"
                ),
            )

    return handle


def handlers(outbox: Outbox) -> dict[type[Event], Handler]:
    return {ContactTokensRevoked: tokens_revoked_handler(outbox)}
