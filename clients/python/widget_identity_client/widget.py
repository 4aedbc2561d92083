"""The widget-facing operations, for code that stands in for a visitor's browser (server-side
rendering, mobile backends, end-to-end tests). The widget in a browser calls these itself.

No credential at construction: ``create_session`` presents the widget token in its body, the
other calls the session token it returned. ``origin`` is sent as the ``Origin`` header, which
the server checks against the widget token's allowed origins (``OriginNotAllowed``).
Retried: ``session_history`` (a GET). Never retried: ``create_session`` and ``logout``.
"""

from __future__ import annotations

import aiohttp

from widget_identity_client import operations as op
from widget_identity_client.models import HistoryOut, LogoutOut, SessionOut, SessionRequest
from widget_identity_client.retry import DEFAULT_RETRY, RetryPolicy
from widget_identity_client.transport import DEFAULT_TIMEOUT, BaseClient


class WidgetClient(BaseClient):
    """``POST /widget/sessions`` and what its session token allows."""

    def __init__(
        self,
        base_url: str,
        *,
        origin: str | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        super().__init__(
            base_url,
            None,
            session=session,
            timeout=timeout,
            retry=retry,
            headers={"Origin": origin} if origin is not None else None,
        )

    async def create_session(self, body: SessionRequest) -> SessionOut:
        """Resolve a session: anonymous, unverified, or verified by ``body.user.token``.
        Keep ``visitor_token`` and send it next time. Not retried: each call opens a session
        (and may start a login merge)."""
        return await self._transport.call(op.CREATE_SESSION, body=body)

    async def session_history(
        self,
        session_id: str,
        session_token: str,
        *,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> HistoryOut:
        """The conversations this session's scope may see, one page. Retried."""
        return await self._transport.call(
            op.SESSION_HISTORY,
            path={"sessionId": session_id},
            query={"limit": limit, "cursor": cursor},
            token=session_token,
        )

    async def logout(self, session_id: str, session_token: str) -> LogoutOut:
        """Unbind this browser and end the session; returns a fresh ``visitor_token``. Not
        retried: a repeat would fail with the session already ended."""
        return await self._transport.call(
            op.LOGOUT, path={"sessionId": session_id}, token=session_token
        )
