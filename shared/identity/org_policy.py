"""Org policy: the per-org switches every service reads, validated in one place.

The policy is stored in ``orgs.policy`` as the full normalised document (defaults filled in),
so an org's behaviour does not change under it when a code default changes. Rate limits are
the exception: a limit left unset (null) means "the operator's environment default"
(``Settings.rate_limits``), which the operator may tune for every org at once.

Keys (camelCase in JSON):

- ``mergeAnonymousOnLogin`` (bool, default true): merge a browser's own history into the
  contact's scope when the visitor presents a valid contact token (promise 4).
- ``requireSignedExternalId`` (bool, default false): a verified session's externalId must come
  from the contact token's claim; a browser-supplied one is then refused (promise 2).
- ``maxTokenLifetime`` (seconds, 60..2592000, default 86400 = 24 h): the longest a contact
  token may live. (Accepted under its earlier name ``tokenMaxTtlSeconds`` too, read as this.) ``POST /widget/authenticate-user`` refuses a longer ``expiresIn``, and the verifier
  refuses any token whose ``exp`` lies further ahead than this (401 token_lifetime_exceeded),
  whoever signed it. One value for both, so issuance and verification cannot disagree; lowering
  it also ends tokens already issued for longer.
- ``rateLimits`` {``authenticatePerKey``, ``sessionsPerIp``, ``sessionsPerWidgetToken``,
  ``sessionsPerVisitor``}: requests per minute, each 1..1000000 or null (environment default).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import asyncpg
import msgspec
from aiohttp import web

from shared.config import RateLimits
from shared.db import TRANSIENT_DB_ERRORS
from shared.errors import not_found, validation_failed
from shared.identity.credential_cache import CredentialCache
from shared.identity.revocation import CredentialChange, install_revocation_feed

log = logging.getLogger(__name__)

DEFAULT_TOKEN_TTL_SECONDS = 3600
MIN_TOKEN_TTL_SECONDS = 60
MAX_TOKEN_TTL_SECONDS = 30 * 24 * 3600

PerMinute = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
TokenTtl = Annotated[int, msgspec.Meta(ge=MIN_TOKEN_TTL_SECONDS, le=MAX_TOKEN_TTL_SECONDS)]


class RateLimitPolicy(msgspec.Struct, frozen=True, rename="camel", forbid_unknown_fields=True):
    """Requests per minute; None means the operator's environment default."""

    authenticate_per_key: PerMinute | None = None
    sessions_per_ip: PerMinute | None = None
    sessions_per_widget_token: PerMinute | None = None
    sessions_per_visitor: PerMinute | None = None


class OrgPolicy(msgspec.Struct, frozen=True, rename="camel", forbid_unknown_fields=True):
    merge_anonymous_on_login: bool = True
    require_signed_external_id: bool = False
    max_token_lifetime: TokenTtl = 86_400
    rate_limits: RateLimitPolicy = msgspec.field(default_factory=RateLimitPolicy)

    def effective_rate_limits(self, defaults: RateLimits) -> RateLimits:
        """The limits to enforce: the org's where set, else the environment's."""
        own = self.rate_limits
        return RateLimits(
            authenticate_per_key=own.authenticate_per_key or defaults.authenticate_per_key,
            sessions_per_ip=own.sessions_per_ip or defaults.sessions_per_ip,
            sessions_per_widget_token=(
                own.sessions_per_widget_token or defaults.sessions_per_widget_token
            ),
            sessions_per_visitor=own.sessions_per_visitor or defaults.sessions_per_visitor,
        )


DEFAULT_POLICY = OrgPolicy()


# Keys renamed since documents were first stored or sent: old name -> current name. An old
# name is read as the current one (and wins over it when both come in one request, since
# only a client that knows the old name sends it); stored documents were renamed by
# migration 0010.
_RENAMED = {"tokenMaxTtlSeconds": "maxTokenLifetime"}


def _current_names(raw: dict[str, Any]) -> dict[str, Any]:
    if not any(old in raw for old in _RENAMED):
        return raw
    renamed = dict(raw)
    for old, new in _RENAMED.items():
        if old in renamed:
            renamed[new] = renamed.pop(old)
    return renamed


def parse_policy(raw: Any) -> OrgPolicy:
    """Validate a policy object from a request; unknown keys and wrong types are a 422."""
    if not isinstance(raw, dict):
        raise validation_failed("policy must be a JSON object")
    try:
        return msgspec.convert(_current_names(raw), OrgPolicy)
    except msgspec.ValidationError as exc:
        raise validation_failed(f"invalid policy: {exc}") from None


def policy_from_row(stored: Any) -> OrgPolicy:
    """Read a stored policy; stored documents were validated on the way in."""
    return msgspec.convert(_current_names(stored or {}), OrgPolicy)


def policy_document(policy: OrgPolicy) -> dict[str, Any]:
    """The full JSON form (defaults included), as stored and as shown to admins."""
    doc: dict[str, Any] = msgspec.to_builtins(policy)
    return doc


def merge_patch(current: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7396 JSON merge patch: objects merge key by key, null removes (back to default)."""
    merged = dict(current)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_patch(merged[key], value)
        else:
            merged[key] = value
    return merged


class PolicyCache:
    """Org policies cached in-process: read on every hot-path request, changed rarely. A
    policy update (or disabling/enabling the org) is seen by this process at once and by the
    other replicas within a second: the revocation listener drops the org's entry."""

    def __init__(self, *, ttl: float = 5.0, max_entries: int = 10_000) -> None:
        self._cache: CredentialCache[str, OrgPolicy] = CredentialCache(
            ttl=ttl, max_entries=max_entries
        )
        # The last policy read per org, served only while Postgres cannot be read.
        self._last_read: dict[str, OrgPolicy] = {}
        self._max = max_entries

    async def get(self, pool: asyncpg.Pool, org_id: str) -> OrgPolicy:
        """The org's policy; 404 not_found when the org does not exist."""

        async def load() -> OrgPolicy:
            try:
                stored = await pool.fetchval("SELECT policy FROM orgs WHERE id = $1", org_id)
            except TRANSIENT_DB_ERRORS:
                last = self._last_read.get(org_id)
                if last is None:
                    raise
                # Postgres is down: the last policy read beats failing every verified session
                # (the token verifier reads it on every call).
                log.warning("org policy unavailable; keeping the last one read")
                return last
            if stored is None:
                raise not_found("org")
            policy = policy_from_row(stored)
            if len(self._last_read) >= self._max:
                self._last_read.clear()  # bounded memory beats a perfect LRU here
            self._last_read[org_id] = policy
            return policy

        return await self._cache.get(org_id, load)

    def set_live(self, live: bool) -> None:
        self._cache.set_live(live)

    def changed(self, change: CredentialChange) -> None:
        if change.kind == "org":
            self._cache.drop(change.id)
            self._last_read.pop(change.id, None)

    def forget(self, org_id: str | None = None) -> None:
        if org_id is None:
            self._cache.clear()
        else:
            self._cache.drop(org_id)


POLICIES: web.AppKey[PolicyCache] = web.AppKey("org_policies", PolicyCache)


def install_policies(app: web.Application) -> None:
    """Idempotent: every service that reads policies calls this from its ``setup``."""
    if POLICIES not in app:
        app[POLICIES] = PolicyCache()
        install_revocation_feed(app).watch(app[POLICIES])
