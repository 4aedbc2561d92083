"""The AsyncAPI document for outside consumers, generated from the msgspec event types.

``python -m shared.bus.asyncapi > docs/asyncapi.json`` regenerates the committed copy; a test
fails when an event type changes and the document was not regenerated, so the published
contract cannot drift from the code.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from shared.bus.events import EVENT_FIELD, EVENT_TYPES


def document() -> dict[str, Any]:
    refs, components = msgspec.json.schema_components(
        EVENT_TYPES, ref_template="#/components/schemas/{name}"
    )
    messages: dict[str, Any] = {}
    for event_type, ref in zip(EVENT_TYPES, refs, strict=True):
        name = event_type.__name__
        messages[name] = {
            "name": event_type.type_name(),
            "title": event_type.type_name(),
            "summary": (event_type.__doc__ or "").strip().splitlines()[0]
            if event_type.__doc__
            else None,
            "contentType": "application/json",
            "payload": ref,
        }
        if messages[name]["summary"] is None:
            del messages[name]["summary"]
    field = EVENT_FIELD.decode()
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "widget-identity events",
            "version": "1",
            "description": (
                "Identity events on Redis Streams. Each stream entry has one field, "
                f"`{field}`, holding the JSON envelope below. Delivery is at-least-once: "
                "deduplicate by `id`. `seq` increases by one per `subject` (contact or "
                "visitor id) in commit order. Read with a consumer group (XREADGROUP) and "
                "XACK after your effect commits. Types evolve only by added fields with "
                "defaults; ignore types you do not know."
            ),
        },
        "defaultContentType": "application/json",
        "channels": {
            "events": {
                "address": "{prefix}events",
                "description": "Every identity event, in publish order. STREAM_PREFIX defaults to `wi:`.",
                "parameters": {"prefix": {"description": "STREAM_PREFIX", "default": "wi:"}},
                "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
            },
            "deadLetters": {
                "address": "{prefix}events:dlq:{group}",
                "description": (
                    "Messages a consumer group gave up on after CONSUMER_MAX_DELIVERIES; fields "
                    f"`{field}` (the original payload), originalId, group, error, deliveries, failedAt."
                ),
                "parameters": {
                    "prefix": {"description": "STREAM_PREFIX", "default": "wi:"},
                    "group": {"description": "consumer group name"},
                },
            },
        },
        "operations": {
            "consumeEvents": {
                "action": "receive",
                "channel": {"$ref": "#/channels/events"},
                "messages": [{"$ref": f"#/channels/events/messages/{name}"} for name in messages],
            }
        },
        "components": {"messages": messages, "schemas": components},
    }


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
