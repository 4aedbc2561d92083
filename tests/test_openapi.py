"""The published HTTP contract: /openapi.json is valid OpenAPI 3.1, generated from the very
msgspec types the handlers decode and encode, complete (every route is documented), exact per
app (a service documents only what it serves), and /docs renders it with no network access.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from services import all_in_one
from services.history import app as history
from services.session_resolution import app as session_resolution
from services.token_issuance import app as token_issuance
from shared.config import Settings
from shared.identity.api_keys import SCOPES
from shared.web.openapi import UndocumentedRoute, build_document, operation
from tests.conftest import ADMIN_TOKEN
from tests.support.server import running

ROOT = Path(__file__).resolve().parent.parent
HTTP_METHODS = {"get", "post", "put", "patch", "delete", "options", "head", "trace"}
PROBES = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"}


def offline_settings() -> Settings:
    # Building a document does no I/O: these URLs are never dialled.
    return Settings(
        database_url="postgresql://unused/unused",
        redis_url="redis://unused",
        admin_token=ADMIN_TOKEN,
        key_encryption_key=bytes(32),
    )


APPS = {
    "all": all_in_one.create_app,
    "token-issuance": token_issuance.create_app,
    "session-resolution": session_resolution.create_app,
    "history": history.create_app,
    "history-consumer": history.create_consumer_app,
}


def operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def served(app: web.Application) -> set[tuple[str, str]]:
    """(method, OpenAPI path) of every route the app answers, HEAD aside (aiohttp adds it to
    every GET)."""
    found = set()
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        path = re.sub(
            r"\{([^}:]+)(?::[^}]*)?\}",
            lambda m: "{" + re.sub(r"_([a-z0-9])", lambda c: c.group(1).upper(), m.group(1)) + "}",
            route.resource.canonical,
        )
        found.add((route.method, path))
    return found


@pytest.mark.parametrize("name", sorted(APPS))
def test_every_app_publishes_a_valid_openapi_3_1_document(name: str) -> None:
    document = build_document(APPS[name](offline_settings()))
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema
    assert document["openapi"].startswith("3.1")


@pytest.mark.parametrize("name", sorted(APPS))
def test_every_route_is_documented_and_nothing_else(name: str) -> None:
    app = APPS[name](offline_settings())
    document = build_document(app)  # strict: an undocumented route raises
    assert operations(document) == served(app)


def test_the_all_in_one_document_is_exactly_the_three_services_together() -> None:
    documents = {
        name: build_document(APPS[name](offline_settings()))
        for name in ("token-issuance", "session-resolution", "history")
    }
    own = {name: operations(doc) - {("GET", p) for p in PROBES} for name, doc in documents.items()}
    combined = build_document(all_in_one.create_app(offline_settings()))
    assert set().union(*own.values()) | {("GET", p) for p in PROBES} == operations(combined)
    # No operation is served by two services.
    names = list(own)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not own[a] & own[b], (a, b)


def test_each_service_documents_only_its_own_routes() -> None:
    tokens = operations(build_document(token_issuance.create_app(offline_settings())))
    sessions = operations(build_document(session_resolution.create_app(offline_settings())))
    histories = operations(build_document(history.create_app(offline_settings())))
    consumer = operations(build_document(history.create_consumer_app(offline_settings())))
    assert ("POST", "/widget/authenticate-user") in tokens
    assert ("POST", "/widget/sessions") not in tokens
    assert ("POST", "/widget/sessions") in sessions
    assert ("POST", "/widget/authenticate-user") not in sessions
    assert ("POST", "/v1/conversations") in histories
    assert not {op for op in histories if op[1].startswith(("/admin", "/widget"))}
    assert consumer == {("GET", p) for p in PROBES}


def test_an_undocumented_route_fails_the_build() -> None:
    app = token_issuance.create_app(offline_settings())

    async def secret(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/secret", secret)
    with pytest.raises(UndocumentedRoute, match="GET /secret"):
        build_document(app)
    # What the running server does instead: it serves the rest and leaves the route out.
    assert ("GET", "/secret") not in operations(build_document(app, strict=False))


def test_the_decorator_changes_nothing_about_the_handler() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    decorated = operation(summary="s", tags=["t"], responses={200: None})(handler)
    assert decorated is handler


def test_request_bodies_are_the_types_the_handlers_decode() -> None:
    """No second copy of a schema: every body decoder of every service is documented as some
    operation's request body, by the same msgspec type."""
    document = build_document(all_in_one.create_app(offline_settings()))
    documented = {
        media["schema"]["$ref"].rsplit("/", 1)[1]
        for item in document["paths"].values()
        for op in item.values()
        for media in op.get("requestBody", {}).get("content", {}).values()
    }
    decoded = set()
    for service in ("token_issuance", "session_resolution", "history"):
        module = importlib.import_module(f"services.{service}.schemas")
        for value in vars(module).values():
            if isinstance(value, msgspec.json.Decoder):
                decoded.add(value.type.__name__)
    assert decoded, "no body decoders found"
    assert decoded <= documented, decoded - documented


