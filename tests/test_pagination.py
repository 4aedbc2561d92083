"""Page limits and cursors, shared by the API's and the widget's history listings: a bad
value is a clear 422 (never a 500), a good cursor round-trips."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from shared.errors import Problem
from shared.web.pagination import MAX_CURSOR_LENGTH, decode_cursor, encode_cursor, parse_limit


def test_a_cursor_names_the_instant_and_id_it_was_made_from() -> None:
    item = uuid.uuid4()
    at = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=5)))
    assert decode_cursor(encode_cursor(at, item)) == (at.astimezone(UTC), item)
    assert decode_cursor(encode_cursor(at, str(item))) == (at.astimezone(UTC), item)
    assert len(encode_cursor(at, item)) <= MAX_CURSOR_LENGTH


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "cursor",
    [
        "!!!",
        b64(b"not json"),
        b64(msgspec.json.encode(["2026-01-01T00:00:00", str(uuid.uuid4())])),  # no offset
        b64(msgspec.json.encode(["0001-01-01T00:00:00+23:59", str(uuid.uuid4())])),  # < year 1
        b64(msgspec.json.encode(["2026-01-01T00:00:00Z", "not-a-uuid"])),
        "A" * (MAX_CURSOR_LENGTH + 1),
    ],
)
def test_anything_else_is_a_422(cursor: str) -> None:
    with pytest.raises(Problem) as caught:
        decode_cursor(cursor)
    assert (caught.value.status, caught.value.code) == (422, "validation_failed")


def test_the_limit_defaults_within_the_maximum_and_refuses_the_rest() -> None:
    assert parse_limit(None, maximum=100) == 20
    assert parse_limit(None, maximum=10) == 10
    assert parse_limit("100", maximum=100) == 100
    for raw in ("", "0", "101", "-1", "²", "1.5", "9" * 5000):
        with pytest.raises(Problem) as caught:
            parse_limit(raw, maximum=100)
        assert caught.value.status == 422
