"""The internal API's HTTP handlers, for the org's platform services (API key auth).

  GET /v1/sessions/{id} (sessions:read),
  GET /v1/contacts/{contactId}/devices, DELETE /v1/contacts/{contactId}/devices/{visitorId}
  (contacts:manage)

Each reads top-down: authenticate, parse the path, run the use case, build the response.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from services.session_resolution import device_queries
from services.session_resolution.app_keys import Deps
from services.session_resolution.schemas import (
    AttributeOut,
    DeviceOut,
    DevicesOut,
    SessionInfoOut,
)
from services.session_resolution.session_access import (
    Introspected,
    introspect_session,
    revoke_device,
)
from shared.db import DB_POOL
from shared.errors import not_found
from shared.identity.api_keys import API_KEYS
from shared.web.http import json_response, parse_uuid
from shared.web.openapi import Content, operation


@operation(
    summary="Session introspection for platform services",
    tags=["sessions"],
    responses={200: SessionInfoOut},
    security="apiKey",
    scope="sessions:read",
    errors=(404,),
)
async def get_session(request: web.Request) -> web.Response:
    principal = await request.app[API_KEYS].authenticate(request, "sessions:read")
    session_id = parse_uuid(request.match_info["session_id"], "session")
    found = await introspect_session(Deps.from_app(request.app), principal.org_id, session_id)
    return json_response(_session_info_out(found))


def _session_info_out(found: Introspected) -> SessionInfoOut:
    row = found.row
    return SessionInfoOut(
        id=row.id,
        org_id=row.org_id,
        visitor_id=row.visitor_id,
        level=row.level,
        contact_id=row.contact_id,
        external_id=row.external_id or None,
        external_id_verified=row.external_id_verified,
        attributes={k: msgspec.convert(v, AttributeOut) for k, v in row.attributes.items()},
        active=found.active,
        created_at=row.created_at,
        expires_at=row.expires_at,
        ended_at=row.ended_at,
        end_reason=found.end_reason,
    )


@operation(
    summary="The devices (visitors) bound to a contact",
    tags=["sessions"],
    responses={200: DevicesOut},
    security="apiKey",
    scope="contacts:manage",
    errors=(404,),
)
async def list_devices(request: web.Request) -> web.Response:
    principal = await request.app[API_KEYS].authenticate(request, "contacts:manage")
    contact_id = parse_uuid(request.match_info["contact_id"], "contact")
    rows = await device_queries.contact_devices(request.app[DB_POOL], principal.org_id, contact_id)
    return json_response(_devices_out(rows))


def _devices_out(rows: list[device_queries.DeviceRow]) -> DevicesOut:
    return DevicesOut(
        devices=[
            DeviceOut(
                visitor_id=r.visitor_id,
                external_id=r.external_id or None,
                bound_at=r.bound_at,
                last_seen_at=r.last_seen_at,
            )
            for r in rows
        ]
    )


@operation(
    summary="Unbind one device from a contact and end its sessions",
    tags=["sessions"],
    responses={204: Content(None, description="Unbound.")},
    security="apiKey",
    scope="contacts:manage",
    errors=(404,),
)
async def delete_device(request: web.Request) -> web.Response:
    principal = await request.app[API_KEYS].authenticate(request, "contacts:manage")
    contact_id = parse_uuid(request.match_info["contact_id"], "contact")
    visitor_id = parse_uuid(request.match_info["visitor_id"], "device")
    found = await revoke_device(
        Deps.from_app(request.app),
        org_id=principal.org_id,
        contact_id=contact_id,
        visitor_id=visitor_id,
    )
    if not found:
        raise not_found("device")
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_get("/v1/sessions/{session_id}", get_session)
    router.add_get("/v1/contacts/{contact_id}/devices", list_devices)
    router.add_delete("/v1/contacts/{contact_id}/devices/{visitor_id}", delete_device)