def test_component_names_are_plain_and_unique() -> None:
    """Two services' types with one name would be disambiguated by module path; keep names
    unique so the contract reads cleanly."""
    document = build_document(all_in_one.create_app(offline_settings()))
    names = list(document["components"]["schemas"])
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", n) for n in names), names


def test_every_error_is_a_problem_and_every_secured_operation_says_how() -> None:
    document = build_document(all_in_one.create_app(offline_settings()))
    schemes = document["components"]["securitySchemes"]
    assert set(schemes) == {"apiKey", "adminToken", "sessionToken"}
    assert schemes["apiKey"]["bearerFormat"] == "wik_..."
    assert schemes["sessionToken"]["bearerFormat"] == "wis_..."
    problem = document["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "code", "detail"} <= set(problem["required"])
    assert {"instance", "errors"} <= set(problem["properties"])
    for path, item in document["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                if int(status) < 400 or (path, status) == ("/readyz", "503"):
                    continue
                content = response["content"]
                if status == "400" and "application/problem+json" not in content:
                    assert set(content) == {"text/plain"}  # the HTTP parser's own refusal
                    continue
                schema = content["application/problem+json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Problem"}, (method, path)
            for requirement in op["security"]:
                for name, scopes in requirement.items():
                    assert name in schemes
                    assert set(scopes) <= SCOPES, (method, path)
                    if name == "apiKey":
                        assert scopes and {"401", "403"} <= set(op["responses"]), (method, path)
                    else:
                        assert "401" in op["responses"], (method, path)


def test_public_widget_operations_need_no_credentials() -> None:
    document = build_document(all_in_one.create_app(offline_settings()))
    paths = document["paths"]
    assert paths["/widget/sessions"]["post"]["security"] == []
    assert paths["/widget/sessions"]["options"]["security"] == []
    assert paths["/.well-known/jwks.json"]["get"]["security"] == []
    for path in PROBES:
        assert paths[path]["get"]["security"] == []
    assert paths["/widget/sessions/{sessionId}/history"]["get"]["security"] == [
        {"sessionToken": []}
    ]
    assert paths["/widget/authenticate-user"]["post"]["security"] == [
        {"apiKey": ["contacts:authenticate"]}
    ]
    # Either scope reads a merge: two alternative requirements.
    assert paths["/v1/merges/{mergeId}"]["get"]["security"] == [
        {"apiKey": ["history:read"]},
        {"apiKey": ["contacts:manage"]},
    ]


async def test_each_running_service_serves_its_own_document(settings: Settings) -> None:
    for create in (token_issuance.create_app, history.create_app):
        app = create(settings)
        async with running(app) as api:
            reply = await api.get("/openapi.json")
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("application/json")
            assert operations(reply.json) == served(app)
            validate(reply.json)


async def test_docs_page_works_offline(settings: Settings) -> None:
    async with running(session_resolution.create_app(settings)) as api:
        reply = await api.get("/docs")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/html")
    page = reply.body
    assert isinstance(page, str) and "<script>" in page and "openapi.json" in page
    # Nothing from anywhere else: no absolute URLs, no protocol-relative ones, no external
    # script, style or image sources.
    assert not re.search(r"https?://", page, flags=re.I)
    assert not re.search(r"""(src|href)\s*=\s*["']?//""", page, flags=re.I)
    assert not re.search(r"<(script|link|img|iframe)[^>]*\s(src|href)=", page, flags=re.I)
    # And the browser is told so: scripts and styles only by hash, fetches only to this origin.
    policy = reply.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", policy)


def shown_media(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every operation's request body and main (first 2xx) response, by media type."""
    found = []
    for path, item in document["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            for media_type, media in op.get("requestBody", {}).get("content", {}).items():
                found.append((f"{where} request {media_type}", media))
            success = sorted(s for s in op["responses"] if s.startswith("2"))
            content = op["responses"][success[0]].get("content", {}) if success else {}
            for media_type, media in content.items():
                found.append((f"{where} {success[0]} {media_type}", media))
    return found


@pytest.mark.parametrize("name", sorted(APPS))
def test_every_body_and_main_response_has_an_example_its_schema_accepts(name: str) -> None:
    document = build_document(APPS[name](offline_settings()))
    components = document.get("components", {})
    shown = shown_media(document)
    assert shown
    for where, media in shown:
        assert "example" in media, f"{where}: no example"
        # The operation's schema as the root, so its #/components/... references resolve.
        validator = Draft202012Validator(
            {**media["schema"], "components": components},
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )
        problems = [e.message for e in validator.iter_errors(media["example"])]
        assert not problems, f"{where}: {problems}"


def test_request_examples_are_what_the_handlers_decode() -> None:
    """Made from the types themselves: each request example decodes into the very type the
    handler decodes (see test_request_bodies_are_the_types_the_handlers_decode)."""
    document = build_document(all_in_one.create_app(offline_settings()))
    decoders = {
        value.type.__name__: value
        for service in ("token_issuance", "session_resolution", "history")
        for value in vars(importlib.import_module(f"services.{service}.schemas")).values()
        if isinstance(value, msgspec.json.Decoder)
    }
    for where, media in shown_media(document):
        ref = media["schema"].get("$ref", "")
        if " request " in where and ref.rsplit("/", 1)[-1] in decoders:
            decoders[ref.rsplit("/", 1)[1]].decode(msgspec.json.encode(media["example"]))


def test_api_key_scopes_are_an_enum_of_exactly_the_known_scopes() -> None:
    document = build_document(token_issuance.create_app(offline_settings()))
    scopes = document["components"]["schemas"]["CreateApiKeyRequest"]["properties"]["scopes"]
    assert set(scopes["items"]["enum"]) == SCOPES


def test_the_document_names_its_license_and_a_server() -> None:
    document = build_document(all_in_one.create_app(offline_settings()))
    assert document["info"]["license"]["identifier"] == "Apache-2.0"
    assert document["servers"] == [
        {"url": "/", "description": document["servers"][0]["description"]}
    ]
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text


REDOCLY = ROOT / ".node" / "node_modules" / ".bin" / "redocly"


def test_redocly_finds_nothing_wrong_with_the_published_document() -> None:
    """Redocly's recommended rules over docs/openapi.json (which test_client_models keeps equal
    to what the code builds). `make install` installs the linter when npm exists."""
    if not REDOCLY.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{REDOCLY} is missing: `make install` runs `npm ci --prefix .node`")
        pytest.skip("Redocly is not installed (no npm); CI runs this")
    proc = subprocess.run(
        [str(REDOCLY), "lint", "--format=json", str(ROOT / "docs" / "openapi.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "REDOCLY_TELEMETRY": "off", "REDOCLY_SUPPRESS_UPDATE_NOTICE": "true"},
    )
    report = json.loads(proc.stdout)
    problems = [(p["ruleId"], p["message"]) for p in report["problems"]]
    assert report["totals"]["errors"] == 0, problems
    assert report["totals"]["warnings"] == 0, problems
    assert proc.returncode == 0, proc.stderr
