"""Faults (docs/promises.md): without Redis the service degrades instead of falling over.

Redis is cut for 10 s under a concurrent load of new and returning visitors, verified logins
and authenticate-user. They all keep answering from Postgres (rate limits count per process,
the session cache is skipped, events wait in the outbox), readiness stays 200 (``degraded``)
so no replica leaves the load balancer, and once Redis is back every event is published and
every merge a login promised ends ``done``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

import pytest
import redis.asyncio as aioredis

from devstack import DevServers
from services import all_in_one
from shared.config import Settings
from tests.support.load import Outcome, bad_log_lines, by_kind, call, client, outage, steady_load
from tests.support.proxy import fault_proxy
from tests.support.server import Api, eventually, running
from tests.support.tokens import mint_contact_token, provision_org
from tests.test_faults import ORIGIN, prepare_login, visit

pytestmark = pytest.mark.slow

RPS = 30
LOAD_SECONDS = 16.0
CUT_AT, RESTORE_AT = 3.0, 13.0
LOGINS = int(LOAD_SECONDS * RPS / 4) + 1


async def test_a_redis_outage_degrades_sessions_and_authentication_without_failing_them(
    settings: Settings,
    servers: DevServers,
    caplog: pytest.LogCaptureFixture,
    redis: aioredis.Redis,
) -> None:
    caplog.set_level(logging.WARNING)
    async with fault_proxy(servers.redis_url) as (proxy, redis_url):
        app = all_in_one.create_app(settings.with_overrides(redis_url=redis_url))
        async with running(app) as started, client(started) as api:
            org = await provision_org(api)
            visitors = [await visit(api, org) for _ in range(10)]
            logins = [await prepare_login(api, org, f"u-out-{n}") for n in range(LOGINS)]
            await mint_contact_token(api, org, userId="u-backend")

            def fire(i: int, t0: float) -> Coroutine[Any, Any, Outcome]:
                match i % 4:
                    case 0:
                        return call(
                            api,
                            "new visitor",
                            "POST",
                            "/widget/sessions",
                            json={"widgetToken": org.widget_token},
                            headers={"Origin": ORIGIN},
                            t0=t0,
                        )
                    case 1:
                        visitor = visitors[i // 4 % len(visitors)]
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
                            expected=visitor["identity"]["visitorId"],
                            pick=lambda body: body["identity"]["visitorId"],
                        )
                    case 2:
                        login = logins[i // 4]
                        return call(
                            api,
                            "verified login",
                            "POST",
                            "/widget/sessions",
                            json={
                                "widgetToken": org.widget_token,
                                "visitorToken": login.visitor_token,
                                "user": {"token": login.contact_token},
                            },
                            headers={"Origin": ORIGIN},
                            t0=t0,
                        )
                    case _:
                        return call(
                            api,
                            "authenticate-user",
                            "POST",
                            "/widget/authenticate-user",
                            json={"userId": "u-backend"},
                            token=org.api_key,
                            t0=t0,
                        )

            async def probe(t0: float) -> list[tuple[float, int, Any]]:
                """/readyz twice a second for the whole run, as a kubelet would."""
                seen = []
                while time.monotonic() < t0 + LOAD_SECONDS:
                    reply = await api.get("/readyz")
                    seen.append((time.monotonic() - t0, reply.status, reply.body))
                    await asyncio.sleep(0.5)
                return seen

            t0 = time.monotonic() + 0.1
            outcomes, restored_at, probes = await asyncio.gather(
                steady_load(fire, rps=RPS, seconds=LOAD_SECONDS, t0=t0),
                outage(proxy, t0=t0, cut_at=CUT_AT, restore_at=RESTORE_AT),
                probe(t0),
            )
            merges = [o.body["merge"]["id"] for o in by_kind(outcomes, "verified login")]
            await eventually(lambda: all_done(api, org.api_key, merges), timeout=20)
            consumed_after = time.monotonic() - restored_at

    during = [o for o in outcomes if CUT_AT + 0.2 < o.sent_at < RESTORE_AT - 0.2]
    print(
        f"\nredis outage of {RESTORE_AT - CUT_AT:g} s: {len(outcomes)} requests, "
        + ", ".join(
            f"{kind} {sorted({o.status for o in by_kind(during, kind)})} "
            f"max {max(o.elapsed for o in by_kind(during, kind)):.2f} s"
            for kind in ("new visitor", "returning visitor", "verified login", "authenticate-user")
        )
        + f" during it; readiness {sorted({(s, b['status']) for _, s, b in probes})}; "
        f"all {len(merges)} promised merges done {consumed_after:.1f} s after the restore"
    )
    assert [o for o in outcomes if o.status == 0] == [], "no answer: a hang"
    # 2xx, or a per-process rate limit; never a 503 for want of Redis.
    assert [
        (o.kind, o.status, o.body) for o in outcomes if o.status >= 300 and o.status != 429
    ] == []
    assert [o for o in outcomes if o.status == 200 and o.expected != o.got] == []
    assert all(merges) and len(merges) == len(by_kind(outcomes, "verified login"))
    assert {status for _, status, _ in probes} == {200}
    assert any(
        body["status"] == "degraded" and list(body["degraded"]) == ["redis"]
        for _, _, body in probes
    ), "the outage never showed in /readyz"
    assert bad_log_lines(caplog) == []


async def all_done(api: Api, api_key: str, merge_ids: list[str]) -> bool:
    for merge_id in merge_ids:
        reply = await api.get(f"/v1/merges/{merge_id}", token=api_key)
        if reply.status != 200 or reply.json["status"] != "done":
            return False
    return True
