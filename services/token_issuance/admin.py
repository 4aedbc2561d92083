"""HTTP handlers of the admin API (``/admin/v1``, the operator's ADMIN_TOKEN): parse, call the
rule modules (the same functions the CLI calls), respond."""

from __future__ import annotations

import uuid
from typing import Annotated

from aiohttp import web
from msgspec import Meta

from services.token_issuance import api_keys, orgs, signing_keys, widget_tokens
from services.token_issuance.app_keys import JWKS, KEYRING
from services.token_issuance.broadcast import from_app
from services.token_issuance.schemas import (
    ADMIN_PAGE_MAX,
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyRevoked,
    CreateApiKeyRequest,
    CreateOrgRequest,
    CreateWidgetTokenRequest,
    Kid,
    OrgInfo,
    OrgList,
    SigningKeyDeleted,
    SigningKeyInfo,
    SigningKeyList,
    UpdateOrgRequest,
    UpdateWidgetTokenRequest,
    WidgetTokenCreated,
    WidgetTokenInfo,
    WidgetTokenList,
    WidgetTokenRevoked,
    create_api_key_decoder,
    create_org_decoder,
    create_widget_token_decoder,
    update_org_decoder,
    update_widget_token_decoder,
)
from shared.config import SETTINGS
from shared.db import DB_POOL
from shared.errors import not_found
from shared.identity.api_keys import require_admin
from shared.identity.contact_tokens import CONTACT_TOKENS, KID_PATTERN
from shared.identity.revocation import announce_key_added, announce_key_deleted
from shared.redis import REDIS
from shared.web.http import decode_body, json_response, parse_uuid
from shared.web.openapi import Query, operation
from shared.web.pagination import MAX_CURSOR_LENGTH, PageRequest, parse_page


def _org_id(request: web.Request) -> str:
    require_admin(request)
    return parse_uuid(request.match_info["org_id"], "org")


_PAGE_QUERY = [
    Query("limit", Annotated[int, Meta(ge=1, le=ADMIN_PAGE_MAX)], "Page size (default 20)."),
    Query(
        "cursor",
        Annotated[str, Meta(max_length=MAX_CURSOR_LENGTH)],
        "`nextCursor` from the previous page (opaque).",
    ),
]
_PAGE_ERRORS = {422: "`validation_failed`: limit or cursor is not valid."}


def _page(request: web.Request) -> PageRequest[uuid.UUID]:
    query = request.query
    return parse_page(query.get("limit"), query.get("cursor"), maximum=ADMIN_PAGE_MAX)


@operation(
    summary="List orgs",
    description="Oldest first, paged with `limit` and `cursor`.",
    tags=["admin"],
    query=_PAGE_QUERY,
    responses={200: OrgList},
    security="adminToken",
    errors=_PAGE_ERRORS,
)
async def list_orgs(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response(await orgs.list_orgs(request.app[DB_POOL], _page(request)))


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
    summary="Rename an org, merge-patch its policy, disable or enable it",
    description=(
        "`policy` is an RFC 7396 merge patch onto the current policy (null resets a key to "
        "its default); the result must be a valid policy as a whole, else 422 and no change. "
        "`disabled: true` disables the org: within a second, on every replica, its API keys "
        "get `401 invalid_api_key`, its widget tokens `401 invalid_widget_token` and its "
        "contact tokens `401 token_revoked`; `disabled: false` restores them. A policy change "
        "also reaches every replica within a second."
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
    result = await orgs.update_org(request.app[DB_POOL], org_id, body, from_app(request.app))
    return json_response(result)


@operation(
    summary="List an org's API keys (never the key or its hash)",
    description=(
        "Oldest first, revoked keys included. `lastUsedAt` is recorded at most about once a "
        "minute per key."
    ),
    tags=["admin"],
    query=_PAGE_QUERY,
    responses={200: ApiKeyList},
    security="adminToken",
    errors={404: "", **_PAGE_ERRORS},
)
async def list_api_keys(request: web.Request) -> web.Response:
    org_id = _org_id(request)
    result = await api_keys.list_api_keys(request.app[DB_POOL], org_id, _page(request))
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
    description="Refused on every replica within a second; a repeat returns the first time.",
    tags=["admin"],
    responses={200: ApiKeyRevoked},
    security="adminToken",
    errors=(404,),
)
async def revoke_api_key(request: web.Request) -> web.Response:
    org_id = _org_id(request)
    key_id = parse_uuid(request.match_info["key_id"], "API key")
    result = await api_keys.revoke_api_key(
        request.app[DB_POOL], org_id, key_id, from_app(request.app)
    )
    return json_response(result)


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
    summary="List an org's widget tokens",
    description="Oldest first, revoked tokens included; the full token is shown only on creation.",
    tags=["admin"],
    query=_PAGE_QUERY,
    responses={200: WidgetTokenList},
    security="adminToken",
    errors={404: "", **_PAGE_ERRORS},
)
async def list_widget_tokens(request: web.Request) -> web.Response:
    org_id = _org_id(request)
    result = await widget_tokens.list_widget_tokens(request.app[DB_POOL], org_id, _page(request))
    return json_response(result)


