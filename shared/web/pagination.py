"""Keyset pagination of conversation lists, the same for the API and the widget: a page size
from ``limit`` and an opaque ``cursor`` naming the last item seen, (created_at, id).

Bad values are a 422 before anything is read; a cursor whose instant decodes but leaves year
1..9999 once in UTC is refused too (no driver can send it: it was a 500).
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from datetime import UTC, datetime

import msgspec

from shared.errors import validation_failed

MAX_CURSOR_LENGTH = 200
DEFAULT_LIMIT = 20
# ASCII digits only (str.isdigit() also accepts "²", which int() refuses), and short: int()
# of thousands of digits raises too.
_LIMIT = re.compile(r"[0-9]{1,4}")
_cursor_decoder = msgspec.json.Decoder(tuple[datetime, uuid.UUID])


def parse_limit(raw: str | None, *, maximum: int) -> int:
    if raw is None:
        return min(DEFAULT_LIMIT, maximum)
    if not _LIMIT.fullmatch(raw) or not 1 <= int(raw) <= maximum:
        raise validation_failed(f"limit: an integer from 1 to {maximum}")
    return int(raw)


def encode_cursor(created_at: datetime, item_id: uuid.UUID | str) -> str:
    raw = msgspec.json.encode((created_at, str(item_id)))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The (created_at in UTC, id) a cursor from ``encode_cursor`` names."""
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise _not_a_cursor()
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, item_id = _cursor_decoder.decode(raw)
        if created_at.tzinfo is None:
            raise _not_a_cursor()
        return created_at.astimezone(UTC), item_id
    except (binascii.Error, ValueError, OverflowError, msgspec.MsgspecError):
        raise _not_a_cursor() from None


def _not_a_cursor() -> Exception:
    return validation_failed("cursor: not a cursor this endpoint returned")
