"""HTTP handlers of token issuance: parse, call the rule modules, respond. Nothing else."""

from __future__ import annotations

import uuid

from aiohttp import web

from services.token_issuance import api_keys, contacts, orgs, signing_keys, widget_tokens
from services.token_issuance.app_keys import JWKS, KEYRING
from services.token_issuance.schemas import (
    ApiKeyCreated,
    ApiKeyRevoked,
    AuthenticateUserRequest,
    AuthenticateUserResponse,
    CreateApiKeyRequest,
    CreateOrgRequest,
    CreateWidgetTokenRequest,
    JwksResponse,
    Kid,
    OrgInfo,
    SigningKeyDeleted,
    SigningKeyInfo,
    TokensRevokedResponse,
    UpdateOrgRequest,
    WidgetTokenCreated,
    authenticate_user_decoder,
    create_api_key_decoder,
    create_org_decoder,
    create_widget_token_decoder,
    update_org_decoder,
)
from shared.bus.outbox import OUTBOX
from shared.config import SETTINGS
from shared.db import DB_POOL
from shared.errors import not_found
from shared.identity.api_keys import API_KEYS, ApiKeyPrincipal, require_admin
from shared.identity.contact_tokens import CONTACT_TOKENS, KID_PATTERN
from shared.identity.org_policy import POLICIES, OrgPolicy
from shared.identity.revocation import announce_key_added, announce_key_deleted, announce_revocation
from shared.redis import REDIS
from shared.web.http import decode_body, json_response, parse_uuid
from shared.web.openapi import Query, operation
from shared.web.ratelimit import Limit, RateLimiter

# --- for customer backends -----------------------------------------------------------------


@operation(
    summary="Mint a contact token for a signed-in user",
    description=(
        "Called by the org's backend. Upserts the contact (keyed by `userId` when given, else "
        "by the normalised `email`), records `contact.authenticated` and returns a signed "
        "contact token for the widget's `user.token`. The org comes from the API key."
    ),
    tags=["token issuance"],
    body=AuthenticateUserRequest,
    responses={200: AuthenticateUserResponse},
    security="apiKey",
    scope="contacts:authenticate",
    errors={
        409: (
            "`identity_conflict` (the email is another contact's verified email, or the "
            "identity belongs to an erased contact) or `no_signing_key`."
        ),
        422: (
            "`validation_failed`: neither userId nor email, an invalid email, customData keys "
            "or size, expiresIn above the org's tokenMaxTtlSeconds; nothing was changed."
        ),
        429: "",
    },
)
async def authenticate_user(request: web.Request) -> web.Response:
    app = request.app
    principal, policy = await _admit_backend(request)
    body = await decode_body(request, authenticate_user_decoder)
    auth = contacts.validate_authentication(body, policy, app[SETTINGS])
    result = await contacts.authenticate(
        app[DB_POOL], app[OUTBOX], app[KEYRING], app[SETTINGS], principal.org_id, auth
    )
    return json_response(result)


async def _admit_backend(request: web.Request) -> tuple[ApiKeyPrincipal, OrgPolicy]:
    """The API key, then the per-key rate limit of its org's policy, before the body is read.
    The org comes from the key, never from the body (the body has no such field)."""
    app = request.app
    settings = app[SETTINGS]
    principal = await app[API_KEYS].authenticate(request, "contacts:authenticate")
    policy = await app[POLICIES].get(app[DB_POOL], principal.org_id)
    limits = policy.effective_rate_limits(settings.rate_limits)
    await RateLimiter(app[REDIS], settings.stream_prefix).check(
        Limit(f"authenticate:{principal.key_id}", limits.authenticate_per_key)
    )
    return principal, policy


@operation(
    summary="Revoke every contact token issued so far (log out everywhere)",
    description=(
        "Tokens issued before this call stop verifying on every replica within a second; "
        "records `contact.tokens_revoked`."
    ),
    tags=["token issuance"],
    responses={200: TokensRevokedResponse},
    security="apiKey",
    scope="contacts:manage",
    errors=(404,),
)
async def revoke_tokens(request: web.Request) -> web.Response:
    app = request.app
    principal = await app[API_KEYS].authenticate(request, "contacts:manage")
    contact_id = parse_uuid(request.match_info["contact_id"], "contact")
    result = await contacts.revoke_tokens(app[DB_POOL], app[OUTBOX], principal.org_id, contact_id)
    # Committed: drop it here now, and tell every other process without waiting for the relay.
    app[CONTACT_TOKENS].revocations.invalidate(contact_id)
    await announce_revocation(app[REDIS], app[SETTINGS], contact_id)
    return json_response(result)


@operation(
    summary="Public keys that verify contact tokens (JWKS)",
    tags=["token issuance"],
    query=[
        Query(
            "org",
            uuid.UUID,
            "Only this org's keys (a non-UUID value is `404 not_found`); all orgs' when absent.",
        )
    ],
    responses={200: JwksResponse},
    errors=(404,),
)
async def jwks(request: web.Request) -> web.Response:
    raw_org = request.query.get("org")
    org_id = parse_uuid(raw_org, "org") if raw_org is not None else None
    keys = await request.app[JWKS].keys(request.app[DB_POOL], org_id)
    # Short public caching: a rotated-in key must reach outside verifiers quickly.
    return json_response(JwksResponse(keys=keys), headers={"Cache-Control": "public, max-age=30"})


# --- admin ---------------------------------------------------------------------------------


def _org_id(request: web.Request) -> str:
    require_admin(request)
    return parse_uuid(request.match_info["org_id"], "org")


