"""The Python client (clients/python) against the real all-in-one server: every operation
typed end to end, and every error a typed exception carrying its stable code."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from widget_identity_client import (
    AdminClient,
    Conflict,
    Forbidden,
    IdentityConflict,
    InsufficientScope,
    InvalidAdminToken,
    InvalidApiKey,
    LastSigningKey,
    NotFound,
    OrgMismatch,
    RateLimited,
    TokenInvalid,
    TokenRevoked,
    Unauthorized,
    ValidationFailed,
    WidgetClient,
    WidgetIdentityClient,
)
from widget_identity_client.models import (
    AddMessage,
    ApiKeyCreated,
    AuthenticateUserRequest,
    AuthenticateUserResponse,
    ContactMerge,
    CreateApiKeyRequest,
    CreateConversation,
    CreateOrgRequest,
    CreateWidgetTokenRequest,
    FieldError,
    FirstMessage,
    MergeOut,
    OrgInfo,
    Scope,
    SessionOut,
    SessionRequest,
    UpdateOrgRequest,
    UserIn,
)

from services import all_in_one
from shared.config import Settings
from shared.identity.api_keys import SCOPES
from tests.conftest import ADMIN_TOKEN
from tests.support.server import eventually, running

ORIGIN = "https://shop.example"


@dataclass
class Stack:
    """A running all-in-one server with one org, provisioned through the admin client."""

    base_url: str
    admin: AdminClient
    client: WidgetIdentityClient  # an API key with every scope
    widget: WidgetClient
    org: OrgInfo
    key: ApiKeyCreated
    widget_token: str

    async def authenticate(
        self,
        user_id: str,
        *,
        email: str | None = None,
        name: str | None = None,
        external_id: str | None = None,
    ) -> AuthenticateUserResponse:
        return await self.client.authenticate_user(
            AuthenticateUserRequest(
                user_id=user_id, email=email, name=name, external_id=external_id
            )
        )

    async def session(
        self, user: UserIn | None = None, visitor_token: str | None = None
    ) -> SessionOut:
        return await self.widget.create_session(
            SessionRequest(widget_token=self.widget_token, visitor_token=visitor_token, user=user)
        )


async def provision(admin: AdminClient, name: str) -> tuple[OrgInfo, ApiKeyCreated, str]:
    """An org, an API key with every scope and a widget token for ``ORIGIN``."""
    org = await admin.create_org(CreateOrgRequest(name=name))
    key = await admin.create_api_key(org.id, CreateApiKeyRequest(scopes=sorted(SCOPES)))
    widget = await admin.create_widget_token(
        org.id, CreateWidgetTokenRequest(allowed_origins=[ORIGIN])
    )
    return org, key, widget.token


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    async with (
        running(all_in_one.create_app(settings)) as api,
        AdminClient(api.base_url, ADMIN_TOKEN) as admin,
        WidgetClient(api.base_url, origin=ORIGIN) as widget,
    ):
        org, key, widget_token = await provision(admin, "Acme")
        async with WidgetIdentityClient(api.base_url, key.key) as client:
            yield Stack(api.base_url, admin, client, widget, org, key, widget_token)


async def merge_with_status(client: WidgetIdentityClient, merge_id: str, status: str) -> MergeOut:
    """The merge once the merge consumer has brought it to ``status`` (a login merge is not
    found until the consumer records it)."""
    seen: list[MergeOut] = []

    async def reached() -> bool:
        try:
            seen.append(await client.get_merge(merge_id))
        except NotFound:
            return False
        return seen[-1].status == status

    await eventually(reached, timeout=15)
    return seen[-1]


# --- every operation, typed ------------------------------------------------------------------


async def test_a_visitors_history_follows_them_into_their_contact_and_back_out_on_undo(
    stack: Stack,
) -> None:
    anonymous = await stack.session(UserIn(name="Ada", email="ada@example.com"))
    visitor_id = anonymous.identity.visitor_id
    assert anonymous.identity.level == "unverified"
    assert anonymous.identity.attributes["email"].source == "browser"

    info = await stack.client.get_session(anonymous.session_id)
    assert (info.level, info.visitor_id, info.active) == ("unverified", visitor_id, True)

    created = await stack.client.create_conversation(
        CreateConversation(
            session_id=anonymous.session_id, message=FirstMessage(text="Hi, my order is late")
        )
    )
    assert created.scope == Scope(type="visitor", visitor_id=visitor_id)
    assert created.message is not None and not created.message.sender_verified
    reply = await stack.client.add_message(
        created.id, AddMessage(text="Sorry to hear that", author="agent")
    )
    assert (reply.conversation_id, reply.author) == (created.id, "agent")

    page = await stack.client.visitor_history(visitor_id, limit=10)
    assert [c.id for c in page.conversations] == [created.id]
    assert {m.text for m in page.conversations[0].messages} == {
        "Hi, my order is late",
        "Sorry to hear that",
    }
    own = await stack.widget.session_history(anonymous.session_id, anonymous.session_token)
    assert [c.id for c in own.conversations] == [created.id]

    token = await stack.authenticate(
        "u-42", email="ada@example.com", name="Ada Lovelace", external_id="workspace-1"
    )
    verified = await stack.session(
        UserIn(token=token.token, external_id="workspace-1"), anonymous.visitor_token
    )
    assert verified.identity.level == "verified"
    assert verified.identity.contact_id == token.contact_id
    assert verified.merge is not None

    merge = await merge_with_status(stack.client, verified.merge.id, "done")
    assert merge.conversation_ids == [created.id]
    assert merge.target == Scope(
        type="contact", contact_id=token.contact_id, external_id="workspace-1"
    )
    history = await stack.client.contact_history(token.contact_id, external_id="workspace-1")
    assert [c.id for c in history.conversations] == [created.id]

    undone = await stack.client.undo_merge(merge.id)
    assert (undone.status, undone.conversations_restored) == ("undone", 1)
    after = await stack.client.contact_history(token.contact_id, external_id="workspace-1")
    assert after.conversations == []


async def test_devices_are_listed_unbound_and_logged_out(stack: Stack) -> None:
    token = await stack.authenticate("u-7")
    contact_id = token.contact_id
    first = await stack.session(UserIn(token=token.token))
    second = await stack.session(UserIn(token=token.token))  # another browser
    devices = await stack.client.list_devices(contact_id)
    assert {d.visitor_id for d in devices.devices} == {
        first.identity.visitor_id,
        second.identity.visitor_id,
    }

    await stack.client.delete_device(contact_id, first.identity.visitor_id)
    out = await stack.widget.logout(second.session_id, second.session_token)
    assert out.visitor_token != second.visitor_token

    assert (await stack.client.list_devices(contact_id)).devices == []
    assert not (await stack.client.get_session(second.session_id)).active


async def test_contacts_merge_only_explicitly_and_erasure_returns_a_receipt(stack: Stack) -> None:
    ada = await stack.authenticate("u-ada")
    bob = await stack.authenticate("u-bob")
    bobs = await stack.session(UserIn(token=bob.token))
    conversation = await stack.client.create_conversation(
        CreateConversation(session_id=bobs.session_id, message=FirstMessage(text="Hello"))
    )

    accepted = await stack.client.merge_contacts(
        ada.contact_id, ContactMerge(source_contact_id=bob.contact_id)
    )
    assert accepted.status == "pending"
    merge = await merge_with_status(stack.client, accepted.id, "done")
    assert merge.conversation_ids == [conversation.id]
    assert merge.source == Scope(type="contact", contact_id=bob.contact_id, external_id="")

    receipt = await stack.client.erase_contact(ada.contact_id)
    assert receipt.contact_id == ada.contact_id
    assert receipt.conversations_deleted == 1
    with pytest.raises(NotFound):
        await stack.client.erase_contact(ada.contact_id)  # erasure is final


async def test_the_admin_client_runs_an_orgs_lifecycle(stack: Stack) -> None:
    org_id = stack.org.id
    assert stack.org.signing_key is not None
    first_kid = stack.org.signing_key.kid
    assert (await stack.admin.get_org(org_id)).name == "Acme"

    updated = await stack.admin.update_org(
        org_id, UpdateOrgRequest(name="Acme GmbH", policy={"mergeAnonymousOnLogin": False})
    )
    assert updated.name == "Acme GmbH"
    assert updated.policy["mergeAnonymousOnLogin"] is False

    rotated = await stack.admin.rotate_signing_key(org_id)
    jwks = await stack.client.jwks(org_id)
    assert {k["kid"] for k in jwks.keys} == {first_kid, rotated.kid}
    deleted = await stack.admin.delete_signing_key(org_id, first_kid)
    assert deleted.kid == first_kid
    assert {k["kid"] for k in (await stack.client.jwks(org_id)).keys} == {rotated.kid}
    with pytest.raises(LastSigningKey) as last:
        await stack.admin.delete_signing_key(org_id, rotated.kid)
    assert (last.value.status, last.value.code) == (409, "last_signing_key")
    assert isinstance(last.value, Conflict)

    reader = await stack.admin.create_api_key(org_id, CreateApiKeyRequest(scopes=["history:read"]))
    revoked = await stack.admin.revoke_api_key(org_id, reader.id)
    assert revoked.id == reader.id
    async with WidgetIdentityClient(stack.base_url, reader.key) as client:
        with pytest.raises(InvalidApiKey):
            await client.visitor_history(str(uuid.uuid4()))


# --- typed errors, by code -------------------------------------------------------------------


async def test_a_wrong_credential_is_a_401_with_its_code(stack: Stack) -> None:
    async with WidgetIdentityClient(stack.base_url, "wik_not-a-real-key") as client:
        with pytest.raises(InvalidApiKey) as bad_key:
            await client.get_session(str(uuid.uuid4()))
    assert (bad_key.value.status, bad_key.value.code) == (401, "invalid_api_key")
    assert isinstance(bad_key.value, Unauthorized)
    assert bad_key.value.problem["code"] == "invalid_api_key"

    async with AdminClient(stack.base_url, "not-the-admin-token") as admin:
        with pytest.raises(InvalidAdminToken) as bad_admin:
            await admin.get_org(stack.org.id)
    assert (bad_admin.value.status, bad_admin.value.code) == (401, "invalid_admin_token")


async def test_a_key_without_the_scope_is_a_403_naming_the_scope(stack: Stack) -> None:
    reader = await stack.admin.create_api_key(
        stack.org.id, CreateApiKeyRequest(scopes=["history:read"])
    )
    async with WidgetIdentityClient(stack.base_url, reader.key) as client:
        with pytest.raises(InsufficientScope) as missing:
            await client.authenticate_user(AuthenticateUserRequest(user_id="u-1"))
    assert (missing.value.status, missing.value.code) == (403, "insufficient_scope")
    assert missing.value.scope == "contacts:authenticate"
    assert isinstance(missing.value, Forbidden)


async def test_unknown_and_other_orgs_ids_are_a_404_not_found(stack: Stack) -> None:
    with pytest.raises(NotFound) as merge:
        await stack.client.get_merge(str(uuid.uuid4()))
    assert (merge.value.status, merge.value.code) == (404, "not_found")
    with pytest.raises(NotFound):
        await stack.admin.get_org(str(uuid.uuid4()))
    # Tenant isolation: another org's session reads exactly like a missing one.
    _, _, other_widget = await provision(stack.admin, "Other")
    async with WidgetClient(stack.base_url, origin=ORIGIN) as widget:
        theirs = await widget.create_session(SessionRequest(widget_token=other_widget))
    with pytest.raises(NotFound):
        await stack.client.get_session(theirs.session_id)


async def test_a_verified_email_of_another_contact_is_a_409_identity_conflict(
    stack: Stack,
) -> None:
    await stack.authenticate("u-1", email="shared@example.com")
    with pytest.raises(IdentityConflict) as conflict:
        await stack.authenticate("u-2", email="shared@example.com")
    assert (conflict.value.status, conflict.value.code) == (409, "identity_conflict")


async def test_invalid_input_is_a_422_with_the_field_errors(stack: Stack) -> None:
    with pytest.raises(ValidationFailed) as visitor:
        await stack.session(UserIn(name="Ada", email="not-an-email"))
    assert (visitor.value.status, visitor.value.code) == (422, "validation_failed")
    assert visitor.value.errors == [FieldError(field="user.email", message="not an email address")]

    with pytest.raises(ValidationFailed) as nobody:
        await stack.client.authenticate_user(AuthenticateUserRequest(name="No identity"))
    assert nobody.value.errors == []
    assert "userId or email" in nobody.value.detail


async def test_too_many_requests_is_a_429_with_retry_after(stack: Stack) -> None:
    await stack.admin.update_org(
        stack.org.id, UpdateOrgRequest(policy={"rateLimits": {"authenticatePerKey": 1}})
    )
    await stack.authenticate("u-1")
    with pytest.raises(RateLimited) as limited:
        await stack.authenticate("u-1")
    assert (limited.value.status, limited.value.code) == (429, "rate_limited")
    assert limited.value.retry_after is not None and limited.value.retry_after > 0


async def test_contact_token_failures_are_typed_by_code(stack: Stack) -> None:
    with pytest.raises(TokenInvalid) as invalid:
        await stack.session(UserIn(token="not-a-jwt"))
    assert (invalid.value.status, invalid.value.code) == (401, "token_invalid")

    token = await stack.authenticate("u-9")
    revoked = await stack.client.revoke_tokens(token.contact_id)
    assert revoked.contact_id == token.contact_id
    with pytest.raises(TokenRevoked) as gone:
        await stack.session(UserIn(token=token.token))
    assert (gone.value.status, gone.value.code) == (401, "token_revoked")

    _, _, other_widget = await provision(stack.admin, "Other")
    fresh = await stack.authenticate("u-10")
    with pytest.raises(OrgMismatch) as mismatch:
        await stack.widget.create_session(
            SessionRequest(widget_token=other_widget, user=UserIn(token=fresh.token))
        )
    assert (mismatch.value.status, mismatch.value.code) == (403, "org_mismatch")
