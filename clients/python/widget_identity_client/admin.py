"""The operator's client for org administration (``Authorization: Bearer <ADMIN_TOKEN>``).

Retried (when the ``RetryPolicy`` allows): reads, DELETEs, ``update_org`` (an RFC 7396
merge patch, so applying it twice leaves what applying it once did) and
``update_widget_token`` (it sets fields to the values given). Never retried: the POSTs that
create something (an org, a key, a widget token, a signing key).

Lists come a page at a time: pass the page's ``next_cursor`` as ``cursor`` for the next one
(None: that was the last page).
"""

from __future__ import annotations

import aiohttp

from widget_identity_client import operations as op
from widget_identity_client.models import (
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyRevoked,
    CreateApiKeyRequest,
    CreateOrgRequest,
    CreateWidgetTokenRequest,
    OrgInfo,
    OrgList,
    SigningKeyDeleted,
    SigningKeyInfo,
    SigningKeyList,
    UpdateOrgRequest,
    UpdateWidgetTokenRequest,
    WidgetTokenCreated,
    WidgetTokenInfo,
    WidgetTokenList,
    WidgetTokenRevoked,
)
from widget_identity_client.retry import DEFAULT_RETRY, RetryPolicy
from widget_identity_client.transport import DEFAULT_TIMEOUT, BaseClient


class AdminClient(BaseClient):
    """Org administration with the operator's admin token; ``InvalidAdminToken`` when it is
    wrong or the server has none configured."""

    def __init__(
        self,
        base_url: str,
        admin_token: str,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        super().__init__(base_url, admin_token, session=session, timeout=timeout, retry=retry)

    async def create_org(self, body: CreateOrgRequest) -> OrgInfo:
        """Create an org with its policy and first signing key. Not retried."""
        return await self._transport.call(op.CREATE_ORG, body=body)

    async def list_orgs(self, *, limit: int | None = None, cursor: str | None = None) -> OrgList:
        """One page of orgs, oldest first. Retried."""
        return await self._transport.call(op.LIST_ORGS, query={"limit": limit, "cursor": cursor})

    async def get_org(self, org_id: str) -> OrgInfo:
        """An org and its full policy. Retried."""
        return await self._transport.call(op.GET_ORG, path={"orgId": org_id})

    async def update_org(self, org_id: str, body: UpdateOrgRequest) -> OrgInfo:
        """Rename an org, merge-patch its policy (a null value resets a key to its default),
        and/or disable (``disabled=True``) or enable it. Retried: a merge patch is
        idempotent."""
        return await self._transport.call(op.UPDATE_ORG, path={"orgId": org_id}, body=body)

    async def create_api_key(self, org_id: str, body: CreateApiKeyRequest) -> ApiKeyCreated:
        """Create an API key with scopes; ``key`` is shown only in this answer. Not retried."""
        return await self._transport.call(op.CREATE_API_KEY, path={"orgId": org_id}, body=body)

    async def list_api_keys(
        self, org_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> ApiKeyList:
        """One page of an org's API keys, revoked ones included; never the key. Retried."""
        return await self._transport.call(
            op.LIST_API_KEYS, path={"orgId": org_id}, query={"limit": limit, "cursor": cursor}
        )

    async def revoke_api_key(self, org_id: str, key_id: str) -> ApiKeyRevoked:
        """Revoke an API key (a repeat returns the first revocation time). Retried."""
        return await self._transport.call(
            op.REVOKE_API_KEY, path={"orgId": org_id, "keyId": key_id}
        )

    async def create_widget_token(
        self, org_id: str, body: CreateWidgetTokenRequest
    ) -> WidgetTokenCreated:
        """Create a widget token with allowed origins and widget settings. Not retried."""
        return await self._transport.call(op.CREATE_WIDGET_TOKEN, path={"orgId": org_id}, body=body)

    async def list_widget_tokens(
        self, org_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> WidgetTokenList:
        """One page of an org's widget tokens, revoked ones included. Retried."""
        return await self._transport.call(
            op.LIST_WIDGET_TOKENS, path={"orgId": org_id}, query={"limit": limit, "cursor": cursor}
        )

    async def update_widget_token(
        self, org_id: str, widget_token_id: str, body: UpdateWidgetTokenRequest
    ) -> WidgetTokenInfo:
        """Replace a widget token's allowed origins and/or settings (validated as on
        creation); ``WidgetTokenRevoked`` for a revoked one. Retried: it sets the values
        given."""
        return await self._transport.call(
            op.UPDATE_WIDGET_TOKEN,
            path={"orgId": org_id, "widgetTokenId": widget_token_id},
            body=body,
        )

    async def revoke_widget_token(self, org_id: str, widget_token_id: str) -> WidgetTokenRevoked:
        """Revoke a widget token (a repeat returns the first revocation time). Retried."""
        return await self._transport.call(
            op.REVOKE_WIDGET_TOKEN, path={"orgId": org_id, "widgetTokenId": widget_token_id}
        )

    async def list_signing_keys(
        self, org_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> SigningKeyList:
        """One page of an org's live signing keys (deleted ones are not listed). Retried."""
        return await self._transport.call(
            op.LIST_SIGNING_KEYS, path={"orgId": org_id}, query={"limit": limit, "cursor": cursor}
        )

    async def rotate_signing_key(self, org_id: str) -> SigningKeyInfo:
        """Add a signing key that signs from now on (older keys keep verifying). Not
        retried: a repeat would add a second key."""
        return await self._transport.call(op.ROTATE_SIGNING_KEY, path={"orgId": org_id})

    async def delete_signing_key(self, org_id: str, kid: str) -> SigningKeyDeleted:
        """Delete a signing key; tokens it signed stop verifying. ``LastSigningKey`` for the
        org's only live key. Retried (DELETE): a retry after a lost answer raises
        ``NotFound``."""
        return await self._transport.call(op.DELETE_SIGNING_KEY, path={"orgId": org_id, "kid": kid})
