"""The Python client cannot drift from the server: its models, its operation table and
docs/openapi.json are generated from the server's own contracts, every operation has a method
that says whether it is retried, every problem code the server raises has a typed exception,
and the client ships without the server's packages."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
from widget_identity_client import AdminClient, WidgetClient, WidgetIdentityClient
from widget_identity_client.errors import WidgetIdentityError
from widget_identity_client.operations import ALL
from widget_identity_client.retry import is_idempotent

ROOT = Path(__file__).resolve().parent.parent
COMMAND = ".venv/bin/python -m tools.generate_client"
CLIENTS = (WidgetIdentityClient, AdminClient, WidgetClient)


@pytest.fixture(scope="module")
def stale() -> set[str]:
    """What ``tools.generate_client --check`` finds stale (it writes nothing), as repository paths."""
    result = subprocess.run(
        [sys.executable, "-m", "tools.generate_client", "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    return {line.split(";")[0].removeprefix("stale: ") for line in result.stdout.splitlines()}


@pytest.mark.parametrize(
    "relative",
    [
        "clients/python/widget_identity_client/models.py",
        "clients/python/widget_identity_client/operations.py",
    ],
)
def test_committed_client_code_matches_the_servers_contract(stale: set[str], relative: str) -> None:
    assert relative not in stale, f"{relative} is stale: run `{COMMAND}`"


def test_committed_openapi_document_matches_the_app(stale: set[str]) -> None:
    assert "docs/openapi.json" not in stale, f"docs/openapi.json is stale: run `{COMMAND}`"


def snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def test_every_operation_has_a_client_method_that_says_whether_it_retries() -> None:
    methods = {name: getattr(c, name) for c in CLIENTS for name in vars(c) if name[0] != "_"}
    for operation in ALL:
        method = methods.get(snake(operation.id))
        assert method is not None, f"no client method for {operation.id}"
        doc = " ".join((inspect.getdoc(method) or "").split())
        promise = "Retried" if is_idempotent(operation) else "Not retried"
        assert re.search(rf"(^|\. ){promise}\b", doc), (operation.id, promise, doc)
    assert len(ALL) == len({op.id for op in ALL})


def raised_problems() -> set[tuple[int, str]]:
    """(status, code) of every ``Problem(status, "code", ...)`` and ``unavailable("code")`` in
    the server's source."""
    found: set[tuple[int, str]] = set()
    for path in [*(ROOT / "shared").rglob("*.py"), *(ROOT / "services").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            args = [a.value if isinstance(a, ast.Constant) else None for a in node.args]
            if name == "Problem" and len(args) > 1 and isinstance(args[1], str):
                assert isinstance(args[0], int), f"{path}: Problem with a non-literal status"
                found.add((args[0], args[1]))
            elif name == "unavailable" and isinstance(args[0], str):
                found.add((503, args[0]))
    return found


def test_every_problem_code_the_server_raises_has_a_typed_exception() -> None:
    problems = raised_problems()
    assert {(401, "invalid_api_key"), (409, "identity_conflict"), (503, "db_unavailable")} <= (
        problems
    )
    missing = {code for _, code in problems} - WidgetIdentityError.known_codes()
    assert not missing, f"add classes to widget_identity_client/errors.py for {sorted(missing)}"
    statuses: dict[str, set[int]] = {}
    for status, code in problems:
        statuses.setdefault(code, set()).add(status)
    for status, code in problems:
        by_code = WidgetIdentityError.class_for(status, code)
        if len(statuses[code]) == 1:
            # ``except Conflict`` catches identity_conflict: a code's class refines its status's.
            assert issubclass(by_code, WidgetIdentityError.class_for(status, None)), code


def test_the_client_package_imports_nothing_from_the_server() -> None:
    """It ships on its own: with ``shared`` and ``services`` made unimportable, every module
    (the events consumer included) still imports."""
    package = ROOT / "clients" / "python" / "widget_identity_client"
    modules = sorted(f"widget_identity_client.{p.stem}" for p in package.glob("[!_]*.py"))
    script = (
        "import importlib, sys\n"
        "sys.modules['shared'] = sys.modules['services'] = None\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd="/", check=False
    )
    assert result.returncode == 0, result.stderr
    assert "widget_identity_client.events" in modules
