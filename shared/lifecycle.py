"""Process lifecycle: background workers tied to an app, and serving with a graceful SIGTERM.

On SIGTERM (Kubernetes) or SIGINT (Ctrl-C) a process turns unready at once (/readyz 503, and
every response says ``Connection: close`` so keep-alive clients reconnect elsewhere), keeps
serving for DRAIN_DELAY while load balancers notice, then closes its listener, lets in-flight
requests and event batches finish, leaves un-acked messages pending for another replica,
closes its pools and exits 0. All of that within SHUTDOWN_TIMEOUT, counted from the signal:
each step gets what the earlier ones left, a worker that ignores its stop is cancelled, and
past the budget the process exits anyway.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from shared.config import SETTINGS, Settings

log = logging.getLogger(__name__)


@dataclass
class Readiness:
    """What /readyz reports: draining after SIGTERM, else every dependency's ping. A failed
    check named in ``degradable`` leaves the process ready, in a degraded mode (the process
    can still serve without that dependency); any other failed check makes it unready."""

    draining: bool = False
    checks: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    degradable: set[str] = field(default_factory=set)


READINESS: web.AppKey[Readiness] = web.AppKey("readiness", Readiness)
SERVICE_NAME: web.AppKey[str] = web.AppKey("service_name", str)


@dataclass
class Shutdown:
    """The one shutdown of a process: ``stop`` tells every worker at once, ``deadline``
    (monotonic) is when SHUTDOWN_TIMEOUT runs out, counted from the signal."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    deadline: float | None = None

    def left(self, default: float, *, keep: float = 0.0) -> float:
        """Seconds until the deadline minus ``keep`` (for the steps after this one), or
        ``default`` when no signal started the shutdown (an app run by a test)."""
        if self.deadline is None:
            return default
        return max(0.0, self.deadline - time.monotonic() - keep)


SHUTDOWN: web.AppKey[Shutdown] = web.AppKey("shutdown", Shutdown)
# What the steps after the workers need (closing pools and clients), kept out of the workers'
# share of the budget.
_CLOSE_RESERVE = 1.0


def shutdown_of(app: web.Application) -> Shutdown:
    if SHUTDOWN not in app:
        app[SHUTDOWN] = Shutdown()
    return app[SHUTDOWN]


Worker = Callable[[asyncio.Event], Awaitable[None]]
WorkerFactory = Callable[[web.Application], Worker]


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep, waking early on stop; True when stopping."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


def add_worker(app: web.Application, name: str, factory: WorkerFactory) -> None:
    """Run ``factory(app)(stop)`` for the app's lifetime; on cleanup set ``stop`` and wait for
    the worker to finish what it holds, cancelling it only past the shutdown deadline."""

    shutdown = shutdown_of(app)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        # One stop for every worker: the serve loop sets it when the listener closes, so they
        # all finish in parallel with the in-flight requests, not one after another here.
        stop = shutdown.stop
        worker = factory(app)
        task = asyncio.create_task(_supervise(name, worker, stop), name=name)
        yield
        stop.set()
        timeout = shutdown.left(app[SETTINGS].shutdown_timeout, keep=_CLOSE_RESERVE)
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=timeout)
        except TimeoutError:
            log.warning("worker did not stop in time; cancelling", extra={"worker": name})
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    app.cleanup_ctx.append(ctx)


async def _supervise(name: str, worker: Worker, stop: asyncio.Event) -> None:
    # A worker that crashes on a bug is restarted after a pause instead of silently dying
    # while the HTTP side keeps reporting ready.
    while not stop.is_set():
        try:
            await worker(stop)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("worker crashed; restarting", extra={"worker": name})
            await sleep_or_stop(stop, 2.0)


def serve(
    app: web.Application, settings: Settings, *, host: str | None = None, port: int | None = None
) -> None:
    """Run the app until SIGTERM/SIGINT, then drain gracefully and return (exit code 0)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    asyncio.run(
        _serve(app, settings, host or settings.host, settings.port if port is None else port)
    )


async def _serve(app: web.Application, settings: Settings, host: str, port: int) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    shutdown = shutdown_of(app)
    # Imported here: the web layer imports this module for READINESS.
    from shared.web.server import AppRunner

    # aiohttp waits this long for in-flight handlers once the listener is closed: what is
    # left of the budget after the drain delay, less what closing needs.
    in_flight = max(0.1, settings.shutdown_timeout - settings.drain_delay - _CLOSE_RESERVE)
    runner = AppRunner(app, handle_signals=False, shutdown_timeout=in_flight, access_log=None)
    await runner.setup()
    try:
        # Inside the try: a port that cannot be bound still stops the workers setup started.
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        log.info("listening", extra={"host": host, "port": port})
        await stopping.wait()
        shutdown.deadline = time.monotonic() + settings.shutdown_timeout
        log.info("shutting down: draining in-flight work")
        # /readyz answers 503 and responses carry Connection: close from now on (http.py).
        app[READINESS].draining = True
        # Keep serving while load balancers notice /readyz is 503 (Kubernetes also sleeps in
        # preStop); then stop listening and wait for in-flight handlers.
        if settings.drain_delay:
            await asyncio.sleep(settings.drain_delay)
    finally:
        shutdown.stop.set()
        try:
            # Past the budget the process exits anyway: the orchestrator's SIGKILL would
            # come soon after, and a stuck cleanup must not take the exit code with it.
            await asyncio.wait_for(
                runner.cleanup(), timeout=shutdown.left(settings.shutdown_timeout)
            )
        except TimeoutError:
            log.warning("shutdown budget spent; exiting with work abandoned")
        log.info("stopped")
