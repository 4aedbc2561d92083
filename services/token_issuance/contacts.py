"""Contacts vouched for by an org's backend: authenticate (upsert + mint a contact token) and
revoke every token issued so far.

Ordering against revocation: issuance reads the database clock *after* taking the contact's
row lock, and revocation takes the same lock before stamping ``tokens_not_before`` (a whole
second strictly after both the revocation instant and any earlier not-before). A token is
revoked when its whole-second ``iat`` is before that stamp. So a token issued before a
revocation is always revoked, and one issued after it never is: its ``iat`` is rounded up to
the current not-before when the two fall in the same second.
"""

from __future__ import annotations

import base64
import json
import math
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from services.token_issuance import queries
from services.token_issuance.keyring import Keyring
from services.token_issuance.queries import Row
from services.token_issuance.schemas import (
    MAX_CUSTOM_DATA_BYTES,
    AuthenticateUserRequest,
    AuthenticateUserResponse,
    TokensRevokedResponse,
)
from services.token_issuance.signing_keys import sign_contact_token
from shared.bus.events import (
    ContactAuthenticated,
    ContactAuthenticatedData,
    ContactTokensRevoked,
    TokensRevokedData,
)
from shared.bus.outbox import Outbox, late
from shared.config import Settings
from shared.db import in_transaction
from shared.errors import Problem, not_found, validation_failed
from shared.identity.contact_tokens import MAX_TOKEN_BYTES
from shared.identity.contacts import lock_live_contact
from shared.identity.org_policy import DEFAULT_TOKEN_TTL_SECONDS, OrgPolicy

# Pragmatic ASCII address check (RFC 5321 sizes); internationalised addresses are refused
# rather than guessed at, because the lower-cased address is an identity key.
_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@"
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_CUSTOM_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
# Attribute names the contact already has; customData may not shadow them.
_RESERVED_ATTRIBUTES = frozenset({"name", "email", "userId", "externalId"})
_VERIFIED_EMAIL_INDEX = "contacts_verified_email"
# Fixed-size parts of a token: header (b64 of ~90 bytes), two dots, 64-byte signature.
_TOKEN_OVERHEAD = 140 + 2 + 86


def identity_conflict(detail: str) -> Problem:
    return Problem(409, "identity_conflict", detail)


@dataclass(frozen=True, slots=True)
class Authentication:
    """A validated authenticate-user call."""

    contact_key: str
    user_id: str | None
    email: str | None
    name: str | None
    external_id: str | None
    custom_data: dict[str, Any] | None
    expires_in: int


def normalize_email(raw: str) -> str:
    email = raw.strip().lower()
    if not _EMAIL.match(email):
        raise validation_failed(
            "email is not a valid address",
            errors=[{"field": "email", "message": "not a valid email address"}],
        )
    return email


def _text(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    if not value.strip() or not value.isprintable():
        raise validation_failed(f"{field} must be printable text and not blank")
    return value


def _check_custom_data(data: dict[str, Any] | None) -> dict[str, Any] | None:
    if not data:
        return None
    for key, value in data.items():
        if not _CUSTOM_KEY.match(key) or key in _RESERVED_ATTRIBUTES:
            raise validation_failed(
                f"customData key {key!r} is not allowed (letters, digits, _ . -; "
                f"not one of {sorted(_RESERVED_ATTRIBUTES)})"
            )
        if isinstance(value, str) and "\x00" in value:
            raise validation_failed(f"customData.{key} contains a NUL character")
        if isinstance(value, float) and not math.isfinite(value):
            raise validation_failed(f"customData.{key} must be a finite number")
    if len(msgspec.json.encode(data)) > MAX_CUSTOM_DATA_BYTES:
        raise validation_failed(f"customData exceeds {MAX_CUSTOM_DATA_BYTES} bytes")
    return data


def validate_authentication(
    request: AuthenticateUserRequest, policy: OrgPolicy, settings: Settings
) -> Authentication:
    """Every check that can fail before anything is written (422 on the first problem)."""
    if request.user_id is None and request.email is None:
        raise validation_failed("give userId or email (or both) to identify the contact")
    user_id = _text(request.user_id, "userId")
    email = normalize_email(request.email) if request.email is not None else None
    expires_in = request.expires_in or min(DEFAULT_TOKEN_TTL_SECONDS, policy.max_token_lifetime)
    if expires_in > policy.max_token_lifetime:
        raise validation_failed(
            f"expiresIn must not exceed the org's maxTokenLifetime ({policy.max_token_lifetime})"
        )
    auth = Authentication(
        contact_key=f"user:{user_id}" if user_id is not None else f"email:{email}",
        user_id=user_id,
        email=email,
        name=_text(request.name, "name"),
        external_id=_text(request.external_id, "externalId"),
        custom_data=_check_custom_data(request.custom_data),
        expires_in=expires_in,
    )
    _check_token_size(auth, settings)
    return auth


def _claims(
    auth: Authentication,
    settings: Settings,
    *,
    org_id: str,
    contact_id: str,
    jti: str,
    iat: int,
    exp: int,
    api_key_id: str | None,
) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": settings.token_issuer,
        "aud": settings.token_audience,
        "sub": contact_id,
        "org": org_id,
        "iat": iat,
        "exp": exp,
        "jti": jti,
    }
    optional = {
        # The API key that minted it: revoking that key ends this token and what it verified.
        "akid": api_key_id,
        "userId": auth.user_id,
        "email": auth.email,
        "name": auth.name,
        "externalId": auth.external_id,
        "customData": auth.custom_data,
    }
    claims.update((k, v) for k, v in optional.items() if v is not None)
    return claims


