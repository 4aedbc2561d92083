"""A closed-loop HTTP load generator, run in its own process so it does not share the
server's event loop: ``concurrency`` workers send requests back to back for ``duration``
seconds, cycling through the given request bodies. Prints one JSON line of results."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from typing import Any

import aiohttp


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    requests: list[dict[str, Any]] = spec["requests"]
    cycle = itertools.cycle(range(len(requests)))
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = 0.0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                req = requests[next(cycle)]
                started = time.perf_counter()
                async with session.request(
                    req.get("method", "POST"),
                    spec["base_url"] + req["path"],
                    data=json.dumps(req["body"]).encode() if "body" in req else None,
                    headers={"Content-Type": "application/json", **req.get("headers", {})},
                ) as resp:
                    await resp.read()
                latencies.append(time.perf_counter() - started)
                statuses[resp.status] = statuses.get(resp.status, 0) + 1

        # Warm up (connections, caches), then measure.
        deadline = time.perf_counter() + spec.get("warmup", 2.0)
        await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
        latencies.clear()
        statuses.clear()
        began = time.perf_counter()
        deadline = began + spec["duration"]
        await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
        elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0.0
        )

    return {
        "requests": len(latencies),
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
