"""Who a visitor is and how far to trust it: the pure rules behind the identity levels and promises 1-3 and 7 (docs/promises.md).

No I/O here. The caller hands in what a *verified contact token* said (``ServerIdentity``, or
None when no token was presented) and what the browser sent; these functions decide the
level, the history scope (contact + externalId, or the visitor), every attribute's provenance,
and whether a login should ask for the browser's history to be merged.

The rules, in one place:
- Only a contact token verifies (promise 1). Browser values never raise the level, never pick
  a contact, and never change the scope of anonymous/unverified visitors.
- Server values win (promise 7): a browser value under a key the token also carries is
  dropped, not stored, so it can never resurface as if it were the person's.
- externalId (promise 2): a signed claim wins and a different browser value is refused; with
  no claim the browser value scopes verified history but is marked unverified, unless the org
  requires signed externalIds.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import msgspec

from shared.errors import Problem, validation_failed

Scalar = str | int | float | bool | None
Level = Literal["anonymous", "unverified", "verified"]
Source = Literal["server", "browser"]

EXTERNAL_ID_MAX = 256
NAME_MAX = 200
EMAIL_MAX = 320
# Deliberately loose (RFC 5322 allows far more than anyone types into a widget): one @, a
# dotted domain, no whitespace. The address is never trusted anyway; this catches typos.
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")


@dataclass(frozen=True, slots=True)
class Attribute:
    value: Any  # browser values are scalars; server customData may be any JSON
    source: Source
    verified: bool


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    """What a verified contact token vouches for (its claims), nothing the browser said."""

    contact_id: str
    issued_at: datetime
    expires_at: datetime
    external_id: str | None = None
    name: str | None = None
    email: str | None = None
    custom_data: Mapping[str, Any] | None = None
    # The credentials the token stands on; the session records them, and ends with them.
    kid: str | None = None
    minted_by: str | None = None


@dataclass(frozen=True, slots=True)
class BrowserInput:
    """What this request's body said about the person. Nothing here is proof of anything."""

    name: str | None = None
    email: str | None = None
    external_id: str | None = None
    fields: Mapping[str, Scalar] | None = None
    custom_data: Mapping[str, Scalar] | None = None


@dataclass(frozen=True, slots=True)
class Resolution:
    level: Level
    contact_id: str | None
    external_id: str  # '' = none; always '' below level verified
    external_id_verified: bool
    attributes: dict[str, Attribute]
    # Browser values to remember on the visitor (this browser) for its next visits.
    visitor_attributes: dict[str, Scalar]

    def fingerprint(self, widget_token_id: str) -> str:
        """Identifies everything a session records; equal fingerprints mean 'nothing new'."""
        doc = {
            "widget": widget_token_id,
            "level": self.level,
            "contact": self.contact_id,
            "ext": self.external_id,
            "extv": self.external_id_verified,
            "attrs": {
                k: [a.value, a.source, a.verified] for k, a in sorted(self.attributes.items())
            },
        }
        return hashlib.sha256(msgspec.json.encode(doc, order="sorted")).hexdigest()[:32]


