"""Promises of the `widget-identity` command at start-up, driven as a person would drive it
(the real console script in a subprocess): every start-up failure is one line on stderr
naming what to fix, with a non-zero exit code and nothing left running; SIGTERM stops `dev`
and its private servers at any point; a running `dev` (`make run`) can be found by the other
commands and the client's event example, and answers on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from devstack import DevServers
from shared.db import with_database

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("widget-identity"))
EXAMPLE = ROOT / "clients/python/examples/consume_events.py"
# What a developer's shell might have set; each test says what it wants instead.
SETTINGS_VARS = (
    "DATABASE_URL",
    "REDIS_URL",
    "PORT",
    "HOST",
    "ADMIN_TOKEN",
    "KEY_ENCRYPTION_KEY",
    "LOG_LEVEL",
    "LOG_JSON",
    "STREAM_PREFIX",
)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS_VARS}
    return {**env, "LOG_JSON": "false", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("widget-identity: error: "), lines[0]
    return lines[0]


def processes_in(directory: Path) -> list[int]:
    """Processes working in ``directory``: both servers chdir into their data dirs."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(proc / "cwd").startswith(str(directory)):
                    found.append(int(proc.name))
    return found


def nothing_left_in(directory: Path, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while processes_in(directory) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not processes_in(directory)


@pytest.fixture
def checkout() -> Iterator[Path]:
    # Under /tmp with mode 755, not tmp_path: as root, Postgres runs as another user, who
    # must be able to reach the data dir (see tests/test_devstack.py).
    directory = Path(tempfile.mkdtemp(prefix="wi-cli-", dir="/tmp"))
    directory.chmod(0o755)
    yield directory
    for pid in processes_in(directory):  # only if a test failed half-way
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def listener() -> Iterator[int]:
    """A port another process already listens on (all interfaces)."""
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        yield int(held.getsockname()[1])


class Dev:
    """`widget-identity dev` (what `make run` runs) in a checkout, stderr kept in a file."""

    def __init__(self, checkout: Path, port: int) -> None:
        self.checkout, self.port = checkout, port
        self.log = checkout / "dev.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [CLI, "dev", "--port", str(port)],
                cwd=checkout,
                env=cli_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )

    @property
    def env_file(self) -> Path:
        return self.checkout / ".devdata" / "env"

    def wait_serving(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2),
            ):
                return
            time.sleep(0.2)
        pytest.fail(f"dev did not become ready: {self.log.read_text()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"dev did not stop on {sig.name}: {self.log.read_text()}")


def test_dev_with_its_port_taken_says_so_in_one_line_and_starts_nothing(
    checkout: Path, listener: int
) -> None:
    proc = run_cli("dev", "--port", str(listener), cwd=checkout, env=cli_env())
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert f"PORT: 127.0.0.1:{listener} is already in use" in line
    assert not (checkout / ".devdata" / "servers" / "postgres").exists()
    assert nothing_left_in(checkout)


def test_serve_with_its_port_taken_says_so_in_one_line(
    servers: DevServers, checkout: Path, listener: int
) -> None:
    env = cli_env(
        DATABASE_URL=servers.database_url, REDIS_URL=servers.redis_url, PORT=str(listener)
    )
    proc = run_cli("serve", "all", cwd=checkout, env=env)
    assert proc.returncode == 2
    assert f"PORT: 0.0.0.0:{listener} is already in use" in one_line(proc.stderr)


def test_serve_without_a_key_encryption_key_says_so_in_one_line(
    servers: DevServers, checkout: Path
) -> None:
    env = cli_env(
        DATABASE_URL=servers.database_url, REDIS_URL=servers.redis_url, PORT=str(free_port())
    )
    proc = run_cli("serve", "all", cwd=checkout, env=env)
    assert proc.returncode == 2
    assert "KEY_ENCRYPTION_KEY: not set" in one_line(proc.stderr)


def test_without_urls_or_a_running_dev_the_cli_says_what_to_set(checkout: Path) -> None:
    proc = run_cli("org", "list", cwd=checkout, env=cli_env())
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert "DATABASE_URL and REDIS_URL: not set" in line
    assert "make run" in line


async def test_a_migration_that_fails_names_itself_in_one_line(
    servers: DevServers, checkout: Path
) -> None:
    name = f"wi_clash_{os.getpid()}_{time.monotonic_ns()}"
    admin = await asyncpg.connect(servers.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = with_database(servers.database_url, name)
        conn = await asyncpg.connect(url)
        try:  # something the first migration does not expect to find
            await conn.execute("CREATE TABLE orgs (id text)")
        finally:
            await conn.close()
        proc = subprocess.run(
            [CLI, "migrate"],
            cwd=checkout,
            env=cli_env(DATABASE_URL=url, REDIS_URL=servers.redis_url),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2
        line = one_line(proc.stderr)
        assert "migration 0001_schema_v1 failed and was rolled back" in line
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def test_sigterm_while_dev_starts_stops_it_and_its_private_servers(checkout: Path) -> None:
    dev = Dev(checkout, free_port())
    try:
        # The moment the private Postgres exists, start-up is under way (Redis and the
        # migrations still to come).
        deadline = time.monotonic() + 120
        while not processes_in(checkout / ".devdata" / "servers"):
            assert dev.proc.poll() is None, dev.log.read_text()
            assert time.monotonic() < deadline, dev.log.read_text()
            time.sleep(0.02)
        code = dev.stop(signal.SIGTERM)
    finally:
        dev.stop(signal.SIGKILL)
    assert code == 128 + signal.SIGTERM, dev.log.read_text()
    assert dev.log.read_text().strip().splitlines()[-1] == "widget-identity: stopped by SIGTERM"
    assert "Traceback" not in dev.log.read_text()
    assert nothing_left_in(checkout), dev.log.read_text()
    assert not dev.env_file.exists()


def test_a_running_dev_is_found_by_the_cli_and_the_example_and_refuses_a_twin(
    checkout: Path,
) -> None:
    dev = Dev(checkout, free_port())
    try:
        dev.wait_serving()
        published = dict(
            line.split("=", 1) for line in dev.env_file.read_text().splitlines() if "=" in line
        )
        assert published["WIDGET_IDENTITY_URL"] == f"'http://127.0.0.1:{dev.port}'"
        log = dev.log.read_text()
        assert "DATABASE_URL=postgresql://" in log
        assert "REDIS_URL=unix://" in log

        # Operator commands with no URL in the environment use the running stack.
        created = run_cli("org", "create", "--name", "Found", cwd=checkout, env=cli_env())
        assert created.returncode == 0, created.stderr
        listed = run_cli("org", "list", cwd=checkout, env=cli_env())
        assert listed.returncode == 0, listed.stderr
        assert [org["name"] for org in json.loads(listed.stdout)["items"]] == ["Found"]

        # So does the client's event example, from a folder below the checkout.
        spec = importlib.util.spec_from_file_location("consume_events_example", EXAMPLE)
        assert spec is not None and spec.loader is not None
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        below = checkout / "some" / "folder"
        below.mkdir(parents=True)
        assert example.dev_redis_url(below) == published["REDIS_URL"].strip("'")

        # It listens on the loopback interface only (no HOST set).
        assert listening_addresses(dev.port) == ["127.0.0.1"]

        # A second `make run` in the same checkout: one line, and the first one keeps going.
        twin = run_cli("dev", "--port", str(free_port()), cwd=checkout, env=cli_env())
        assert twin.returncode == 2
        assert "is in use by another devstack" in one_line(twin.stderr)
        assert dev.proc.poll() is None
        assert dev.env_file.exists()

        code = dev.stop(signal.SIGTERM)
    finally:
        dev.stop(signal.SIGKILL)
    assert code == 0, dev.log.read_text()
    assert nothing_left_in(checkout), dev.log.read_text()
    assert not dev.env_file.exists()
    after = run_cli("org", "list", cwd=checkout, env=cli_env())
    assert after.returncode == 2
    assert "no running `make run` was found" in one_line(after.stderr)


def listening_addresses(port: int) -> list[str]:
    """IPv4 addresses with a listening TCP socket on ``port``, from /proc/net/tcp."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.append(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found
