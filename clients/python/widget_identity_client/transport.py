"""One HTTP exchange per operation: encode, send, retry when safe, decode or raise.

Every client class is a thin layer of typed methods over ``Transport.call``; the method,
path and success type of each call come from the generated ``operations`` table, so none of
them is written twice.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import Mapping
from types import NoneType, TracebackType
from typing import Any, Self, TypeVar, cast
from urllib.parse import quote

import aiohttp
import msgspec

from widget_identity_client.errors import (
    TransportError,
    UnexpectedResponse,
    WidgetIdentityError,
    problem_error,
)
from widget_identity_client.models import Model
from widget_identity_client.operations import Operation
from widget_identity_client.retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy, is_idempotent

log = logging.getLogger("widget_identity_client")

R = TypeVar("R")
QueryValue = str | int | None

DEFAULT_TIMEOUT = 10.0
# Failures that mean "no (complete) answer": the request may or may not have arrived.
_NO_ANSWER = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)
_encoder = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def _version() -> str:
    try:
        return importlib.metadata.version("widget-identity-client")
    except importlib.metadata.PackageNotFoundError:
        return "0"


USER_AGENT = f"widget-identity-client/{_version()} (python)"


def _decoder(tp: type[R]) -> msgspec.json.Decoder[R]:
    decoder = _decoders.get(tp)
    if decoder is None:
        decoder = _decoders[tp] = msgspec.json.Decoder(tp)
    return cast(msgspec.json.Decoder[R], decoder)


class Transport:
    """Sends operations to one server with one bearer credential (or none)."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        session: aiohttp.ClientSession | None,
        timeout: float,
        retry: RetryPolicy,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._headers = {"Accept": "application/json", "User-Agent": USER_AGENT, **(headers or {})}
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.retry = retry

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if not self._owns_session:
                raise RuntimeError("the aiohttp session given to the client is closed")
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        """Close the aiohttp session if the client created it (a given one is the caller's)."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def call(
        self,
        operation: Operation[R],
        *,
        path: Mapping[str, str] | None = None,
        query: Mapping[str, QueryValue] | None = None,
        body: Model | None = None,
        token: str | None = None,
    ) -> R:
        """Perform ``operation``; retried per the policy only when it is idempotent."""
        url = self.base_url + operation.path.format_map(
            {name: quote(value, safe="") for name, value in (path or {}).items()}
        )
        params = {k: str(v) for k, v in (query or {}).items() if v is not None}
        headers = dict(self._headers)
        bearer = token if token is not None else self._token
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        data = None
        if body is not None:
            data = _encoder.encode(body)
            headers["Content-Type"] = "application/json"
        policy = self.retry if is_idempotent(operation) else NO_RETRY
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._once(operation, url, params, headers, data)
            except (TransportError, WidgetIdentityError) as error:
                delay = policy.delay(attempt, error)
                if delay is None:
                    raise
                log.info(
                    "%s %s: %s; try %d of %d in %.2f s",
                    operation.method,
                    operation.path,
                    error,
                    attempt + 1,
                    policy.attempts,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _once(
        self,
        operation: Operation[R],
        url: str,
        params: dict[str, str],
        headers: dict[str, str],
        data: bytes | None,
    ) -> R:
        session = self._client_session()
        try:
            async with session.request(
                operation.method,
                url,
                params=params,
                headers=headers,
                data=data,
                timeout=self._timeout,
                # The API never redirects; following one could resend a POST or the token.
                allow_redirects=False,
            ) as response:
                raw = await response.read()
                status, reason, response_headers = (
                    response.status,
                    response.reason,
                    response.headers,
                )
        except _NO_ANSWER as exc:
            raise TransportError(f"{operation.method} {url}: {type(exc).__name__}: {exc}") from exc
        if status >= 400:
            raise problem_error(status, reason or "", response_headers, raw)
        if not 200 <= status < 300:
            raise UnexpectedResponse(status, f"{operation.id} answered {status}", raw)
        return _decode(operation, status, raw)


def _decode(operation: Operation[R], status: int, raw: bytes) -> R:
    if operation.response is NoneType:
        return cast(R, None)
    try:
        return _decoder(operation.response).decode(raw)
    except msgspec.MsgspecError as exc:
        raise UnexpectedResponse(status, f"{operation.id}: {exc}", raw) from exc


class BaseClient:
    """What every client shares: a transport and the async context manager.

    ``session``: an aiohttp session to use (the caller keeps and closes it); without one the
    client opens its own and closes it on exit or ``close()``. ``timeout``: seconds per try.
    ``retry``: the policy for idempotent calls (``NO_RETRY`` to turn retries off).
    ``headers``: sent with every request (e.g. a tracing header).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._transport = Transport(
            base_url, token, session=session, timeout=timeout, retry=retry, headers=headers
        )

    @property
    def base_url(self) -> str:
        return self._transport.base_url

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
