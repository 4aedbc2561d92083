"""A security scanner (checkov, pinned) accepts every rendered overlay.

Each overlay is rendered with `kubectl kustomize` and scanned with checkov's Kubernetes
checks. A failed check fails the test, naming it, so a new finding cannot land unnoticed.
A check may be skipped only inline, on the object, with a `checkov.io/skipN:
"CKV_K8S_<n>=<why>"` annotation, and only for the reasons accepted below; a new kind of skip
needs its reason written here first.
"""

from __future__ import annotations

import functools
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.manifests import DEPLOY, OVERLAYS, Manifest, render, render_text
from tests.support.tools import checkov

# Check id -> overlays where it may be skipped, and why.
ACCEPTED_SKIPS: dict[str, tuple[set[str], str]] = {
    "CKV_K8S_35": (
        set(OVERLAYS),
        "secrets as env vars: the app reads them only from the environment until it gains "
        "*_FILE variables; the Secret is already mounted as files for that switch",
    ),
    "CKV_K8S_43": (
        {"dev"},
        "image by digest: dev rebuilds a moving tag in place and pulls it Always",
    ),
}
WORKLOAD_KINDS = {"Deployment", "Job"}


@functools.cache
def _scan(manifests: str) -> dict[str, Any]:
    """checkov's JSON report on these manifests (cached: each overlay is scanned once)."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "rendered.yaml"
        target.write_text(manifests)
        return _run_checkov(target)


def _run_checkov(target: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [checkov(), "--framework", "kubernetes", "--file", str(target), "--output", "json",
         "--compact", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    # 0: nothing failed, 1: findings; anything else is checkov itself failing.
    assert proc.returncode in (0, 1), f"checkov failed ({proc.returncode}):\n{proc.stderr}"
    report: dict[str, Any] = json.loads(proc.stdout)
    assert report["check_type"] == "kubernetes", report.get("check_type")
    assert report["summary"]["parsing_errors"] == 0, report["results"].get("parsing_errors")
    return report


def _resources(report: dict[str, Any], outcome: str) -> list[tuple[str, str, str]]:
    return [
        (c["check_id"], c["resource"], (c.get("check_result") or {}).get("suppress_comment", ""))
        for c in report["results"][f"{outcome}_checks"]
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_finds_nothing_in_the_rendered_overlay(overlay: str) -> None:
    report = _scan(render_text(DEPLOY / "overlays" / overlay))
    failed = _resources(report, "failed")
    assert not failed, f"{overlay}: checkov findings:\n" + "\n".join(
        f"  {check} {resource}" for check, resource, _ in failed
    )
    # It really looked: every workload was checked, and passed checks were counted.
    checked = {r for _, r, _ in _resources(report, "passed")}
    for doc in render(DEPLOY / "overlays" / overlay):
        if doc["kind"] in WORKLOAD_KINDS:
            name = f"{doc['kind']}.{doc['metadata']['namespace']}.{doc['metadata']['name']}"
            assert name in checked, f"{overlay}: checkov did not scan {name}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_skipped_check_is_accepted_and_justified_inline(overlay: str, tmp_path: Path) -> None:
    report = _scan(render_text(DEPLOY / "overlays" / overlay))
    for check, resource, comment in _resources(report, "skipped"):
        where = f"{overlay} {resource} skips {check}"
        assert check in ACCEPTED_SKIPS, f"{where}: not an accepted skip (see ACCEPTED_SKIPS)"
        overlays, _ = ACCEPTED_SKIPS[check]
        assert overlay in overlays, f"{where}: accepted only in {sorted(overlays)}"
        assert len(comment.split()) >= 6, f"{where}: the justification {comment!r} is too thin"


def test_the_scan_fails_on_a_new_finding() -> None:
    """The same scan flags a regression: prod with one image back on a bare tag."""
    docs: list[Manifest] = list(render(DEPLOY / "overlays" / "prod"))
    for doc in docs:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "history":
            container = doc["spec"]["template"]["spec"]["containers"][0]
            container["image"] = container["image"].split("@", 1)[0]
    report = _scan(yaml.safe_dump_all(docs))
    failed = {(check, resource) for check, resource, _ in _resources(report, "failed")}
    assert failed == {
        ("CKV_K8S_43", "Deployment.widget-identity.history"),  # not by digest
        ("CKV_K8S_15", "Deployment.widget-identity.history"),  # IfNotPresent on a tag
    }, failed
