"""The load generator when ``wrk`` is installed (Debian package ``wrk``): C, event-driven, a few
µs of CPU per request, so the two cores go to the server and not to the measuring. The same
spec as bench/load.py (``base_url``, ``concurrency``, ``duration``, ``warmup``, ``requests``)
becomes a Lua script that cycles through the requests; each wrk thread starts at its own
offset and steps by the thread count, so requests meant to be sent once (a login per
visitor) are not sent twice while the list lasts.

The warm-up is a separate wrk run on the first part of the requests; the measured run
starts where the warm-up's share ends (``warm_share``), so one-shot requests stay unused.
CPU per process tree is sampled right before the measured wrk starts and right after it
exits; wrk's own CPU comes from its rusage.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.procstat import cpu_sample
from bench.runner import Window

THREADS = 2

_LUA = """
local requests = {%(requests)s}
local n = #requests
local counter = 0
local threads = {}

function setup(thread)
    thread:set("offset", #threads)
    thread:set("step", %(threads)d)
    table.insert(threads, thread)
end

function init(args)
    counter = offset
end

function request()
    local r = requests[(counter %% n) + 1]
    counter = counter + step
    return wrk.format(r[1], r[2], r[3], r[4])
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        '{"requests": %%d, "micros": %%d, "p50_us": %%d, "p99_us": %%d, "non2xx": %%d, '
        .. '"socket_errors": %%d}\\n',
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
        e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def _lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid Lua string literal here


def script(requests: list[dict[str, Any]]) -> str:
    rows = []
    for r in requests:
        headers = {"Content-Type": "application/json", **r.get("headers", {})}
        body = json.dumps(r["body"]) if "body" in r else None
        lua_headers = (
            "{"
            + ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items())
            + "}"
        )
        rows.append(
            "{"
            + ", ".join(
                [
                    _lua_string(r.get("method", "POST")),
                    _lua_string(r["path"]),
                    lua_headers,
                    "nil" if body is None else _lua_string(body),
                ]
            )
            + "}"
        )
    return _LUA % {"requests": ",\n".join(rows), "threads": THREADS}


def _spawn(argv: list[str], out: Path) -> subprocess.Popen[bytes]:
    with open(out, "wb") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)


async def _wrk(
    spec: dict[str, Any], requests: list[dict[str, Any]], seconds: float, workdir: Path, name: str
) -> tuple[dict[str, Any], float, subprocess.Popen[bytes], Path]:
    lua = workdir / f"{name}.lua"
    lua.write_text(script(requests))
    out = workdir / f"{name}.out"
    argv = ["wrk", f"-t{THREADS}", f"-c{spec['concurrency']}", f"-d{max(1, round(seconds))}s"]
    proc = _spawn([*argv, "--timeout", "10s", "-s", str(lua), spec["base_url"]], out)
    _pid, status, usage = await asyncio.to_thread(os.wait4, proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = out.read_text()
    if proc.returncode != 0 or not text.strip():
        raise SystemExit(f"wrk failed ({proc.returncode}); see {out}:\n{text[-2000:]}")
    result: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
    return result, usage.ru_utime + usage.ru_stime, proc, out


async def run_wrk(spec: dict[str, Any], workdir: Path, measured: Mapping[str, int]) -> Window:
    """The bench/runner.py ``run_load`` contract, with wrk."""
    requests: list[dict[str, Any]] = spec["requests"]
    share = spec.get("warm_share", 0.0)
    cut = int(len(requests) * share)
    warm, main = (requests[:cut], requests[cut:]) if cut else (requests, requests)
    tag = f"wrk-{time.monotonic_ns()}"
    if spec.get("warmup", 0) > 0:
        await _wrk(spec, warm, spec["warmup"], workdir, tag + "-warm")
    began, before = time.monotonic(), cpu_sample(measured)
    result, load_cpu, _proc, _out = await _wrk(spec, main, spec["duration"], workdir, tag)
    ended, after = time.monotonic(), cpu_sample(measured)
    seconds = result["micros"] / 1e6
    cpu = {k: after[k] - before[k] for k in measured} | {"load": load_cpu}
    statuses = {"2xx": result["requests"] - result["non2xx"]}
    if result["non2xx"]:
        statuses["non-2xx"] = result["non2xx"]
    if result["socket_errors"]:
        statuses["socket errors"] = result["socket_errors"]
    return Window(
        {
            "requests": result["requests"],
            "seconds": seconds,
            "rps": result["requests"] / seconds,
            "p50_ms": result["p50_us"] / 1000,
            "p99_ms": result["p99_us"] / 1000,
            "statuses": statuses,
            "generator": "wrk",
        },
        ended - began,
        cpu,
    )
