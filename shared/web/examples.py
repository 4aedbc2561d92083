"""Examples for the OpenAPI document, made from the contract's own types so they cannot drift.

A value is sketched from the JSON schema msgspec renders for a type (a field's name picks a
readable sample: an email looks like one, a widget token starts with ``wit_``), then decoded
into the real type with msgspec and encoded again: what the document shows is an instance
the server itself would accept or send. Request examples show the required fields and the
ones a reader most needs; response examples show every field. A type whose sketch msgspec
refuses gets no example, and ``tests/test_openapi.py`` fails on the operation that lacks one.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

import msgspec

_WHEN = "2030-01-01T12:00:00Z"
_KEY_CHARS = "Xk3_9vQz-" * 5  # base64url, long enough for any token pattern

# Samples by field name (camelCase, as the document spells them). Request examples include
# these optional fields, since they are what a reader looks for.
_SAMPLES: dict[str, Any] = {
    "email": "ada@example.com",
    "name": "Ada Lovelace",
    "userId": "u-42",
    "externalId": "workspace-1",
    "text": "Hi, my order is late",
    "allowedOrigins": ["https://shop.example"],
    "origin": "https://shop.example",
    "widgetToken": "wit_" + _KEY_CHARS[:43],
    "visitorToken": "wiv_" + _KEY_CHARS[:43],
    "sessionToken": "wis_" + _KEY_CHARS[:43],
    "key": "wik_" + _KEY_CHARS[:43],
    "displayPrefix": "wik_Xk3_9vQz",
    "token": "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.eyJzdWIiOiJ1LTQyIn0.c2lnbmF0dXJl",
    "kid": "k1",
    "alg": "EdDSA",
    "label": "Email",
    "reason": "login",
    "scopes": ["contacts:authenticate", "history:read"],
    "nextCursor": None,
    "status": "done",
    "checks": ["postgres", "redis"],
    "error": None,
    "endReason": None,
    "keys": [
        {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
            "kid": "k1",
            "alg": "EdDSA",
            "use": "sig",
        }
    ],
}
# Where one name means different things: (component, field) first.
_IN_TYPE: dict[tuple[str, str], Any] = {("ProbeOut", "status"): "ready"}
# Bodies that are text, not JSON: what the probes and the docs page send.
_TEXT: dict[str, str] = {
    "text/plain": '# TYPE wi_http_requests_total counter\nwi_http_requests_total{method="GET",route="/readyz",status="200"} 1.0\n',
    "text/html": "<!doctype html><title>widget-identity API</title>",
}
# Optional request fields that are objects worth showing (sketched from their own schema).
_SHOWN = {"message", "settings"}
# Nested names whose sample would read wrong in context fall back to the schema's own.
_STRING_FALLBACKS = ("example_value", "ExampleValue1")


def example(
    tp: Any, schema: Mapping[str, Any], components: Mapping[str, Any], media_type: str
) -> Any:
    """A JSON value of type ``tp`` (whose rendered schema is ``schema``), or None when the
    sketch is not an instance msgspec accepts."""
    if media_type in _TEXT and tp is str:
        return _TEXT[media_type]
    request = _is_request(tp)
    sketch = _Sketch(components).value(schema, name="", request=request)
    try:
        instance = msgspec.json.decode(msgspec.json.encode(sketch), type=tp)
    except msgspec.ValidationError:
        return None
    # A request as a client would write it (defaults left out); a response as the server
    # encodes the instance.
    return sketch if request else msgspec.json.decode(msgspec.json.encode(instance))


def _is_request(tp: Any) -> bool:
    # Request types refuse unknown fields; responses never do. Both are msgspec Structs here.
    config = getattr(tp, "__struct_config__", None)
    return bool(config is not None and config.forbid_unknown_fields)


class _Sketch:
    def __init__(self, components: Mapping[str, Any]) -> None:
        self._components = components
        self._ids = 0

    def value(self, schema: Mapping[str, Any], *, name: str, request: bool) -> Any:
        ref = schema.get("$ref")
        if isinstance(ref, str):
            component = ref.rsplit("/", 1)[1]
            return self.value(
                {**self._components[component], "x-component": component},
                name=name,
                request=request,
            )
        if name in _SAMPLES and _fits(_SAMPLES[name], schema):
            return _SAMPLES[name]
        for key in ("anyOf", "oneOf"):
            if key in schema:
                branches = [b for b in schema[key] if b.get("type") != "null"] or schema[key]
                return self.value(branches[0], name=name, request=request)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return schema["enum"][0]
        kind = schema.get("type")
        if kind == "object":
            return self._object(schema, request=request)
        if kind == "array":
            item = self.value(schema.get("items", {}), name=_singular(name), request=request)
            return [item] * max(1, int(schema.get("minItems", 1)))
        if kind == "string":
            return self._string(schema, name)
        if kind == "integer":
            return max(int(schema.get("minimum", 1)), min(1, int(schema.get("maximum", 1))))
        if kind == "number":
            return float(schema.get("minimum", 1.0))
        if kind == "boolean":
            return True
        return "value"  # any JSON value

    def _object(self, schema: Mapping[str, Any], *, request: bool) -> dict[str, Any]:
        required = set(schema.get("required", ()))
        properties: Mapping[str, Any] = schema.get("properties", {})
        component = schema.get("x-component", "")
        return {
            field: _IN_TYPE[component, field]
            if (component, field) in _IN_TYPE
            else self.value(sub, name=field, request=request)
            for field, sub in properties.items()
            if not request or field in required or field in _SAMPLES or field in _SHOWN
        }

    def _string(self, schema: Mapping[str, Any], name: str) -> str:
        fmt = schema.get("format")
        if fmt == "date-time":
            return _WHEN
        if fmt == "uuid" or name == "id" or name.endswith("Id"):
            self._ids += 1
            return str(uuid.UUID(int=0x1CE0_0000_0000_4000_8000_0000_0000_0000 + self._ids))
        candidates = (*_STRING_FALLBACKS, _KEY_CHARS)
        return next((c for c in candidates if _fits(c, schema)), _STRING_FALLBACKS[0])


_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "object": dict,
    "array": list,
    "boolean": bool,
    "integer": int,
    "number": (int, float),
    "null": type(None),
}


def _fits(value: Any, schema: Mapping[str, Any]) -> bool:
    """Roughly: of the schema's type and within its string limits (msgspec's decode is the
    real check)."""
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return any(_fits(value, branch) for branch in schema[key])
    if "$ref" in schema:
        return isinstance(value, dict)
    kind = schema.get("type")
    if isinstance(kind, str) and not isinstance(value, _JSON_TYPES.get(kind, object)):
        return False
    if not isinstance(value, str):
        return True
    if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1 << 30):
        return False
    pattern = schema.get("pattern")
    return pattern is None or re.search(pattern, value) is not None


def _singular(name: str) -> str:
    return name[:-1] if name.endswith("s") else name
