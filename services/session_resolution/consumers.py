"""The session service's event consumer: "log out everywhere" also ends verified sessions,
and an erasure removes what Redis still holds of the erased person's browsers.

The widget endpoints already refuse a session whose contact token was revoked (they ask the
verifier's revocation cache on every use), so this consumer is not what makes revocation
fast. It makes it *recorded*: such sessions get ``ended_at`` / ``end_reason =
'tokens_revoked'`` and a ``session.ended`` event, so ``session_scopes`` (read by the history
service) and GET /v1/sessions/{id} show them ended too, without each reader re-checking
revocation. Idempotent: it ends only sessions still live and verified by a token issued before
the revocation, inside the consumer's exactly-once transaction.

``contact.erased`` names the browsers the erasure made unusable (their remembered values and
sessions' copies are already gone from Postgres). The cache still holds them under their
visitor and session token hashes: those keys are buried (a tombstone, so no fill from an
older read can bring the values back), and only then are the hashes dropped. A Redis failure
rolls the transaction back and the event is delivered again.
"""

from __future__ import annotations

import time

import asyncpg

from services.session_resolution import queries, visitor_queries
from services.session_resolution.cache import SessionCache
from services.session_resolution.config import SessionConfig
from shared.bus.events import (
    ContactErased,
    ContactTokensRevoked,
    Event,
    SessionEnded,
    SessionEndedData,
)
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


def contact_erased_handler(cache: SessionCache, config: SessionConfig) -> Handler:
    async def handle(event: ContactErased, conn: asyncpg.Connection) -> None:
        visitor_ids = event.data.visitor_ids
        browsers = await visitor_queries.erased_browsers(conn, event.org_id, visitor_ids)
        now = time.time()
        await cache.bury(
            visitor_token_hashes=[
                b.visitor_token_hash for b in browsers if b.visitor_token_hash is not None
            ],
            session_token_hashes=[
                (token_hash, max(1.0, expires_at.timestamp() - now))
                for b in browsers
                for token_hash, expires_at in b.sessions
            ],
            visitor_ttl_seconds=config.visitor_cache_ttl,
        )
        await visitor_queries.forget_erased_tokens(conn, event.org_id, visitor_ids)

    return handle


def handlers(
    outbox: Outbox, cache: SessionCache, config: SessionConfig
) -> dict[type[Event], Handler]:
    return {
        ContactTokensRevoked: tokens_revoked_handler(outbox),
        ContactErased: contact_erased_handler(cache, config),
    }
