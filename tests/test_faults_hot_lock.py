"""Faults (docs/promises.md): one hot lock does not stall the endpoints that do not need it.

A transaction holds ``LOCK TABLE contacts IN ACCESS EXCLUSIVE MODE`` for 15 s under a mixed
load. What needs ``contacts`` fails fast and honestly (503 problem+json with Retry-After,
within its budget: the pool's ``lock_timeout`` frees the connection), what does not keeps
answering, and all of it recovers within seconds of the release. Latencies are printed;
assertions are loose bounds.

What needs ``contacts`` is more than it seems: verified logins and authenticate-user read
and write it, and so does every INSERT into a table with a foreign key to it, even with a
NULL key (Postgres's foreign-key check opens the referenced table first): a new anonymous
session (``sessions.contact_id``) and a new conversation (``conversations.contact_id``)
cannot commit while ``contacts`` is locked ACCESS EXCLUSIVE. Returning visitors and history
reads do not touch it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

import asyncpg
import pytest

from services import all_in_one
from shared.config import Settings
from tests.support.load import Outcome, bad_log_lines, by_kind, call, client, steady_load
from tests.support.server import running
from tests.support.tokens import mint_contact_token, provision_org
from tests.test_faults import ORIGIN, visit

pytestmark = pytest.mark.slow

RPS = 42
LOCK_AT, LOCK_SECONDS = 3.0, 15.0
LOAD_SECONDS = LOCK_AT + LOCK_SECONDS + 5.0
RECOVERY = 3.0  # every request sent this long after the release must succeed
SLACK = 1.0  # over a budget: scheduling on a shared machine, not a hang
USERS = 10

NEEDS_CONTACTS = ("new anonymous session", "conversation", "verified login", "authenticate-user")
NEEDS_NO_CONTACTS = ("returning visitor", "widget history", "visitor history")


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0


async def test_a_hot_lock_on_contacts_fails_only_what_needs_contacts_fast_and_all_recovers(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    budgets = {
        "new anonymous session": settings.widget_request_timeout,
        "returning visitor": settings.widget_request_timeout,
        "widget history": settings.widget_request_timeout,
        "verified login": settings.widget_request_timeout,
        "conversation": settings.request_timeout,
        "authenticate-user": settings.request_timeout,
        "visitor history": settings.request_timeout,
    }
    async with (
        running(all_in_one.create_app(settings)) as started,
        client(started, timeout=max(budgets.values()) + 5) as api,
    ):
        org = await provision_org(api)
        anonymous = [await visit(api, org) for _ in range(USERS)]
        tokens = [
            (await mint_contact_token(api, org, userId=f"u-hot-{n}"))["token"] for n in range(USERS)
        ]

        def fire(i: int, t0: float) -> Coroutine[Any, Any, Outcome]:
            n = i // 7 % USERS
            visitor = anonymous[n]
            match i % 7:
                case 0:
                    return call(
                        api,
                        "new anonymous session",
                        "POST",
                        "/widget/sessions",
                        json={"widgetToken": org.widget_token},
                        headers={"Origin": ORIGIN},
                        t0=t0,
                    )
                case 1:
                    return call(
                        api,
                        "conversation",
                        "POST",
                        "/v1/conversations",
                        json={"sessionId": visitor["sessionId"]},
                        token=org.api_key,
                        t0=t0,
                    )
                case 2:
                    return call(
                        api,
                        "verified login",
                        "POST",
                        "/widget/sessions",
                        json={"widgetToken": org.widget_token, "user": {"token": tokens[n]}},
                        headers={"Origin": ORIGIN},
                        t0=t0,
                    )
                case 3:
                    return call(
                        api,
                        "authenticate-user",
                        "POST",
                        "/widget/authenticate-user",
                        json={"userId": f"u-hot-{n}"},
                        token=org.api_key,
                        t0=t0,
                    )
                case 4:
                    return call(
                        api,
                        "returning visitor",
                        "POST",
                        "/widget/sessions",
                        json={
                            "widgetToken": org.widget_token,
                            "visitorToken": visitor["visitorToken"],
                        },
                        headers={"Origin": ORIGIN},
                        t0=t0,
                    )
                case 5:
                    return call(
                        api,
                        "widget history",
                        "GET",
                        f"/widget/sessions/{visitor['sessionId']}/history",
                        token=visitor["sessionToken"],
                        headers={"Origin": ORIGIN},
                        t0=t0,
                    )
                case _:
                    return call(
                        api,
                        "visitor history",
                        "GET",
                        f"/v1/visitors/{visitor['identity']['visitorId']}/history",
                        token=org.api_key,
                        t0=t0,
                    )

        async def hold_lock(t0: float) -> tuple[float, float]:
            """The lock's hold, in seconds since ``t0``."""
            await asyncio.sleep(max(0.0, t0 + LOCK_AT - time.monotonic()))
            conn = await asyncpg.connect(settings.database_url)
            try:
                async with conn.transaction():
                    await conn.execute("LOCK TABLE contacts IN ACCESS EXCLUSIVE MODE")
                    locked = time.monotonic() - t0
                    await asyncio.sleep(LOCK_SECONDS)
                released = time.monotonic() - t0
            finally:
                await conn.close()
            return locked, released

        t0 = time.monotonic() + 0.1
        outcomes, (locked, released) = await asyncio.gather(
            steady_load(fire, rps=RPS, seconds=LOAD_SECONDS, t0=t0), hold_lock(t0)
        )

    def during(kind: str) -> list[Outcome]:
        return [o for o in by_kind(outcomes, kind) if locked < o.sent_at < released - SLACK]

    lines = [f"\nhot lock on contacts for {released - locked:.1f} s, {len(outcomes)} requests:"]
    for kind in (*NEEDS_NO_CONTACTS, *NEEDS_CONTACTS):
        held = during(kind)
        statuses = sorted({o.status for o in held})
        lines.append(
            f"  {kind}: {statuses} during the lock, p99 {p99([o.elapsed for o in held]):.2f} s "
            f"max {max((o.elapsed for o in held), default=0):.2f} s (budget {budgets[kind]:g} s)"
        )
    after = [o for o in outcomes if o.sent_at > released]
    first_ok = min(
        (o.sent_at - released for o in after if o.kind in NEEDS_CONTACTS and o.status < 300),
        default=float("nan"),
    )
    lines.append(f"  needs-contacts requests succeed again {first_ok:.2f} s after the release")
    print("\n".join(lines))

    assert [o for o in outcomes if o.status == 0] == [], "no answer: a hang"
    assert [
        (o.kind, o.status, o.body) for o in outcomes if o.status >= 500 and not o.is_problem_503
    ] == []
    for outcome in outcomes:
        # Nothing outlives its budget, whatever it waits for.
        assert outcome.elapsed < budgets[outcome.kind] + SLACK, (outcome.kind, outcome.elapsed)
    for kind in NEEDS_NO_CONTACTS:
        # Neither the lock nor the requests parked on it take what these need.
        assert [(o.status, o.body) for o in by_kind(outcomes, kind) if o.status >= 300] == [], kind
    for kind in NEEDS_CONTACTS:
        refused = [o for o in during(kind) if o.status == 503]
        assert refused, f"the lock did not reach {kind}"
        assert {o.body["code"] for o in refused} <= {"db_busy", "deadline_exceeded"}
        assert [
            o.status for o in by_kind(outcomes, kind) if o.status >= 300 and o.status != 503
        ] == []
    # Recovery: within seconds of the release, everything works again.
    late = [o for o in after if o.sent_at > released + RECOVERY]
    assert late
    assert [(o.kind, o.status, o.body) for o in late if o.status >= 300] == []
    assert bad_log_lines(caplog) == []
