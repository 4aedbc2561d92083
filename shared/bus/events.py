"""The event contract on Redis Streams: one envelope, one tagged type per event.

Every event is stored in its stream as one field, ``event``, holding the JSON envelope, so a
consumer in any language reads it with a plain Redis client. Evolve a type only by adding
fields with defaults; never change a field's type or meaning (bump ``version`` and add a new
type instead).
"""

from __future__ import annotations

import msgspec

from shared.timestamps import Timestamp


class Event(msgspec.Struct, kw_only=True, frozen=True, rename="camel", tag_field="type"):
    """The envelope (docs/architecture.md, "Events"). Subclasses add a typed ``data``."""

    id: str
    version: int = 1
    org_id: str
    # The contact or visitor id this event is about; ``seq`` orders events per subject.
    subject: str
    seq: int
    occurred_at: Timestamp
    traceparent: str | None = None

    @classmethod
    def type_name(cls) -> str:
        return str(cls.__struct_config__.tag)


class EventHeader(msgspec.Struct, frozen=True, rename="camel"):
    """The envelope without ``data``: enough to route, order, dedupe or dead-letter an event
    whose type this process does not know (a newer publisher) or whose data is malformed."""

    id: str
    type: str
    org_id: str
    subject: str
    seq: int
    occurred_at: Timestamp


class _Data(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    pass


class VisitorCreatedData(_Data, frozen=True):
    visitor_id: str
    widget_token_id: str


class VisitorCreated(Event, frozen=True, tag="visitor.created"):
    data: VisitorCreatedData


class SessionResolvedData(_Data, frozen=True):
    session_id: str
    visitor_id: str
    level: str
    contact_id: str | None = None
    external_id: str | None = None


class SessionResolved(Event, frozen=True, tag="session.resolved"):
    data: SessionResolvedData


class SessionEndedData(_Data, frozen=True):
    session_id: str
    visitor_id: str
    reason: str  # "logout" | "device_revoked" | "tokens_revoked"


class SessionEnded(Event, frozen=True, tag="session.ended"):
    data: SessionEndedData


class ContactAuthenticatedData(_Data, frozen=True):
    contact_id: str
    jti: str
    expires_at: Timestamp
    user_id: str | None = None
    email: str | None = None
    external_id: str | None = None
    created: bool = False


class ContactAuthenticated(Event, frozen=True, tag="contact.authenticated"):
    data: ContactAuthenticatedData


class MergeRequestedData(_Data, frozen=True):
    merge_id: str
    reason: str  # "login" | "admin"
    target_contact_id: str
    target_external_id: str = ""
    source_visitor_id: str | None = None
    source_contact_id: str | None = None
    source_external_id: str = ""


class HistoryMergeRequested(Event, frozen=True, tag="history.merge_requested"):
    data: MergeRequestedData


class MergedData(_Data, frozen=True):
    merge_id: str
    target_contact_id: str
    target_external_id: str
    conversations_moved: int


class HistoryMerged(Event, frozen=True, tag="history.merged"):
    data: MergedData


class MergeUndoneData(_Data, frozen=True):
    merge_id: str
    conversations_restored: int


class HistoryMergeUndone(Event, frozen=True, tag="history.merge_undone"):
    data: MergeUndoneData


class TokensRevokedData(_Data, frozen=True):
    contact_id: str
    # Tokens with iat before this instant are rejected everywhere.
    not_before: Timestamp


class ContactTokensRevoked(Event, frozen=True, tag="contact.tokens_revoked"):
    data: TokensRevokedData


class ContactErasedData(_Data, frozen=True):
    contact_id: str
    receipt_id: str
    # The browsers that were bound to the contact (ids only): their owners drop what they
    # still hold of them (session resolution: its cache entries and token hashes).
    visitor_ids: list[str] = []


class ContactErased(Event, frozen=True, tag="contact.erased"):
    data: ContactErasedData


EVENT_TYPES: tuple[type[Event], ...] = (
    VisitorCreated,
    SessionResolved,
    SessionEnded,
    ContactAuthenticated,
    HistoryMergeRequested,
    HistoryMerged,
    HistoryMergeUndone,
    ContactTokensRevoked,
    ContactErased,
)

AnyEvent = (
    VisitorCreated
    | SessionResolved
    | SessionEnded
    | ContactAuthenticated
    | HistoryMergeRequested
    | HistoryMerged
    | HistoryMergeUndone
    | ContactTokensRevoked
    | ContactErased
)

EVENT_FIELD = b"event"

event_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)
header_decoder = msgspec.json.Decoder(EventHeader)
_encoder = msgspec.json.Encoder()


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)