def _widget_token_id(request: web.Request) -> tuple[str, str]:
    org_id = _org_id(request)
    return org_id, parse_uuid(request.match_info["widget_token_id"], "widget token")


@operation(
    summary="Change a widget token's allowed origins and/or settings",
    description=(
        "Each field given replaces the stored one and is validated exactly as on creation. "
        "Takes effect on every replica within a second."
    ),
    tags=["admin"],
    body=UpdateWidgetTokenRequest,
    responses={200: WidgetTokenInfo},
    security="adminToken",
    errors={
        404: "",
        409: "`widget_token_revoked`: a revoked token is not changed.",
        422: "`validation_failed`: a bad origin or setting, or nothing to change.",
    },
)
async def update_widget_token(request: web.Request) -> web.Response:
    org_id, token_id = _widget_token_id(request)
    body = await decode_body(request, update_widget_token_decoder)
    result = await widget_tokens.update_widget_token(
        request.app[DB_POOL], org_id, token_id, body, from_app(request.app)
    )
    return json_response(result)


@operation(
    summary="Revoke a widget token",
    description=(
        "New sessions with it get `401 invalid_widget_token` on every replica within a "
        "second; a repeat returns the first revocation time."
    ),
    tags=["admin"],
    responses={200: WidgetTokenRevoked},
    security="adminToken",
    errors=(404,),
)
async def revoke_widget_token(request: web.Request) -> web.Response:
    org_id, token_id = _widget_token_id(request)
    result = await widget_tokens.revoke_widget_token(
        request.app[DB_POOL], org_id, token_id, from_app(request.app)
    )
    return json_response(result)


@operation(
    summary="List an org's live signing keys",
    description="Oldest first; deleted keys are not listed (they neither sign nor verify).",
    tags=["admin"],
    query=_PAGE_QUERY,
    responses={200: SigningKeyList},
    security="adminToken",
    errors={404: "", **_PAGE_ERRORS},
)
async def list_signing_keys(request: web.Request) -> web.Response:
    org_id = _org_id(request)
    query = request.query
    page = parse_page(query.get("limit"), query.get("cursor"), maximum=ADMIN_PAGE_MAX, id_type=str)
    result = await signing_keys.list_signing_keys(request.app[DB_POOL], org_id, page)
    return json_response(result)


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
    router.add_post("/admin/v1/orgs", create_org)
    router.add_get("/admin/v1/orgs", list_orgs)
    router.add_get("/admin/v1/orgs/{org_id}", get_org)
    router.add_patch("/admin/v1/orgs/{org_id}", update_org)
    router.add_post("/admin/v1/orgs/{org_id}/api-keys", create_api_key)
    router.add_get("/admin/v1/orgs/{org_id}/api-keys", list_api_keys)
    router.add_delete("/admin/v1/orgs/{org_id}/api-keys/{key_id}", revoke_api_key)
    router.add_post("/admin/v1/orgs/{org_id}/widget-tokens", create_widget_token)
    router.add_get("/admin/v1/orgs/{org_id}/widget-tokens", list_widget_tokens)
    router.add_patch("/admin/v1/orgs/{org_id}/widget-tokens/{widget_token_id}", update_widget_token)
    router.add_delete(
        "/admin/v1/orgs/{org_id}/widget-tokens/{widget_token_id}", revoke_widget_token
    )
    router.add_post("/admin/v1/orgs/{org_id}/signing-keys", rotate_signing_key)
    router.add_get("/admin/v1/orgs/{org_id}/signing-keys", list_signing_keys)
    router.add_delete("/admin/v1/orgs/{org_id}/signing-keys/{kid}", delete_signing_key)
