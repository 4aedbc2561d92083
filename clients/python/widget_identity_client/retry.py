"""When a call is tried again, and how long to wait first.

Only calls that are safe to repeat are retried: a request whose answer was lost may have
taken effect, and repeating a non-idempotent one (mint a token, record a message, start a
merge) would do it twice. Safe here means the server makes doing it twice leave the same state
as doing it once: every GET, every DELETE (erasing, unbinding, revoking an API key, deleting a
signing key: a repeat finds the work done), the org update (an RFC 7396 merge patch, and
``disabled`` set to a value) and the widget token update (it replaces fields with the values
given). No POST is retried, not even on a connection error.

What is retried: connection errors and timeouts, 502/503/504 and 429. Waits grow
exponentially with full jitter, capped; a ``Retry-After`` from the server is the wait instead,
and one longer than the cap is not waited for (the error is raised at once). (aiohttp itself
also resends a GET or DELETE once when a kept-alive connection drops, as RFC 9112 allows.)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from widget_identity_client.errors import ClientError, TransportError, WidgetIdentityError
from widget_identity_client.operations import Operation

# HTTP methods the server implements idempotently, and the other operations it does.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "DELETE", "PUT"})
IDEMPOTENT_OPERATIONS = frozenset({"updateOrg", "updateWidgetToken"})
RETRIED_STATUSES = frozenset({429, 502, 503, 504})


def is_idempotent(operation: Operation[Any]) -> bool:
    return operation.method in IDEMPOTENT_METHODS or operation.id in IDEMPOTENT_OPERATIONS


def is_retryable(error: ClientError) -> bool:
    if isinstance(error, TransportError):
        return True
    return isinstance(error, WidgetIdentityError) and error.status in RETRIED_STATUSES


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempts``: tries in all (1: never retry). Before try n+1 the client waits a random
    time in [0, min(max_delay, base_delay * 2**(n-1))], or the server's ``Retry-After``."""

    attempts: int = 4
    base_delay: float = 0.2
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must not be negative")

    def backoff(self, attempt: int) -> float:
        """The jittered wait after failed try number ``attempt`` (1-based)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)

    def delay(self, attempt: int, error: ClientError) -> float | None:
        """How long to wait before trying again after ``error`` on try ``attempt``, or None
        to give up and raise it."""
        if attempt >= self.attempts or not is_retryable(error):
            return None
        retry_after = error.retry_after if isinstance(error, WidgetIdentityError) else None
        if retry_after is None:
            return self.backoff(attempt)
        return retry_after if retry_after <= self.max_delay else None


NO_RETRY = RetryPolicy(attempts=1)
DEFAULT_RETRY = RetryPolicy()
