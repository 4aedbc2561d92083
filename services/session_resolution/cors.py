"""CORS for the public widget endpoints: which browser origins may call, and what to answer.

Decisions (documented for integrators):
- An ``Origin`` must equal one of the widget token's ``allowedOrigins`` exactly (scheme, host
  and port; no wildcards, no trailing slash). An empty list allows no browser origin.
- A request *without* ``Origin`` is allowed: it does not come from a browser page, CORS only
  protects browsers, and the widget token is public anyway (it sits in page source). Such a
  caller is still rate limited and gains nothing a browser could not.
- ``Origin: null`` (sandboxed iframes, file://) is an origin like any other: refused unless
  listed, which it should not be.
- A preflight carries neither body nor Authorization, so it cannot know the widget token: it
  is answered for any origin, and the real request is checked. A refused origin gets a 403
  ``origin_not_allowed`` (readable by the page, so integrators see why).
"""

from __future__ import annotations

from collections.abc import Collection

from shared.errors import Problem

ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = "Content-Type, Authorization"
EXPOSE_HEADERS = "Retry-After, X-Request-Id"
PREFLIGHT_MAX_AGE = "600"


def check_origin(origin: str | None, allowed: Collection[str]) -> None:
    if origin is None:
        return
    if origin not in allowed:
        raise Problem(
            403,
            "origin_not_allowed",
            f"the origin {origin[:200]!r} is not in this widget token's allowed origins",
        )


def response_headers(origin: str | None) -> dict[str, str]:
    """Headers for an actual (non-preflight) response to ``origin``.

    Every successful response was produced only after ``check_origin`` passed, and problem
    responses carry no data, so echoing the origin is safe on both.
    """
    if origin is None:
        return {"Vary": "Origin"}
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": EXPOSE_HEADERS,
        "Vary": "Origin",
    }


def preflight_headers(origin: str | None) -> dict[str, str]:
    headers = {
        "Access-Control-Allow-Methods": ALLOW_METHODS,
        "Access-Control-Allow-Headers": ALLOW_HEADERS,
        "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
        "Vary": "Origin",
    }
    if origin is not None:
        headers["Access-Control-Allow-Origin"] = origin
    return headers
