"""The Python client retries only what is safe to repeat: idempotent calls through connection
errors, 502/503/504 and 429 (honouring Retry-After, within the policy's cap); never a POST.

The server here is a tiny real aiohttp app that fails the first requests in a scripted way
and then answers like widget-identity would, so every retry is a real HTTP exchange.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import msgspec
import pytest
from aiohttp import web
from widget_identity_client import (
    AdminClient,
    RateLimited,
    RetryPolicy,
    ServiceUnavailable,
    TransportError,
    WidgetClient,
    WidgetIdentityClient,
    WidgetIdentityError,
)
from widget_identity_client.errors import retry_after_seconds
from widget_identity_client.models import (
    AuthenticateUserRequest,
    CreateConversation,
    ErasureReceipt,
    HistoryOut,
    MergeOut,
    OrgInfo,
    Scope,
    UpdateOrgRequest,
)
from widget_identity_client.retry import NO_RETRY

from tests.support.server import running

ID = str(uuid.uuid4())
NOW = datetime(2030, 1, 1, tzinfo=UTC)
FAST = RetryPolicy(attempts=4, base_delay=0.001, max_delay=5.0)

Failure = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem(status: int, code: str, retry_after: str | None = "0") -> Failure:
    async def answer(request: web.Request) -> web.StreamResponse:
        body = {
            "type": "about:blank",
            "title": code,
            "status": status,
            "code": code,
            "detail": code,
        }
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return web.json_response(
            body, status=status, headers=headers, content_type="application/problem+json"
        )

    return answer


async def dropped(request: web.Request) -> web.StreamResponse:
    """Close the connection without an answer (the client sees it disconnect)."""
    assert request.transport is not None
    request.transport.close()
    return web.Response()


async def bad_gateway_page(request: web.Request) -> web.StreamResponse:
    return web.Response(
        status=502, text="<html><h1>502 Bad Gateway</h1></html>", content_type="text/html"
    )


class Scripted:
    """Answers the scripted failures in order, then the success body for the method."""

    def __init__(self, failures: list[Failure], success: dict[str, bytes]) -> None:
        self.failures = list(failures)
        self.success = success
        self.seen: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(f"{request.method} {request.path}")
        if self.failures:
            return await self.failures.pop(0)(request)
        return web.Response(body=self.success[request.method], content_type="application/json")


SUCCESS = {
    "GET": msgspec.json.encode(
        MergeOut(
            id=ID,
            status="done",
            reason="login",
            source=Scope(type="visitor", visitor_id=ID),
            target=Scope(type="contact", contact_id=ID),
            conversation_ids=[],
            conversations_moved=0,
            error=None,
            requested_at=NOW,
            completed_at=NOW,
            undone_at=None,
        )
    ),
    "PATCH": msgspec.json.encode(
        OrgInfo(
            id=ID,
            name="Acme",
            policy={},
            disabled=False,
            disabled_at=None,
            created_at=NOW,
            updated_at=NOW,
        )
    ),
    "DELETE": msgspec.json.encode(
        ErasureReceipt(
            receipt_id=ID,
            contact_id=ID,
            erased_at=NOW,
            conversations_deleted=0,
            messages_deleted=0,
            bindings_removed=0,
            sessions_ended=0,
            browsers_erased=0,
        )
    ),
}


Start = Callable[[list[Failure]], Awaitable[tuple[str, Scripted]]]


@pytest.fixture
async def scripted() -> AsyncIterator[Start]:
    """Start scripted servers: ``base_url, server = await scripted([failures...])``."""
    async with contextlib.AsyncExitStack() as servers:

        async def start(failures: list[Failure]) -> tuple[str, Scripted]:
            server = Scripted(failures, SUCCESS)
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", server.handle)
            api = await servers.enter_async_context(running(app))
            return api.base_url, server

        yield start


Call = Callable[[str, RetryPolicy], Awaitable[object]]


async def get_merge(base_url: str, retry: RetryPolicy) -> object:
    async with WidgetIdentityClient(base_url, "wik_test", retry=retry) as client:
        return await client.get_merge(ID)


async def erase_contact(base_url: str, retry: RetryPolicy) -> object:
    async with WidgetIdentityClient(base_url, "wik_test", retry=retry) as client:
        return await client.erase_contact(ID)


async def update_org(base_url: str, retry: RetryPolicy) -> object:
    async with AdminClient(base_url, "admin", retry=retry) as admin:
        return await admin.update_org(ID, UpdateOrgRequest(name="Acme"))


async def create_conversation(base_url: str, retry: RetryPolicy) -> object:
    async with WidgetIdentityClient(base_url, "wik_test", retry=retry) as client:
        return await client.create_conversation(CreateConversation(session_id=ID))


async def authenticate_user(base_url: str, retry: RetryPolicy) -> object:
    async with WidgetIdentityClient(base_url, "wik_test", retry=retry) as client:
        return await client.authenticate_user(AuthenticateUserRequest(user_id="u-1"))


async def undo_merge(base_url: str, retry: RetryPolicy) -> object:
    async with WidgetIdentityClient(base_url, "wik_test", retry=retry) as client:
        return await client.undo_merge(ID)


async def logout(base_url: str, retry: RetryPolicy) -> object:
    async with WidgetClient(base_url, retry=retry) as widget:
        return await widget.logout(ID, "wis_test")


IDEMPOTENT: dict[str, tuple[Call, type]] = {
    "GET getMerge": (get_merge, MergeOut),
    "DELETE eraseContact": (erase_contact, ErasureReceipt),
    "PATCH updateOrg (merge patch)": (update_org, OrgInfo),
}
NOT_IDEMPOTENT: dict[str, Call] = {
    "POST createConversation": create_conversation,
    "POST authenticateUser": authenticate_user,
    "POST undoMerge": undo_merge,
    "POST logout": logout,
}


@pytest.mark.parametrize("name", sorted(IDEMPOTENT))
async def test_an_idempotent_call_is_retried_through_transient_failures_until_it_succeeds(
    scripted: Start, name: str
) -> None:
    call, result_type = IDEMPOTENT[name]
    # Two drops in a row: aiohttp itself resends a GET or DELETE once when the connection
    # drops (RFC 9112 9.3.1), so only the second one reaches the client's own retry.
    base_url, server = await scripted(
        [dropped, dropped, problem(503, "db_unavailable"), problem(429, "rate_limited")]
    )
    result = await call(base_url, RetryPolicy(attempts=5, base_delay=0.001))
    assert isinstance(result, result_type)
    assert len(server.seen) == 5
    assert len(set(server.seen)) == 1  # the same request each time


async def test_a_get_is_retried_once_for_each_of_502_503_and_504(
    scripted: Start,
) -> None:
    base_url, server = await scripted(
        [problem(502, "bad_gateway", None), problem(503, "redis_unavailable"), problem(504, "x")]
    )
    merge = await get_merge(base_url, FAST)
    assert isinstance(merge, MergeOut) and merge.id == ID
    assert len(server.seen) == 4


async def test_retries_stop_after_the_policys_attempts_with_the_last_error(
    scripted: Start,
) -> None:
    base_url, server = await scripted([problem(503, "db_unavailable")] * 10)
    with pytest.raises(ServiceUnavailable) as unavailable:
        await get_merge(base_url, RetryPolicy(attempts=3, base_delay=0.001))
    assert unavailable.value.code == "db_unavailable"
    assert len(server.seen) == 3

    base_url, server = await scripted([problem(503, "db_unavailable")])
    with pytest.raises(ServiceUnavailable):
        await get_merge(base_url, NO_RETRY)
    assert len(server.seen) == 1


async def test_a_retry_after_beyond_the_cap_is_raised_at_once_not_waited_for(
    scripted: Start,
) -> None:
    base_url, server = await scripted([problem(429, "rate_limited", retry_after="3600")])
    with pytest.raises(RateLimited) as limited:
        await get_merge(base_url, FAST)
    assert limited.value.retry_after == 3600
    assert len(server.seen) == 1


@pytest.mark.parametrize("name", sorted(NOT_IDEMPOTENT))
@pytest.mark.parametrize(
    ("failure", "raised"),
    [
        (problem(503, "db_unavailable"), ServiceUnavailable),
        (problem(429, "rate_limited"), RateLimited),
        (dropped, TransportError),
    ],
    ids=["503", "429", "dropped connection"],
)
async def test_a_post_is_never_retried(
    scripted: Start,
    name: str,
    failure: Failure,
    raised: type[Exception],
) -> None:
    base_url, server = await scripted([failure, failure])
    with pytest.raises(raised):
        await NOT_IDEMPOTENT[name](base_url, FAST)
    assert len(server.seen) == 1


async def test_an_error_body_that_is_not_a_problem_is_still_a_typed_error(
    scripted: Start,
) -> None:
    base_url, _ = await scripted([bad_gateway_page])
    with pytest.raises(ServiceUnavailable) as gateway:
        await create_conversation(base_url, FAST)
    assert (gateway.value.status, gateway.value.code) == (502, None)
    assert gateway.value.title == "Bad Gateway"
    assert "502 Bad Gateway" in gateway.value.detail
    assert gateway.value.problem == {}

    async def teapot(request: web.Request) -> web.StreamResponse:
        return web.Response(status=418, text="short and stout")

    base_url, _ = await scripted([teapot])
    with pytest.raises(WidgetIdentityError) as odd:
        await create_conversation(base_url, FAST)
    assert type(odd.value) is WidgetIdentityError
    assert (odd.value.status, odd.value.detail) == (418, "short and stout")


async def test_a_session_history_read_is_retried_with_the_session_token(
    scripted: Start,
) -> None:
    empty = msgspec.json.encode(HistoryOut(conversations=[], next_cursor=None))
    base_url, server = await scripted([dropped, dropped])
    server.success = {"GET": empty}
    async with WidgetClient(base_url, retry=FAST) as widget:
        history = await widget.session_history(ID, "wis_test", limit=5)
    assert history.conversations == []
    assert server.seen == [f"GET /widget/sessions/{ID}/history"] * 3


# --- the policy itself -----------------------------------------------------------------------


def test_backoff_is_jittered_exponential_and_capped() -> None:
    policy = RetryPolicy(attempts=10, base_delay=0.5, max_delay=4.0)
    for attempt in range(1, 10):
        ceiling = min(4.0, 0.5 * 2 ** (attempt - 1))
        delays = [policy.backoff(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered, not a fixed schedule


def test_retry_after_is_the_wait_when_the_server_gives_one() -> None:
    policy = RetryPolicy(attempts=3, max_delay=10.0)
    limited = RateLimited(429, "rate_limited", "Rate limited", "slow down", {}, retry_after=7)
    assert policy.delay(1, limited) == 7
    assert policy.delay(3, limited) is None  # attempts used up
    too_long = RateLimited(429, "rate_limited", "", "", {}, retry_after=11)
    assert policy.delay(1, too_long) is None
    not_found = WidgetIdentityError(404, "not_found", "", "", {})
    assert policy.delay(1, not_found) is None


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_seconds("12") == 12
    now = datetime(2030, 1, 1, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=120), usegmt=True)
    assert retry_after_seconds(later, now=now.timestamp()) == 120
    assert retry_after_seconds(later, now=now.timestamp() + 500) == 0  # in the past: now
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None
