"""From a POST /widget/sessions body to the identity rules' two inputs: what the browser says
(``browser_input``, pure; a 422 names the bad value) and what a contact token proves
(``server_identity``, verified).

A token that fails is its own 401/403: never a silent downgrade to unverified.
"""

from __future__ import annotations

import msgspec

from services.session_resolution.collect import validate_fields
from services.session_resolution.identity import (
    BrowserInput,
    ServerIdentity,
    normalise_browser_input,
)
from services.session_resolution.schemas import CUSTOM_DATA_MAX_BYTES, SessionRequest, UserIn
from shared.errors import validation_failed
from shared.identity.contact_tokens import ContactTokenVerifier
from shared.identity.widget_tokens import WidgetSettings


def browser_input(body: SessionRequest, settings: WidgetSettings) -> BrowserInput:
    """The browser's values, within the request's limits and the widget's field rules."""
    if body.custom_data and len(msgspec.json.encode(body.custom_data)) > CUSTOM_DATA_MAX_BYTES:
        raise validation_failed(f"customData exceeds {CUSTOM_DATA_MAX_BYTES} bytes")
    fields = validate_fields(body.fields, settings)
    user = body.user
    return normalise_browser_input(
        BrowserInput(
            name=None if user is None else user.name,
            email=None if user is None else user.email,
            external_id=None if user is None else user.external_id,
            fields=fields,
            custom_data=body.custom_data,
        )
    )


async def server_identity(
    verifier: ContactTokenVerifier, user: UserIn | None, org_id: str
) -> ServerIdentity | None:
    """The contact a presented contact token proves, or None when none was presented."""
    if user is None or user.token is None:
        return None
    claims = await verifier.verify(user.token, org_id=org_id)
    return ServerIdentity(
        contact_id=claims.contact_id,
        issued_at=claims.issued_at,
        expires_at=claims.expires_at,
        external_id=claims.external_id,
        name=claims.name,
        email=claims.email,
        custom_data=claims.custom_data,
        kid=claims.kid,
        minted_by=claims.minted_by,
    )
