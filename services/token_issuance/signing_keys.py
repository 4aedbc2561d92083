"""Signing keys: generation, encryption at rest, signing, rotation and deletion.

A private key is stored only as AES-256-GCM(KEY_ENCRYPTION_KEY) of its PKCS#8 bytes, with the
kid as associated data (a ciphertext copied onto another key's row does not decrypt). Layout:
``0x01 || nonce (12 bytes) || ciphertext+tag``; the version byte leaves room for a future
key-encryption-key rotation.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.token_issuance import queries
from services.token_issuance.schemas import SigningKeyDeleted, SigningKeyInfo, SigningKeyList
from shared.db import in_transaction
from shared.errors import ConfigError, Problem, not_found
from shared.identity.contact_tokens import TOKEN_TYPE
from shared.web.pagination import PageRequest, next_cursor

_FORMAT_V1 = b"\x01"
_NONCE_BYTES = 12

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class NewSigningKey:
    kid: str
    alg: str
    private_key: PrivateKey
    public_jwk: dict[str, Any]
    private_key_enc: bytes


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A decrypted, ready-to-sign private key (kept in memory by the keyring)."""

    kid: str
    org_id: str
    alg: str
    private_key: PrivateKey
    created_at: datetime


def generate_signing_key(kek: bytes, alg: str) -> NewSigningKey:
    # "k" + 22 chars of [A-Za-z0-9_-]: matches the kid pattern, and never starts with "-", which
    # an operator's shell command (`keys delete --kid -Ab...`) would read as an option.
    kid = "k" + secrets.token_urlsafe(16)
    private_key: PrivateKey
    if alg == "EdDSA":
        private_key = ed25519.Ed25519PrivateKey.generate()
        jwk = jwt.algorithms.OKPAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    elif alg == "ES256":
        private_key = ec.generate_private_key(ec.SECP256R1())
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    else:
        raise ValueError(f"unsupported signing algorithm {alg!r}")
    public_jwk = {**jwk, "kid": kid, "alg": alg, "use": "sig"}
    pkcs8 = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return NewSigningKey(
        kid=kid,
        alg=alg,
        private_key=private_key,
        public_jwk=public_jwk,
        private_key_enc=encrypt_private_key(kek, kid, pkcs8),
    )


def encrypt_private_key(kek: bytes, kid: str, pkcs8: bytes) -> bytes:
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return _FORMAT_V1 + nonce + AESGCM(kek).encrypt(nonce, pkcs8, kid.encode())


def decrypt_private_key(kek: bytes, kid: str, blob: bytes) -> PrivateKey:
    if not blob.startswith(_FORMAT_V1) or len(blob) < 1 + _NONCE_BYTES + 16:
        raise ConfigError(f"signing key {kid}: unknown encryption format")
    nonce, sealed = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
    try:
        pkcs8 = AESGCM(kek).decrypt(nonce, sealed, kid.encode())
    except InvalidTag:
        raise ConfigError(
            f"KEY_ENCRYPTION_KEY: cannot decrypt signing key {kid} (wrong key-encryption key?)"
        ) from None
    key = serialization.load_der_private_key(pkcs8, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(f"signing key {kid}: unexpected key type {type(key).__name__}")
    return key


def sign_contact_token(key: SigningKey, claims: dict[str, Any]) -> str:
    return jwt.encode(
        claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": TOKEN_TYPE}
    )


async def add_signing_key(
    conn: asyncpg.Connection, kek: bytes, org_id: str, alg: str
) -> SigningKeyInfo:
    new = generate_signing_key(kek, alg)
    row = await queries.insert_signing_key(
        conn,
        kid=new.kid,
        org_id=org_id,
        alg=new.alg,
        public_jwk=new.public_jwk,
        private_key_enc=new.private_key_enc,
    )
    return SigningKeyInfo(kid=row["kid"], alg=row["alg"], created_at=row["created_at"])


async def list_signing_keys(
    pool: asyncpg.Pool, org_id: str, page: PageRequest[str]
) -> SigningKeyList:
    """The org's live keys (deleted ones are left out, as in the JWKS)."""
    if await queries.fetch_org(pool, org_id) is None:
        raise not_found("org")
    rows = await queries.list_signing_keys(pool, org_id, page)
    return SigningKeyList(
        items=[
            SigningKeyInfo(kid=row["kid"], alg=row["alg"], created_at=row["created_at"])
            for row in rows[: page.limit]
        ],
        next_cursor=next_cursor(rows, page.limit, id_column="kid"),
    )


async def rotate(pool: asyncpg.Pool, kek: bytes, org_id: str, alg: str) -> SigningKeyInfo:
    """Add a new key that signs from now on; older keys keep verifying until deleted."""

    async def work(conn: asyncpg.Connection) -> SigningKeyInfo:
        if await queries.lock_org(conn, org_id) is None:
            raise not_found("org")
        return await add_signing_key(conn, kek, org_id, alg)

    return await in_transaction(pool, work)


async def delete(pool: asyncpg.Pool, org_id: str, kid: str) -> SigningKeyDeleted:
    """Delete a key: tokens it signed stop verifying. The last live key cannot be deleted
    (the org could no longer sign in anyone): rotate first."""

    async def work(conn: asyncpg.Connection) -> SigningKeyDeleted:
        if await queries.lock_org(conn, org_id) is None:
            raise not_found("org")
        if not await queries.live_key_exists(conn, org_id, kid):
            raise not_found("signing key")
        if await queries.live_key_count(conn, org_id) <= 1:
            raise Problem(
                409,
                "last_signing_key",
                "this is the org's only live signing key; rotate to a new key before deleting it",
            )
        deleted_at = await queries.delete_signing_key(conn, org_id, kid)
        return SigningKeyDeleted(kid=kid, deleted_at=deleted_at)

    return await in_transaction(pool, work)
