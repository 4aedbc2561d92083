"""All SQL of the token issuance service (orgs, api_keys, widget_tokens, signing_keys,
contacts). Every statement that touches org data is scoped by org_id."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg

from shared.bus.outbox import EventInsert
from shared.web.pagination import PageRequest

Executor: TypeAlias = asyncpg.Pool | asyncpg.Connection
Row: TypeAlias = asyncpg.Record

# --- orgs ----------------------------------------------------------------------------------

_ORG_COLUMNS = "id, name, policy, disabled_at, created_at, updated_at"  # what orgs._info reads

# Keyset pages: rows after the cursor's (created_at, id), limit + 1 of them (the extra one
# only tells whether there is a next page). $1/$2 are the cursor (NULL: from the start).
_AFTER = "($1::timestamptz IS NULL OR ({columns}) > ($1::timestamptz, $2::{id_type}))"


def _page_args(page: PageRequest[Any]) -> tuple[Any, Any, int]:
    created_at, item_id = page.after if page.after is not None else (None, None)
    return created_at, item_id, page.limit + 1


async def insert_org(
    conn: asyncpg.Connection, org_id: str, name: str, policy: dict[str, Any]
) -> Row:
    row: Row = await conn.fetchrow(
        f"""INSERT INTO orgs (id, name, policy) VALUES ($1, $2, $3)
            RETURNING {_ORG_COLUMNS}""",
        org_id,
        name,
        policy,
    )
    return row


async def fetch_org(db: Executor, org_id: str) -> Row | None:
    row: Row | None = await db.fetchrow(f"SELECT {_ORG_COLUMNS} FROM orgs WHERE id = $1", org_id)
    return row


async def lock_org(conn: asyncpg.Connection, org_id: str) -> Row | None:
    """Serialises changes to one org's policy and keys (e.g. two concurrent key deletions
    must not both see "another key is left")."""
    row: Row | None = await conn.fetchrow(
        f"SELECT {_ORG_COLUMNS} FROM orgs WHERE id = $1 FOR UPDATE",
        org_id,
    )
    return row


async def update_org(
    conn: asyncpg.Connection, org_id: str, name: str, policy: dict[str, Any], disabled: bool
) -> Row:
    """Disabling an org that is already disabled keeps the first disabled_at."""
    row: Row = await conn.fetchrow(
        f"""UPDATE orgs SET name = $2, policy = $3,
                disabled_at = CASE WHEN $4 THEN COALESCE(disabled_at, now()) END,
                updated_at = now()
            WHERE id = $1 RETURNING {_ORG_COLUMNS}""",
        org_id,
        name,
        policy,
        disabled,
    )
    return row


async def list_orgs(db: Executor, page: PageRequest[uuid.UUID]) -> list[Row]:
    after = _AFTER.format(columns="created_at, id", id_type="uuid")
    rows: list[Row] = await db.fetch(
        f"""SELECT {_ORG_COLUMNS} FROM orgs WHERE {after}
            ORDER BY created_at, id LIMIT $3""",
        *_page_args(page),
    )
    return rows


# --- API keys ------------------------------------------------------------------------------


async def insert_api_key(
    conn: asyncpg.Connection,
    *,
    key_id: str,
    org_id: str,
    key_hash: bytes,
    display_prefix: str,
    scopes: list[str],
    expires_at: datetime | None,
) -> Row:
    row: Row = await conn.fetchrow(
        """INSERT INTO api_keys (id, org_id, key_hash, display_prefix, scopes, expires_at)
           VALUES ($1, $2, $3, $4, $5, $6) RETURNING created_at""",
        key_id,
        org_id,
        key_hash,
        display_prefix,
        scopes,
        expires_at,
    )
    return row


async def revoke_api_key(conn: asyncpg.Connection, org_id: str, key_id: str) -> Row | None:
    """Revoke (idempotent: a second call returns the first revocation time)."""
    row: Row | None = await conn.fetchrow(
        """UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now())
           WHERE id = $1 AND org_id = $2 RETURNING revoked_at""",
        key_id,
        org_id,
    )
    return row


async def list_api_keys(db: Executor, org_id: str, page: PageRequest[uuid.UUID]) -> list[Row]:
    after = _AFTER.format(columns="created_at, id", id_type="uuid")
    rows: list[Row] = await db.fetch(
        f"""SELECT id, display_prefix, scopes, created_at, last_used_at, expires_at, revoked_at
            FROM api_keys WHERE org_id = $4 AND {after}
            ORDER BY created_at, id LIMIT $3""",
        *_page_args(page),
        org_id,
    )
    return rows


# --- widget tokens -------------------------------------------------------------------------

_WIDGET_COLUMNS = "id, display_prefix, allowed_origins, settings, created_at, revoked_at"


async def insert_widget_token(
    conn: asyncpg.Connection,
    *,
    token_id: str,
    org_id: str,
    token_hash: bytes,
    display_prefix: str,
    allowed_origins: list[str],
    settings: dict[str, Any],
) -> Row:
    row: Row = await conn.fetchrow(
        """INSERT INTO widget_tokens
               (id, org_id, token_hash, display_prefix, allowed_origins, settings)
           VALUES ($1, $2, $3, $4, $5, $6) RETURNING created_at""",
        token_id,
        org_id,
        token_hash,
        display_prefix,
        allowed_origins,
        settings,
    )
    return row


async def list_widget_tokens(db: Executor, org_id: str, page: PageRequest[uuid.UUID]) -> list[Row]:
    after = _AFTER.format(columns="created_at, id", id_type="uuid")
    rows: list[Row] = await db.fetch(
        f"""SELECT {_WIDGET_COLUMNS} FROM widget_tokens WHERE org_id = $4 AND {after}
            ORDER BY created_at, id LIMIT $3""",
        *_page_args(page),
        org_id,
    )
    return rows


async def lock_widget_token(conn: asyncpg.Connection, org_id: str, token_id: str) -> Row | None:
    row: Row | None = await conn.fetchrow(
        f"""SELECT {_WIDGET_COLUMNS} FROM widget_tokens WHERE id = $1 AND org_id = $2
            FOR UPDATE""",
        token_id,
        org_id,
    )
    return row


async def update_widget_token(
    conn: asyncpg.Connection,
    token_id: str,
    allowed_origins: list[str],
    settings: dict[str, Any],
) -> Row:
    row: Row = await conn.fetchrow(
        f"""UPDATE widget_tokens SET allowed_origins = $2, settings = $3 WHERE id = $1
            RETURNING {_WIDGET_COLUMNS}""",
        token_id,
        allowed_origins,
        settings,
    )
    return row


async def revoke_widget_token(conn: asyncpg.Connection, org_id: str, token_id: str) -> Row | None:
    """Revoke (idempotent: a second call returns the first revocation time)."""
    row: Row | None = await conn.fetchrow(
        """UPDATE widget_tokens SET revoked_at = COALESCE(revoked_at, now())
           WHERE id = $1 AND org_id = $2 RETURNING revoked_at""",
        token_id,
        org_id,
    )
    return row


# --- signing keys --------------------------------------------------------------------------


async def insert_signing_key(
    conn: asyncpg.Connection,
    *,
    kid: str,
    org_id: str,
    alg: str,
    public_jwk: dict[str, Any],
    private_key_enc: bytes,
) -> Row:
    row: Row = await conn.fetchrow(
        """INSERT INTO signing_keys (kid, org_id, alg, public_jwk, private_key_enc)
           VALUES ($1, $2, $3, $4, $5) RETURNING kid, alg, created_at""",
        kid,
        org_id,
        alg,
        public_jwk,
        private_key_enc,
    )
    return row


async def newest_signing_key(db: Executor, org_id: str) -> Row | None:
    row: Row | None = await db.fetchrow(
        """SELECT kid, alg, private_key_enc, created_at FROM signing_keys
           WHERE org_id = $1 AND deleted_at IS NULL
           ORDER BY created_at DESC, kid LIMIT 1""",
        org_id,
    )
    return row


async def any_signing_key(db: Executor) -> Row | None:
    """One stored key, to prove at start-up that the key-encryption key opens them."""
    row: Row | None = await db.fetchrow(
        """SELECT kid, org_id, alg, private_key_enc FROM signing_keys
           WHERE deleted_at IS NULL ORDER BY created_at DESC LIMIT 1"""
    )
    return row


async def live_key_count(conn: asyncpg.Connection, org_id: str) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM signing_keys WHERE org_id = $1 AND deleted_at IS NULL", org_id
    )
    return count


async def live_key_exists(conn: asyncpg.Connection, org_id: str, kid: str) -> bool:
    found: bool = await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM signing_keys
                          WHERE kid = $1 AND org_id = $2 AND deleted_at IS NULL)""",
        kid,
        org_id,
    )
    return found


