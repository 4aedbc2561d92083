"""External tools the deployment and monitoring tests run: kubectl, promtool, checkov.

A missing tool skips the test locally, naming what to install, and fails it in CI (CI=true),
where a skipped scan would look like a passed one. checkov pins packages that clash with the
project's (packaging, among others), so it lives in its own virtualenv under .venv-tools/,
created here on first use at a pinned version: the findings do not change under us.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".venv-tools"
CHECKOV_VERSION = "3.3.30"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"true", "1"}


def missing(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a check that cannot run fails here)")
    pytest.skip(reason)


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        missing(
            "kubectl not found on PATH: the deployment tests render deploy/ with "
            "`kubectl kustomize`; install kubectl >= 1.27 to run them"
        )
    return path


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing(
            "promtool not found on PATH: it checks and unit-tests the alert rules; "
            "on Debian/Ubuntu `apt-get install -y prometheus` ships it (no daemon is needed)"
        )
    return path


def checkov() -> str:
    """The pinned checkov, installed into .venv-tools/checkov-<version> if it is not there."""
    venv = TOOLS / f"checkov-{CHECKOV_VERSION}"
    binary = venv / "bin" / "checkov"
    done = venv / ".installed"
    if done.exists():
        return str(binary)
    TOOLS.mkdir(exist_ok=True)
    with (TOOLS / "checkov.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest run may be installing it
        if not done.exists():
            _install_checkov(venv)
            done.touch()
    return str(binary)


def _install_checkov(venv: Path) -> None:
    shutil.rmtree(venv, ignore_errors=True)  # a half-made one from an interrupted run
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
         f"checkov=={CHECKOV_VERSION}"],
    ]  # fmt: skip
    for step in steps:
        try:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            missing(f"installing checkov {CHECKOV_VERSION} into {venv} timed out")
        if proc.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            missing(
                f"could not install checkov {CHECKOV_VERSION} into {venv} "
                f"({' '.join(step[-3:])} failed): {proc.stderr.strip()[-800:]}"
            )
