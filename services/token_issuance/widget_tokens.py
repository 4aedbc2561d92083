"""Widget tokens: the public embed token of an org's widget, with its allowed origins and
settings; created, listed, updated (validated exactly as on creation) and revoked. Stored as a SHA-256 hash (shared.identity.api_keys.hash_secret) plus a display prefix, so
session resolution looks a token up by ``hash_secret(token)``."""

from __future__ import annotations

import secrets
import uuid

import asyncpg

from services.token_issuance import queries
from services.token_issuance.broadcast import Announce
from services.token_issuance.schemas import (
    CreateWidgetTokenRequest,
    UpdateWidgetTokenRequest,
    WidgetTokenCreated,
    WidgetTokenInfo,
    WidgetTokenList,
    WidgetTokenRevoked,
)
from shared.db import in_transaction
from shared.errors import Problem, not_found, validation_failed
from shared.identity.api_keys import hash_secret
from shared.identity.revocation import CredentialChange
from shared.identity.widget_tokens import (
    check_widget_settings,
    normalize_origins,
    widget_settings_document,
)
from shared.web.pagination import PageRequest, next_cursor

WIDGET_TOKEN_PREFIX = "wit_"


async def create_widget_token(
    pool: asyncpg.Pool, org_id: str, request: CreateWidgetTokenRequest
) -> WidgetTokenCreated:
    origins = normalize_origins(request.allowed_origins)
    settings = widget_settings_document(check_widget_settings(request.settings))
    token = WIDGET_TOKEN_PREFIX + secrets.token_urlsafe(32)
    token_id = str(uuid.uuid4())

    async def work(conn: asyncpg.Connection) -> WidgetTokenCreated:
        if await queries.lock_org(conn, org_id) is None:
            raise not_found("org")
        row = await queries.insert_widget_token(
            conn,
            token_id=token_id,
            org_id=org_id,
            token_hash=hash_secret(token),
            display_prefix=token[:12],
            allowed_origins=origins,
            settings=settings,
        )
        return WidgetTokenCreated(
            id=token_id,
            token=token,
            display_prefix=token[:12],
            allowed_origins=origins,
            settings=settings,
            created_at=row["created_at"],
        )

    return await in_transaction(pool, work)


def _info(row: asyncpg.Record) -> WidgetTokenInfo:
    return WidgetTokenInfo(
        id=str(row["id"]),
        display_prefix=row["display_prefix"],
        allowed_origins=list(row["allowed_origins"]),
        settings=row["settings"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


async def list_widget_tokens(
    pool: asyncpg.Pool, org_id: str, page: PageRequest[uuid.UUID]
) -> WidgetTokenList:
    if await queries.fetch_org(pool, org_id) is None:
        raise not_found("org")
    rows = await queries.list_widget_tokens(pool, org_id, page)
    return WidgetTokenList(
        items=[_info(row) for row in rows[: page.limit]],
        next_cursor=next_cursor(rows, page.limit),
    )


async def update_widget_token(
    pool: asyncpg.Pool,
    org_id: str,
    token_id: str,
    request: UpdateWidgetTokenRequest,
    announce: Announce,
) -> WidgetTokenInfo:
    """Replace the allowed origins and/or the settings, validated as on creation (422 and no
    write otherwise). A revoked token is not updated (409 widget_token_revoked): it never
    works again, so a change to it would only mislead."""
    if request.allowed_origins is None and request.settings is None:
        raise validation_failed("give allowedOrigins and/or settings to change")
    origins = (
        None if request.allowed_origins is None else normalize_origins(request.allowed_origins)
    )
    settings = (
        None
        if request.settings is None
        else widget_settings_document(check_widget_settings(request.settings))
    )

    async def work(conn: asyncpg.Connection) -> WidgetTokenInfo:
        row = await queries.lock_widget_token(conn, org_id, token_id)
        if row is None:
            raise not_found("widget token")
        if row["revoked_at"] is not None:
            raise Problem(409, "widget_token_revoked", "this widget token is revoked")
        updated = await queries.update_widget_token(
            conn,
            token_id,
            origins if origins is not None else list(row["allowed_origins"]),
            settings if settings is not None else row["settings"],
        )
        return _info(updated)

    result = await in_transaction(pool, work)
    await announce(CredentialChange("widget_token", token_id))
    return result


async def revoke_widget_token(
    pool: asyncpg.Pool, org_id: str, token_id: str, announce: Announce
) -> WidgetTokenRevoked:
    """Revoke (a repeat returns the first revocation time). Sessions already open with it
    keep their origins (see shared.identity.widget_tokens.WidgetTokenDirectory.get_by_id)."""

    async def work(conn: asyncpg.Connection) -> WidgetTokenRevoked:
        row = await queries.revoke_widget_token(conn, org_id, token_id)
        if row is None:
            raise not_found("widget token")
        return WidgetTokenRevoked(id=token_id, revoked_at=row["revoked_at"])

    result = await in_transaction(pool, work)
    await announce(CredentialChange("widget_token", token_id))
    return result
