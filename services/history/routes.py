"""HTTP handlers of the history API: parse, call the rules, respond. The org always comes
from the API key; another org's ids read exactly like missing ones."""

from __future__ import annotations

import logging

from aiohttp import web

from services.history import conversations, erasure, merges, queries
from services.history.schemas import (
    MergeAccepted,
    UndoResult,
    add_message_decoder,
    contact_merge_decoder,
    create_conversation_decoder,
)
from shared.auth import API_KEYS, ApiKeyPrincipal
from shared.db import DB_POOL, in_transaction
from shared.errors import Problem, not_found
from shared.http import SETTINGS, decode_body, json_response, parse_uuid
from shared.outbox import OUTBOX
from shared.redis import REDIS
from shared.revocation import announce_revocation

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


async def _principal(request: web.Request, *scopes: str) -> ApiKeyPrincipal:
    """Authenticate a key carrying any of ``scopes``; one with none of them gets the 403 that
    names the first."""
    authenticator = request.app[API_KEYS]
    for scope in scopes[1:]:
        try:
            return await authenticator.authenticate(request, scope)
        except Problem as problem:
            if problem.code != "insufficient_scope":
                raise
    return await authenticator.authenticate(request, scopes[0])


@routes.post("/v1/conversations")
async def create_conversation(request: web.Request) -> web.Response:
    principal = await _principal(request, "history:write")
    body = await decode_body(request, create_conversation_decoder)
    created = await in_transaction(
        request.app[DB_POOL],
        lambda conn: conversations.create_conversation(conn, principal.org_id, body),
    )
    return json_response(created, status=201)


@routes.post("/v1/conversations/{conversationId}/messages")
async def add_message(request: web.Request) -> web.Response:
    principal = await _principal(request, "history:write")
    conversation_id = parse_uuid(request.match_info["conversationId"], "conversation")
    body = await decode_body(request, add_message_decoder)
    message = await in_transaction(
        request.app[DB_POOL],
        lambda conn: conversations.add_message(conn, principal.org_id, conversation_id, body),
    )
    return json_response(message, status=201)


@routes.get("/v1/contacts/{contactId}/history")
async def contact_history(request: web.Request) -> web.Response:
    principal = await _principal(request, "history:read")
    contact_id = parse_uuid(request.match_info["contactId"], "contact")
    page = await conversations.contact_history(
        request.app[DB_POOL],
        principal.org_id,
        contact_id,
        request.query.get("externalId", ""),
        request.query,
    )
    return json_response(page)


@routes.get("/v1/visitors/{visitorId}/history")
async def visitor_history(request: web.Request) -> web.Response:
    principal = await _principal(request, "history:read")
    visitor_id = parse_uuid(request.match_info["visitorId"], "visitor")
    page = await conversations.visitor_history(
        request.app[DB_POOL], principal.org_id, visitor_id, request.query
    )
    return json_response(page)


@routes.get("/v1/merges/{mergeId}")
async def get_merge(request: web.Request) -> web.Response:
    # Readable by history readers and by the admins who request and undo merges.
    principal = await _principal(request, "history:read", "contacts:manage")
    merge_id = parse_uuid(request.match_info["mergeId"], "merge")
    # A login merge gets its row when the consumer applies it: until then it is not found.
    row = await queries.get_merge(request.app[DB_POOL], principal.org_id, merge_id)
    if row is None:
        raise not_found("merge")
    return json_response(merges.merge_out(row))


@routes.post("/v1/merges/{mergeId}/undo")
async def undo_merge(request: web.Request) -> web.Response:
    principal = await _principal(request, "contacts:manage")
    merge_id = parse_uuid(request.match_info["mergeId"], "merge")
    outbox = request.app[OUTBOX]
    restored = await in_transaction(
        request.app[DB_POOL],
        lambda conn: merges.undo_merge(conn, outbox, principal.org_id, merge_id),
    )
    return json_response(UndoResult(id=merge_id, status="undone", conversations_restored=restored))


@routes.post("/v1/contacts/{contactId}/merge")
async def merge_contacts(request: web.Request) -> web.Response:
    principal = await _principal(request, "contacts:manage")
    target_id = parse_uuid(request.match_info["contactId"], "contact")
    body = await decode_body(request, contact_merge_decoder)
    outbox = request.app[OUTBOX]
    merge_id = await in_transaction(
        request.app[DB_POOL],
        lambda conn: merges.request_contact_merge(conn, outbox, principal.org_id, target_id, body),
    )
    return json_response(
        MergeAccepted(id=merge_id, status="pending"),
        status=202,
        headers={"Location": f"/v1/merges/{merge_id}"},
    )


@routes.delete("/v1/contacts/{contactId}")
async def erase_contact(request: web.Request) -> web.Response:
    principal = await _principal(request, "contacts:manage")
    contact_id = parse_uuid(request.match_info["contactId"], "contact")
    pool = request.app[DB_POOL]
    outbox = request.app[OUTBOX]
    receipt = await in_transaction(
        pool, lambda conn: erasure.erase_contact(conn, outbox, principal.org_id, contact_id)
    )
    # After the commit: every replica drops its cached token state for the contact at once
    # (the contact.erased event is the reliable path; this is the fast one).
    await announce_revocation(request.app[REDIS], request.app[SETTINGS], contact_id)
    try:
        await erasure.scrub_event_copies(pool, contact_id)
    except Exception:
        # The erasure itself committed; stale event copies expire with the outbox retention.
        log.warning("could not scrub event copies after erasure", exc_info=True)
    return json_response(receipt)
