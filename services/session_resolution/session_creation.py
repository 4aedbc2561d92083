"""The write path of POST /widget/sessions: a new session in one transaction.

Anything the fast path (resolution.py) cannot hand back, a new visitor, new values, another
level or scope, creates a new session in one transaction that also records the visitor, the
device binding, the login merge request and their outbox events. The caches are filled after
the commit. Older sessions of the browser stay valid until they expire (other open tabs hold
them) unless the browser logs out.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.session_resolution import device_queries, queries, visitor_queries
from services.session_resolution.app_keys import Deps
from services.session_resolution.cache import (
    CurrentSession,
    SessionRecord,
    VisitorState,
    fill_quietly,
)
from services.session_resolution.identity import (
    BrowserInput,
    Resolution,
    ServerIdentity,
    needs_login_merge,
    resolve,
)
from services.session_resolution.session_tokens import (
    new_session_token,
    new_visitor_token,
    token_hash,
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


@dataclass(frozen=True, slots=True)
class Written:
    visitor_id: str
    visitor_token: str
    resolution: Resolution
    session_id: str
    session_token: str
    wrapped: bytes
    expires_at: datetime
    last_seen: datetime
    merge_id: str | None


async def write_new_session(
    deps: Deps,
    *,
    widget: WidgetToken,
    policy: OrgPolicy,
    visitor: VisitorState | None,
    visitor_token: str | None,
    server: ServerIdentity | None,
    browser: BrowserInput,
) -> Written:
    """A new session for this browser (and, when it is new or was logged out meanwhile, a new
    visitor), with its device binding and login merge request, in one transaction."""
    config = deps.config

    async def work(conn: asyncpg.Connection) -> Written:
        row = (
            None
            if visitor is None
            else await visitor_queries.lock_live_visitor(conn, visitor.visitor_id)
        )
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
            last_seen = await visitor_queries.insert_visitor(
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
            last_seen = await visitor_queries.update_visitor(
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
            verified_kid=None if server is None else server.kid,
            minted_by=None if server is None else server.minted_by,
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
        return Written(
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
    return written


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
    await device_queries.bind_device(
        conn,
        org_id=widget.org_id,
        contact_id=resolution.contact_id,
        visitor_id=visitor_id,
        external_id=resolution.external_id,
    )
    unmerged = not created and await device_queries.has_unmerged_browser_sessions(conn, visitor_id)
    if not needs_login_merge(
        policy_merge_on_login=policy.merge_anonymous_on_login,
        level=resolution.level,
        visitor_is_new=created,
        unmerged_browser_sessions=unmerged,
    ):
        return None
    merge_id = str(uuid.uuid4())
    # The promise and its event commit with the session that hands out the id (promise 13).
    await device_queries.insert_merge_request(
        conn,
        merge_id=merge_id,
        org_id=widget.org_id,
        visitor_id=visitor_id,
        contact_id=resolution.contact_id,
        external_id=resolution.external_id,
    )
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
    await device_queries.mark_merge_requested(
        conn,
        contact_id=resolution.contact_id,
        visitor_id=visitor_id,
        external_id=resolution.external_id,
    )
    return merge_id


async def _remember(
    deps: Deps, widget: WidgetToken, server: ServerIdentity | None, written: Written
) -> None:
    """Fill the caches after commit. Best effort: Postgres has everything already, and a
    failed fill only means the next request reads Postgres."""
    now = time.time()
    expires = written.expires_at.timestamp()
    iat = None if server is None else int(server.issued_at.timestamp())
    resolution = written.resolution
    await fill_quietly(
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
                verified_kid=None if server is None else server.kid,
                minted_by=None if server is None else server.minted_by,
            ),
            expires - now,
        )
    )
    await fill_quietly(
        deps.cache.put_visitor(
            token_hash(written.visitor_token),
            VisitorState(
                visitor_id=written.visitor_id,
                org_id=widget.org_id,
                attributes=resolution.visitor_attributes,
                last_seen=written.last_seen.timestamp(),
                session=CurrentSession(
                    id=written.session_id,
                    fingerprint=resolution.fingerprint(widget.id),
                    expires_at=expires,
                    wrapped=written.wrapped,
                    contact_token_iat=iat,
                    verified_kid=None if server is None else server.kid,
                    minted_by=None if server is None else server.minted_by,
                ),
            ),
            deps.config.visitor_cache_ttl,
        )
    )


def attributes_document(resolution: Resolution) -> dict[str, Any]:
    return {
        k: {"value": a.value, "source": a.source, "verified": a.verified}
        for k, a in resolution.attributes.items()
    }