@operation(
    summary="Create an org with its policy and first signing key",
    tags=["admin"],
    body=CreateOrgRequest,
    responses={201: OrgInfo},
    security="adminToken",
)
async def create_org(request: web.Request) -> web.Response:
    require_admin(request)
    body = await decode_body(request, create_org_decoder)
    settings = request.app[SETTINGS]
    result = await orgs.create_org(
        request.app[DB_POOL],
        request.app[KEYRING].kek,
        settings.token_algorithms[0],
        body,
    )
    if result.signing_key is not None:
        await _key_created(request.app, result.signing_key.kid)
    return json_response(result, status=201)


@operation(
    summary="Read an org and its full policy",
    tags=["admin"],
    responses={200: OrgInfo},
    security="adminToken",
    errors=(404,),
)
async def get_org(request: web.Request) -> web.Response:
    org_id = _org_id(request)
    return json_response(await orgs.get_org(request.app[DB_POOL], org_id))


@operation(
    summary="Rename an org and/or merge-patch its policy",
    description=(
        "`policy` is an RFC 7396 merge patch onto the current policy (null resets a key to "
        "its default); the result must be a valid policy as a whole, else 422 and no change."
    ),
    tags=["admin"],
    body=UpdateOrgRequest,
    responses={200: OrgInfo},
    security="adminToken",
    errors=(404,),
)
async def update_org(request: web.Request) -> web.Response:
    org_id = _org_id(request)
    body = await decode_body(request, update_org_decoder)
    result = await orgs.update_org(request.app[DB_POOL], org_id, body)
    request.app[POLICIES].forget(org_id)
    return json_response(result)


@operation(
    summary="Create an API key with scopes (the key is shown once)",
    tags=["admin"],
    body=CreateApiKeyRequest,
    responses={201: ApiKeyCreated},
    security="adminToken",
    errors=(404,),
)
async def create_api_key(request: web.Request) -> web.Response:
    org_id = _org_id(request)
    body = await decode_body(request, create_api_key_decoder)
    result = await api_keys.create_api_key(request.app[DB_POOL], org_id, body)
    return json_response(result, status=201)


@operation(
    summary="Revoke an API key",
    tags=["admin"],
    responses={200: ApiKeyRevoked},
    security="adminToken",
    errors=(404,),
)
async def revoke_api_key(request: web.Request) -> web.Response:
    org_id = _org_id(request)
    key_id = parse_uuid(request.match_info["key_id"], "API key")
    revocation = await api_keys.revoke_api_key(request.app[DB_POOL], org_id, key_id)
    # Other replicas stop accepting it within their authenticator cache TTL.
    request.app[API_KEYS].forget(revocation.key_hash)
    return json_response(revocation.response)


@operation(
    summary="Create a widget token with allowed origins and widget settings",
    tags=["admin"],
    body=CreateWidgetTokenRequest,
    responses={201: WidgetTokenCreated},
    security="adminToken",
    errors=(404,),
)
async def create_widget_token(request: web.Request) -> web.Response:
    org_id = _org_id(request)
    body = await decode_body(request, create_widget_token_decoder)
    result = await widget_tokens.create_widget_token(request.app[DB_POOL], org_id, body)
    return json_response(result, status=201)


@operation(
    summary="Rotate: add a signing key that signs from now on",
    description="Older keys keep verifying until they are deleted.",
    tags=["admin"],
    responses={201: SigningKeyInfo},
    security="adminToken",
    errors=(404,),
)
async def rotate_signing_key(request: web.Request) -> web.Response:
    org_id = _org_id(request)
    app = request.app
    result = await signing_keys.rotate(
        app[DB_POOL], app[KEYRING].kek, org_id, app[SETTINGS].token_algorithms[0]
    )
    await _key_created(app, result.kid)
    app[KEYRING].forget_org(org_id)
    app[JWKS].clear()
    return json_response(result, status=201)


async def _key_created(app: web.Application, kid: str) -> None:
    # This process and every other verifier see the new key at once, not after their
    # unknown-kid back-off.
    app[CONTACT_TOKENS].keys.expire()
    await announce_key_added(app[REDIS], app[SETTINGS], kid)


@operation(
    summary="Delete a signing key (tokens it signed stop verifying)",
    tags=["admin"],
    path={"kid": Kid},
    responses={200: SigningKeyDeleted},
    security="adminToken",
    errors={
        404: "",
        409: "`last_signing_key`: the org's only live key; rotate before deleting it.",
    },
)
async def delete_signing_key(request: web.Request) -> web.Response:
    org_id = _org_id(request)
    kid = request.match_info["kid"]
    if not KID_PATTERN.match(kid):
        raise not_found("signing key")
    app = request.app
    result = await signing_keys.delete(app[DB_POOL], org_id, kid)
    app[CONTACT_TOKENS].key_deleted(kid)  # also drops it from this process's keyring
    app[JWKS].clear()
    await announce_key_deleted(app[REDIS], app[SETTINGS], kid)
    return json_response(result)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/widget/authenticate-user", authenticate_user)
    router.add_get("/.well-known/jwks.json", jwks)
    router.add_post("/v1/contacts/{contact_id}/revoke-tokens", revoke_tokens)
    router.add_post("/admin/v1/orgs", create_org)
    router.add_get("/admin/v1/orgs/{org_id}", get_org)
    router.add_patch("/admin/v1/orgs/{org_id}", update_org)
    router.add_post("/admin/v1/orgs/{org_id}/api-keys", create_api_key)
    router.add_delete("/admin/v1/orgs/{org_id}/api-keys/{key_id}", revoke_api_key)
    router.add_post("/admin/v1/orgs/{org_id}/widget-tokens", create_widget_token)
    router.add_post("/admin/v1/orgs/{org_id}/signing-keys", rotate_signing_key)
    router.add_delete("/admin/v1/orgs/{org_id}/signing-keys/{kid}", delete_signing_key)
