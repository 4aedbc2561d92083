"""Promises of devstack: private servers that start on any machine and always stop."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import asyncpg
import pytest
import redis

from devstack import DevStackError, dev_servers, processes

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _sql(url: str, *queries: str) -> list[object]:
    async def run() -> list[object]:
        conn = await asyncpg.connect(url)
        try:
            return [await conn.fetchval(q) for q in queries]
        finally:
            await conn.close()

    # A private loop, not asyncio.run(): that would clear the thread's current loop under
    # pytest-asyncio's session-scoped one.
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()


def _postmaster_pid(pgdata: pathlib.Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def _eventually_dead(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while processes._alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not processes._alive(pid)


@pytest.fixture
def data_dir() -> Iterator[pathlib.Path]:
    # Not tmp_path: as root that sits in a 0700 dir the postgres user cannot pass through,
    # which is the fallback case, tested on its own below.
    parent = pathlib.Path(tempfile.mkdtemp(prefix="wi-devtest-", dir="/tmp"))
    parent.chmod(0o755)
    yield parent / "data"
    shutil.rmtree(parent, ignore_errors=True)


def test_throwaway_servers_listen_only_on_unix_sockets_and_vanish_on_exit() -> None:
    with dev_servers(None, log=lambda _: None) as servers:
        sockdir = pathlib.Path(servers.database_url.partition("?host=")[2])
        assert str(sockdir).startswith("/tmp/wi-")
        assert servers.redis_url == f"unix://{sockdir}/redis.sock"
        assert _sql(
            servers.database_url,
            "select current_user",
            "show listen_addresses",
            "show fsync",
            "show max_connections",
        ) == ["postgres", "", "off", "200"]
        with redis.Redis.from_url(servers.redis_url) as r:
            assert r.config_get("port") == {"port": "0"}
            r.xadd("s", {"k": "v"})
            r.xgroup_create("s", "g", id="0")
            r.xreadgroup("g", "dead-consumer", {"s": ">"})
            assert len(r.xautoclaim("s", "g", "live-consumer", min_idle_time=0)[1]) == 1
        pg_pid = _postmaster_pid(sockdir / "pg")
    assert not sockdir.exists()
    assert not processes._alive(pg_pid)


def test_persistent_data_survives_a_restart(data_dir: pathlib.Path) -> None:
    with dev_servers(data_dir, log=lambda _: None) as servers:
        _sql(servers.database_url, "create table kept (v text)", "insert into kept values ('pg')")
        with redis.Redis.from_url(servers.redis_url) as r:
            r.set("kept", "redis")
    assert (data_dir / "redis").is_dir()
    with dev_servers(data_dir, log=lambda _: None) as servers:
        assert _sql(servers.database_url, "select v from kept", "show fsync") == ["pg", "on"]
        with redis.Redis.from_url(servers.redis_url) as r:
            assert r.get("kept") == b"redis"


def test_one_data_dir_serves_one_devstack_at_a_time(data_dir: pathlib.Path) -> None:
    with (
        dev_servers(data_dir, log=lambda _: None),
        pytest.raises(DevStackError, match="in use by another devstack"),
        dev_servers(data_dir, log=lambda _: None),
    ):
        pass


def test_missing_binaries_give_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_BINDIR", "/nonexistent/bin")
    with pytest.raises(DevStackError, match="PG_BINDIR"), dev_servers(None, log=lambda _: None):
        pass


@pytest.mark.slow
@pytest.mark.parametrize("pdeathsig", [True, False], ids=["servers-follow-parent", "orphaned"])
def test_a_sigkilled_run_does_not_block_the_next_start(
    data_dir: pathlib.Path, pdeathsig: bool
) -> None:
    # False stands for a platform without PR_SET_PDEATHSIG: the servers outlive the kill.
    code = (
        "import sys; import devstack; from devstack import processes; "
        f"processes._USE_PDEATHSIG = {pdeathsig}; "
        f"sys.argv[1:] = ['--data-dir', {str(data_dir)!r}]; devstack.main()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        pytest.fail(f"devstack did not start: {proc.stderr.read()}")
    urls = json.loads(line)
    _sql(urls["database_url"], "create table kept (v text)", "insert into kept values ('pg')")
    with redis.Redis.from_url(urls["redis_url"]) as r:
        r.set("kept", "redis")
    pg_pid = _postmaster_pid(data_dir / "postgres")
    old_sockdir = pathlib.Path(urls["database_url"].partition("?host=")[2])

    proc.kill()
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    if pdeathsig:
        assert _eventually_dead(pg_pid), "Postgres outlived its parent"
    else:
        assert processes._alive(pg_pid)

    logs: list[str] = []
    with dev_servers(data_dir, log=logs.append) as servers:
        assert not processes._alive(pg_pid)
        assert not old_sockdir.exists()
        assert _sql(servers.database_url, "select v from kept") == ["pg"]
        with redis.Redis.from_url(servers.redis_url) as r:
            assert r.get("kept") == b"redis"
    assert pdeathsig or any("left running by an earlier run" in m for m in logs), logs


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands Postgres to another user")
def test_as_root_an_unreachable_data_dir_moves_postgres_to_a_stable_place(
    data_dir: pathlib.Path,
) -> None:
    data_dir.parent.chmod(0o700)  # like a checkout under /root
    logs: list[str] = []
    fallback: pathlib.Path | None = None
    try:
        for _ in range(2):
            with dev_servers(data_dir, log=logs.append) as servers:
                moved = [m for m in logs if "keeping its Postgres data in" in m]
                assert moved, logs
                fallback = pathlib.Path(moved[-1].split(" in ")[-1].split()[0])
                assert str(fallback).startswith("/var/tmp/wi-devstack-")
                _sql(
                    servers.database_url,
                    "create table if not exists kept (v int)",
                    "insert into kept values (1)",
                )
                count = _sql(servers.database_url, "select count(*) from kept")[0]
        assert count == 2  # the second run found the first run's data
    finally:
        if fallback is not None:
            shutil.rmtree(fallback.parent, ignore_errors=True)


def test_a_server_that_dies_while_starting_is_an_error_with_its_log(tmp_path: pathlib.Path) -> None:
    log_file = tmp_path / "server.log"
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(["sh", "-c", "echo 'FATAL: bad setting'; exit 3"], stdout=out)
    with pytest.raises(DevStackError, match=r"(?s)Fake did not start; exit 3.*FATAL: bad setting"):
        processes._await_ready(
            proc, lambda: False, what="Fake", log_file=log_file, stop_signals=(signal.SIGTERM,)
        )
