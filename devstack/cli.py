"""`python -m devstack`: run the servers in the foreground for `make run`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from pathlib import Path

from .errors import DevStackError
from .servers import dev_servers


def main() -> None:
    """`python -m devstack [--data-dir DIR]`: print the URLs as JSON, run until signalled."""
    # The package docstring is the help text; imported here because the package imports us.
    import devstack

    parser = argparse.ArgumentParser(
        prog="python -m devstack",
        description=devstack.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="keep data here between runs (default: throwaway servers)",
    )
    args = parser.parse_args()

    def to_stderr(msg: str) -> None:  # stdout carries only the JSON line
        print(msg, file=sys.stderr, flush=True)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM during startup: unwind and clean up like Ctrl-C

    signal.signal(signal.SIGTERM, interrupt)
    # Started in the background by a non-interactive shell, SIGINT arrives ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with dev_servers(args.data_dir, log=to_stderr) as servers:
            print(json.dumps(dataclasses.asdict(servers)), flush=True)
            # Blocked + sigwait: no race between checking a flag and sleeping. The servers
            # were spawned before this, so they don't inherit the blocked mask.
            stop = {signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, stop)
            to_stderr(f"devstack: stopping on {signal.Signals(signal.sigwait(stop)).name}")
    except DevStackError as e:
        to_stderr(f"devstack: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