async def delete_signing_key(conn: asyncpg.Connection, org_id: str, kid: str) -> datetime:
    """Soft delete: the row stays (audit; kids are never reused) but the key stops verifying
    and its encrypted private key is wiped."""
    deleted_at: datetime = await conn.fetchval(
        """UPDATE signing_keys SET deleted_at = now(), private_key_enc = '\\x'::bytea
           WHERE kid = $1 AND org_id = $2 AND deleted_at IS NULL RETURNING deleted_at""",
        kid,
        org_id,
    )
    return deleted_at


async def list_signing_keys(db: Executor, org_id: str, page: PageRequest[str]) -> list[Row]:
    after = _AFTER.format(columns="created_at, kid", id_type="text")
    rows: list[Row] = await db.fetch(
        f"""SELECT kid, alg, created_at FROM signing_keys
            WHERE org_id = $4 AND deleted_at IS NULL AND {after}
            ORDER BY created_at, kid LIMIT $3""",
        *_page_args(page),
        org_id,
    )
    return rows


async def live_public_jwks(db: Executor, org_id: str | None) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """SELECT public_jwk FROM signing_keys
           WHERE deleted_at IS NULL AND ($1::uuid IS NULL OR org_id = $1::uuid)
           ORDER BY created_at, kid""",
        org_id,
    )
    return [row["public_jwk"] for row in rows]