def _check_token_size(auth: Authentication, settings: Settings) -> None:
    # The verifier refuses tokens over MAX_TOKEN_BYTES; never mint one. Measured the way the
    # signer encodes (ASCII-escaped JSON, base64url) with the longest possible fixed claims.
    placeholder = str(uuid.UUID(int=0))
    claims = _claims(
        auth,
        settings,
        org_id=placeholder,
        contact_id=placeholder,
        jti=placeholder,
        iat=9_999_999_999,
        exp=9_999_999_999,
        api_key_id=placeholder,
    )
    payload = json.dumps(claims, separators=(",", ":")).encode()
    size = len(base64.urlsafe_b64encode(payload).rstrip(b"=")) + _TOKEN_OVERHEAD
    if size > MAX_TOKEN_BYTES:
        raise validation_failed(
            f"the claims are too large for a contact token (at most {MAX_TOKEN_BYTES} bytes); "
            "shorten customData or name"
        )


def _server_attributes(auth: Authentication) -> dict[str, Any]:
    """Provenance on every attribute (promise 7): these come from the org's backend."""
    values: dict[str, Any] = dict(auth.custom_data or {})
    if auth.name is not None:
        values["name"] = auth.name
    if auth.email is not None:
        values["email"] = auth.email
    return {k: {"value": v, "source": "server", "verified": True} for k, v in values.items()}


async def authenticate(
    pool: asyncpg.Pool,
    outbox: Outbox,
    keyring: Keyring,
    settings: Settings,
    org_id: str,
    auth: Authentication,
    *,
    api_key_id: str | None,
) -> AuthenticateUserResponse:
    """Upsert the contact, record ``contact.authenticated``, and mint its token (which names
    ``api_key_id``, the key that asked for it; None only for the Playground's demo backend,
    which mints on its own authority)."""
    key = await keyring.current(pool, org_id)  # before any write: no key, no change
    jti = str(uuid.uuid4())
    new_id = str(uuid.uuid4())
    attributes = _server_attributes(auth)
    # The contact id, `created` and the expiry come from the upsert itself (see
    # queries.upsert_contact), so the event is written by the same statement.
    event = outbox.insert(
        ContactAuthenticated,
        org_id=org_id,
        subject=late("subject"),
        data=ContactAuthenticatedData(
            contact_id=late("contact_id"),
            jti=jti,
            expires_at=late("expires_at"),
            user_id=auth.user_id,
            email=auth.email,
            external_id=auth.external_id,
            created=late("created"),
        ),
        source="authenticated",
        first_param=8,
    )

    async def upsert() -> Row | None:
        return await queries.upsert_contact(
            pool,
            new_id=new_id,
            org_id=org_id,
            contact_key=auth.contact_key,
            user_id=auth.user_id,
            verified_email=auth.email,
            attributes=attributes,
            expires_in=auth.expires_in,
            event=event,
        )

    row = await _with_email_retry(upsert, auth)
    if row is None:
        raise identity_conflict("this identity belongs to an erased contact")
    contact_id, iat = str(row["contact_id"]), int(row["iat"])
    exp = iat + auth.expires_in
    token = sign_contact_token(
        key,
        _claims(
            auth,
            settings,
            org_id=org_id,
            contact_id=contact_id,
            jti=jti,
            iat=iat,
            exp=exp,
            api_key_id=api_key_id,
        ),
    )
    return AuthenticateUserResponse(
        token=token, contact_id=contact_id, expires_at=datetime.fromtimestamp(exp, UTC)
    )


async def _with_email_retry(
    upsert: Callable[[], Awaitable[Row | None]], auth: Authentication
) -> Row | None:
    # ON CONFLICT arbitrates only on (org_id, contact_key). Two first-time calls for the same
    # new contact can race on the verified-email index instead: the loser retries once the
    # winner has committed and then takes the DO UPDATE path. A violation that survives the
    # retry is a real conflict: the email is the verified email of a different contact.
    for attempt in range(3):
        try:
            return await upsert()
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != _VERIFIED_EMAIL_INDEX:
                raise
            if attempt == 2:
                owner = "a different userId" if auth.user_id is not None else "a userId"
                raise identity_conflict(
                    f"this email is already the verified email of {owner} in this org"
                ) from None
    raise AssertionError("unreachable")


async def revoke_tokens(
    pool: asyncpg.Pool, outbox: Outbox, org_id: str, contact_id: str
) -> TokensRevokedResponse:
    """Reject every token of the contact issued so far ("log out everywhere")."""

    async def work(conn: asyncpg.Connection) -> datetime:
        if not await lock_live_contact(conn, org_id, contact_id, mode="update"):
            raise not_found("contact")
        not_before = await queries.set_tokens_not_before(conn, contact_id)
        await outbox.emit(
            conn,
            ContactTokensRevoked,
            org_id=org_id,
            subject=contact_id,
            data=TokensRevokedData(contact_id=contact_id, not_before=not_before),
        )
        return not_before

    not_before = await in_transaction(pool, work)
    return TokensRevokedResponse(contact_id=contact_id, not_before=not_before)
