"""Widget tokens' settings and allowed origins, validated once for every service.

Token issuance validates them when an admin creates a widget token; session resolution reads
them to build ``collect`` and to validate the fields a browser sends.

Settings (camelCase in JSON):

- ``collectUserData`` (bool, default false): the widget asks for name and email before chat.
- ``prefillUserData`` {``name``: bool, ``email``: bool} (default both false): the widget fills
  those form fields from what the session already knows about the visitor or contact.
- ``extraDataCollectionFields``: up to 10 extra form fields, each {``name`` (unique,
  ``^[a-zA-Z][a-zA-Z0-9_]{0,39}$``, not ``name``/``email``), ``label`` (1..100 chars),
  ``type`` (text|email|number|boolean, default text), ``required`` (default false),
  ``maxLength`` (1..1000, default 200)}.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import asyncpg
import msgspec
from aiohttp import web

from shared.errors import validation_failed
from shared.identity.api_keys import hash_secret
from shared.identity.credential_cache import CredentialCache
from shared.identity.revocation import CredentialChange, install_revocation_feed

FIELD_NAME_PATTERN = r"^[a-zA-Z][a-zA-Z0-9_]{0,39}$"
# Collected natively by the widget; an extra field with these names would shadow them.
RESERVED_FIELD_NAMES = frozenset({"name", "email"})
MAX_EXTRA_FIELDS = 10
MAX_ORIGINS = 50

FieldType = Literal["text", "email", "number", "boolean"]


class ExtraField(msgspec.Struct, frozen=True, rename="camel", forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern=FIELD_NAME_PATTERN)]
    label: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    type: FieldType = "text"
    required: bool = False
    max_length: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 200


class PrefillUserData(msgspec.Struct, frozen=True, rename="camel", forbid_unknown_fields=True):
    name: bool = False
    email: bool = False


class WidgetSettings(msgspec.Struct, frozen=True, rename="camel", forbid_unknown_fields=True):
    collect_user_data: bool = False
    prefill_user_data: PrefillUserData = msgspec.field(default_factory=PrefillUserData)
    extra_data_collection_fields: Annotated[
        list[ExtraField], msgspec.Meta(max_length=MAX_EXTRA_FIELDS)
    ] = msgspec.field(default_factory=list)


def check_widget_settings(settings: WidgetSettings) -> WidgetSettings:
    """Rules a schema cannot say: field names unique and not reserved. 422 otherwise."""
    seen: set[str] = set()
    for extra in settings.extra_data_collection_fields:
        if extra.name.lower() in RESERVED_FIELD_NAMES:
            raise validation_failed(
                f"extraDataCollectionFields: {extra.name!r} is collected natively; pick another name"
            )
        if extra.name in seen:
            raise validation_failed(f"extraDataCollectionFields: duplicate name {extra.name!r}")
        seen.add(extra.name)
    return settings


def parse_widget_settings(raw: Any) -> WidgetSettings:
    """Validate settings given as plain JSON data (e.g. from the CLI)."""
    try:
        settings = msgspec.convert(raw if raw is not None else {}, WidgetSettings)
    except msgspec.ValidationError as exc:
        raise validation_failed(f"invalid widget settings: {exc}") from None
    return check_widget_settings(settings)


def widget_settings_from_row(stored: Any) -> WidgetSettings:
    """Read stored settings (validated on the way in)."""
    return msgspec.convert(stored or {}, WidgetSettings)


def widget_settings_document(settings: WidgetSettings) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.to_builtins(settings)
    return doc


_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(raw: str) -> str:
    """An exact web origin ``scheme://host[:port]`` in the form browsers send in ``Origin``
    (lower-case, default port dropped). No paths, wildcards, credentials or queries: raises
    ValueError naming what is wrong."""
    value = raw.strip()
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{raw!r} is not a valid origin ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"{raw!r}: the scheme must be http or https")
    host = (parts.hostname or "").lower()
    if not host or "*" in value:
        raise ValueError(f"{raw!r}: an exact host is required (no wildcards)")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{raw!r}: credentials are not allowed in an origin")
    if parts.path not in ("", "/") or parts.query or parts.fragment or value.endswith("?"):
        raise ValueError(f"{raw!r}: an origin has no path, query or fragment")
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def normalize_origins(raw: list[str]) -> list[str]:
    """Validate and de-duplicate a list of allowed origins; 422 on the first bad one."""
    if not raw:
        raise validation_failed("allowedOrigins: at least one origin is required")
    if len(raw) > MAX_ORIGINS:
        raise validation_failed(f"allowedOrigins: at most {MAX_ORIGINS} origins")
    result: list[str] = []
    for item in raw:
        try:
            origin = normalize_origin(item)
        except ValueError as exc:
            raise validation_failed(f"allowedOrigins: {exc}") from None
        if origin not in result:
            result.append(origin)
    return result


# --- Widget token lookup (session resolution's hot path) -----------------------------------


@dataclass(frozen=True, slots=True)
class WidgetToken:
    """A live widget token as the public endpoints need it. The org comes from here, never
    from a request body."""

    id: str
    org_id: str
    allowed_origins: frozenset[str]
    settings: WidgetSettings
    # Only ``get_by_id`` hands out ended tokens (a session must still be able to log out);
    # these say whether it, or its org, has ended since.
    revoked: bool = False
    org_disabled: bool = False


class WidgetTokenDirectory:
    """Widget tokens by their SHA-256, cached in-process: read on every widget load, changed
    rarely. A revoked or updated token, or a disabled org, takes effect on every replica
    within a second: the revocation listener drops the affected entries (``changed``).
    Unknown tokens are remembered for ``negative_ttl`` so a flood of made-up tokens costs few
    reads."""

    def __init__(
        self, *, ttl: float = 30.0, negative_ttl: float = 2.0, max_entries: int = 10_000
    ) -> None:
        self._cache: CredentialCache[bytes, WidgetToken | None] = CredentialCache(
            ttl=ttl, negative_ttl=negative_ttl, max_entries=max_entries
        )

    async def get(self, pool: asyncpg.Pool, token: str) -> WidgetToken | None:
        """The live widget token presented by a browser, or None (unknown, revoked, or its
        org is disabled: all refused alike)."""
        token_hash = hash_secret(token)
        return await self._cached(
            token_hash,
            pool,
            """SELECT w.id, w.org_id, w.allowed_origins, w.settings,
                      false AS revoked, false AS org_disabled
               FROM widget_tokens w JOIN orgs o ON o.id = w.org_id
               WHERE w.token_hash = $1 AND w.revoked_at IS NULL AND o.disabled_at IS NULL""",
            token_hash,
        )

    async def get_by_id(self, pool: asyncpg.Pool, widget_token_id: str) -> WidgetToken | None:
        """A widget token by id, revoked or not: a session made with it keeps its origins
        (a visitor must still be able to log out after the token is revoked)."""
        return await self._cached(
            b"id:" + widget_token_id.encode(),
            pool,
            """SELECT w.id, w.org_id, w.allowed_origins, w.settings,
                      w.revoked_at IS NOT NULL AS revoked, o.disabled_at IS NOT NULL AS org_disabled
               FROM widget_tokens w JOIN orgs o ON o.id = w.org_id WHERE w.id = $1""",
            uuid.UUID(widget_token_id),
        )

    async def _cached(
        self, cache_key: bytes, pool: asyncpg.Pool, sql: str, arg: object
    ) -> WidgetToken | None:
        async def load() -> WidgetToken | None:
            row = await pool.fetchrow(sql, arg)
            if row is None:
                return None
            return WidgetToken(
                id=str(row["id"]),
                org_id=str(row["org_id"]),
                allowed_origins=frozenset(row["allowed_origins"]),
                settings=widget_settings_from_row(row["settings"]),
                revoked=row["revoked"],
                org_disabled=row["org_disabled"],
            )

        return await self._cache.get(cache_key, load)

    def set_live(self, live: bool) -> None:
        self._cache.set_live(live)

    def changed(self, change: CredentialChange) -> None:
        if change.kind == "widget_token":
            self._cache.drop_where(lambda w: w is not None and w.id == change.id)
        elif change.kind == "org":
            # "Unknown" entries too: an enabled org's tokens must work again at once.
            self._cache.drop_where(lambda w: w is None or w.org_id == change.id)

    def forget(self) -> None:
        """Drop everything cached."""
        self._cache.clear()


WIDGET_TOKENS: web.AppKey[WidgetTokenDirectory] = web.AppKey("widget_tokens", WidgetTokenDirectory)


def install_widget_tokens(app: web.Application) -> None:
    """Idempotent: every service that resolves widget tokens calls this from its ``setup``."""
    if WIDGET_TOKENS not in app:
        app[WIDGET_TOKENS] = WidgetTokenDirectory()
        install_revocation_feed(app).watch(app[WIDGET_TOKENS])
