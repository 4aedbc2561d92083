"""OpenAPI 3.1 for every app, built from the msgspec types the handlers themselves use.

A handler carries its contract in one decorator (no behaviour change, it only attaches the
spec)::

    @operation(summary="Mint a contact token", tags=["token issuance"],
               body=AuthenticateUserRequest, responses={200: AuthenticateUserResponse},
               security="apiKey", scope="contacts:authenticate", errors=(409, 429))
    async def authenticate_user(request: web.Request) -> web.Response: ...

``build_document(app)`` walks the app's router, so an app documents exactly the routes it
serves (a single service, or the all-in-one composition), and renders every body and response
with ``msgspec.json.schema_components``: there is no second, hand-kept copy of a schema to
drift. Error statuses the decorator cannot get wrong are added from what the operation does
(a JSON body can be 400/413/415/422; an API key 401/403; a backend outage 503), and every error
response is an RFC 9457 ``Problem``. ``shared.web.apidocs`` serves the document and its docs page.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal, TypeVar

import msgspec
from aiohttp import web

from shared.web import examples

log = logging.getLogger(__name__)

Security = Literal["apiKey", "adminToken", "sessionToken"]
H = TypeVar("H", bound=Callable[[web.Request], Awaitable[web.StreamResponse]])

SPEC_ATTRIBUTE = "__openapi_operation__"
PROBLEM_JSON = "application/problem+json"
REF_TEMPLATE = "#/components/schemas/{name}"
# Path ids are UUIDs unless an operation says otherwise; a malformed id is simply not found.
UUID_PATH = {"type": "string", "format": "uuid"}


# --- the RFC 9457 body every error has (what shared.errors.Problem.body() produces) ---------


class FieldError(msgspec.Struct, kw_only=True):
    """One invalid input field of a ``validation_failed`` problem."""

    field: str
    message: str


class Problem(msgspec.Struct, kw_only=True):
    """RFC 9457 problem details. ``code`` is the stable, machine-readable part; ``detail`` is
    for humans and may change. Some problems add members (e.g. ``scope`` on
    ``insufficient_scope``, ``mergeStatus`` on ``merge_not_undoable``)."""

    type: str
    title: str
    status: int
    code: str
    detail: str
    instance: str | msgspec.UnsetType = msgspec.UNSET
    errors: list[FieldError] | msgspec.UnsetType = msgspec.UNSET


# --- what a handler declares -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Content:
    """A body that is not plain JSON of a type, or that needs a description or headers.
    ``type`` is anything msgspec can describe (None: no body)."""

    type: Any
    media_type: str = "application/json"
    description: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # name -> description


@dataclass(frozen=True, slots=True)
class Query:
    """A query parameter, typed like a body field (msgspec types and ``Meta`` constraints)."""

    name: str
    type: Any
    description: str
    required: bool = False


@dataclass(frozen=True, slots=True)
class OperationSpec:
    summary: str
    tags: tuple[str, ...]
    description: str | None
    body: Any
    responses: Mapping[int, Any]
    security: Security | None
    scopes: tuple[str, ...]  # any one of them suffices
    errors: Mapping[int, str]  # status -> the problem codes and when (empty: the defaults)
    query: tuple[Query, ...]
    path: Mapping[str, Any]  # path parameter (aiohttp name) -> type, when not a UUID
    operation_id: str | None
    backend: bool  # touches Postgres/Redis, so it can answer 503


def operation(
    *,
    summary: str,
    tags: Iterable[str],
    responses: Mapping[int, Any],
    description: str | None = None,
    body: Any = None,
    security: Security | None = None,
    scope: str | Iterable[str] | None = None,
    errors: Iterable[int] | Mapping[int, str] = (),
    query: Iterable[Query] = (),
    path: Mapping[str, Any] | None = None,
    operation_id: str | None = None,
    backend: bool = True,
) -> Callable[[H], H]:
    """Attach an OpenAPI operation to a handler; the handler itself is returned unchanged."""
    scopes = (scope,) if isinstance(scope, str) else tuple(scope or ())
    if scopes and security != "apiKey":
        raise ValueError("scopes belong to API keys (security='apiKey')")
    error_map = dict(errors) if isinstance(errors, Mapping) else dict.fromkeys(errors, "")
    spec = OperationSpec(
        summary=summary,
        tags=tuple(tags),
        description=description,
        body=body,
        responses=dict(responses),
        security=security,
        scopes=scopes,
        errors=error_map,
        query=tuple(query),
        path=dict(path or {}),
        operation_id=operation_id,
        backend=backend,
    )

    def attach(handler: H) -> H:
        setattr(handler, SPEC_ATTRIBUTE, spec)
        return handler

    return attach


def spec_of(handler: object) -> OperationSpec | None:
    spec = getattr(handler, SPEC_ATTRIBUTE, None)
    return spec if isinstance(spec, OperationSpec) else None


# --- building the document -------------------------------------------------------------------

SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "wik_...",
        "description": (
            "An org API key (`Authorization: Bearer wik_...`), created by an admin with "
            "scopes; the org always comes from the key. Every way a key can be wrong is the "
            "same `401 invalid_api_key`; a key without the operation's scope is "
            "`403 insufficient_scope`. Scopes are listed on each operation."
        ),
    },
    "adminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": (
            "The operator's `ADMIN_TOKEN` from the environment "
            "(`Authorization: Bearer <ADMIN_TOKEN>`); without one configured the admin API "
            "is closed. Wrong or missing: `401 invalid_admin_token`."
        ),
    },
    "sessionToken": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "wis_...",
        "description": (
            "The `sessionToken` returned by `POST /widget/sessions` "
            "(`Authorization: Bearer wis_...`). Unknown or not this session's: "
            "`401 invalid_session_token`; ended: `401 session_ended`; its contact token "
            "revoked: `401 token_revoked`."
        ),
    },
}

TAG_DESCRIPTIONS = {
    "token issuance": "Customer backends vouch for their signed-in users: contact tokens, JWKS, revocation.",
    "widget sessions": "Public endpoints the widget calls from the visitor's browser (CORS-checked, rate limited).",
    "sessions": "Session introspection and device bindings for platform services.",
    "history": "Conversations and messages, recorded and read in a session's history scope.",
    "merges": "History merges (login merges and explicit contact merges), their status and undo.",
    "contacts": "Contact lifecycle: erasure (GDPR).",
    "admin": "Org administration with the operator's admin token.",
    "operations": "Probes, metrics and this documentation.",
    "browser": "The identity SDK for web pages (ES module, classic script, TypeScript types).",
}

# What each error status means here, unless an operation says more precisely.
_DEFAULT_ERRORS = {
    400: "`malformed_json`: the body is not valid JSON.",
    401: "Not authenticated.",
    403: "Authenticated but not allowed.",
    404: "`not_found`: no such resource in the caller's org (another org's reads the same).",
    409: "Conflicts with the resource's current state.",
    413: "`payload_too_large`: the body exceeds the server's limit.",
    415: "`unsupported_media_type`: the body must be `application/json`.",
    422: "`validation_failed`: the input is well-formed JSON but not valid; nothing was changed.",
    429: "`rate_limited`: too many requests; retry after `Retry-After` seconds.",
    503: (
        "`db_unavailable` or `redis_unavailable` (a backend is unreachable), `db_busy` (a lock "
        "or statement timeout, or no database connection free in time) or `deadline_exceeded` "
        "(the request's time budget ran out); retry after `Retry-After` seconds."
    ),
}
_AUTH_429 = (
    "`rate_limited`: too many requests, or too many failed authentication attempts from this "
    "client IP (`AUTH_FAILURES_PER_IP` a minute; a key this server has already seen valid is "
    "never held back); retry after `Retry-After` seconds."
)
_AUTH_ERRORS: dict[str, dict[int, str]] = {
    "apiKey": {
        401: "`invalid_api_key`: the API key is missing, malformed, unknown, revoked or expired.",
        403: "`insufficient_scope`: the API key lacks the operation's scope.",
        429: _AUTH_429,
    },
    "adminToken": {
        401: "`invalid_admin_token`: the admin token is missing or wrong.",
        429: _AUTH_429,
    },
    "sessionToken": {
        401: (
            "`invalid_session_token` (missing, unknown or another session's token), "
            "`session_ended` (logged out, device revoked or expired) or `token_revoked` "
            "(the contact token that verified the session was revoked)."
        ),
    },
}
_BODY_ERRORS = (400, 413, 415, 422)
_RESPONSE_HEADERS = {
    429: {"Retry-After": "Seconds to wait before retrying."},
    503: {"Retry-After": "Seconds to wait before retrying."},
}


class UndocumentedRoute(Exception):
    """A route has no ``@operation``: the published contract would be incomplete."""


def camel(name: str) -> str:
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), name)


def _path_names(template: str) -> list[str]:
    return re.findall(r"\{([^}:]+)(?::[^}]*)?\}", template)


@dataclass
class _Schemas:
    """Every type an app's operations mention, rendered by msgspec in one call (so a type used
    by several operations becomes one component). ``schema(tp)`` hands out a placeholder that
    ``render()`` fills in."""

    wanted: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    components: dict[str, Any] = field(default_factory=dict)
    exemplified: list[tuple[Any, str, dict[str, Any]]] = field(default_factory=list)

    def schema(self, tp: Any) -> dict[str, Any]:
        placeholder: dict[str, Any] = {}
        self.wanted.append((tp, placeholder))
        return placeholder

    def media(self, tp: Any, media_type: str) -> dict[str, Any]:
        """A media type object for ``tp``, with an example (see shared.web.examples)."""
        media = {"schema": self.schema(tp)}
        self.exemplified.append((tp, media_type, media))
        return {media_type: media}

    def render(self) -> None:
        if not self.wanted:
            return
        rendered, components = msgspec.json.schema_components(
            [tp for tp, _ in self.wanted], ref_template=REF_TEMPLATE
        )
        for (_, placeholder), schema in zip(self.wanted, rendered, strict=True):
            placeholder.update(schema)
        self.components = {name: _tidy(schema) for name, schema in sorted(components.items())}
        for tp, media_type, media in self.exemplified:
            value = examples.example(tp, media["schema"], self.components, media_type)
            if value is not None:
                media["example"] = value


def _tidy(schema: dict[str, Any]) -> dict[str, Any]:
    """Docstrings become descriptions: dedent them and turn reST ``code`` into Markdown."""
    description = schema.get("description")
    if isinstance(description, str):
        schema = {**schema, "description": inspect.cleandoc(description).replace("``", "`")}
    return schema


@dataclass
class _Route:
    method: str
    path: str  # OpenAPI template, camelCase parameter names
    names: list[str]  # aiohttp parameter names, in order
    spec: OperationSpec
    handler_name: str


def _routes(app: web.Application, *, strict: bool) -> list[_Route]:
    found: list[_Route] = []
    for route in app.router.routes():
        method = route.method.upper()
        resource = route.resource
        if method == "HEAD" or resource is None:
            continue  # aiohttp adds HEAD to every GET; it answers like the GET without a body
        spec = spec_of(route.handler)
        template = resource.canonical
        if spec is None:
            if method == "OPTIONS":
                continue  # an undocumented CORS preflight is plumbing, not an operation
            message = f"{method} {template} has no @operation spec"
            if strict:
                raise UndocumentedRoute(message)
            log.warning("%s; it is left out of /openapi.json", message)
            continue
        names = _path_names(template)
        path = re.sub(r"\{([^}:]+)(?::[^}]*)?\}", lambda m: "{" + camel(m.group(1)) + "}", template)
        handler_name = getattr(route.handler, "__name__", "operation")
        found.append(_Route(method, path, names, spec, handler_name))
    return found


def _operation_ids(routes: list[_Route]) -> list[str]:
    """The handler's name in camelCase; a handler serving several routes (the CORS preflight)
    gets the path's words appended so every id stays unique."""
    counts: dict[str, int] = {}
    for r in routes:
        counts[r.handler_name] = counts.get(r.handler_name, 0) + 1
    ids: list[str] = []
    for r in routes:
        if r.spec.operation_id is not None:
            ids.append(r.spec.operation_id)
            continue
        base = camel(r.handler_name)
        if counts[r.handler_name] > 1:
            words = [w for w in re.split(r"[^A-Za-z0-9]+", r.path) if w]
            base += "".join(w[:1].upper() + w[1:] for w in words)
        ids.append(base)
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"duplicate operationIds: {duplicates}")
    return ids


