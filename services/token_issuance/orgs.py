"""Orgs and their policy: creation (with the first signing key), listing, merge-patch updates,
disabling and enabling."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from services.token_issuance import queries
from services.token_issuance.broadcast import Announce
from services.token_issuance.schemas import (
    CreateOrgRequest,
    OrgInfo,
    OrgList,
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
from shared.identity.revocation import CredentialChange
from shared.web.pagination import PageRequest, next_cursor


def _info(row: asyncpg.Record, signing_key: SigningKeyInfo | None = None) -> OrgInfo:
    return OrgInfo(
        id=str(row["id"]),
        name=row["name"],
        policy=policy_document(policy_from_row(row["policy"])),
        disabled=row["disabled_at"] is not None,
        disabled_at=row["disabled_at"],
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


async def list_orgs(pool: asyncpg.Pool, page: PageRequest[uuid.UUID]) -> OrgList:
    rows = await queries.list_orgs(pool, page)
    return OrgList(
        items=[_info(row) for row in rows[: page.limit]],
        next_cursor=next_cursor(rows, page.limit),
    )


async def update_org(
    pool: asyncpg.Pool, org_id: str, request: UpdateOrgRequest, announce: Announce
) -> OrgInfo:
    """Rename, merge-patch the policy and/or disable or enable; the policy is validated as a
    whole (422 and no write when it is not a valid policy). A policy or disabled change is
    announced to every process once committed."""

    async def work(conn: asyncpg.Connection) -> OrgInfo:
        row = await queries.lock_org(conn, org_id)
        if row is None:
            raise not_found("org")
        policy: dict[str, Any] = row["policy"]
        if request.policy is not None:
            policy = policy_document(parse_policy(merge_patch(policy, request.policy)))
        name = _clean_name(request.name) if request.name is not None else row["name"]
        disabled = (
            request.disabled if request.disabled is not None else row["disabled_at"] is not None
        )
        return _info(await queries.update_org(conn, org_id, name, policy, disabled))

    result = await in_transaction(pool, work)
    if request.policy is not None or request.disabled is not None:
        await announce(CredentialChange("org", org_id))
    return result
