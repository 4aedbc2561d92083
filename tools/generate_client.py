"""Generate the Python client's models and operation table from the server's own contracts.

Run from the repository root::

    .venv/bin/python -m tools.generate_client

It renders the all-in-one app's OpenAPI 3.1 document (``shared.web.openapi.build_document``) and
the AsyncAPI event document (``shared.bus.asyncapi.document``), writes the OpenAPI document to
``docs/openapi.json`` for outside readers, and turns both documents' schemas into
``clients/python/widget_identity_client/models.py`` (msgspec Structs) and their operations into
``clients/python/widget_identity_client/operations.py`` (the translation is client_codegen.py).
It lives outside the client package on purpose: it imports ``shared`` and ``services``, which
the client package never does. A test fails when a committed output is stale
(tests/test_client_models.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from services import all_in_one
from shared.bus.asyncapi import document
from shared.config import Settings
from shared.web.openapi import build_document
from tools.client_codegen import COMMAND, build_models, render_models, render_operations

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clients" / "python" / "widget_identity_client"
MODELS = PACKAGE / "models.py"
OPERATIONS = PACKAGE / "operations.py"
OPENAPI = ROOT / "docs" / "openapi.json"

# --- the documents ---------------------------------------------------------------------------


def openapi_document() -> dict[str, Any]:
    """The all-in-one app's document, built without I/O (the URLs are never dialled)."""
    settings = Settings(
        database_url="postgresql://unused/unused",
        redis_url="redis://unused",
        admin_token="unused-admin-token-" + "x" * 16,
        key_encryption_key=bytes(32),
    )
    return build_document(all_in_one.create_app(settings))


def asyncapi_document() -> dict[str, Any]:
    return document()


def render_openapi(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


# --- output ----------------------------------------------------------------------------------


def _formatted(source: str, target: Path) -> str:
    """Through the repository's own formatter, so the committed files pass `make lint`."""
    ruff = Path(sys.executable).with_name("ruff")
    command = [str(ruff) if ruff.exists() else "ruff"]
    for args in (
        ["check", "--fix-only", "--select", "I,UP,F401", "--quiet"],
        ["format", "--quiet"],
    ):
        source = subprocess.run(
            [*command, *args, "--stdin-filename", str(target), "-"],
            input=source,
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
    return source


def outputs() -> dict[Path, str]:
    """Every generated file and its content."""
    openapi = openapi_document()
    asyncapi = asyncapi_document()
    return {
        OPENAPI: render_openapi(openapi),
        MODELS: _formatted(render_models(build_models(openapi, asyncapi)), MODELS),
        OPERATIONS: _formatted(render_operations(openapi), OPERATIONS),
    }


def main(argv: list[str] | None = None) -> int:
    """Write the stale outputs; with ``--check``, only name them (exit 1 if any)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a committed file is stale"
    )
    args = parser.parse_args(argv)
    stale = []
    for path, content in outputs().items():
        current = path.read_text() if path.exists() else None
        if current == content:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.write_text(content)
    for path in stale:
        print(f"stale: {path}; run `{COMMAND}`" if args.check else f"written: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
