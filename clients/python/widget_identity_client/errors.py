"""Every failure the client raises, one class per stable problem ``code``.

The server answers every error with RFC 9457 ``application/problem+json`` carrying a stable
machine-readable ``code``; ``problem_error`` turns that into the class registered for the code
and, for a code this version does not know (a newer server) or a body that is not a problem at
all (a proxy's HTML page), into the class registered for the HTTP status. So ``except
NotFound`` works whatever produced the 404, and ``except WidgetIdentityError`` catches them all.

Classes by status, with the codes that refine them::

    400 BadRequest            MalformedJson
    401 Unauthorized          InvalidApiKey, InvalidAdminToken, InvalidWidgetToken,
                              InvalidSessionToken, TokenInvalid, TokenExpired, TokenRevoked
    403 Forbidden             InsufficientScope, OrgMismatch, ExternalIdMismatch,
                              ExternalIdUnsigned, OriginNotAllowed, ScopeMismatch
    404 NotFound
    409 Conflict              IdentityConflict, NoSigningKey, LastSigningKey, MergeNotUndoable,
                              WidgetTokenRevoked
    413 PayloadTooLarge
    415 UnsupportedMediaType
    422 ValidationFailed      (``errors``: the invalid fields, when the server names them)
    429 RateLimited           (``retry_after``)
    500 ServerError           InternalError
    502/503/504 ServiceUnavailable (``db_unavailable``, ``redis_unavailable``, ``db_busy``,
                              ``deadline_exceeded``; ``retry_after``)
    401 or 409 SessionEnded   (401 on a widget session token, 409 when recording history)
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import msgspec

from widget_identity_client.models import FieldError


class ClientError(Exception):
    """Root of every exception this package raises on purpose."""


class TransportError(ClientError):
    """No HTTP answer: the connection failed, broke or timed out (after any retries). The
    underlying aiohttp or timeout exception is ``__cause__``."""


class UnexpectedResponse(ClientError):
    """A success response whose body does not match the contract (a server of another
    version, or something else answering at the base URL)."""

    def __init__(self, status: int, message: str, body: bytes) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.body = body


class WidgetIdentityError(ClientError):
    """The server (or something in front of it) answered with an error status.

    ``code`` is the problem's stable code, or None when the body was not a problem (then
    ``title`` is the HTTP reason and ``detail`` the start of the body). ``problem`` is the
    whole problem document (``{}`` when there was none); ``retry_after`` is the
    ``Retry-After`` header in seconds, when the answer had one.
    """

    _by_code: ClassVar[dict[str, type[WidgetIdentityError]]] = {}
    _by_status: ClassVar[dict[int, type[WidgetIdentityError]]] = {}

    def __init_subclass__(
        cls, *, codes: tuple[str, ...] = (), statuses: tuple[int, ...] = (), **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        for code in codes:
            WidgetIdentityError._by_code[code] = cls
        for status in statuses:
            WidgetIdentityError._by_status[status] = cls

    def __init__(
        self,
        status: int,
        code: str | None,
        title: str,
        detail: str,
        problem: Mapping[str, Any],
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code or title}: {detail}")
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.problem = dict(problem)
        self.retry_after = retry_after

    @staticmethod
    def known_codes() -> frozenset[str]:
        """The problem codes that have a class of their own."""
        return frozenset(WidgetIdentityError._by_code)

    @staticmethod
    def class_for(status: int, code: str | None) -> type[WidgetIdentityError]:
        """The class for ``code``, else for ``status``, else the root (or ``ServerError``)."""
        by_code = WidgetIdentityError._by_code.get(code) if code is not None else None
        if by_code is not None:
            return by_code
        by_status = WidgetIdentityError._by_status.get(status)
        if by_status is not None:
            return by_status
        return ServerError if status >= 500 else WidgetIdentityError


# --- by status -------------------------------------------------------------------------------


class BadRequest(WidgetIdentityError, statuses=(400,)):
    """400: the request could not be read (e.g. a header longer than the server accepts)."""


class Unauthorized(WidgetIdentityError, statuses=(401,)):
    """401: the credential (API key, admin token, session token or contact token) failed."""


class Forbidden(WidgetIdentityError, statuses=(403,)):
    """403: authenticated, but not allowed to do this."""


class NotFound(WidgetIdentityError, codes=("not_found",), statuses=(404,)):
    """404 ``not_found``: no such resource in the caller's org (another org's reads the same)."""


class Conflict(WidgetIdentityError, statuses=(409,)):
    """409: conflicts with the resource's current state."""


class PayloadTooLarge(WidgetIdentityError, codes=("payload_too_large",), statuses=(413,)):
    """413 ``payload_too_large``: the body exceeds the server's limit."""


class UnsupportedMediaType(WidgetIdentityError, codes=("unsupported_media_type",), statuses=(415,)):
    """415 ``unsupported_media_type``."""


