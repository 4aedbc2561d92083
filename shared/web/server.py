"""The HTTP server around an app: even what aiohttp answers by itself is problem+json.

aiohttp rejects a request it cannot parse (a request or header line over 8190 bytes, an
invalid header name, a bad method, broken chunked encoding, too many headers) in its protocol
handler, before any middleware runs, with a ``text/plain`` 400 that quotes the offending bytes
back and a ``Server: Python/x aiohttp/y`` header. A client gets no stable ``code``, and an
attacker learns our versions and gets a reflection of their own input. ``AppRunner`` answers
those with a fixed problem+json body instead, and every response, app or protocol, names the
server ``SERVER_NAME`` only.

aiohttp (3.14) has no public hook for this: the answer is built by
``RequestHandler.handle_error``, which the ``web.Server`` connection factory instantiates.
``AppRunner`` keeps aiohttp's server and only makes it build our handler subclass;
tests/test_hardening.py speaks raw HTTP to a real server to catch an aiohttp upgrade that
changes this.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from shared.errors import Problem
from shared.web.http import SERVER_NAME, problem_response


def protocol_problem(status: int, exc: BaseException | None) -> Problem:
    """The answer to a request aiohttp could not parse (400) or whose handling failed outside
    every middleware (500). The detail is fixed per kind: nothing of the request is echoed."""
    if status >= 500:
        return Problem(500, "internal_error", "an internal error occurred")
    if isinstance(exc, LineTooLong):
        # aiohttp does not say whether the request line or a header was too long, so 414 or
        # 431 could each be wrong; 400 never is.
        return Problem(400, "line_too_long", "the request line or a header line exceeds 8190 bytes")
    return Problem(400, "malformed_request", "the request is not valid HTTP/1.1")


class _ProblemRequestHandler(RequestHandler):
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own version logs the error (shared.observability.MalformedRequestFilter
        # shortens the malformed-request case) and refuses when a response already started.
        super().handle_error(request, status, exc, message)
        response = problem_response(protocol_problem(status, exc))
        response.headers["Server"] = SERVER_NAME  # no app here to run the prepare hook
        response.force_close()
        return response


class _ProblemServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer protocol errors as problem+json."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The app's own server (its request factory, handler_args, access log), with only
        # the per-connection handler class changed; web.Server adds no state of its own here.
        server.__class__ = _ProblemServer
        return server
