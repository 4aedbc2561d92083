"""POST /widget/sessions behind the handler: the fast path and the one-transaction write path.

Fast path (issue 4, item 7). A returning visitor whose resolution is exactly what its
current session already records (same widget token, level, contact, externalId and
attributes; see ``Resolution.fingerprint``) and whose remembered browser values did not
change gets that same session back: its token is unwrapped from the visitor's cached state
(``session_tokens.py``). Nothing is written to Postgres; the visitor's state comes from Redis,
or on a cache miss from two indexed Postgres *reads*. ``last_seen_at`` is refreshed at most
once per ``SessionConfig.last_seen_interval``. A session is not reused when it would expire
soon, outlive the contact token now presented, or was verified by a token issued before the
contact's tokens were revoked.

Write path: anything new (a new visitor, new values, another level or scope) creates a new
session in one transaction that also records the visitor, the device binding, the login
merge request and their outbox events. Older sessions of the browser stay valid until they
expire (other open tabs hold them) unless the browser logs out.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.session_resolution import queries
from services.session_resolution.cache import (
    BURIED,
    CurrentSession,
    SessionRecord,
    VisitorState,
)
from services.session_resolution.deps import Deps
from services.session_resolution.identity import (
    BrowserInput,
    Resolution,
    ServerIdentity,
    needs_login_merge,
    resolve,
)
from services.session_resolution.session_tokens import (
    looks_like_visitor_token,
    new_session_token,
    new_visitor_token,
    token_hash,
    unwrap_session_token,
    wrap_session_token,
)
from shared.bus.events import (
    HistoryMergeRequested,
    MergeRequestedData,
    SessionResolved,
    SessionResolvedData,
    VisitorCreated,
    VisitorCreatedData,
)
from shared.db import in_transaction
from shared.identity.org_policy import OrgPolicy
from shared.identity.widget_tokens import WidgetToken
from shared.redis import TRANSIENT_REDIS_ERRORS

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resolved:
    session_id: str
    session_token: str
    expires_at: datetime
    visitor_id: str
    visitor_token: str
    resolution: Resolution
    merge_id: str | None
    reused: bool


def _epoch(value: datetime) -> float:
    return value.timestamp()


async def _visitor_state(
    deps: Deps, org_id: str, visitor_token: str | None
) -> tuple[bytes, VisitorState] | None:
    """The returning visitor behind ``visitor_token`` in this org, or None (a new visitor).
    Unknown, malformed, logged-out and other-org tokens all mean "new visitor", never an error."""
    if visitor_token is None or not looks_like_visitor_token(visitor_token):
        return None
    hashed = token_hash(visitor_token)
    cached = await deps.cache.visitor(hashed)
    if isinstance(cached, VisitorState):
        return (hashed, cached) if cached.org_id == org_id else None
    if cached == BURIED:
        return None
    row = await queries.find_live_visitor(deps.pool, org_id, hashed)
    if row is None:
        return None
    current = await queries.current_session(deps.pool, row.id)
    state = VisitorState(
        visitor_id=row.id,
        org_id=row.org_id,
        attributes=row.attributes,
        last_seen=_epoch(row.last_seen_at),
        session=None if current is None else _current(current),
    )
    await deps.cache.put_visitor(hashed, state, deps.config.visitor_cache_ttl)
    return hashed, state


def _current(row: queries.SessionRow) -> CurrentSession | None:
    if row.token_wrapped is None:
        return None
    iat = row.contact_token_issued_at
    return CurrentSession(
        id=row.id,
        fingerprint=row.fingerprint,
        expires_at=_epoch(row.expires_at),
        wrapped=row.token_wrapped,
        contact_token_iat=None if iat is None else int(_epoch(iat)),
    )


async def resolve_session(
    deps: Deps,
    *,
    widget: WidgetToken,
    policy: OrgPolicy,
    visitor_token: str | None,
    server: ServerIdentity | None,
    browser: BrowserInput,
) -> Resolved:
    found = await _visitor_state(deps, widget.org_id, visitor_token)
    if found is not None and visitor_token is not None:
        hashed, state = found
        resolution = resolve(
            server=server,
            remembered=state.attributes,
            browser=browser,
            require_signed_external_id=policy.require_signed_external_id,
        )
        reused = await _reuse(deps, widget, state, resolution, server, visitor_token, hashed)
        if reused is not None:
            return reused
    else:
        # Validate the request's rules (externalId) before any write, as for a known visitor.
        resolve(
            server=server,
            remembered={},
            browser=browser,
            require_signed_external_id=policy.require_signed_external_id,
        )
    return await _create(
        deps,
        widget=widget,
        policy=policy,
        visitor=None if found is None else found[1],
        visitor_token=visitor_token if found is not None else None,
        server=server,
        browser=browser,
    )


async def _reuse(
    deps: Deps,
    widget: WidgetToken,
    state: VisitorState,
    resolution: Resolution,
    server: ServerIdentity | None,
    visitor_token: str,
    hashed: bytes,
) -> Resolved | None:
    current = state.session
    now = time.time()
    if (
        current is None
        or current.fingerprint != resolution.fingerprint(widget.id)
        or resolution.visitor_attributes != state.attributes
        or current.expires_at - now < deps.config.reuse_min_remaining
    ):
        return None
    if server is not None:
        if current.expires_at > _epoch(server.expires_at) or current.contact_token_iat is None:
            return None  # the session must not outlive the token that verifies it now
        revocation = await deps.verifier.revocations.state(
            deps.pool, widget.org_id, server.contact_id
        )
        if revocation.revokes(current.contact_token_iat):
            return None
    session_token = unwrap_session_token(
        current.wrapped, visitor_token=visitor_token, session_id=current.id
    )
    if session_token is None:
        return None
    if now - state.last_seen > deps.config.last_seen_interval:
        # The one write a returning visitor costs, at most once per interval.
        seen = await queries.touch_visitor(deps.pool, state.visitor_id)
        if seen is None:
            return None  # logged out meanwhile: resolve as a new visitor
        await _fill_quietly(
            deps.cache.put_visitor(
                hashed,
                VisitorState(
                    visitor_id=state.visitor_id,
                    org_id=state.org_id,
                    attributes=state.attributes,
                    last_seen=_epoch(seen),
                    session=current,
                ),
                deps.config.visitor_cache_ttl,
            )
        )
    return Resolved(
        session_id=current.id,
        session_token=session_token,
        expires_at=datetime.fromtimestamp(current.expires_at, UTC),
        visitor_id=state.visitor_id,
        visitor_token=visitor_token,
        resolution=resolution,
        merge_id=None,
        reused=True,
    )


@dataclass(frozen=True, slots=True)
class _Written:
    visitor_id: str
    visitor_token: str
    resolution: Resolution
    session_id: str
    session_token: str
    wrapped: bytes
    expires_at: datetime
    last_seen: datetime
    merge_id: str | None


async def _create(
    deps: Deps,
    *,
    widget: WidgetToken,
    policy: OrgPolicy,
    visitor: VisitorState | None,
    visitor_token: str | None,
    server: ServerIdentity | None,
    browser: BrowserInput,
) -> Resolved:
    config = deps.config

    async def work(conn: asyncpg.Connection) -> _Written:
        row = None if visitor is None else await queries.lock_live_visitor(conn, visitor.visitor_id)
        if row is not None and visitor_token is not None:
            token, visitor_id, remembered = visitor_token, row.id, row.attributes
            created = False
        else:
            # New browser, or its visitor was logged out while we looked: a fresh visitor.
            token, visitor_id, remembered = new_visitor_token(), str(uuid.uuid4()), {}
            created = True
        # Re-resolved under the visitor's lock, from the row (a concurrent request may have
        # changed the remembered values since the cached read).
        resolution = resolve(
            server=server,
            remembered=remembered,
            browser=browser,
            require_signed_external_id=policy.require_signed_external_id,
        )
        if created:
            last_seen = await queries.insert_visitor(
                conn,
                visitor_id=visitor_id,
                org_id=widget.org_id,
                token_hash=token_hash(token),
                attributes=resolution.visitor_attributes,
            )
            await deps.outbox.emit(
                conn,
                VisitorCreated,
                org_id=widget.org_id,
                subject=visitor_id,
                data=VisitorCreatedData(visitor_id=visitor_id, widget_token_id=widget.id),
            )
        else:
            last_seen = await queries.update_visitor(
                conn, visitor_id, resolution.visitor_attributes
            )
        merge_id = None
        if resolution.contact_id is not None:
            merge_id = await _bind_and_maybe_merge(
                deps, conn, widget, policy, visitor_id, created, resolution
            )
        session_id = str(uuid.uuid4())
        session_token = new_session_token()
        expires_at = datetime.now(UTC) + timedelta(seconds=config.session_ttl)
        if server is not None:
            expires_at = min(expires_at, server.expires_at)
        wrapped = wrap_session_token(session_token, visitor_token=token, session_id=session_id)
        await queries.insert_session(
            conn,
            session_id=session_id,
            org_id=widget.org_id,
            visitor_id=visitor_id,
            widget_token_id=widget.id,
            level=resolution.level,
            contact_id=resolution.contact_id,
            external_id=resolution.external_id,
            external_id_verified=resolution.external_id_verified,
            attributes=attributes_document(resolution),
            fingerprint=resolution.fingerprint(widget.id),
            token_hash=token_hash(session_token),
            token_wrapped=wrapped,
            contact_token_issued_at=None if server is None else server.issued_at,
            expires_at=expires_at,
        )
        await deps.outbox.emit(
            conn,
            SessionResolved,
            org_id=widget.org_id,
            subject=visitor_id,
            data=SessionResolvedData(
                session_id=session_id,
                visitor_id=visitor_id,
                level=resolution.level,
                contact_id=resolution.contact_id,
                external_id=resolution.external_id or None,
            ),
        )
        return _Written(
            visitor_id=visitor_id,
            visitor_token=token,
            resolution=resolution,
            session_id=session_id,
            session_token=session_token,
            wrapped=wrapped,
            expires_at=expires_at,
            last_seen=last_seen,
            merge_id=merge_id,
        )

    written = await in_transaction(deps.pool, work)
    await _remember(deps, widget, server, written)
    return Resolved(
        session_id=written.session_id,
        session_token=written.session_token,
        expires_at=written.expires_at,
        visitor_id=written.visitor_id,
        visitor_token=written.visitor_token,
        resolution=written.resolution,
        merge_id=written.merge_id,
        reused=False,
    )


async def _bind_and_maybe_merge(
    deps: Deps,
    conn: asyncpg.Connection,
    widget: WidgetToken,
    policy: OrgPolicy,
    visitor_id: str,
    created: bool,
    resolution: Resolution,
) -> str | None:
    assert resolution.contact_id is not None
    await queries.bind_device(
        conn,
        org_id=widget.org_id,
        contact_id=resolution.contact_id,
        visitor_id=visitor_id,
        external_id=resolution.external_id,
    )
    unmerged = not created and await queries.has_unmerged_browser_sessions(conn, visitor_id)
    if not needs_login_merge(
        policy_merge_on_login=policy.merge_anonymous_on_login,
        level=resolution.level,
        visitor_is_new=created,
        unmerged_browser_sessions=unmerged,
    ):
        return None
    merge_id = str(uuid.uuid4())
    # Subject = the target contact: merges into one contact are applied in order.
    await deps.outbox.emit(
        conn,
        HistoryMergeRequested,
        org_id=widget.org_id,
        subject=resolution.contact_id,
        data=MergeRequestedData(
            merge_id=merge_id,
            reason="login",
            target_contact_id=resolution.contact_id,
            target_external_id=resolution.external_id,
            source_visitor_id=visitor_id,
        ),
    )
    await queries.mark_merge_requested(
        conn,
        contact_id=resolution.contact_id,
        visitor_id=visitor_id,
        external_id=resolution.external_id,
    )
    return merge_id


async def _remember(
    deps: Deps, widget: WidgetToken, server: ServerIdentity | None, written: _Written
) -> None:
    """Fill the caches after commit. Best effort: Postgres has everything already, and a
    failed fill only means the next request reads Postgres."""
    now = time.time()
    expires = _epoch(written.expires_at)
    iat = None if server is None else int(_epoch(server.issued_at))
    resolution = written.resolution
    await _fill_quietly(
        deps.cache.put_session(
            token_hash(written.session_token),
            SessionRecord(
                id=written.session_id,
                org_id=widget.org_id,
                visitor_id=written.visitor_id,
                widget_token_id=widget.id,
                level=resolution.level,
                contact_id=resolution.contact_id,
                external_id=resolution.external_id,
                expires_at=expires,
                contact_token_iat=iat,
            ),
            expires - now,
        )
    )
    await _fill_quietly(
        deps.cache.put_visitor(
            token_hash(written.visitor_token),
            VisitorState(
                visitor_id=written.visitor_id,
                org_id=widget.org_id,
                attributes=resolution.visitor_attributes,
                last_seen=_epoch(written.last_seen),
                session=CurrentSession(
                    id=written.session_id,
                    fingerprint=resolution.fingerprint(widget.id),
                    expires_at=expires,
                    wrapped=written.wrapped,
                    contact_token_iat=iat,
                ),
            ),
            deps.config.visitor_cache_ttl,
        )
    )


async def _fill_quietly(fill: Any) -> None:
    try:
        await fill
    except TRANSIENT_REDIS_ERRORS as exc:
        log.warning("session cache fill failed", extra={"error": repr(exc)})


def attributes_document(resolution: Resolution) -> dict[str, Any]:
    return {
        k: {"value": a.value, "source": a.source, "verified": a.verified}
        for k, a in resolution.attributes.items()
    }
