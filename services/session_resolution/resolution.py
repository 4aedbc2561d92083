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
session in one transaction (session_creation.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from services.session_resolution import queries, visitor_queries
from services.session_resolution.app_keys import Deps
from services.session_resolution.cache import (
    BURIED,
    CurrentSession,
    VisitorState,
    fill_quietly,
)
from services.session_resolution.identity import (
    BrowserInput,
    Resolution,
    ServerIdentity,
    resolve,
)
from services.session_resolution.session_creation import write_new_session
from services.session_resolution.session_tokens import (
    looks_like_visitor_token,
    token_hash,
    unwrap_session_token,
)
from shared.identity.org_policy import OrgPolicy
from shared.identity.widget_tokens import WidgetToken


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
    row = await visitor_queries.find_live_visitor(deps.pool, org_id, hashed)
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
        verified_kid=row.verified_kid,
        minted_by=row.minted_by,
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
    written = await write_new_session(
        deps,
        widget=widget,
        policy=policy,
        visitor=None if found is None else found[1],
        visitor_token=visitor_token if found is not None else None,
        server=server,
        browser=browser,
    )
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
        if (current.verified_kid, current.minted_by) != (server.kid, server.minted_by):
            # Its credentials must be the ones that vouch now: a session verified under a
            # since-rotated key would end with that key, under a visitor who did nothing.
            return None
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
        seen = await visitor_queries.touch_visitor(deps.pool, state.visitor_id)
        if seen is None:
            return None  # logged out meanwhile: resolve as a new visitor
        await fill_quietly(
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
