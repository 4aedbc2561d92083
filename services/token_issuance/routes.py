"""HTTP handlers of token issuance: parse, call the rule modules, respond. Nothing else.

The admin API's handlers are in admin.py."""

from __future__ import annotations

import uuid

from aiohttp import web

from services.token_issuance import admin, contacts
from services.token_issuance.app_keys import JWKS, KEYRING
from services.token_issuance.schemas import (
    AuthenticateUserRequest,
    AuthenticateUserResponse,
    JwksResponse,
    TokensRevokedResponse,
    authenticate_user_decoder,
)
from shared.bus.outbox import OUTBOX
from shared.config import SETTINGS
from shared.db import DB_POOL
from shared.identity.api_keys import API_KEYS, ApiKeyPrincipal
from shared.identity.contact_tokens import CONTACT_TOKENS
from shared.identity.org_policy import POLICIES, OrgPolicy
from shared.identity.revocation import announce_revocation
from shared.redis import REDIS
from shared.web.http import decode_body, json_response, parse_uuid
from shared.web.openapi import Query, operation
from shared.web.ratelimit import RATE_LIMITER, Limit

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
            "or size, expiresIn above the org's maxTokenLifetime; nothing was changed."
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
        app[DB_POOL],
        app[OUTBOX],
        app[KEYRING],
        app[SETTINGS],
        principal.org_id,
        auth,
        api_key_id=principal.key_id,
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
    await app[RATE_LIMITER].check(
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


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/widget/authenticate-user", authenticate_user)
    router.add_get("/.well-known/jwks.json", jwks)
    router.add_post("/v1/contacts/{contact_id}/revoke-tokens", revoke_tokens)
    admin.add_routes(router)
