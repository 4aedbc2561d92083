"""Orgs and their policy: creation (with the first signing key) and merge-patch updates."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from services.token_issuance import queries
from services.token_issuance.schemas import (
    CreateOrgRequest,
    OrgInfo,
    SigningKeyInfo,
    UpdateOrgRequest,
)
from services.token_issuance.signing_keys import add_signing_key
from shared.db import in_transaction
from shared.errors import not_found, validation_failed
from shared.identity.org_policy import (
    DEFAULT_POLICY,
    merge_patch,
    parse_policy,
    policy_document,
    policy_from_row,
)


def _info(row: asyncpg.Record, signing_key: SigningKeyInfo | None = None) -> OrgInfo:
    return OrgInfo(
        id=str(row["id"]),
        name=row["name"],
        policy=policy_document(policy_from_row(row["policy"])),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        signing_key=signing_key,
    )


def _clean_name(name: str) -> str:
    cleaned = name.strip()
    if not cleaned or not cleaned.isprintable():
        raise validation_failed("name must be printable text and not blank")
    return cleaned


async def create_org(
    pool: asyncpg.Pool, kek: bytes, alg: str, request: CreateOrgRequest
) -> OrgInfo:
    """A new org with its policy and one signing key, in one transaction."""
    name = _clean_name(request.name)
    policy = policy_document(request.policy or DEFAULT_POLICY)

    async def work(conn: asyncpg.Connection) -> OrgInfo:
        row = await queries.insert_org(conn, str(uuid.uuid4()), name, policy)
        key = await add_signing_key(conn, kek, str(row["id"]), alg)
        return _info(row, key)

    return await in_transaction(pool, work)


async def get_org(pool: asyncpg.Pool, org_id: str) -> OrgInfo:
    row = await queries.fetch_org(pool, org_id)
    if row is None:
        raise not_found("org")
    return _info(row)


async def update_org(pool: asyncpg.Pool, org_id: str, request: UpdateOrgRequest) -> OrgInfo:
    """Rename and/or merge-patch the policy; the result is validated as a whole (422 and no
    write when it is not a valid policy)."""

    async def work(conn: asyncpg.Connection) -> OrgInfo:
        row = await queries.lock_org(conn, org_id)
        if row is None:
            raise not_found("org")
        policy: dict[str, Any] = row["policy"]
        if request.policy is not None:
            policy = policy_document(parse_policy(merge_patch(policy, request.policy)))
        name = _clean_name(request.name) if request.name is not None else row["name"]
        return _info(await queries.update_org(conn, org_id, name, policy))

    return await in_transaction(pool, work)
