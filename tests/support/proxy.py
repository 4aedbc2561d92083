"""A small TCP fault proxy (toxiproxy-style) between a service under test and its Postgres or
Redis, so a test can cut, slow down and bring back a dependency without touching the shared
test servers.

``FaultProxy`` listens on 127.0.0.1:<free port> and forwards every connection to the upstream
(a Unix socket or host:port). ``cut()`` drops every open connection and refuses new ones until
``restore()`` (what clients see when a server restarts); ``latency(seconds)`` delays every
chunk on its way back to the client (a slow or distant server; order is kept and the delay
does not add up over a pipeline). ``url_through(url)`` rewrites a database or Redis URL to go
through the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

_CHUNK = 64 * 1024


def upstream_of(url: str) -> str | tuple[str, int]:
    """Where a Postgres or Redis URL points: a Unix socket path, or (host, port)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return unquote(parts.path)
    if parts.scheme.startswith("postgres"):
        # libpq style: the socket directory in ?host=, the port names the socket file.
        query_host = parse_qs(parts.query).get("host", [""])[0]
        host = query_host or parts.hostname or "localhost"
        port = parts.port or 5432
        if host.startswith("/"):
            return os.path.join(host, f".s.PGSQL.{port}")
        return host, port
    return parts.hostname or "localhost", parts.port or 6379


def url_through(url: str, port: int) -> str:
    """``url`` with its server replaced by 127.0.0.1:``port``, everything else kept."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        options = parse_qs(parts.query)
        db = options.pop("db", ["0"])[0]
        rest = urlencode({k: v[0] for k, v in options.items()})
        return urlunsplit(("redis", f"127.0.0.1:{port}", f"/{db}", rest, ""))
    user = f"{parts.username}@" if parts.username else ""
    if parts.password:
        user = f"{parts.username}:{parts.password}@"
    query = {k: v[0] for k, v in parse_qs(parts.query).items() if k != "host"}
    return urlunsplit(
        (parts.scheme, f"{user}127.0.0.1:{port}", parts.path, urlencode(query), parts.fragment)
    )


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream`` (a Unix socket path or (host, port))."""

    def __init__(self, upstream: str | tuple[str, int]) -> None:
        self._upstream = upstream
        self._server: asyncio.Server | None = None
        self._port = 0
        self._delay = 0.0
        # The two pumps of every open link (cancelling them ends the link), and the client
        # side of every accepted connection, linked up or still connecting upstream.
        self._pumps: set[asyncio.Task[None]] = set()
        self._clients: list[asyncio.StreamWriter] = []
        # lose_reply_to: the request that arms it, and whether its reply is to be lost.
        self._lose_after: tuple[bytes, ...] = ()
        self._losing = False

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        await self._listen()

    async def _listen(self) -> None:
        # The same port across cut/restore, so clients reconnect to the same URL.
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self._port, reuse_address=True, backlog=1024
        )
        self._port = self._server.sockets[0].getsockname()[1]

    def latency(self, seconds: float) -> None:
        """Delay each chunk the upstream sends back by ``seconds`` (0 turns it off)."""
        self._delay = seconds

    def lose_reply_to(self, *needles: bytes) -> None:
        """The next request whose bytes contain every needle reaches the server and runs, but
        its connection dies before the reply comes back (the ambiguous failure: did it run?)."""
        self._lose_after = needles

    async def cut(self) -> None:
        """Stop listening (new connections are refused) and drop every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        # A connection accepted but not yet linked up is dropped here too.
        for client in self._clients:
            client.transport.abort()
        pumps = list(self._pumps)
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)

    async def restore(self) -> None:
        if self._server is None:
            await self._listen()

    async def stop(self) -> None:
        await self.cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:  # accepted in the instant the listener closed
            writer.transport.abort()
            return
        self._clients.append(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            if isinstance(self._upstream, str):
                up_reader, upstream = await asyncio.open_unix_connection(self._upstream)
            else:
                up_reader, upstream = await asyncio.open_connection(*self._upstream)
            if self._server is None:
                return  # cut while connecting upstream
            pumps = {
                asyncio.create_task(self._pump(reader, upstream, delayed=False)),
                asyncio.create_task(self._pump(up_reader, writer, delayed=True)),
            }
            self._pumps |= pumps
            try:
                # Either side closing (or a cut) ends the link, as with a real socket pair.
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                self._pumps -= pumps
        except OSError:
            pass
        finally:
            self._clients.remove(writer)
            for side in (writer, upstream):
                if side is not None:
                    # abort(): no polite shutdown, as when a server process dies.
                    side.transport.abort()

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, delayed: bool
    ) -> None:
        if not delayed:
            while chunk := await source.read(_CHUNK):
                if self._lose_after and all(n in chunk for n in self._lose_after):
                    self._lose_after, self._losing = (), True
                sink.write(chunk)
                await sink.drain()
            return
        # Chunks wait in a queue until their due time: order is kept and a pipeline of
        # replies is delayed once, not once per reply.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not chunk:
                    return
                sink.write(chunk)
                await sink.drain()

        deliverer = asyncio.create_task(deliver())
        try:
            while True:
                chunk = await source.read(_CHUNK)
                if self._losing and chunk:
                    self._losing = False
                    return  # ends the link: both sides are aborted
                queue.put_nowait((time.monotonic() + self._delay, chunk))
                if not chunk:
                    break
            await deliverer
        finally:
            deliverer.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await deliverer


@asynccontextmanager
async def fault_proxy(url: str) -> AsyncIterator[tuple[FaultProxy, str]]:
    """A started proxy in front of the server of ``url``, and the URL that goes through it."""
    proxy = FaultProxy(upstream_of(url))
    await proxy.start()
    try:
        yield proxy, url_through(url, proxy.port)
    finally:
        await proxy.stop()