class ValidationFailed(WidgetIdentityError, codes=("validation_failed",), statuses=(422,)):
    """422 ``validation_failed``: well-formed but invalid input; nothing was changed.
    ``errors`` lists the invalid fields when the server names them (else it is empty)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            self.errors = msgspec.convert(self.problem.get("errors", []), list[FieldError])
        except msgspec.ValidationError:
            self.errors = []


class RateLimited(WidgetIdentityError, codes=("rate_limited",), statuses=(429,)):
    """429 ``rate_limited``: wait ``retry_after`` seconds before trying again."""


class ServerError(WidgetIdentityError, statuses=(500,)):
    """5xx: the server failed; the request may or may not have taken effect."""


class ServiceUnavailable(
    ServerError,
    codes=("db_unavailable", "redis_unavailable", "db_busy", "deadline_exceeded"),
    statuses=(502, 503, 504),
):
    """502/503/504: a backend (Postgres, Redis) or the server itself is unreachable or busy
    for now; ``retry_after`` says when to try again, if the answer said."""


# --- by code ---------------------------------------------------------------------------------


class MalformedJson(BadRequest, codes=("malformed_json",)):
    """400 ``malformed_json``: the body is not JSON."""


class LineTooLong(BadRequest, codes=("line_too_long",)):
    """400 ``line_too_long``: the request line or a header is longer than the server reads."""


class MalformedRequest(BadRequest, codes=("malformed_request",)):
    """400 ``malformed_request``: the request is not valid HTTP/1.1."""


class InvalidApiKey(Unauthorized, codes=("invalid_api_key",)):
    """401 ``invalid_api_key``: missing, malformed, unknown, revoked or expired."""


class InvalidAdminToken(Unauthorized, codes=("invalid_admin_token",)):
    """401 ``invalid_admin_token``: missing or wrong (or the admin API is closed)."""


class InvalidWidgetToken(Unauthorized, codes=("invalid_widget_token",)):
    """401 ``invalid_widget_token``: unknown or revoked."""


class InvalidSessionToken(Unauthorized, codes=("invalid_session_token",)):
    """401 ``invalid_session_token``: missing, unknown or another session's."""


class TokenInvalid(Unauthorized, codes=("token_invalid",)):
    """401 ``token_invalid``: the contact token is malformed, badly signed or not for us."""


class TokenExpired(Unauthorized, codes=("token_expired",)):
    """401 ``token_expired``: the contact token has expired."""


class TokenLifetimeExceeded(Unauthorized, codes=("token_lifetime_exceeded",)):
    """401 ``token_lifetime_exceeded``: the contact token expires further ahead than the org's
    ``maxTokenLifetime`` allows."""


class TokenRevoked(Unauthorized, codes=("token_revoked",)):
    """401 ``token_revoked``: the contact's tokens were revoked ("log out everywhere")."""


class InsufficientScope(Forbidden, codes=("insufficient_scope",)):
    """403 ``insufficient_scope``: the API key lacks ``scope``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        scope = self.problem.get("scope")
        self.scope: str | None = scope if isinstance(scope, str) else None


class OrgMismatch(Forbidden, codes=("org_mismatch",)):
    """403 ``org_mismatch``: the contact token belongs to another org."""


class ExternalIdMismatch(Forbidden, codes=("external_id_mismatch",)):
    """403 ``external_id_mismatch``: the browser's externalId differs from the signed one."""


class ExternalIdUnsigned(Forbidden, codes=("external_id_unsigned",)):
    """403 ``external_id_unsigned``: the org requires the externalId inside the token."""


class OriginNotAllowed(Forbidden, codes=("origin_not_allowed",)):
    """403 ``origin_not_allowed``: the Origin is not one of the widget token's."""


class ScopeMismatch(Forbidden, codes=("scope_mismatch",)):
    """403 ``scope_mismatch``: the conversation is not in the session's history scope."""


class IdentityConflict(Conflict, codes=("identity_conflict",)):
    """409 ``identity_conflict``: the email is another contact's verified email, or the
    identity belongs to an erased contact."""


class NoSigningKey(Conflict, codes=("no_signing_key",)):
    """409 ``no_signing_key``: the org has no live signing key to sign with."""


class LastSigningKey(Conflict, codes=("last_signing_key",)):
    """409 ``last_signing_key``: the org's only live key; rotate before deleting it."""


class WidgetTokenRevoked(Conflict, codes=("widget_token_revoked",)):
    """409 ``widget_token_revoked``: a revoked widget token is not changed."""


class MergeNotUndoable(Conflict, codes=("merge_not_undoable",)):
    """409 ``merge_not_undoable``: the merge is not ``done`` (``merge_status`` says what it
    is), or a contact involved was erased."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        status = self.problem.get("mergeStatus")
        self.merge_status: str | None = status if isinstance(status, str) else None


class SessionEnded(WidgetIdentityError, codes=("session_ended",)):
    """``session_ended``: the session was logged out, revoked or expired (401 on a session
    token; 409 when recording a conversation or message in it)."""


class InternalError(ServerError, codes=("internal_error",)):
    """500 ``internal_error``: a bug on the server; the request id is in its logs."""


# --- from a response -------------------------------------------------------------------------

_EXCERPT = 200


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def problem_error(
    status: int, reason: str, headers: Mapping[str, str], body: bytes
) -> WidgetIdentityError:
    """The exception for an error response, whatever its body."""
    problem: dict[str, Any] = {}
    try:
        decoded = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError:
        decoded = None
    if isinstance(decoded, dict):
        problem = decoded
    code = problem.get("code") if isinstance(problem.get("code"), str) else None
    title = problem.get("title") if isinstance(problem.get("title"), str) else None
    detail = problem.get("detail") if isinstance(problem.get("detail"), str) else None
    if detail is None:
        detail = body[:_EXCERPT].decode("utf-8", "replace").strip() or reason
    cls = WidgetIdentityError.class_for(status, code)
    return cls(
        status,
        code,
        title or reason,
        detail,
        problem,
        retry_after=retry_after_seconds(headers.get("Retry-After")),
    )
