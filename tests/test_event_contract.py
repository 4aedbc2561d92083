"""The event contract outside consumers read cannot drift from the code."""

from __future__ import annotations

from pathlib import Path

from shared.bus.asyncapi import document, render
from shared.bus.events import EVENT_TYPES

COMMITTED = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.json"


def test_committed_asyncapi_document_matches_the_event_types() -> None:
    assert COMMITTED.read_text() == render(), (
        "docs/asyncapi.json is stale: run `python -m shared.bus.asyncapi > docs/asyncapi.json`"
    )


def test_every_event_type_is_documented_with_its_envelope() -> None:
    doc = document()
    names = {m["name"] for m in doc["components"]["messages"].values()}
    assert names == {t.type_name() for t in EVENT_TYPES}
    for t in EVENT_TYPES:
        schema = doc["components"]["schemas"][t.__name__]
        assert {"id", "type", "orgId", "subject", "seq", "occurredAt", "data"} <= set(
            schema["required"]
        )
