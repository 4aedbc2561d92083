"""Request and response bodies of the token issuance API (camelCase on the wire).

Requests reject unknown fields and carry explicit size limits; one module-level decoder per
body type. Responses are plain Structs encoded by ``json_response``.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from shared.identity.api_keys import Scope
from shared.identity.contact_tokens import KID_PATTERN
from shared.identity.org_policy import MAX_TOKEN_TTL_SECONDS, MIN_TOKEN_TTL_SECONDS, OrgPolicy
from shared.identity.widget_tokens import MAX_ORIGINS, WidgetSettings
from shared.timestamps import Timestamp

OrgName = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
# A signing key id in a path; anything else is simply not found.
Kid = Annotated[str, msgspec.Meta(pattern=KID_PATTERN.pattern)]
Scalar = str | int | float | bool | None

# The largest customData (encoded JSON) a contact token may carry. Sized so that a token with
# every claim at its maximum stays under the verifier's 8 KiB limit.
MAX_CUSTOM_DATA_BYTES = 4 * 1024
MAX_CUSTOM_DATA_KEYS = 50

# The largest page an admin list returns (``limit``); 20 when not given.
ADMIN_PAGE_MAX = 100


class _Request(msgspec.Struct, frozen=True, rename="camel", forbid_unknown_fields=True):
    pass


class _Response(msgspec.Struct, frozen=True, rename="camel"):
    pass


# --- admin: orgs ---------------------------------------------------------------------------


class CreateOrgRequest(_Request, frozen=True):
    name: OrgName
    policy: OrgPolicy | None = None


class UpdateOrgRequest(_Request, frozen=True):
    """``policy`` is an RFC 7396 merge patch onto the current policy (null resets a key).
    ``disabled``: true disables the org (its API keys, widget tokens and contact tokens are
    refused on every replica within a second), false enables it again."""

    name: OrgName | None = None
    policy: dict[str, Any] | None = None
    disabled: bool | None = None


class SigningKeyInfo(_Response, frozen=True):
    kid: str
    alg: str
    created_at: Timestamp


class OrgInfo(_Response, frozen=True):
    id: str
    name: str
    policy: dict[str, Any]
    disabled: bool
    disabled_at: Timestamp | None
    created_at: Timestamp
    updated_at: Timestamp
    signing_key: SigningKeyInfo | None = None


class OrgList(_Response, frozen=True):
    """One page of orgs, oldest first; pass ``nextCursor`` as ``cursor`` for the next."""

    items: list[OrgInfo]
    next_cursor: str | None


# --- admin: API keys -----------------------------------------------------------------------


class CreateApiKeyRequest(_Request, frozen=True):
    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1, max_length=16)]
    expires_at: Timestamp | None = None


class ApiKeyCreated(_Response, frozen=True):
    id: str
    key: str  # shown once
    display_prefix: str
    scopes: list[str]
    created_at: Timestamp
    expires_at: Timestamp | None = None


class ApiKeyRevoked(_Response, frozen=True):
    id: str
    revoked_at: Timestamp


class ApiKeyInfo(_Response, frozen=True):
    """An API key as listed: never the key or its hash. ``lastUsedAt`` is accurate to about
    a minute."""

    id: str
    display_prefix: str
    scopes: list[str]
    created_at: Timestamp
    last_used_at: Timestamp | None
    expires_at: Timestamp | None
    revoked_at: Timestamp | None


class ApiKeyList(_Response, frozen=True):
    items: list[ApiKeyInfo]
    next_cursor: str | None


# --- admin: widget tokens ------------------------------------------------------------------


AllowedOrigins = Annotated[
    list[Annotated[str, msgspec.Meta(max_length=300)]], msgspec.Meta(max_length=MAX_ORIGINS)
]


class CreateWidgetTokenRequest(_Request, frozen=True):
    allowed_origins: AllowedOrigins
    settings: WidgetSettings = msgspec.field(default_factory=WidgetSettings)


class UpdateWidgetTokenRequest(_Request, frozen=True):
    """Each field given replaces the stored one as a whole and is validated as on creation;
    at least one is required."""

    allowed_origins: AllowedOrigins | None = None
    settings: WidgetSettings | None = None


class WidgetTokenCreated(_Response, frozen=True):
    id: str
    token: str  # the embed token (public, but shown in full only here)
    display_prefix: str
    allowed_origins: list[str]
    settings: dict[str, Any]
    created_at: Timestamp


class WidgetTokenInfo(_Response, frozen=True):
    """A widget token as listed or updated (the full token is shown only on creation)."""

    id: str
    display_prefix: str
    allowed_origins: list[str]
    settings: dict[str, Any]
    created_at: Timestamp
    revoked_at: Timestamp | None


class WidgetTokenList(_Response, frozen=True):
    items: list[WidgetTokenInfo]
    next_cursor: str | None


class WidgetTokenRevoked(_Response, frozen=True):
    id: str
    revoked_at: Timestamp


# --- admin: signing keys -------------------------------------------------------------------


class SigningKeyDeleted(_Response, frozen=True):
    kid: str
    deleted_at: Timestamp


class SigningKeyList(_Response, frozen=True):
    """The org's live signing keys, oldest first (deleted keys are not listed: they neither
    sign nor verify)."""

    items: list[SigningKeyInfo]
    next_cursor: str | None


# --- POST /widget/authenticate-user --------------------------------------------------------


class AuthenticateUserRequest(_Request, frozen=True):
    user_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    email: Annotated[str, msgspec.Meta(min_length=3, max_length=320)] | None = None
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    external_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    # Flat: scalar values only, so no client can hide structure in a verified claim.
    custom_data: (
        Annotated[
            dict[Annotated[str, msgspec.Meta(min_length=1, max_length=64)], Scalar],
            msgspec.Meta(max_length=MAX_CUSTOM_DATA_KEYS),
        ]
        | None
    ) = None
    expires_in: (
        Annotated[int, msgspec.Meta(ge=MIN_TOKEN_TTL_SECONDS, le=MAX_TOKEN_TTL_SECONDS)] | None
    ) = None


class AuthenticateUserResponse(_Response, frozen=True):
    token: str
    contact_id: str
    expires_at: Timestamp


class TokensRevokedResponse(_Response, frozen=True):
    contact_id: str
    not_before: Timestamp


class JwksResponse(_Response, frozen=True):
    """RFC 7517 JWK set: the public keys (each with ``kid``, ``alg``, ``use: sig``) that verify
    contact tokens; a token's header ``kid`` names its key."""

    keys: list[dict[str, Any]]


create_org_decoder = msgspec.json.Decoder(CreateOrgRequest)
update_org_decoder = msgspec.json.Decoder(UpdateOrgRequest)
create_api_key_decoder = msgspec.json.Decoder(CreateApiKeyRequest)
create_widget_token_decoder = msgspec.json.Decoder(CreateWidgetTokenRequest)
update_widget_token_decoder = msgspec.json.Decoder(UpdateWidgetTokenRequest)
authenticate_user_decoder = msgspec.json.Decoder(AuthenticateUserRequest)
