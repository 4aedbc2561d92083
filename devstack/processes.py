"""Child processes: liveness, stopping, running as another user, PR_SET_PDEATHSIG."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .errors import DevStackError

Log = Callable[[str], None]

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 20.0
# Tests clear this to reproduce a platform without PR_SET_PDEATHSIG (orphaned servers).
_USE_PDEATHSIG = True


def _alive(pid: int) -> bool:
    # kill(pid, 0) also succeeds on zombies, and some container inits reap them late.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no procfs (macOS)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X", "x")


def _start_time(pid: int) -> str | None:
    # Pid plus start time identifies a process even after its pid is reused.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _runs_in(pid: int, directory: Path) -> bool:
    # Both servers chdir into their data directory: that tells our orphan from a reused pid.
    try:
        return os.readlink(f"/proc/{pid}/cwd") == os.path.realpath(directory)
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill_orphan(pid: int, sigs: tuple[signal.Signals, ...], what: str, log: Log) -> None:
    log(f"devstack: stopping {what} (pid {pid}) left running by an earlier run")
    for i, sig in enumerate(sigs):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise DevStackError(f"{what} (pid {pid}) belongs to another user; stop it") from None
        if _wait_gone(pid, _STOP_TIMEOUT if i == 0 else 5.0):
            return
    raise DevStackError(f"could not stop {what} (pid {pid}) left by an earlier run")


def _stop_child(proc: subprocess.Popen[bytes], sigs: tuple[signal.Signals, ...]) -> None:
    for i, sig in enumerate(sigs):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(_STOP_TIMEOUT if i == 0 else 5.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5.0)


@dataclasses.dataclass(frozen=True)
class _RunAs:
    """Who runs Postgres: None = ourselves; as root an unprivileged user (Postgres refuses root)."""

    uid: int | None
    gid: int | None
    name: str


def _run_as_for(owner: int | None) -> _RunAs:
    if os.geteuid() != 0:
        return _RunAs(None, None, pwd.getpwuid(os.geteuid()).pw_name)
    if owner:  # existing data keeps its owner, whoever created it
        with contextlib.suppress(KeyError):
            pw = pwd.getpwuid(owner)
            return _RunAs(pw.pw_uid, pw.pw_gid, pw.pw_name)
        return _RunAs(owner, owner, str(owner))
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return _RunAs(pw.pw_uid, pw.pw_gid, name)
    raise DevStackError("running as root, but neither a 'postgres' nor a 'nobody' user exists")


def _chown(path: Path, run_as: _RunAs) -> None:
    if run_as.uid is not None and run_as.gid is not None:
        os.chown(path, run_as.uid, run_as.gid)


def _pdeathsig_hook(sig: signal.Signals | None) -> Callable[[], None] | None:
    if sig is None or not _USE_PDEATHSIG or not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None  # the kernel would fire it when this (maybe short-lived) thread ends
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, not in the child
    parent = os.getpid()

    def hook() -> None:
        # Runs after Popen's setuid (which clears the death signal), right before exec.
        prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # parent died before the signal was armed
            os._exit(1)

    return hook


def _spawn(
    argv: list[str], run_as: _RunAs, log_file: Path | None, death_sig: signal.Signals | None
) -> subprocess.Popen[bytes]:
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
            user=run_as.uid,
            group=run_as.gid,
            extra_groups=[] if run_as.uid is not None else None,
            # Own session: a terminal's Ctrl-C reaches only us, so we decide the stop order.
            start_new_session=True,
            preexec_fn=_pdeathsig_hook(death_sig),
        )
    finally:
        if not isinstance(out, int):
            out.close()


def _run(argv: list[str], run_as: _RunAs, timeout: float = 120.0) -> tuple[int, str]:
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd="/",
            timeout=timeout,
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
            user=run_as.uid,
            group=run_as.gid,
            extra_groups=[] if run_as.uid is not None else None,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return 126, str(e)
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


def _log_tail(path: Path, proc: subprocess.Popen[bytes], lines: int = 25) -> str:
    status = "still starting" if proc.returncode is None else f"exit {proc.returncode}"
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"{status}, no log at {path}"
    # The last line (usually the FATAL one) on the first line: a one-line report keeps it.
    last = next((line for line in reversed(text) if line.strip()), "(empty)")
    return f"{status}; {path} ends with: {last}\n" + "\n".join(text[-lines:])


def _await_ready(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    *,
    what: str,
    log_file: Path,
    stop_signals: tuple[signal.Signals, ...],
) -> subprocess.Popen[bytes]:
    """Wait until ``ready()``; a server that dies or takes longer than _START_TIMEOUT is an
    error with its log's tail. Not yet on the caller's exit stack, so it is stopped here on
    failure or Ctrl-C."""
    deadline = time.monotonic() + _START_TIMEOUT
    try:
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DevStackError(f"{what} did not start; {_log_tail(log_file, proc)}")
            time.sleep(0.02)
    except BaseException:
        _stop_child(proc, stop_signals)
        raise
    return proc
