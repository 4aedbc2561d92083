"""What every service process is made of, before the service adds its own routes."""

from __future__ import annotations

from aiohttp import web

from shared.bus.outbox import OUTBOX, Outbox
from shared.bus.relay import add_relay
from shared.bus.retention import add_stream_retention
from shared.config import Settings
from shared.identity.api_keys import API_KEYS, ApiKeyAuthenticator, install_auth_throttle
from shared.identity.revocation import install_revocation_feed
from shared.tracing import configure as configure_tracing
from shared.web.http import base_app


def service_app(settings: Settings, *, name: str) -> web.Application:
    """Base HTTP app (probes, metrics, errors, pools) plus the outbox and, unless disabled,
    the outbox relay and the events stream's retention. Builds objects only; every connection opens at start-up."""
    configure_tracing(settings, service_name=name)  # once per process, before any Application
    app = base_app(settings, name=name)
    app[OUTBOX] = Outbox(settings.event_streams)
    app[API_KEYS] = ApiKeyAuthenticator()
    # Every process that checks API keys runs the revocation listener, so a revoked key (or a
    # disabled org) is refused on every replica within a second.
    install_revocation_feed(app).watch(app[API_KEYS])
    install_auth_throttle(app)
    if settings.relay_enabled:
        add_relay(app)
        add_stream_retention(app)
    return app
