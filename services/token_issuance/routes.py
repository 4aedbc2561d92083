"""HTTP handlers of token issuance: parse, call the rule modules, respond. Nothing else."""

from __future__ import annotations

from aiohttp import web

from services.token_issuance import api_keys, contacts, orgs, signing_keys, widget_tokens
from services.token_issuance.deps import JWKS, KEYRING
from services.token_issuance.schemas import (
    authenticate_user_decoder,
    create_api_key_decoder,
    create_org_decoder,
    create_widget_token_decoder,
    update_org_decoder,
)
from shared.auth import API_KEYS, require_admin
from shared.db import DB_POOL
from shared.errors import not_found
from shared.http import SETTINGS, decode_body, json_response, parse_uuid
from shared.outbox import OUTBOX
from shared.policy import POLICIES
from shared.ratelimit import Limit, RateLimiter
from shared.redis import REDIS
from shared.revocation import announce_key_added, announce_key_deleted, announce_revocation
from shared.tokens import CONTACT_TOKENS, KID_PATTERN

# --- for customer backends -----------------------------------------------------------------


async def authenticate_user(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    principal = await app[API_KEYS].authenticate(request, "contacts:authenticate")
    # The org comes from the key, never from the body (the body has no such field).
    policy = await app[POLICIES].get(app[DB_POOL], principal.org_id)
    limits = policy.effective_rate_limits(settings.rate_limits)
    await RateLimiter(app[REDIS], settings.stream_prefix).check(
        Limit(f"authenticate:{principal.key_id}", limits.authenticate_per_key)
    )
    body = await decode_body(request, authenticate_user_decoder)
    auth = contacts.validate_authentication(body, policy, settings)
    result = await contacts.authenticate(
        app[DB_POOL], app[OUTBOX], app[KEYRING], settings, principal.org_id, auth
    )
    return json_response(result)


async def revoke_tokens(request: web.Request) -> web.Response:
    app = request.app
    principal = await app[API_KEYS].authenticate(request, "contacts:manage")
    contact_id = parse_uuid(request.match_info["contact_id"], "contact")
    result = await contacts.revoke_tokens(app[DB_POOL], app[OUTBOX], principal.org_id, contact_id)
    # Committed: drop it here now, and tell every other process without waiting for the relay.
    app[CONTACT_TOKENS].revocations.invalidate(contact_id)
    await announce_revocation(app[REDIS], app[SETTINGS], contact_id)
    return json_response(result)


async def jwks(request: web.Request) -> web.Response:
    raw_org = request.query.get("org")
    org_id = parse_uuid(raw_org, "org") if raw_org is not None else None
    keys = await request.app[JWKS].keys(request.app[DB_POOL], org_id)
    # Short public caching: a rotated-in key must reach outside verifiers quickly.
    return json_response({"keys": keys}, headers={"Cache-Control": "public, max-age=30"})


# --- admin ---------------------------------------------------------------------------------


def _org_id(request: web.Request) -> str:
    require_admin(request)
    return parse_uuid(request.match_info["org_id"], "org")


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


async def get_org(request: web.Request) -> web.Response:
    org_id = _org_id(request)
    return json_response(await orgs.get_org(request.app[DB_POOL], org_id))


async def update_org(request: web.Request) -> web.Response:
    org_id = _org_id(request)
    body = await decode_body(request, update_org_decoder)
    result = await orgs.update_org(request.app[DB_POOL], org_id, body)
    request.app[POLICIES].forget(org_id)
    return json_response(result)


async def create_api_key(request: web.Request) -> web.Response:
    org_id = _org_id(request)
    body = await decode_body(request, create_api_key_decoder)
    result = await api_keys.create_api_key(request.app[DB_POOL], org_id, body)
    return json_response(result, status=201)


async def revoke_api_key(request: web.Request) -> web.Response:
    org_id = _org_id(request)
    key_id = parse_uuid(request.match_info["key_id"], "API key")
    revocation = await api_keys.revoke_api_key(request.app[DB_POOL], org_id, key_id)
    # Other replicas stop accepting it within their authenticator cache TTL.
    request.app[API_KEYS].forget(revocation.key_hash)
    return json_response(revocation.response)


async def create_widget_token(request: web.Request) -> web.Response:
    org_id = _org_id(request)
    body = await decode_body(request, create_widget_token_decoder)
    result = await widget_tokens.create_widget_token(request.app[DB_POOL], org_id, body)
    return json_response(result, status=201)


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
