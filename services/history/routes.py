"""HTTP handlers of the history API: parse, call the rules, respond. The org always comes
from the API key; another org's ids read exactly like missing ones."""

from __future__ import annotations

import logging
from typing import Annotated

import msgspec
from aiohttp import web

from services.history import conversations, erasure, merge_responses, merge_undo, merges
from services.history.queries import merge_rows
from services.history.schemas import (
    AddMessage,
    ContactMerge,
    CreateConversation,
    CreatedConversation,
    ErasureReceipt,
    HistoryPage,
    MergeAccepted,
    MergeOut,
    MessageOut,
    UndoResult,
    add_message_decoder,
    contact_merge_decoder,
    create_conversation_decoder,
)
from shared.bus.outbox import OUTBOX
from shared.config import SETTINGS
from shared.db import DB_POOL, in_transaction
from shared.errors import Problem, not_found
from shared.identity.api_keys import API_KEYS, ApiKeyPrincipal
from shared.identity.revocation import announce_revocation
from shared.redis import REDIS
from shared.web.http import decode_body, json_response, parse_uuid
from shared.web.openapi import Content, Query, operation
from shared.web.pagination import MAX_CURSOR_LENGTH

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

_PAGE = [
    Query(
        "limit",
        Annotated[int, msgspec.Meta(ge=1, le=100)],
        "Conversations per page (default 20).",
    ),
    Query(
        "cursor",
        Annotated[str, msgspec.Meta(max_length=MAX_CURSOR_LENGTH)],
        "`nextCursor` from the previous page.",
    ),
]


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
@operation(
    summary="Record a conversation in a session's history scope",
    description=(
        "The conversation lands in the session's scope at this moment: the contact and its "
        "externalId for a verified session, else the visitor's browser. An optional first "
        "message is recorded with it."
    ),
    tags=["history"],
    body=CreateConversation,
    responses={201: CreatedConversation},
    security="apiKey",
    scope="history:write",
    errors={
        404: "`not_found`: no such session in the key's org.",
        409: "`session_ended`: the session has ended or expired (or its contact was erased).",
    },
)
async def create_conversation(request: web.Request) -> web.Response:
    principal = await _principal(request, "history:write")
    body = await decode_body(request, create_conversation_decoder)
    created = await in_transaction(
        request.app[DB_POOL],
        lambda conn: conversations.create_conversation(conn, principal.org_id, body),
    )
    return json_response(created, status=201)


@routes.post("/v1/conversations/{conversationId}/messages")
@operation(
    summary="Add a message to a conversation",
    description=(
        "A visitor message needs the `sessionId` it was written in and records whether its "
        "sender was verified at that moment; agent and bot messages take no sessionId."
    ),
    tags=["history"],
    body=AddMessage,
    responses={201: MessageOut},
    security="apiKey",
    scope="history:write",
    errors={
        403: (
            "`insufficient_scope`, or `scope_mismatch`: the conversation is not in the "
            "session's history scope."
        ),
        404: "`not_found`: no such conversation or session in the key's org.",
        409: "`session_ended`: the session has ended or expired.",
    },
)
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
@operation(
    summary="A contact's history for one externalId",
    tags=["history"],
    query=[
        Query(
            "externalId",
            Annotated[str, msgspec.Meta(max_length=256)],
            "The externalId scope (absent or empty: the scope without an externalId).",
        ),
        *_PAGE,
    ],
    responses={200: HistoryPage},
    security="apiKey",
    scope="history:read",
    errors={
        404: "`not_found`: no such live contact in the key's org.",
        422: "`validation_failed`: limit, cursor or externalId is not valid.",
    },
)
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
@operation(
    summary="A visitor's (browser-bound) history",
    tags=["history"],
    query=_PAGE,
    responses={200: HistoryPage},
    security="apiKey",
    scope="history:read",
    errors={
        404: "`not_found`: no such visitor in the key's org.",
        422: "`validation_failed`: limit or cursor is not valid.",
    },
)
async def visitor_history(request: web.Request) -> web.Response:
    principal = await _principal(request, "history:read")
    visitor_id = parse_uuid(request.match_info["visitorId"], "visitor")
    page = await conversations.visitor_history(
        request.app[DB_POOL], principal.org_id, visitor_id, request.query
    )
    return json_response(page)


