"""What a session token unlocks, and how a browser is unbound (logout, device revocation).

A session token is checked against Redis first and Postgres on a miss. Either way a session
stops working when it ended (logout, device revoked), expired, or was verified by a contact
token issued before the contact's tokens were revoked ("log out everywhere", promise 10:
the verifier's revocation cache sees that within a second on every replica).

Unbinding (promise 6) ends every live session of the browser's visitor, unbinds the visitor
and its device bindings, and (for logout) creates a fresh visitor for the browser, all in one
transaction with its events. Cache entries are buried *before* the commit, so no replica can
serve the old visitor or sessions from Redis afterwards; if the commit then fails, the browser
is merely treated as logged out (fail closed).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import asyncpg

from services.session_resolution import device_queries, queries, visitor_queries
from services.session_resolution.app_keys import Deps
from services.session_resolution.cache import BURIED, SessionRecord
from services.session_resolution.session_tokens import (
    looks_like_session_token,
    new_visitor_token,
    token_hash,
)
from shared.bus.events import (
    SessionEnded,
    SessionEndedData,
    VisitorCreated,
    VisitorCreatedData,
)
from shared.db import in_transaction
from shared.errors import Problem, not_found


def invalid_session_token() -> Problem:
    return Problem(
        401,
        "invalid_session_token",
        "the session token is missing, malformed, unknown or not this session's",
        headers={"WWW-Authenticate": 'Bearer realm="widget-identity-session"'},
    )


def session_ended(detail: str = "the session has ended; resolve a new one") -> Problem:
    return Problem(401, "session_ended", detail)


def session_revoked() -> Problem:
    return Problem(
        401,
        "token_revoked",
        "the contact token that verified this session has been revoked; resolve a new one",
    )


def record_from_row(row: queries.SessionRow) -> SessionRecord:
    iat = row.contact_token_issued_at
    return SessionRecord(
        id=row.id,
        org_id=row.org_id,
        visitor_id=row.visitor_id,
        widget_token_id=row.widget_token_id,
        level=row.level,
        contact_id=row.contact_id,
        external_id=row.external_id,
        expires_at=row.expires_at.timestamp(),
        contact_token_iat=None if iat is None else int(iat.timestamp()),
        verified_kid=row.verified_kid,
        minted_by=row.minted_by,
    )


@dataclass(frozen=True, slots=True)
class Located:
    record: SessionRecord
    # Set when storage says the session ended: 'logout', 'device_revoked', 'tokens_revoked'...
    end_reason: str | None = None


async def locate_session(deps: Deps, session_token: str | None) -> Located:
    """The session behind a token, live or ended (callers decide), or 401 when unknown."""
    if session_token is None or not looks_like_session_token(session_token):
        raise invalid_session_token()
    hashed = token_hash(session_token)
    cached = await deps.cache.session(hashed)
    if isinstance(cached, SessionRecord):
        return Located(cached)
    if cached == BURIED:
        raise session_ended()  # only logout and device revocation bury
    row = await queries.session_by_token(deps.pool, hashed)
    if row is None:
        raise invalid_session_token()
    ended = None if row.ended_at is None else (row.end_reason or "ended")
    return Located(record_from_row(row), ended)


async def check_session(deps: Deps, located: Located, session_id: str) -> None:
    """The path's session must be the token's, live, and not revoked."""
    record = located.record
    if record.id != session_id:
        raise invalid_session_token()
    if located.end_reason == "tokens_revoked":
        raise session_revoked()
    if located.end_reason is not None:
        raise session_ended()
    if record.expires_at <= time.time():
        raise session_ended("the session has expired; resolve a new one")
    if await is_revoked(deps, record.org_id, record.contact_id, record.contact_token_iat):
        raise session_revoked()
    ended = await ended_credential(deps, record)
    if ended is not None:
        raise session_ended(f"the session has ended: {_CREDENTIAL_ENDS[ended]}; resolve a new one")


# Promise 11: a session ends with any credential it stands on.
_CREDENTIAL_ENDS = {
    "widget_token_revoked": "the widget token that opened it was revoked",
    "org_disabled": "its organisation was disabled",
    "signing_key_deleted": "the signing key that verified it was deleted",
    "api_key_revoked": "the API key that minted its contact token was revoked",
}


async def ended_credential(deps: Deps, record: SessionRecord) -> str | None:
    """Which credential the session stands on has ended since it began (a key of
    ``_CREDENTIAL_ENDS``), or None. Read from in-process caches that the revocation listener
    keeps honest: no round trip for a session that is fine, and an end reaches every replica
    within a second. The history service sees the same through the ``session_scopes`` view."""
    widget = await deps.widget_tokens.get_by_id(deps.pool, record.widget_token_id)
    if widget is None or widget.revoked:
        return "widget_token_revoked"
    if widget.org_disabled:
        return "org_disabled"
    if record.verified_kid is not None and (
        await deps.verifier.keys.get(deps.pool, record.verified_kid) is None
    ):
        return "signing_key_deleted"
    if record.minted_by is not None and not await deps.verifier.minting_keys.live(
        deps.pool, record.org_id, record.minted_by
    ):
        return "api_key_revoked"
    return None


def check_can_log_out(located: Located, session_id: str) -> None:
    """Logging out works even after the session expired or its contact token was revoked:
    the browser may still be bound, and unbinding it is what the person asks for."""
    if located.record.id != session_id:
        raise invalid_session_token()
    if located.end_reason not in (None, "tokens_revoked"):
        raise session_ended()


@dataclass(frozen=True, slots=True)
class Introspected:
    row: queries.SessionRow
    # The recorded end, or 'tokens_revoked' when revocation ended it before the consumer did.
    end_reason: str | None
    active: bool


async def introspect_session(deps: Deps, org_id: str, session_id: str) -> Introspected:
    """A session of this org as platform services see it, revocation included; 404 when
    there is none."""
    row = await queries.session_by_id(deps.pool, org_id, session_id)
    if row is None:
        raise not_found("session")  # another org's session reads exactly like a missing one
    iat = row.contact_token_issued_at
    revoked = await is_revoked(
        deps, row.org_id, row.contact_id, None if iat is None else int(iat.timestamp())
    )
    ended = None
    if row.ended_at is None and not revoked:
        ended = await ended_credential(deps, record_from_row(row))
    return Introspected(
        row=row,
        end_reason=row.end_reason or ("tokens_revoked" if revoked else ended),
        active=row.ended_at is None
        and not revoked
        and ended is None
        and row.expires_at.timestamp() > time.time(),
    )


async def is_revoked(
    deps: Deps, org_id: str, contact_id: str | None, contact_token_iat: int | None
) -> bool:
    if contact_id is None:
        return False
    if contact_token_iat is None:
        return True  # a verified session always records its token's iat; be safe
    state = await deps.verifier.revocations.state(deps.pool, org_id, contact_id)
    return state.revokes(contact_token_iat)


@dataclass(frozen=True, slots=True)
class Unbound:
    ended_sessions: int
    new_visitor_token: str | None


async def unbind_visitor(
    deps: Deps,
    *,
    visitor_id: str,
    org_id: str,
    widget_token_id: str | None,
    reason: str,
    bound_to_contact: str | None = None,
) -> Unbound | None:
    """End the browser's sessions and unbind it. With ``widget_token_id`` (logout) the browser
    gets a fresh anonymous visitor. With ``bound_to_contact`` (device revocation) the visitor
    must be one of that contact's devices. None when there is no such live visitor."""

    async def work(conn: asyncpg.Connection) -> Unbound | None:
        if bound_to_contact is not None:
            found = await device_queries.lock_bound_visitor(
                conn, org_id=org_id, contact_id=bound_to_contact, visitor_id=visitor_id
            )
        else:
            found = await visitor_queries.lock_live_visitor(conn, visitor_id) is not None
        if not found:
            return None
        live = await queries.live_session_keys(conn, visitor_id)
        visitor_hash = await visitor_queries.visitor_token_hash(conn, visitor_id)
        now = time.time()
        await deps.cache.bury(
            visitor_token_hashes=[] if visitor_hash is None else [visitor_hash],
            session_token_hashes=[
                (s.token_hash, max(1.0, s.expires_at.timestamp() - now))
                for s in live
                if s.token_hash is not None
            ],
            visitor_ttl_seconds=deps.config.visitor_cache_ttl,
        )
        ended = await queries.end_live_sessions(conn, visitor_id, reason)
        await visitor_queries.unbind_visitor(conn, visitor_id)
        for session in ended:
            await deps.outbox.emit(
                conn,
                SessionEnded,
                org_id=org_id,
                subject=visitor_id,
                data=SessionEndedData(session_id=session.id, visitor_id=visitor_id, reason=reason),
            )
        fresh_token = None
        if widget_token_id is not None:
            fresh_token = new_visitor_token()
            fresh_id = str(uuid.uuid4())
            await visitor_queries.insert_visitor(
                conn,
                visitor_id=fresh_id,
                org_id=org_id,
                token_hash=token_hash(fresh_token),
                attributes={},
            )
            await deps.outbox.emit(
                conn,
                VisitorCreated,
                org_id=org_id,
                subject=fresh_id,
                data=VisitorCreatedData(visitor_id=fresh_id, widget_token_id=widget_token_id),
            )
        return Unbound(ended_sessions=len(ended), new_visitor_token=fresh_token)

    return await in_transaction(deps.pool, work)


@dataclass(frozen=True, slots=True)
class LoggedOut:
    visitor_token: str
    ended_sessions: int


async def log_out(deps: Deps, record: SessionRecord) -> LoggedOut:
    """Unbind the session's browser and hand it a fresh visitor token; 401 when the browser
    was unbound meanwhile."""
    result = await unbind_visitor(
        deps,
        visitor_id=record.visitor_id,
        org_id=record.org_id,
        widget_token_id=record.widget_token_id,
        reason="logout",
    )
    if result is None or result.new_visitor_token is None:
        raise session_ended()
    return LoggedOut(visitor_token=result.new_visitor_token, ended_sessions=result.ended_sessions)


async def revoke_device(deps: Deps, *, org_id: str, contact_id: str, visitor_id: str) -> bool:
    """Unbind one of a contact's devices, as if it logged out. False when not found."""
    result = await unbind_visitor(
        deps,
        visitor_id=visitor_id,
        org_id=org_id,
        widget_token_id=None,
        reason="device_revoked",
        bound_to_contact=contact_id,
    )
    return result is not None
