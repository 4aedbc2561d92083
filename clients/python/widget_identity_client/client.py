"""The client for customer backends and internal platform services (org API key).

Every method is one operation of the HTTP contract and says whether it is retried: the ones
that are safe to repeat (GET, DELETE) are, on connection errors, timeouts, 502/503/504 and
429, as the ``RetryPolicy`` says; the others (POST) never are, because a repeat could do the
work twice. Every failure is a ``widget_identity_client.errors`` exception.
"""

from __future__ import annotations

import aiohttp

from widget_identity_client import operations as op
from widget_identity_client.models import (
    AddMessage,
    AuthenticateUserRequest,
    AuthenticateUserResponse,
    ContactMerge,
    CreateConversation,
    CreatedConversation,
    DevicesOut,
    ErasureReceipt,
    HistoryPage,
    JwksResponse,
    MergeAccepted,
    MergeOut,
    MessageOut,
    SessionInfoOut,
    TokensRevokedResponse,
    UndoResult,
)
from widget_identity_client.retry import DEFAULT_RETRY, RetryPolicy
from widget_identity_client.transport import DEFAULT_TIMEOUT, BaseClient


class WidgetIdentityClient(BaseClient):
    """An org's API key (``wik_...``) against one widget-identity server.

    ::

        async with WidgetIdentityClient("http://127.0.0.1:8080", api_key) as client:
            token = await client.authenticate_user(AuthenticateUserRequest(user_id="u-42"))

    The key's scopes decide which methods succeed (``InsufficientScope`` otherwise); the org
    is always the key's.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        super().__init__(base_url, api_key, session=session, timeout=timeout, retry=retry)

    # --- token issuance ----------------------------------------------------------------------

    async def authenticate_user(self, body: AuthenticateUserRequest) -> AuthenticateUserResponse:
        """Mint a contact token for a signed-in user (``contacts:authenticate``). Not retried:
        each call mints a token and records an event. ``RateLimited`` carries
        ``retry_after``."""
        return await self._transport.call(op.AUTHENTICATE_USER, body=body)

    async def revoke_tokens(self, contact_id: str) -> TokensRevokedResponse:
        """Revoke every contact token issued so far, "log out everywhere"
        (``contacts:manage``). Not retried: a repeat would move the cut-off later."""
        return await self._transport.call(op.REVOKE_TOKENS, path={"contactId": contact_id})

    async def jwks(self, org_id: str | None = None) -> JwksResponse:
        """The public keys that verify contact tokens (one org's, or all). Retried."""
        return await self._transport.call(op.JWKS, query={"org": org_id})

    # --- sessions and devices ----------------------------------------------------------------

    async def get_session(self, session_id: str) -> SessionInfoOut:
        """Session introspection (``sessions:read``). Retried."""
        return await self._transport.call(op.GET_SESSION, path={"sessionId": session_id})

    async def list_devices(self, contact_id: str) -> DevicesOut:
        """The browsers bound to a contact (``contacts:manage``). Retried."""
        return await self._transport.call(op.LIST_DEVICES, path={"contactId": contact_id})

    async def delete_device(self, contact_id: str, visitor_id: str) -> None:
        """Unbind one browser from a contact (``contacts:manage``). Retried (DELETE): when an
        earlier try's answer was lost after it took effect, the retry raises ``NotFound``."""
        await self._transport.call(
            op.DELETE_DEVICE, path={"contactId": contact_id, "visitorId": visitor_id}
        )

    # --- history -----------------------------------------------------------------------------

    async def create_conversation(self, body: CreateConversation) -> CreatedConversation:
        """Record a conversation in a session's history scope (``history:write``). Not
        retried: a repeat would record a second conversation."""
        return await self._transport.call(op.CREATE_CONVERSATION, body=body)

    async def add_message(self, conversation_id: str, body: AddMessage) -> MessageOut:
        """Add a message to a conversation (``history:write``). Not retried."""
        return await self._transport.call(
            op.ADD_MESSAGE, path={"conversationId": conversation_id}, body=body
        )

    async def contact_history(
        self,
        contact_id: str,
        *,
        external_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> HistoryPage:
        """One page of a contact's history for one externalId (``history:read``); pass the
        page's ``next_cursor`` for the next. Retried."""
        return await self._transport.call(
            op.CONTACT_HISTORY,
            path={"contactId": contact_id},
            query={"externalId": external_id, "limit": limit, "cursor": cursor},
        )

    async def visitor_history(
        self, visitor_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> HistoryPage:
        """One page of a visitor's browser-bound history (``history:read``). Retried."""
        return await self._transport.call(
            op.VISITOR_HISTORY,
            path={"visitorId": visitor_id},
            query={"limit": limit, "cursor": cursor},
        )

    # --- merges ------------------------------------------------------------------------------

    async def merge_contacts(self, target_contact_id: str, body: ContactMerge) -> MergeAccepted:
        """Merge ``body.source_contact_id``'s history into the target contact
        (``contacts:manage``); applied asynchronously: poll ``get_merge``. Not retried."""
        return await self._transport.call(
            op.MERGE_CONTACTS, path={"contactId": target_contact_id}, body=body
        )

    async def get_merge(self, merge_id: str) -> MergeOut:
        """A merge and its status (``history:read`` or ``contacts:manage``); a login merge is
        ``NotFound`` until the merge consumer has recorded it. Retried."""
        return await self._transport.call(op.GET_MERGE, path={"mergeId": merge_id})

    async def undo_merge(self, merge_id: str) -> UndoResult:
        """Undo a done merge (``contacts:manage``). Not retried: a repeat after a lost answer
        would raise ``MergeNotUndoable`` for an undo that succeeded."""
        return await self._transport.call(op.UNDO_MERGE, path={"mergeId": merge_id})

    # --- contacts ----------------------------------------------------------------------------

    async def erase_contact(self, contact_id: str) -> ErasureReceipt:
        """Erase a contact (GDPR) and get the receipt (``contacts:manage``). Retried (DELETE):
        erasure is final, so when an earlier try's answer was lost after it committed, the
        retry raises ``NotFound`` (the contact is gone either way)."""
        return await self._transport.call(op.ERASE_CONTACT, path={"contactId": contact_id})
