"""Logs stay useful: one JSON line per event, with the request id, and junk requests do not
masquerade as server errors."""

from __future__ import annotations

import json
import logging
import sys

from aiohttp.http_exceptions import LineTooLong

from shared.observability import JsonFormatter, MalformedRequestFilter, request_id_var


def record(exc: BaseException | None = None) -> logging.LogRecord:
    info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (), info
    )


def test_a_malformed_request_is_one_warning_line_not_an_error_with_a_traceback() -> None:
    rec = record(LineTooLong("x" * 10, "8190"))
    assert MalformedRequestFilter().filter(rec)
    assert rec.levelno == logging.WARNING
    assert rec.exc_info is None
    assert "LineTooLong" in rec.getMessage()


def test_other_server_errors_keep_their_level_and_traceback() -> None:
    try:
        raise RuntimeError("real bug")
    except RuntimeError:
        rec = logging.LogRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "boom", (), sys.exc_info()
        )
    assert MalformedRequestFilter().filter(rec)
    assert rec.levelno == logging.ERROR
    assert rec.exc_info is not None


def test_log_lines_are_json_with_the_request_id_and_extras() -> None:
    token = request_id_var.set("req-123")
    try:
        rec = record()
        rec.__dict__["mergeId"] = "m-1"
        line = json.loads(JsonFormatter().format(rec))
    finally:
        request_id_var.reset(token)
    assert line["requestId"] == "req-123"
    assert line["mergeId"] == "m-1"
    assert line["level"] == "error"
