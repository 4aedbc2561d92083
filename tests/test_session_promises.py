"""docs/promises.md, promises 1, 2, 3, 6, 7 and 8, proven against the real server: one test
per promise, each a story a customer would recognise."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping

import asyncpg

from tests.support.server import Api
from tests.support.tokens import OrgFixture, mint_contact_token, provision_org
from tests.test_sessions import (
    ORIGIN,
    history,
    logout,
    outbox_types,
    resolved,
    row_counts,
    say,
    seen,
    visit,
)
from tests.test_sessions import (
    api as api,
)
from tests.test_sessions import (
    org as org,
)


def _b64(doc: Mapping[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def unsigned_token(org: OrgFixture, contact_id: str, **claims: object) -> str:
    """The classic forgery: a token claiming to be ours with ``alg: none`` and no signature."""
    header = {"alg": "none", "typ": "wi-contact+jwt", "kid": org.kid}
    payload = {
        "iss": "widget-identity",
        "aud": "widget-identity:widget",
        "sub": contact_id,
        "org": org.org_id,
        "iat": 1,
        "exp": 4_000_000_000,
        "jti": "x",
        **claims,
    }
    return f"{_b64(header)}.{_b64(payload)}."


def tampered(token: str) -> str:
    """The same token with one signature character changed."""
    last = token[-2]
    return token[:-2] + ("A" if last != "A" else "B") + token[-1]


async def test_promise_1_only_a_contact_token_verifies(
    api: Api, org: OrgFixture, pool: asyncpg.Pool
) -> None:
    # Both orgs exist before the first verification loads the signing keys (a key created
    # later is picked up by the verifier's periodic refresh, not tested here).
    other = await provision_org(api, name="Other")
    foreign = await mint_contact_token(api, other, userId="ann", email="ann@example.com")
    ann = await mint_contact_token(api, org, userId="ann", email="ann@example.com", name="Ann")
    verified = await resolved(api, org, user={"token": ann["token"]})
    assert verified["identity"]["level"] == "verified"

    # Every browser-supplied value a visitor could try, together, on another browser.
    claims_everything = await resolved(
        api,
        org,
        user={"name": "Ann", "email": "ann@example.com", "externalId": "acme"},
        customData={
            "contactId": ann["contactId"],
            "userId": "ann",
            "visitorId": verified["identity"]["visitorId"],
            "verified": True,
        },
    )
    assert claims_everything["identity"]["level"] == "unverified"
    assert claims_everything["identity"]["contactId"] is None
    assert claims_everything["identity"]["externalId"] is None
    assert all(
        a["source"] == "browser" and a["verified"] is False
        for a in claims_everything["identity"]["attributes"].values()
    )

    # Forged, foreign and damaged tokens: their own error, and nothing written.
    before = await row_counts(pool)
    for token, status, code in [
        (unsigned_token(org, ann["contactId"]), 401, "token_invalid"),
        (foreign["token"], 403, "org_mismatch"),
        (tampered(ann["token"]), 401, "token_invalid"),
    ]:
        reply = await visit(api, org, user={"token": token})
        assert (reply.status, reply.json["code"]) == (status, code), reply.json["detail"]
    assert await row_counts(pool) == before
    bindings = await pool.fetchval(
        "SELECT count(*) FROM device_bindings WHERE contact_id = $1", uuid.UUID(ann["contactId"])
    )
    assert bindings == 1  # only the browser that presented the real token


async def test_promise_2_verified_history_follows_the_person_scoped_by_external_id(
    api: Api, org: OrgFixture, pool: asyncpg.Pool
) -> None:
    async def device(external_id: str | None) -> dict[str, object]:
        body: dict[str, object] = {"userId": "ann", "email": "ann@example.com"}
        if external_id is not None:
            body["externalId"] = external_id
        token = (await mint_contact_token(api, org, **body))["token"]
        return await resolved(api, org, user={"token": token})

    laptop = await device("workspace-1")
    await say(pool, str(laptop["sessionId"]), "from the laptop")
    phone = await device("workspace-1")  # another browser, a freshly minted token
    assert phone["identity"]["visitorId"] != laptop["identity"]["visitorId"]
    assert phone["identity"]["externalId"] == "workspace-1"
    assert phone["identity"]["externalIdVerified"] is True
    await say(pool, str(phone["sessionId"]), "from the phone")
    assert (
        await seen(api, laptop)
        == await seen(api, phone)
        == {
            "from the laptop",
            "from the phone",
        }
    )

    # The same person under another externalId has a separate history.
    other_workspace = await device("workspace-2")
    assert await seen(api, other_workspace) == set()
    await say(pool, str(other_workspace["sessionId"]), "workspace 2 only")
    assert await seen(api, laptop) == {"from the laptop", "from the phone"}
    assert await seen(api, other_workspace) == {"workspace 2 only"}

    # A browser value cannot move a signed externalId...
    token = (await mint_contact_token(api, org, userId="ann", externalId="workspace-1"))["token"]
    reply = await visit(api, org, user={"token": token, "externalId": "workspace-2"})
    assert (reply.status, reply.json["code"]) == (403, "external_id_mismatch")
    # ...but with no claim, the browser's value scopes the history, marked unverified.
    unsigned = (await mint_contact_token(api, org, userId="ann"))["token"]
    scoped = await resolved(api, org, user={"token": unsigned, "externalId": "workspace-2"})
    assert scoped["identity"]["externalId"] == "workspace-2"
    assert scoped["identity"]["externalIdVerified"] is False
    assert await seen(api, scoped) == {"workspace 2 only"}


async def test_promise_3_unverified_email_never_sees_verified_history(
    api: Api, org: OrgFixture, pool: asyncpg.Pool
) -> None:
    victim_token = await mint_contact_token(
        api, org, userId="victim", email="victim@example.com", name="Victim"
    )
    victim = await resolved(api, org, user={"token": victim_token["token"]})
    await say(pool, str(victim["sessionId"]), "my card ends in 4242")
    contact_before = await pool.fetchrow(
        "SELECT * FROM contacts WHERE id = $1", uuid.UUID(victim_token["contactId"])
    )
    outbox_before = await outbox_types(pool)

    attacker = await resolved(
        api,
        org,
        user={"name": "Victim", "email": "victim@example.com"},
        fields={"company": "Victim Inc"},
        customData={"userId": "victim"},
    )
    assert attacker["identity"]["level"] == "unverified"
    assert attacker["merge"] is None
    assert await seen(api, attacker) == set()
    await say(pool, str(attacker["sessionId"]), "attacker was here")
    # Returning with the same claims changes nothing either.
    again = await resolved(
        api, org, visitorToken=attacker["visitorToken"], user={"email": "victim@example.com"}
    )
    assert await seen(api, again) == {"attacker was here"}

    # The victim's side: same history, same row, no binding or merge for the attacker.
    assert await seen(api, victim) == {"my card ends in 4242"}
    contact_after = await pool.fetchrow(
        "SELECT * FROM contacts WHERE id = $1", uuid.UUID(victim_token["contactId"])
    )
    assert contact_after == contact_before
    bound = await pool.fetch(
        "SELECT visitor_id FROM device_bindings WHERE contact_id = $1",
        uuid.UUID(victim_token["contactId"]),
    )
    assert [str(r["visitor_id"]) for r in bound] == [victim["identity"]["visitorId"]]
    new_events = (await outbox_types(pool))[len(outbox_before) :]
    assert "history.merge_requested" not in new_events


async def test_promise_6_logout_unbinds_the_shared_browser(
    api: Api, org: OrgFixture, pool: asyncpg.Pool
) -> None:
    ann = await mint_contact_token(api, org, userId="ann", email="ann@example.com")
    shared_pc = await resolved(api, org, user={"token": ann["token"]})
    await say(pool, str(shared_pc["sessionId"]), "ann's private question")
    other_tab = await resolved(api, org, visitorToken=shared_pc["visitorToken"])  # anonymous tab

    out = await logout(api, shared_pc)
    assert out.status == 200, out.body
    fresh_token = out.json["visitorToken"]
    assert fresh_token != shared_pc["visitorToken"]
    assert out.json["endedSessions"] == 2

    # The old session tokens stop working, in every tab of that browser.
    for session in (shared_pc, other_tab):
        reply = await history(api, session)
        assert (reply.status, reply.json["code"]) == (401, "session_ended")
    # The next person at this computer is a new, anonymous visitor who sees nothing...
    next_person = await resolved(api, org, visitorToken=fresh_token)
    assert next_person["identity"]["level"] == "anonymous"
    assert next_person["identity"]["visitorId"] != shared_pc["identity"]["visitorId"]
    assert await seen(api, next_person) == set()
    # ...even if the page still has the old visitor token.
    stale = await resolved(api, org, visitorToken=shared_pc["visitorToken"])
    assert stale["identity"]["visitorId"] not in {
        shared_pc["identity"]["visitorId"],
        next_person["identity"]["visitorId"],
    }
    assert await seen(api, stale) == set()
    unbound = await pool.fetchval(
        "SELECT unbound_at IS NOT NULL FROM device_bindings WHERE visitor_id = $1",
        uuid.UUID(shared_pc["identity"]["visitorId"]),
    )
    assert unbound is True
    assert (await outbox_types(pool)).count("session.ended") == 2
    # Until a contact token is presented again.
    ann_again = await mint_contact_token(api, org, userId="ann")
    back = await resolved(api, org, visitorToken=fresh_token, user={"token": ann_again["token"]})
    assert await seen(api, back) == {"ann's private question"}


async def test_promise_7_every_attribute_says_where_it_came_from(
    api: Api, org: OrgFixture, pool: asyncpg.Pool
) -> None:
    minted = await mint_contact_token(
        api, org, userId="ann", email="ann@example.com", name="Ann", customData={"plan": "pro"}
    )
    session = await resolved(
        api,
        org,
        user={"token": minted["token"], "name": "Mallory", "email": "mallory@evil.example"},
        fields={"company": "Acme"},
        customData={"plan": "enterprise", "page": "/pricing"},
    )
    expected = {
        "name": {"value": "Ann", "source": "server", "verified": True},
        "email": {"value": "ann@example.com", "source": "server", "verified": True},
        "plan": {"value": "pro", "source": "server", "verified": True},
        "company": {"value": "Acme", "source": "browser", "verified": False},
        "page": {"value": "/pricing", "source": "browser", "verified": False},
    }
    assert session["identity"]["attributes"] == expected
    # Platform services see the same provenance, and what is stored equals the signed claims.
    info = await api.get(f"/v1/sessions/{session['sessionId']}", token=org.api_key)
    assert info.status == 200, info.body
    assert info.json["attributes"] == expected
    stored = await pool.fetchval(
        "SELECT attributes FROM sessions WHERE id = $1", uuid.UUID(session["sessionId"])
    )
    assert stored == expected
    remembered = await pool.fetchval(
        "SELECT attributes FROM visitors WHERE id = $1",
        uuid.UUID(session["identity"]["visitorId"]),
    )
    assert remembered == {"company": "Acme", "page": "/pricing"}

    # Below verified, everything is the browser's word.
    unverified = await resolved(api, org, user={"name": "Ann", "email": "ann@example.com"})
    assert {
        (a["source"], a["verified"]) for a in unverified["identity"]["attributes"].values()
    } == {("browser", False)}


async def test_promise_8_tenant_isolation(api: Api, org: OrgFixture, pool: asyncpg.Pool) -> None:
    other = await provision_org(api, name="Other", origins=("https://other.example",))
    ann = await mint_contact_token(api, org, userId="ann", email="ann@example.com")
    mine = await resolved(api, org, user={"token": ann["token"]})
    await say(pool, str(mine["sessionId"]), "org A secret")

    # A visitor token of org A means nothing to org B: a new visitor there.
    reply = await api.post(
        "/widget/sessions",
        json={"widgetToken": other.widget_token, "visitorToken": mine["visitorToken"]},
        headers={"Origin": "https://other.example"},
    )
    assert reply.status == 200, reply.body
    assert reply.json["identity"]["visitorId"] != mine["identity"]["visitorId"]
    assert reply.json["visitorToken"] != mine["visitorToken"]
    # A contact token of org A at org B's widget.
    reply = await api.post(
        "/widget/sessions",
        json={"widgetToken": other.widget_token, "user": {"token": ann["token"]}},
        headers={"Origin": "https://other.example"},
    )
    assert (reply.status, reply.json["code"]) == (403, "org_mismatch")
    # Org B's API key: A's session reads exactly like a session that does not exist.
    foreign = await api.get(f"/v1/sessions/{mine['sessionId']}", token=other.api_key)
    missing = await api.get(f"/v1/sessions/{uuid.uuid4()}", token=other.api_key)
    assert foreign.status == missing.status == 404
    assert {k: v for k, v in foreign.json.items() if k != "instance"} == {
        k: v for k, v in missing.json.items() if k != "instance"
    }
    devices = await api.get(f"/v1/contacts/{ann['contactId']}/devices", token=other.api_key)
    assert devices.status == 200
    assert devices.json == {"devices": []}
    revoke = await api.delete(
        f"/v1/contacts/{ann['contactId']}/devices/{mine['identity']['visitorId']}",
        token=other.api_key,
    )
    assert revoke.status == 404
    # A's session token from B's site is refused by origin; A's own history is intact.
    reply = await history(api, mine, origin="https://other.example")
    assert (reply.status, reply.json["code"]) == (403, "origin_not_allowed")
    assert await seen(api, mine) == {"org A secret"}
    assert ORIGIN in org.origins
