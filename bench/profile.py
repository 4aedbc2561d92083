"""``make bench`` with ``--profile``: where the all-in-one server's time goes under one path's
load, sampled with py-spy (installed from PyPI: ``.venv/bin/pip install py-spy``) while wrk or
the Python generator drives the path. Writes a small text summary under bench/results/ (the
functions with the most samples, inclusive and own), not the raw stacks."""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.provision import ORIGIN
from bench.runner import run_load
from bench.wrk import available, run_wrk

RESULTS = Path(__file__).resolve().parent / "results"
TOP = 30


def summarize(raw: str, title: str) -> str:
    """Top frames by inclusive and own samples from py-spy's collapsed stacks."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    out = [f"{title}: {total} samples", "", "inclusive (the function and what it called):"]
    out += [f"  {n * 100 / total:5.1f}%  {f}" for f, n in inclusive.most_common(TOP)]
    out += ["", "own (the function itself):"]
    out += [f"  {n * 100 / total:5.1f}%  {f}" for f, n in own.most_common(TOP)]
    return "\n".join(out) + "\n"


def _py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


async def profile_server(
    pid: int, base: str, data: dict[str, Any], workdir: Path, args: argparse.Namespace
) -> list[str]:
    spy = _py_spy()
    if spy is None:
        return ["  (--profile: py-spy is not installed; .venv/bin/pip install py-spy)"]
    paths = {
        "new-visitor": [
            {
                "path": "/widget/sessions",
                "body": {"widgetToken": data["widget"]},
                "headers": {"Origin": ORIGIN},
            }
        ],
        "returning-visitor": [
            {"path": "/widget/sessions", "body": b, "headers": {"Origin": ORIGIN}}
            for b in data["anonymous"]
        ],
    }
    RESULTS.mkdir(exist_ok=True)
    lines = []
    for name, requests in paths.items():
        raw = workdir / f"profile-{name}.txt"
        seconds = max(5, int(args.duration))
        spy_proc = await asyncio.create_subprocess_exec(
            spy,
            "record",
            "-p",
            str(pid),
            "-d",
            str(seconds),
            "-r",
            "100",
            "--format",
            "raw",
            "--nonblocking",
            "--subprocesses",
            "-o",
            str(raw),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        spec = {
            "base_url": base,
            "concurrency": args.concurrency,
            "duration": seconds,
            "warmup": 0,
            "requests": requests,
        }
        if available() and not args.python_load:
            await run_wrk(spec, workdir, {"server": pid})
        else:
            await run_load(spec, workdir, {"server": pid})
        await spy_proc.wait()
        if not raw.exists():
            lines.append(f"  (--profile: py-spy wrote nothing for {name}; ptrace not permitted?)")
            continue
        out = RESULTS / f"profile-{name}.txt"
        out.write_text(
            summarize(raw.read_text(), f"all-in-one server under POST /widget/sessions ({name})")
        )
        lines.append(f"  profile of {name}: {out.relative_to(RESULTS.parent.parent)}")
    return lines