def _blank_to_none(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def normalise_browser_input(raw: BrowserInput) -> BrowserInput:
    """Trim, treat empty strings as absent, and validate formats (422 before any write)."""
    name = _blank_to_none(raw.name)
    email = _blank_to_none(raw.email)
    external_id = _blank_to_none(raw.external_id)
    errors: list[dict[str, str]] = []
    if name is not None and (len(name) > NAME_MAX or not name.isprintable()):
        errors.append({"field": "user.name", "message": f"printable, at most {NAME_MAX} chars"})
    if email is not None and not is_email(email):
        errors.append({"field": "user.email", "message": "not an email address"})
    if external_id is not None:
        problem = external_id_problem(external_id)
        if problem:
            errors.append({"field": "user.externalId", "message": problem})
    if errors:
        raise validation_failed("the visitor details are invalid", errors=errors)
    return BrowserInput(
        name=name,
        email=email,
        external_id=external_id,
        fields=raw.fields,
        custom_data=raw.custom_data,
    )


def is_email(value: str) -> bool:
    return len(value) <= EMAIL_MAX and _EMAIL.match(value) is not None


def external_id_problem(value: str) -> str | None:
    if len(value) > EXTERNAL_ID_MAX:
        return f"at most {EXTERNAL_ID_MAX} characters"
    if not value.isprintable():
        return "printable characters only"
    return None


def browser_values(previous: Mapping[str, Scalar], new: BrowserInput) -> dict[str, Scalar]:
    """This browser's remembered values updated with this request's; the newest value wins.

    Precedence inside one request: the typed name/email beat extra fields, which beat
    customData options (a form the visitor filled in says more than a page's script).
    """
    merged = dict(previous)
    for source in (new.custom_data or {}, new.fields or {}):
        for key, value in source.items():
            if value is None:
                continue
            merged[key] = value
    if new.name is not None:
        merged["name"] = new.name
    if new.email is not None:
        merged["email"] = new.email
    return merged


def server_values(server: ServerIdentity) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in (server.custom_data or {}).items():
        if value is not None:
            values[key] = value
    # The token's own name/email claims beat its customData of the same key.
    if server.name is not None:
        values["name"] = server.name
    if server.email is not None:
        values["email"] = server.email
    return values


def resolve(
    *,
    server: ServerIdentity | None,
    remembered: Mapping[str, Scalar],
    browser: BrowserInput,
    require_signed_external_id: bool,
) -> Resolution:
    """Decide level, scope and attributes. Raises 403 for an externalId the rules refuse."""
    values = browser_values(remembered, browser)
    if server is None:
        # Browser-bound: scope is the visitor, whatever externalId the page passed (it only
        # scopes *verified* history). Typed/prefilled details make it unverified, no more.
        attributes = {k: Attribute(v, "browser", False) for k, v in values.items()}
        return Resolution(
            level="unverified" if values else "anonymous",
            contact_id=None,
            external_id="",
            external_id_verified=False,
            attributes=attributes,
            visitor_attributes=values,
        )
    external_id, external_id_verified = resolve_external_id(
        claim=server.external_id,
        browser=browser.external_id,
        require_signed=require_signed_external_id,
    )
    signed = server_values(server)
    # Browser values under a signed key are discarded, not just hidden: stored values must
    # equal the signed claims (promise 7).
    browser_only = {k: v for k, v in values.items() if k not in signed}
    attributes = {k: Attribute(v, "browser", False) for k, v in browser_only.items()}
    attributes.update({k: Attribute(v, "server", True) for k, v in signed.items()})
    return Resolution(
        level="verified",
        contact_id=server.contact_id,
        external_id=external_id,
        external_id_verified=external_id_verified,
        attributes=attributes,
        visitor_attributes=browser_only,
    )


def resolve_external_id(
    *, claim: str | None, browser: str | None, require_signed: bool
) -> tuple[str, bool]:
    """The verified scope's externalId and whether it was signed."""
    if claim:
        if browser is not None and browser != claim:
            raise Problem(
                403,
                "external_id_mismatch",
                "user.externalId differs from the externalId signed into the contact token",
            )
        return claim, True
    if browser is None:
        return "", False
    if require_signed:
        raise Problem(
            403,
            "external_id_unsigned",
            "this organisation only accepts an externalId signed into the contact token",
        )
    return browser, False


def needs_login_merge(
    *,
    policy_merge_on_login: bool,
    level: Level,
    visitor_is_new: bool,
    unmerged_browser_sessions: bool,
) -> bool:
    """Promise 4's trigger: a verified login on a browser that may hold browser-bound history
    nobody asked to merge yet (a non-verified session after the visitor's last merge request).
    A visitor created by this very request cannot have history."""
    return (
        policy_merge_on_login
        and level == "verified"
        and not visitor_is_new
        and unmerged_browser_sessions
    )
