"""Process lifecycle: background workers tied to an app, and serving with a graceful SIGTERM.

On SIGTERM (Kubernetes) or SIGINT (Ctrl-C) a process stops taking work at once (/readyz
turns 503), lets in-flight requests and event batches finish within SHUTDOWN_TIMEOUT, leaves
un-acked messages pending for another replica, closes its pools and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from shared.config import SETTINGS, Settings

log = logging.getLogger(__name__)


@dataclass
class Readiness:
    """What /readyz reports: draining after SIGTERM, else every dependency's ping."""

    draining: bool = False
    checks: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)


READINESS: web.AppKey[Readiness] = web.AppKey("readiness", Readiness)
SERVICE_NAME: web.AppKey[str] = web.AppKey("service_name", str)

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

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        worker = factory(app)
        task = asyncio.create_task(_supervise(name, worker, stop), name=name)
        yield
        stop.set()
        timeout = app[SETTINGS].shutdown_timeout
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
    # Imported here: the web layer imports this module for READINESS.
    from shared.web.server import AppRunner

    runner = AppRunner(
        app, handle_signals=False, shutdown_timeout=settings.shutdown_timeout, access_log=None
    )
    await runner.setup()
    try:
        # Inside the try: a port that cannot be bound still stops the workers setup started.
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        log.info("listening", extra={"host": host, "port": port})
        await stopping.wait()
        log.info("shutting down: draining in-flight work")
        app[READINESS].draining = True
        # Keep serving while load balancers notice /readyz is 503 (Kubernetes also sleeps in
        # preStop); then stop listening and wait for in-flight handlers.
        if settings.drain_delay:
            await asyncio.sleep(settings.drain_delay)
    finally:
        await runner.cleanup()
        log.info("stopped")
