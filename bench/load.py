"""A closed-loop HTTP load generator, run in its own process so it does not share the
server's event loop: ``concurrency`` workers send requests back to back for ``duration``
seconds, cycling through the given requests. Prints one JSON line of results.

Spec (a JSON file): ``base_url``, ``concurrency``, ``duration``, ``warmup``, ``requests``: a
list of {``path``, ``method`` (POST), ``body``, ``headers``, ``unique``}; a ``unique``
request has each ``{n}`` in its body replaced by a number never sent before, so it creates
new rows (contacts, visitors) instead of touching the same ones again.

With ``"handshake": true`` the measured window is bracketed for the parent (bench/runner.py),
which samples server CPU exactly at its edges: after the warm-up it prints ``warm`` and waits
for a line on stdin before starting the window; after the window it prints ``done`` and waits
again, before closing its connections (which costs the server CPU too).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from typing import Any

import aiohttp


def _pause(word: str) -> None:
    # Blocking on purpose: no request is in flight at a window edge.
    print(word, flush=True)
    sys.stdin.readline()


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    requests: list[dict[str, Any]] = spec["requests"]
    bodies = [json.dumps(r["body"]).encode() if "body" in r else None for r in requests]
    cycle = itertools.cycle(range(len(requests)))
    serial = itertools.count()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    deadline = 0.0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                i = next(cycle)
                req, body = requests[i], bodies[i]
                if body is not None and req.get("unique"):
                    body = body.replace(b"{n}", b"%d" % next(serial))
                started = time.perf_counter()
                try:
                    async with session.request(
                        req.get("method", "POST"),
                        spec["base_url"] + req["path"],
                        data=body,
                        headers={"Content-Type": "application/json", **req.get("headers", {})},
                    ) as resp:
                        await resp.read()
                except aiohttp.ClientError as exc:
                    # Counted, not fatal: a long soak must report a dropped connection.
                    key = type(exc).__name__
                    statuses[key] = statuses.get(key, 0) + 1
                    continue
                latencies.append(time.perf_counter() - started)
                statuses[str(resp.status)] = statuses.get(str(resp.status), 0) + 1

        # Warm up (connections, caches), then measure.
        deadline = time.perf_counter() + spec.get("warmup", 2.0)
        await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
        latencies.clear()
        statuses.clear()
        if spec.get("handshake"):
            _pause("warm")
        began = time.perf_counter()
        deadline = began + spec["duration"]
        await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
        elapsed = time.perf_counter() - began
        if spec.get("handshake"):
            _pause("done")
    latencies.sort()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0.0
        )

    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "statuses": statuses,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec", help="JSON file: base_url, concurrency, duration, warmup, requests")
    args = parser.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    import uvloop

    print(json.dumps(uvloop.run(run(spec))))


if __name__ == "__main__":
    main()
