"""The operator's client for org administration (``Authorization: Bearer <ADMIN_TOKEN>``).

Retried (when the ``RetryPolicy`` allows): reads, DELETEs and ``update_org`` (an RFC 7396
merge patch, so applying it twice leaves what applying it once did). Never retried: the
POSTs that create something (an org, a key, a widget token, a signing key).
"""

from __future__ import annotations

import aiohttp

from widget_identity_client import operations as op
from widget_identity_client.models import (
    ApiKeyCreated,
    ApiKeyRevoked,
    CreateApiKeyRequest,
    CreateOrgRequest,
    CreateWidgetTokenRequest,
    OrgInfo,
    SigningKeyDeleted,
    SigningKeyInfo,
    UpdateOrgRequest,
    WidgetTokenCreated,
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

    async def get_org(self, org_id: str) -> OrgInfo:
        """An org and its full policy. Retried."""
        return await self._transport.call(op.GET_ORG, path={"orgId": org_id})

    async def update_org(self, org_id: str, body: UpdateOrgRequest) -> OrgInfo:
        """Rename an org and/or merge-patch its policy (a null value resets a key to its
        default). Retried: a merge patch is idempotent."""
        return await self._transport.call(op.UPDATE_ORG, path={"orgId": org_id}, body=body)

    async def create_api_key(self, org_id: str, body: CreateApiKeyRequest) -> ApiKeyCreated:
        """Create an API key with scopes; ``key`` is shown only in this answer. Not retried."""
        return await self._transport.call(op.CREATE_API_KEY, path={"orgId": org_id}, body=body)

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

    async def rotate_signing_key(self, org_id: str) -> SigningKeyInfo:
        """Add a signing key that signs from now on (older keys keep verifying). Not
        retried: a repeat would add a second key."""
        return await self._transport.call(op.ROTATE_SIGNING_KEY, path={"orgId": org_id})

    async def delete_signing_key(self, org_id: str, kid: str) -> SigningKeyDeleted:
        """Delete a signing key; tokens it signed stop verifying. ``LastSigningKey`` for the
        org's only live key. Retried (DELETE): a retry after a lost answer raises
        ``NotFound``."""
        return await self._transport.call(op.DELETE_SIGNING_KEY, path={"orgId": org_id, "kid": kid})
