"""``python -m bench.traced -m MODULE [ARGS...]``: run MODULE (the server) under tracemalloc,
for ``make soak`` with BENCH_TRACEMALLOC=1. Each SIGUSR2 writes the n-th heap snapshot to
``$BENCH_TRACE_DIR/heap-<n>.pickle`` and the count of gc-tracked objects per type (what
objgraph counts) to ``types-<n>.json``, written last so it marks the pair complete. The
server runs several times slower like this: use it to find what grows, not to measure."""

from __future__ import annotations

import gc
import itertools
import json
import os
import runpy
import signal
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from types import FrameType


def load_types(path: Path) -> dict[str, int]:
    types: dict[str, int] = json.loads(path.read_text())
    return types


def _dump(out: Path, n: int) -> None:
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    snap.dump(str(out / f"heap-{n}.pickle"))
    types = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
    tmp = out / f"types-{n}.json.tmp"
    tmp.write_text(json.dumps(dict(types)))
    tmp.rename(out / f"types-{n}.json")


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        raise SystemExit("usage: python -m bench.traced -m MODULE [ARGS...]")
    out = Path(os.environ["BENCH_TRACE_DIR"])
    serial = itertools.count()
    tracemalloc.start(int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "1")))

    def on_signal(signum: int, frame: FrameType | None) -> None:
        _dump(out, next(serial))

    signal.signal(signal.SIGUSR2, on_signal)
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
