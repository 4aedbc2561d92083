"""Keyset pagination, the same for every list (conversations, admin lists): a page size from
``limit`` and an opaque ``cursor`` naming the last item seen, (created_at, id). The id is a
UUID for most lists; ``decode_cursor(cursor, str)`` reads one whose id is text (signing keys).

Bad values are a 422 before anything is read; a cursor whose instant decodes but leaves year
1..9999 once in UTC is refused too (no driver can send it: it was a 500).
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, overload

import msgspec

from shared.errors import validation_failed

MAX_CURSOR_LENGTH = 200
DEFAULT_LIMIT = 20
# ASCII digits only (str.isdigit() also accepts "²", which int() refuses), and short: int()
# of thousands of digits raises too.
_LIMIT = re.compile(r"[0-9]{1,4}")
_uuid_cursor = msgspec.json.Decoder(tuple[datetime, uuid.UUID])
_text_cursor = msgspec.json.Decoder(tuple[datetime, str])

IdT = TypeVar("IdT", uuid.UUID, str)


def parse_limit(raw: str | None, *, maximum: int) -> int:
    if raw is None:
        return min(DEFAULT_LIMIT, maximum)
    if not _LIMIT.fullmatch(raw) or not 1 <= int(raw) <= maximum:
        raise validation_failed(f"limit: an integer from 1 to {maximum}")
    return int(raw)


def encode_cursor(created_at: datetime, item_id: uuid.UUID | str) -> str:
    raw = msgspec.json.encode((created_at, str(item_id)))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@overload
def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]: ...
@overload
def decode_cursor(cursor: str, id_type: type[str]) -> tuple[datetime, str]: ...
def decode_cursor(cursor: str, id_type: type[Any] = uuid.UUID) -> tuple[datetime, Any]:
    """The (created_at in UTC, id) a cursor from ``encode_cursor`` names."""
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise _not_a_cursor()
    decoder = _text_cursor if id_type is str else _uuid_cursor
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, item_id = decoder.decode(raw)
        if created_at.tzinfo is None or (id_type is str and not item_id):
            raise _not_a_cursor()
        return created_at.astimezone(UTC), item_id
    except (binascii.Error, ValueError, OverflowError, msgspec.MsgspecError):
        raise _not_a_cursor() from None


def _not_a_cursor() -> Exception:
    return validation_failed("cursor: not a cursor this endpoint returned")


@dataclass(frozen=True, slots=True)
class PageRequest(Generic[IdT]):
    """A validated page request: read ``limit + 1`` rows after ``after`` (None: from the
    start); the extra row only says whether there is a next page."""

    limit: int
    after: tuple[datetime, IdT] | None


@overload
def parse_page(
    limit: str | None, cursor: str | None, *, maximum: int
) -> PageRequest[uuid.UUID]: ...
@overload
def parse_page(
    limit: str | None, cursor: str | None, *, maximum: int, id_type: type[str]
) -> PageRequest[str]: ...
def parse_page(
    limit: str | None, cursor: str | None, *, maximum: int, id_type: type[Any] = uuid.UUID
) -> PageRequest[Any]:
    """``limit`` and ``cursor`` as a query string (or a CLI) gives them; 422 when bad."""
    return PageRequest(
        parse_limit(limit, maximum=maximum),
        decode_cursor(cursor, id_type) if cursor else None,
    )


def next_cursor(
    rows: Sequence[Mapping[str, Any]], limit: int, *, id_column: str = "id"
) -> str | None:
    """The cursor after a page read with ``limit + 1`` rows, or None on the last page."""
    if len(rows) <= limit:
        return None
    last = rows[limit - 1]
    return encode_cursor(last["created_at"], last[id_column])
