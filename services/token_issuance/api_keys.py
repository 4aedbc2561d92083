"""Org API keys: created with scopes (shown once, stored as a hash), listed (never the secret
or its hash), revoked by id.

Checking a key on a request is shared.identity.api_keys's job (every service does it the same way).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from services.token_issuance import queries
from services.token_issuance.broadcast import Announce
from services.token_issuance.schemas import (
    ApiKeyCreated,
    ApiKeyInfo,
    ApiKeyList,
    ApiKeyRevoked,
    CreateApiKeyRequest,
)
from shared.db import in_transaction
from shared.errors import not_found, validation_failed
from shared.identity.api_keys import SCOPES, generate_api_key
from shared.identity.revocation import CredentialChange
from shared.web.pagination import PageRequest, next_cursor


def check_scopes(scopes: Sequence[str]) -> list[str]:
    unknown = sorted(set(scopes) - SCOPES)
    if unknown:
        raise validation_failed(
            f"unknown scopes {unknown}; valid scopes are {sorted(SCOPES)}",
            errors=[{"field": "scopes", "message": f"unknown scope {s!r}"} for s in unknown],
        )
    return sorted(set(scopes))


def check_expiry(expires_at: datetime | None) -> datetime | None:
    if expires_at is None:
        return None
    # A naive time never gets here: the request type is a Timestamp (decoding refuses it).
    try:
        # In UTC it must still be a storable instant: an extreme offset on 9999-12-31 is not
        # (it was a 500 from the driver).
        expires_at = expires_at.astimezone(UTC)
    except OverflowError:
        raise validation_failed("expiresAt is out of range") from None
    if expires_at <= datetime.now(UTC):
        raise validation_failed("expiresAt must be in the future")
    return expires_at


async def create_api_key(
    pool: asyncpg.Pool, org_id: str, request: CreateApiKeyRequest
) -> ApiKeyCreated:
    scopes = check_scopes(request.scopes)
    expires_at = check_expiry(request.expires_at)
    new = generate_api_key()
    key_id = str(uuid.uuid4())

    async def work(conn: asyncpg.Connection) -> ApiKeyCreated:
        if await queries.lock_org(conn, org_id) is None:
            raise not_found("org")
        row = await queries.insert_api_key(
            conn,
            key_id=key_id,
            org_id=org_id,
            key_hash=new.key_hash,
            display_prefix=new.display_prefix,
            scopes=scopes,
            expires_at=expires_at,
        )
        return ApiKeyCreated(
            id=key_id,
            key=new.key,
            display_prefix=new.display_prefix,
            scopes=scopes,
            created_at=row["created_at"],
            expires_at=expires_at,
        )

    return await in_transaction(pool, work)


async def list_api_keys(
    pool: asyncpg.Pool, org_id: str, page: PageRequest[uuid.UUID]
) -> ApiKeyList:
    if await queries.fetch_org(pool, org_id) is None:
        raise not_found("org")
    rows = await queries.list_api_keys(pool, org_id, page)
    items = [
        ApiKeyInfo(
            id=str(row["id"]),
            display_prefix=row["display_prefix"],
            scopes=list(row["scopes"]),
            created_at=row["created_at"],
            last_used_at=row["last_used_at"],
            expires_at=row["expires_at"],
            revoked_at=row["revoked_at"],
        )
        for row in rows[: page.limit]
    ]
    return ApiKeyList(items=items, next_cursor=next_cursor(rows, page.limit))


async def revoke_api_key(
    pool: asyncpg.Pool, org_id: str, key_id: str, announce: Announce
) -> ApiKeyRevoked:
    """Revoke; every process stops accepting the key as soon as it hears the announcement."""

    async def work(conn: asyncpg.Connection) -> ApiKeyRevoked:
        row = await queries.revoke_api_key(conn, org_id, key_id)
        if row is None:
            raise not_found("API key")
        return ApiKeyRevoked(id=key_id, revoked_at=row["revoked_at"])

    result = await in_transaction(pool, work)
    await announce(CredentialChange("api_key", key_id))
    return result
