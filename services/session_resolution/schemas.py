"""Request and response bodies of the session endpoints (msgspec Structs, camelCase on the wire).

Every request field has an explicit size limit so a hostile body is refused while decoding,
before any work or write.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from services.session_resolution.identity import EMAIL_MAX, EXTERNAL_ID_MAX, NAME_MAX, Level
from shared.timestamps import Timestamp

# Postgres text and jsonb cannot hold NUL: refused while decoding (a 422), not at the insert.
NO_NUL = "^[^\x00]*$"
# Browser-supplied custom values are scalars only: no nesting to walk, nothing to smuggle.
StrValue = Annotated[str, Meta(max_length=1000, pattern=NO_NUL)]
ScalarValue = StrValue | int | float | bool | None
Key = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]*$")]
CUSTOM_DATA_MAX_KEYS = 50
CUSTOM_DATA_MAX_BYTES = 8 * 1024
FIELDS_MAX_KEYS = 50  # the widget settings' own count is checked in collect.py


class _In(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    pass


class _Out(msgspec.Struct, rename="camel", kw_only=True):
    pass


class UserIn(_In):
    # A contact token with customData (itself capped at 8 KiB by the issuer) fits well in 16 KiB.
    token: Annotated[str, Meta(min_length=1, max_length=16 * 1024)] | None = None
    external_id: Annotated[str, Meta(max_length=EXTERNAL_ID_MAX, pattern=NO_NUL)] | None = None
    name: Annotated[str, Meta(max_length=NAME_MAX, pattern=NO_NUL)] | None = None
    email: Annotated[str, Meta(max_length=EMAIL_MAX, pattern=NO_NUL)] | None = None


class SessionRequest(_In):
    widget_token: Annotated[str, Meta(min_length=1, max_length=200)]
    # Any string of sane length: an unknown or stale visitor token just means a new visitor.
    visitor_token: Annotated[str, Meta(max_length=100)] | None = None
    user: UserIn | None = None
    fields: Annotated[dict[Key, ScalarValue], Meta(max_length=FIELDS_MAX_KEYS)] | None = None
    custom_data: Annotated[dict[Key, ScalarValue], Meta(max_length=CUSTOM_DATA_MAX_KEYS)] | None = (
        None
    )


session_request_decoder = msgspec.json.Decoder(SessionRequest)


class AttributeOut(_Out):
    # Browser values are scalars; server values are whatever the contact token's claims hold.
    value: Any
    source: str  # "server" | "browser"
    verified: bool


class IdentityOut(_Out):
    level: Level
    visitor_id: str
    contact_id: str | None
    external_id: str | None
    external_id_verified: bool
    attributes: dict[str, AttributeOut]


class MergeRefOut(_Out):
    id: str
    status: str


class CollectFieldOut(_Out):
    name: str
    label: str
    type: str
    required: bool
    max_length: int | None = None


class CollectOut(_Out):
    collect_user_data: bool
    # What the widget should ask before chat: built-in name/email and configured extra fields
    # whose value is not known yet for this visitor.
    ask: list[CollectFieldOut]
    # Values to show pre-filled in the form (known attributes, as the settings allow).
    prefill: dict[str, str]


class SessionOut(_Out):
    session_id: str
    session_token: str
    expires_at: Timestamp
    visitor_token: str
    identity: IdentityOut
    merge: MergeRefOut | None
    collect: CollectOut


class LogoutOut(_Out):
    visitor_token: str
    ended_sessions: int


class WidgetMessageOut(_Out):
    id: str
    author: str
    text: str
    sender_verified: bool
    created_at: Timestamp


class WidgetConversationOut(_Out):
    id: str
    created_at: Timestamp
    messages: list[WidgetMessageOut]


class HistoryOut(_Out):
    conversations: list[WidgetConversationOut]
    next_cursor: str | None


class SessionInfoOut(_Out):
    """GET /v1/sessions/{id}: what a platform service may know about a session."""

    id: str
    org_id: str
    visitor_id: str
    level: str
    contact_id: str | None
    external_id: str | None
    external_id_verified: bool
    attributes: dict[str, AttributeOut]
    active: bool
    created_at: Timestamp
    expires_at: Timestamp
    ended_at: Timestamp | None
    end_reason: str | None


class DeviceOut(_Out):
    visitor_id: str
    external_id: str | None
    bound_at: Timestamp
    last_seen_at: Timestamp


class DevicesOut(_Out):
    devices: list[DeviceOut]
