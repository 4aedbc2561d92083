"""The house's import rules, read from the code itself (docs/architecture.md, "Layers").

A rule written only in prose drifts; these fail the moment an import crosses a line:
- services never import each other (they talk through Postgres and Redis Streams);
- the shared library never imports a service or the dev tooling;
- the bus stands on the process layer only (tests/test_bus.py checks that in a fresh
  interpreter, so that indirect imports count too);
- the runtime never imports the dev stack at module level (only the `dev` command does,
  inside the function that needs it);
- the client package ships alone: it imports neither the server library nor the services;
- nothing in the repository points at documents outside it;
- every test docs/promises.md names as a proof exists.
"""

from __future__ import annotations

import ast
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("token_issuance", "session_resolution", "history")


def _modules(folder: str) -> Iterator[Path]:
    yield from sorted((ROOT / folder).rglob("*.py"))


def _imports(path: Path, *, top_level_only: bool = False) -> Iterator[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:
                # `from shared import db` names the module shared.db.
                yield f"{node.module}.{alias.name}"


def _violations(
    folder: str, forbidden: tuple[str, ...], *, top_level_only: bool = False
) -> list[str]:
    found = []
    for path in _modules(folder):
        for name in _imports(path, top_level_only=top_level_only):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return sorted(set(found))


@pytest.mark.parametrize("service", SERVICES)
def test_services_never_import_each_other(service: str) -> None:
    others = tuple(f"services.{other}" for other in SERVICES if other != service)
    assert (
        _violations(f"services/{service}", (*others, "services.all_in_one", "services.cli")) == []
    )


def test_the_shared_library_never_imports_a_service_or_the_dev_tooling() -> None:
    assert _violations("shared", ("services", "devstack", "bench", "tests")) == []


def test_the_runtime_imports_the_dev_stack_only_where_the_dev_command_needs_it() -> None:
    assert _violations("services", ("devstack",), top_level_only=True) == []


def test_the_client_package_ships_alone() -> None:
    client = "clients/python/widget_identity_client"
    assert _violations(client, ("shared", "services", "devstack")) == []


def test_nothing_in_the_repository_points_outside_it() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    outside = ("../shared", "DESIGN.md", "RELIABILITY.md", "STYLE.md")
    offenders = [
        name
        for name in tracked
        if (ROOT / name).is_file()
        and name != "tests/test_architecture.py"
        and any(marker in _text(ROOT / name) for marker in outside)
    ]
    assert offenders == []


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        return ""


def test_every_test_the_promises_page_names_exists() -> None:
    page = (ROOT / "docs" / "promises.md").read_text()
    named = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", page)
    assert len(named) > 20  # the page is read, not silently empty
    missing = [
        f"{path}::{name}"
        for path, name in named
        if not re.search(rf"^(async )?def {name}\(", (ROOT / path).read_text(), re.M)
    ]
    assert missing == []
