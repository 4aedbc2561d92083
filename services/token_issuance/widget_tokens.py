"""Widget tokens: the public embed token of an org's widget, with its allowed origins and
settings. Stored as a SHA-256 hash (shared.identity.api_keys.hash_secret) plus a display prefix, so
session resolution looks a token up by ``hash_secret(token)``."""

from __future__ import annotations

import secrets
import uuid

import asyncpg

from services.token_issuance import queries
from services.token_issuance.schemas import CreateWidgetTokenRequest, WidgetTokenCreated
from shared.db import in_transaction
from shared.errors import not_found
from shared.identity.api_keys import hash_secret
from shared.identity.widget_tokens import (
    check_widget_settings,
    normalize_origins,
    widget_settings_document,
)

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