# --- contacts ------------------------------------------------------------------------------


async def upsert_contact(
    pool: asyncpg.Pool,
    *,
    new_id: str,
    org_id: str,
    contact_key: str,
    user_id: str | None,
    verified_email: str | None,
    attributes: dict[str, Any],
    expires_in: int,
    event: EventInsert,
) -> Row | None:
    """Insert or update the contact for ``contact_key`` and record its event, in one
    race-free statement (atomic without BEGIN/COMMIT: one round trip).

    Server attributes from this call overwrite earlier server values; omitted ones stay.
    ``iat`` is read from the database clock after the row lock is held, so it orders this
    issuance against any revocation of the same contact (see contacts.revoke_tokens): it is
    rounded up to the contact's ``tokens_not_before`` when they fall in the same second.
    ``event`` is built on the ``authenticated`` source (columns ``subject``, ``contact_id``,
    ``created``, ``expires_at``) with parameters from $8. Returns (contact_id, iat, created),
    or None when the matching contact is erased (never resurrect it; no event then).
    """
    row: Row | None = await pool.fetchrow(
        f"""WITH upserted AS (
               INSERT INTO contacts AS c
                   (id, org_id, contact_key, user_id, verified_email, attributes)
               VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (org_id, contact_key) DO UPDATE SET
                   user_id = COALESCE(EXCLUDED.user_id, c.user_id),
                   verified_email = COALESCE(EXCLUDED.verified_email, c.verified_email),
                   attributes = c.attributes || EXCLUDED.attributes,
                   updated_at = now()
               WHERE c.erased_at IS NULL
               RETURNING c.id, c.tokens_not_before, clock_timestamp() AS issued_at),
           issued AS (
               SELECT id, GREATEST(floor(extract(epoch FROM issued_at)),
                                   ceil(extract(epoch FROM tokens_not_before)))::bigint AS iat
               FROM upserted),
           authenticated AS (
               SELECT id::text AS subject, id AS contact_id, id = $1 AS created, iat,
                      to_timestamp(iat + $7) AS expires_at
               FROM issued),
           {event.ctes}
           SELECT contact_id, iat, created FROM authenticated""",
        new_id,
        org_id,
        contact_key,
        user_id,
        verified_email,
        attributes,
        expires_in,
        *event.params,
    )
    return row


async def set_tokens_not_before(conn: asyncpg.Connection, contact_id: str) -> datetime:
    """Stamp the contact's not-before: the next whole second after now (contact tokens carry
    whole-second ``iat``), and strictly after the previous not-before. So a token issued
    before this call (``iat`` <= its issue time < now) is revoked, and so is one issued after
    an earlier revocation in the same second (whose ``iat`` was rounded up to that earlier
    not-before). clock_timestamp(), not now(): the row lock is already held, so every token
    issued before this instant has committed with an earlier issue time."""
    not_before: datetime = await conn.fetchval(
        """UPDATE contacts SET
               tokens_not_before = GREATEST(
                   date_trunc('second', clock_timestamp()) + interval '1 second',
                   tokens_not_before + interval '1 second'),
               updated_at = now()
           WHERE id = $1 RETURNING tokens_not_before""",
        contact_id,
    )
    return not_before