@routes.get("/v1/merges/{mergeId}")
@operation(
    summary="A merge and its status",
    description=(
        "`status` is `pending`, `done`, `failed` or `undone`. A merge id handed out in a "
        "session response is readable from that moment (`pending`, with `requestedAt`) and "
        "ends `done` or `failed` (with `error`); one still pending after "
        "`MERGE_PENDING_TIMEOUT` is applied from the database."
    ),
    tags=["merges"],
    responses={200: MergeOut},
    security="apiKey",
    scope=("history:read", "contacts:manage"),
    errors=(404,),
)
async def get_merge(request: web.Request) -> web.Response:
    # Readable by history readers and by the admins who request and undo merges.
    principal = await _principal(request, "history:read", "contacts:manage")
    merge_id = parse_uuid(request.match_info["mergeId"], "merge")
    # Before it is applied, a login merge reads as its request, pending.
    row = await merge_rows.get_merge(request.app[DB_POOL], principal.org_id, merge_id)
    if row is None:
        raise not_found("merge")
    return json_response(merge_responses.merge_out(row))


@routes.post("/v1/merges/{mergeId}/undo")
@operation(
    summary="Undo a done merge",
    description="Moves the merged conversations still in the target scope back to the source.",
    tags=["merges"],
    responses={200: UndoResult},
    security="apiKey",
    scope="contacts:manage",
    errors={
        404: "",
        409: "`merge_not_undoable`: the merge is not `done`, or a contact involved was erased.",
    },
)
async def undo_merge(request: web.Request) -> web.Response:
    principal = await _principal(request, "contacts:manage")
    merge_id = parse_uuid(request.match_info["mergeId"], "merge")
    outbox = request.app[OUTBOX]
    restored = await in_transaction(
        request.app[DB_POOL],
        lambda conn: merge_undo.undo_merge(conn, outbox, principal.org_id, merge_id),
    )
    return json_response(UndoResult(id=merge_id, status="undone", conversations_restored=restored))


@routes.post("/v1/contacts/{contactId}/merge")
@operation(
    summary="Merge another contact's history into this contact (explicit, recorded, undoable)",
    description=(
        "Two verified contacts never merge by themselves; this is the only way. The merge is "
        "applied asynchronously: poll the merge in `Location`."
    ),
    tags=["merges"],
    body=ContactMerge,
    responses={
        202: Content(
            MergeAccepted,
            description="Accepted: the merge is pending.",
            headers={"Location": "The merge: `/v1/merges/{id}`."},
        )
    },
    security="apiKey",
    scope="contacts:manage",
    errors={
        404: "`not_found`: either contact is missing, erased or another org's.",
        422: "`validation_failed`, e.g. a contact merged into itself.",
    },
)
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
@operation(
    summary="Erase a contact (GDPR)",
    description=(
        "Deletes its history, device bindings, sessions' copies of its data and its tokens, "
        "and erases every browser bound to it (its sessions, remembered values and "
        "browser-bound history; the browser starts over as a new visitor), in one "
        "transaction; leaves a tombstone and emits `contact.erased`. Event stream entries "
        "and cache entries holding the person's data are removed shortly after, by the "
        "consumers of that event. Returns a receipt."
    ),
    tags=["contacts"],
    responses={200: ErasureReceipt},
    security="apiKey",
    scope="contacts:manage",
    errors={404: "`not_found`: no such live contact in the key's org (erasure is final)."},
)
async def erase_contact(request: web.Request) -> web.Response:
    principal = await _principal(request, "contacts:manage")
    contact_id = parse_uuid(request.match_info["contactId"], "contact")
    pool = request.app[DB_POOL]
    outbox = request.app[OUTBOX]
    receipt = await in_transaction(
        pool, lambda conn: erasure.erase_contact(conn, outbox, principal.org_id, contact_id)
    )
    # After the commit: every replica drops its cached token state for the contact at once
    # (the contact.erased event is the reliable path; this is the fast one). Redis copies of
    # the person's data go when the consumers handle contact.erased (see erasure.py).
    await announce_revocation(request.app[REDIS], request.app[SETTINGS], contact_id)
    return json_response(receipt)