def _content(value: Any) -> Content:
    return value if isinstance(value, Content) else Content(type=value)


def _version() -> str:
    try:
        return importlib.metadata.version("widget-identity")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def build_document(
    app: web.Application, *, title: str = "widget-identity", strict: bool = True
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of exactly the routes ``app`` serves.

    ``strict``: a route without ``@operation`` raises ``UndocumentedRoute`` (tests use this to
    keep the contract complete); otherwise it is logged and left out.
    """
    routes = _routes(app, strict=strict)
    schemas = _Schemas()
    problem = schemas.schema(Problem)
    paths: dict[str, dict[str, Any]] = {}
    for route, operation_id in zip(routes, _operation_ids(routes), strict=True):
        op = _operation(route, operation_id, schemas, problem)
        paths.setdefault(route.path, {})[route.method.lower()] = op
    schemas.render()

    specs = [r.spec for r in routes]
    tags = list(dict.fromkeys(t for spec in specs for t in spec.tags))
    security = {spec.security for spec in specs if spec.security is not None}
    component_schemas = schemas.components
    if not any(problem is media.get("schema") for media in _media(paths)):
        component_schemas = {
            k: v for k, v in component_schemas.items() if k not in ("Problem", "FieldError")
        }
    components: dict[str, Any] = {}
    if component_schemas:
        components["schemas"] = component_schemas
    if security:
        components["securitySchemes"] = {
            name: scheme for name, scheme in SECURITY_SCHEMES.items() if name in security
        }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": _version(),
            "description": _DESCRIPTION,
            "license": {"name": "Apache 2.0", "identifier": "Apache-2.0"},
        },
        # Relative: the server that serves this document (`make run`: http://127.0.0.1:8080).
        "servers": [{"url": "/", "description": "the server this document was fetched from"}],
        "tags": [
            {"name": t, "description": TAG_DESCRIPTIONS[t]}
            if t in TAG_DESCRIPTIONS
            else {"name": t}
            for t in tags
        ],
        "paths": dict(sorted(paths.items())),
    }
    if components:
        document["components"] = components
    return document


_DESCRIPTION = (
    "Decides who a chat-widget visitor is, how far to trust that, and which conversation "
    "history they may see. Bodies are JSON with camelCase fields; every error is RFC 9457 "
    "`application/problem+json` with a stable `code`."
)


def _media(paths: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        media
        for item in paths.values()
        for op in item.values()
        for response in op["responses"].values()
        for media in response.get("content", {}).values()
    ]


def _operation(
    route: _Route, operation_id: str, schemas: _Schemas, problem: dict[str, Any]
) -> dict[str, Any]:
    spec = route.spec
    unknown = set(spec.path) - set(route.names)
    if unknown:
        raise ValueError(f"{route.method} {route.path}: no path parameters {sorted(unknown)}")
    op: dict[str, Any] = {"operationId": operation_id, "summary": spec.summary}
    description = spec.description or ""
    if spec.scopes:
        needs = " or ".join(f"`{s}`" for s in spec.scopes)
        description = f"{description}\n\nRequires an API key with the scope {needs}.".strip()
    if description:
        op["description"] = description
    if spec.tags:
        op["tags"] = list(spec.tags)
    parameters = [
        {
            "name": camel(name),
            "in": "path",
            "required": True,
            "schema": schemas.schema(spec.path[name]) if name in spec.path else dict(UUID_PATH),
        }
        for name in route.names
    ] + [
        {
            "name": q.name,
            "in": "query",
            "required": q.required,
            "description": q.description,
            "schema": schemas.schema(q.type),
        }
        for q in spec.query
    ]
    if parameters:
        op["parameters"] = parameters
    if spec.body is not None:
        body = _content(spec.body)
        op["requestBody"] = {
            "required": True,
            "content": schemas.media(body.type, body.media_type),
        }
        if body.description:
            op["requestBody"]["description"] = body.description
    if spec.security is None:
        op["security"] = []
    else:
        op["security"] = [{spec.security: [s]} for s in spec.scopes] or [{spec.security: []}]
    op["responses"] = _responses(spec, schemas, problem)
    return op


def _responses(spec: OperationSpec, schemas: _Schemas, problem: dict[str, Any]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, value in sorted(spec.responses.items()):
        content = _content(value)
        response: dict[str, Any] = {"description": content.description or HTTPStatus(status).phrase}
        if content.type is not None:
            response["content"] = schemas.media(content.type, content.media_type)
        if content.headers:
            response["headers"] = {
                name: {"description": text, "schema": {"type": "string"}}
                for name, text in content.headers.items()
            }
        responses[str(status)] = response
    for status, text in sorted(_error_statuses(spec).items()):
        if str(status) in responses:
            continue  # the operation's own response for this status wins (e.g. /readyz)
        error: dict[str, Any] = {
            "description": f"{HTTPStatus(status).phrase}. {text}",
            "content": {PROBLEM_JSON: {"schema": problem}},
        }
        if status in _RESPONSE_HEADERS:
            error["headers"] = {
                name: {"description": text, "schema": {"type": "integer", "minimum": 0}}
                for name, text in _RESPONSE_HEADERS[status].items()
            }
        responses[str(status)] = error
    _add_transport_limit(responses, problem)
    return responses


# aiohttp's HTTP parser refuses these before any app code (or middleware) runs;
# shared.web.server answers them as problems too, with a fixed detail.
MAX_LINE_BYTES = 8190
_TRANSPORT_400 = (
    f"`line_too_long`: the request line (path and query) or a header is longer than "
    f"{MAX_LINE_BYTES} bytes; `malformed_request`: the request is not valid HTTP/1.1 (bad "
    "request line, invalid header name, broken chunked encoding). Refused by the HTTP server "
    "before the application sees it; nothing of the request is echoed."
)


def _add_transport_limit(responses: dict[str, Any], problem: dict[str, Any]) -> None:
    existing = responses.get("400")
    if existing is None:
        responses["400"] = {
            "description": f"Bad Request. {_TRANSPORT_400}",
            "content": {PROBLEM_JSON: {"schema": problem}},
        }
        return
    existing["description"] += f" Or: {_TRANSPORT_400}"
    existing.setdefault("content", {}).setdefault(PROBLEM_JSON, {"schema": problem})


def _error_statuses(spec: OperationSpec) -> dict[int, str]:
    """The declared errors plus those implied by what the operation does; an operation's own
    text for a status replaces the default."""
    implied: dict[int, str] = {}
    if spec.body is not None:
        implied.update((s, _DEFAULT_ERRORS[s]) for s in _BODY_ERRORS)
    if spec.security is not None:
        implied.update(_AUTH_ERRORS[spec.security])
        if spec.security == "apiKey" and not spec.scopes:
            implied.pop(403)
    if spec.backend:
        implied[503] = _DEFAULT_ERRORS[503]
    for status, text in spec.errors.items():
        implied[status] = text or implied.get(status) or _DEFAULT_ERRORS.get(status, "")
    return implied
