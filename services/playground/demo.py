"""The Playground's demo org, provisioned on first use through the functions the admin API
and the customer-backend API use (token issuance's orgs, widget_tokens and contacts; history's
conversations), so the page exercises the real paths.

The demo org is found by name, so a restart reuses it. Widget tokens are stored hashed and
cannot be read back: each process mints its own per (origin, settings) on demand, kept in
memory, at most ``MAX_WIDGET_TOKENS`` of them.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec

from services.history import conversations
from services.history.schemas import CreateConversation, CreatedConversation
from services.token_issuance import contacts, orgs, widget_tokens
from services.token_issuance.keyring import Keyring
from services.token_issuance.schemas import (
    AuthenticateUserRequest,
    AuthenticateUserResponse,
    CreateOrgRequest,
    CreateWidgetTokenRequest,
)
from shared.bus.outbox import Outbox
from shared.config import Settings
from shared.db import in_transaction
from shared.errors import ConfigError, Problem
from shared.identity.org_policy import PolicyCache
from shared.identity.widget_tokens import parse_widget_settings

DEMO_ORG_NAME = "Playground demo"
MAX_WIDGET_TOKENS = 64


class PageSettings(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    """The widget options of the product page (extra fields keyed by ``key``), which the page's
    toggles produce; translated to the admin API's widget-token settings."""

    collect_user_data: bool = False
    prefill_user_data: dict[str, bool] = msgspec.field(default_factory=dict)
    extra_data_collection_fields: list[dict[str, Any]] = msgspec.field(default_factory=list)

    def widget_settings(self) -> dict[str, Any]:
        extra = []
        for f in self.extra_data_collection_fields:
            translated = {("name" if k == "key" else k): v for k, v in f.items()}
            extra.append(translated)
        return {
            "collectUserData": self.collect_user_data,
            "prefillUserData": self.prefill_user_data,
            "extraDataCollectionFields": extra,
        }


@dataclass
class DemoOrg:
    """One per process: the demo org's id and the widget tokens this process minted."""

    _org_id: str | None = None
    _widget_tokens: dict[str, str] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def org_id(self, pool: asyncpg.Pool, settings: Settings) -> str:
        async with self._lock:
            if self._org_id is None:
                self._org_id = await _find_or_create_org(pool, settings)
            return self._org_id

    async def widget_token(
        self, pool: asyncpg.Pool, settings: Settings, origin: str, page: PageSettings
    ) -> str:
        widget_settings = parse_widget_settings(page.widget_settings())  # 422 when invalid
        cache_key = origin + " " + json.dumps(page.widget_settings(), sort_keys=True)
        org_id = await self.org_id(pool, settings)
        async with self._lock:
            token = self._widget_tokens.get(cache_key)
            if token is not None:
                return token
            if len(self._widget_tokens) >= MAX_WIDGET_TOKENS:
                raise Problem(
                    429, "rate_limited", "this playground has minted enough widget tokens"
                )
            created = await widget_tokens.create_widget_token(
                pool,
                org_id,
                CreateWidgetTokenRequest(allowed_origins=[origin], settings=widget_settings),
            )
            self._widget_tokens[cache_key] = created.token
            return created.token


async def _find_or_create_org(pool: asyncpg.Pool, settings: Settings) -> str:
    # Token issuance has no lookup by name (the admin API addresses orgs by id); the demo org
    # is the oldest one with this name. An advisory lock makes two processes agree on it.
    async def work(conn: asyncpg.Connection) -> str | None:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('widget-identity:playground'))")
        found = await conn.fetchval(
            "SELECT id FROM orgs WHERE name = $1 ORDER BY created_at LIMIT 1", DEMO_ORG_NAME
        )
        return None if found is None else str(found)

    found = await in_transaction(pool, work)
    if found is not None:
        return found
    kek = settings.key_encryption_key
    if kek is None:  # token issuance refuses to start without it; this only satisfies types
        raise ConfigError("KEY_ENCRYPTION_KEY: not set")
    created = await orgs.create_org(
        pool,
        kek,
        settings.token_algorithms[0],
        CreateOrgRequest(name=DEMO_ORG_NAME),
    )
    return created.id


async def mint_contact_token(
    pool: asyncpg.Pool,
    outbox: Outbox,
    keyring: Keyring,
    policies: PolicyCache,
    settings: Settings,
    org_id: str,
    request: AuthenticateUserRequest,
) -> AuthenticateUserResponse:
    """What a customer's backend does with ``POST /widget/authenticate-user``, for the demo org."""
    policy = await policies.get(pool, org_id)
    auth = contacts.validate_authentication(request, policy, settings)
    return await contacts.authenticate(
        pool, outbox, keyring, settings, org_id, auth, api_key_id=None
    )


async def record_conversation(
    pool: asyncpg.Pool, org_id: str, body: CreateConversation
) -> CreatedConversation:
    """What a chat service does with ``POST /v1/conversations``: a conversation in the
    session's scope (another org's session is not found)."""
    return await in_transaction(
        pool, lambda conn: conversations.create_conversation(conn, org_id, body)
    )
