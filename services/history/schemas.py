"""Request and response bodies of the history API (msgspec Structs, camelCase on the wire)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import msgspec

from shared.timestamps import Timestamp

# Postgres text and jsonb cannot hold NUL; refusing it here keeps a bad body a 422, not a 500.
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=10_000, pattern="^[^\x00]*$")]
ExternalId = Annotated[str, msgspec.Meta(max_length=256, pattern="^[^\x00]*$")]
MessageData = Annotated[dict[str, Any], msgspec.Meta(max_length=50)]
Author = Literal["visitor", "agent", "bot"]


class _Body(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    pass


class FirstMessage(_Body):
    text: Text
    author: Author = "visitor"
    data: MessageData = {}


class CreateConversation(_Body):
    session_id: uuid.UUID
    message: FirstMessage | None = None


class AddMessage(_Body):
    text: Text
    author: Author = "visitor"
    # Required for visitor-authored messages: the session says whether the sender was
    # verified at this moment. Not accepted for agent/bot messages.
    session_id: uuid.UUID | None = None
    data: MessageData = {}


class ContactMerge(_Body):
    source_contact_id: uuid.UUID
    # The externalId scope merged on both sides ('' = the scope without an externalId).
    external_id: ExternalId = ""


create_conversation_decoder = msgspec.json.Decoder(CreateConversation)
add_message_decoder = msgspec.json.Decoder(AddMessage)
contact_merge_decoder = msgspec.json.Decoder(ContactMerge)


# Responses. ``omit_defaults`` drops the None fields of the scope that does not apply.


class _Out(msgspec.Struct, rename="camel", kw_only=True):
    pass


class Scope(_Out, omit_defaults=True):
    type: Literal["visitor", "contact"]
    visitor_id: str | None = None
    contact_id: str | None = None
    external_id: str | None = None


class MessageOut(_Out):
    id: str
    conversation_id: str
    author: str
    sender_verified: bool
    text: str
    data: dict[str, Any]
    created_at: Timestamp


class ConversationOut(_Out):
    id: str
    scope: Scope
    origin_visitor_id: str
    last_merge_id: str | None
    created_at: Timestamp
    updated_at: Timestamp
    messages: list[MessageOut]
    # True when older messages exist beyond the newest MESSAGES_PER_CONVERSATION.
    messages_truncated: bool


class CreatedConversation(_Out):
    id: str
    scope: Scope
    created_at: Timestamp
    message: MessageOut | None


class HistoryPage(_Out):
    conversations: list[ConversationOut]
    next_cursor: str | None


class MergeOut(_Out):
    id: str
    status: str
    reason: str
    source: Scope
    target: Scope
    conversation_ids: list[str]
    conversations_moved: int
    error: str | None
    requested_at: Timestamp
    completed_at: Timestamp | None
    undone_at: Timestamp | None


class MergeAccepted(_Out):
    id: str
    status: str


class UndoResult(_Out):
    id: str
    status: str
    conversations_restored: int


class ErasureReceipt(_Out):
    receipt_id: str
    contact_id: str
    erased_at: Timestamp
    conversations_deleted: int
    messages_deleted: int
    bindings_removed: int
    sessions_ended: int
    # Browsers that were bound to the contact: now erased, each starts over as a new visitor.
    browsers_erased: int
