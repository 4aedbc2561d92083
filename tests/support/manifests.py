"""deploy/ rendered the way a cluster would receive it: `kubectl kustomize`, offline."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.tools import kubectl

Manifest = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
MONITORING = DEPLOY / "monitoring"
OVERLAYS = sorted(p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))


@functools.cache
def render_text(directory: Path) -> str:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{proc.stderr}")
    return proc.stdout


def render(directory: Path) -> tuple[Manifest, ...]:
    return tuple(doc for doc in yaml.safe_load_all(render_text(directory)) if doc)
