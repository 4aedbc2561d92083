"""Visitor and session tokens: generation, hashing, and wrapping a session token for reuse.

Both tokens are bearer secrets with 256 random bits, stored only as SHA-256 (high entropy, so
a fast hash is safe and allows lookup by hash).

A returning visitor with nothing new is handed its live session again instead of a new one
(no Postgres write per widget load). That needs the session token back, which is stored only
*wrapped*: AES-GCM under a key derived from the visitor token, which the server never stores.
A database or Redis dump alone therefore yields no usable session token; only a request that
presents the browser's visitor token can unwrap its own session.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import uuid

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VISITOR_PREFIX = "wiv_"
SESSION_PREFIX = "wis_"
# token_urlsafe(32) is 43 characters of base64url.
_VISITOR = re.compile(r"^wiv_[A-Za-z0-9_-]{43}$")
_SESSION = re.compile(r"^wis_[A-Za-z0-9_-]{43}$")
_WRAP_CONTEXT = b"widget-identity/session-wrap/v1:"


def new_visitor_token() -> str:
    return VISITOR_PREFIX + secrets.token_urlsafe(32)


def new_session_token() -> str:
    return SESSION_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def looks_like_visitor_token(value: str) -> bool:
    return _VISITOR.match(value) is not None


def looks_like_session_token(value: str) -> bool:
    return _SESSION.match(value) is not None


def _wrap_key(visitor_token: str) -> bytes:
    # Domain-separated from token_hash, so the stored hash is not the key.
    return hashlib.sha256(_WRAP_CONTEXT + visitor_token.encode()).digest()


def wrap_session_token(session_token: str, *, visitor_token: str, session_id: str) -> bytes:
    nonce = os.urandom(12)
    sealed = AESGCM(_wrap_key(visitor_token)).encrypt(
        nonce, session_token.encode(), uuid.UUID(session_id).bytes
    )
    return nonce + sealed


def unwrap_session_token(wrapped: bytes, *, visitor_token: str, session_id: str) -> str | None:
    """The session token, or None when it was not wrapped for this visitor and session."""
    if len(wrapped) < 12 + 16:
        return None
    try:
        plain = AESGCM(_wrap_key(visitor_token)).decrypt(
            wrapped[:12], wrapped[12:], uuid.UUID(session_id).bytes
        )
    except InvalidTag:
        return None
    return plain.decode()
