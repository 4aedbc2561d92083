"""The one root exception and the domain errors that become RFC 9457 problem+json.

Rules code raises these; one middleware (``shared.web.http``) turns them into responses, so
handlers never build error bodies by hand and every error carries a stable ``code``.
"""

from __future__ import annotations

from typing import Any


class WidgetIdentityError(Exception):
    """Root of every exception this project raises on purpose."""


class ConfigError(WidgetIdentityError):
    """The environment is wrong; start-up stops with this one-line message."""


class Problem(WidgetIdentityError):
    """A failure the client is told about, as ``application/problem+json``.

    ``code`` is the stable machine-readable part; ``detail`` is for humans and may change.
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or code.replace("_", " ").capitalize()
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": f"https://widget-identity.dev/problems/{self.code.replace('_', '-')}",
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
        }
        if instance is not None:
            doc["instance"] = instance
        doc.update(self.extra)
        return doc


# Constructors for the codes the HTTP contract names (docs/openapi.json), so a code is spelled in one place.


def validation_failed(detail: str, *, errors: list[dict[str, str]] | None = None) -> Problem:
    extra: dict[str, Any] = {"errors": errors} if errors else {}
    return Problem(422, "validation_failed", detail, **extra)


def not_found(what: str = "resource") -> Problem:
    # Tenant isolation (promise 8): "exists in another org" must read exactly like this.
    return Problem(404, "not_found", f"{what} not found")


def invalid_api_key() -> Problem:
    # One body for missing, malformed, unknown, revoked and expired keys: nothing to probe.
    return Problem(
        401,
        "invalid_api_key",
        "the API key is missing, malformed, unknown, revoked or expired",
        headers={"WWW-Authenticate": 'Bearer realm="widget-identity"'},
    )


def insufficient_scope(scope: str) -> Problem:
    return Problem(403, "insufficient_scope", f"the API key lacks the scope {scope!r}", scope=scope)


def rate_limited(retry_after: int) -> Problem:
    return Problem(
        429,
        "rate_limited",
        f"too many requests; retry after {retry_after} s",
        headers={"Retry-After": str(retry_after)},
    )


def unavailable(code: str, detail: str, *, retry_after: int = 1) -> Problem:
    return Problem(503, code, detail, headers={"Retry-After": str(retry_after)})


def db_unavailable() -> Problem:
    return unavailable("db_unavailable", "the database is unavailable")


def db_busy() -> Problem:
    # A lock or statement timeout, or no pooled connection free in time: the database is up,
    # this request could not get its turn.
    return unavailable("db_busy", "the database is busy; retry shortly")


def deadline_exceeded(budget: float) -> Problem:
    return unavailable("deadline_exceeded", f"the request did not finish within {budget:g} s")
