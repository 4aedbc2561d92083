"""A Hypothesis state machine drives random sequences of visits, typed emails,
logins (several contacts and externalIds), chats, logouts and token revocations on several
browsers against the real server, and checks the identity invariants after every step.

The app here is token issuance + session resolution without the merge consumer: merges are
*requested* (and the model predicts exactly when) but not applied, so which history each
session may see is fully determined by its scope:
- a verified session sees exactly the conversations of its (contact, externalId);
- any other session sees exactly its own visitor's conversations, whatever email it typed;
- an ended session (logout) answers 401 session_ended, a revoked one 401 token_revoked;
- ``session_scopes`` (what the history service reads) agrees with the model for every session.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.session_resolution import app as session_resolution
from services.token_issuance import app as token_issuance
from shared.config import Settings
from shared.db import create_pool
from shared.service import service_app
from tests.support.server import Api, running
from tests.support.tokens import OrgFixture, mint_contact_token, provision_org
from tests.test_sessions import ORIGIN, history, logout, resolved, say, visit

T = TypeVar("T")

BROWSERS = 3
CONTACTS = ("alice", "bob")
EXTERNAL_IDS = (None, "w1", "w2")
# Typed emails include the contacts' own (verified) addresses: claiming one must change nothing.
TYPED = (*CONTACTS, "stranger")


class Loop:
    """An event loop in its own thread, so Hypothesis' synchronous rules can drive the async
    server and clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class ModelSession:
    body: dict[str, Any]
    visitor_id: str
    contact: str | None  # contact id when verified
    external_id: str
    ended: bool = False
    revoked: bool = False


@dataclass
class ModelBrowser:
    visitor_token: str | None = None
    visitor_id: str | None = None  # None until a resolution tells (e.g. after logout)
    remembered: dict[str, str] = field(default_factory=dict)
    # A browser-bound session since this visitor's last merge request (promise 4 trigger).
    unmerged: bool = False
    sessions: list[ModelSession] = field(default_factory=list)
    login_token: str | None = None
    login_contact: str | None = None
    login_external_id: str | None = None


@dataclass
class World:
    loop: Loop
    api: Api
    pool: asyncpg.Pool
    # One org for every example (each example has its own browsers and contacts): a new org's
    # signing key would otherwise have to reach the verifier's key cache first.
    org: OrgFixture


class IdentityMachine(RuleBasedStateMachine):
    world: World  # set by the test before running

    def __init__(self) -> None:
        super().__init__()
        self.org = self.world.org
        self.example = uuid.uuid4().hex[:8]
        self.browsers = [ModelBrowser() for _ in range(BROWSERS)]
        self.contact_ids: dict[str, str] = {}
        self.revoked_tokens: set[str] = set()
        # Conversation text -> scope: ("visitor", id) or ("contact", contact id, externalId).
        self.conversations: dict[str, tuple[str, ...]] = {}

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.world.loop.run(coro)

    # --- expectations shared by the rules ------------------------------------------------------

    def _accept(self, b: ModelBrowser, body: dict[str, Any]) -> ModelSession:
        identity = body["identity"]
        if b.visitor_token is not None:
            assert body["visitorToken"] == b.visitor_token, "a live visitor keeps its token"
            if b.visitor_id is not None:
                assert identity["visitorId"] == b.visitor_id
        b.visitor_token = body["visitorToken"]
        b.visitor_id = identity["visitorId"]
        scope_contact = identity["contactId"] if identity["level"] == "verified" else None
        session = ModelSession(
            body=body,
            visitor_id=identity["visitorId"],
            contact=scope_contact,
            external_id=identity["externalId"] or "",
        )
        for earlier in b.sessions:
            if earlier.body["sessionId"] == body["sessionId"]:
                # Reuse (the fast path) never resurrects a dead session or changes its scope.
                assert not earlier.ended and not earlier.revoked
                assert (earlier.contact, earlier.external_id) == (
                    session.contact,
                    session.external_id,
                )
                return earlier
        b.sessions.append(session)
        return session

    def _visit_unverified(self, b: ModelBrowser, body: dict[str, Any]) -> None:
        expected_level = "unverified" if b.remembered else "anonymous"
        identity = body["identity"]
        assert identity["level"] == expected_level
        assert identity["contactId"] is None
        assert all(
            a["source"] == "browser" and not a["verified"] for a in identity["attributes"].values()
        )
        assert {k: a["value"] for k, a in identity["attributes"].items()} == b.remembered
        assert body["merge"] is None
        self._accept(b, body)
        b.unmerged = True

    # --- rules -----------------------------------------------------------------------------

    @rule(i=st.integers(0, BROWSERS - 1))
    def load_widget(self, i: int) -> None:
        b = self.browsers[i]
        extra = {} if b.visitor_token is None else {"visitorToken": b.visitor_token}
        self._visit_unverified(b, self.run(resolved(self.world.api, self.org, **extra)))

    @rule(i=st.integers(0, BROWSERS - 1), who=st.sampled_from(TYPED))
    def type_email(self, i: int, who: str) -> None:
        b = self.browsers[i]
        email = f"{who}-{self.example}@example.com"
        extra = {} if b.visitor_token is None else {"visitorToken": b.visitor_token}
        body = self.run(resolved(self.world.api, self.org, user={"email": email}, **extra))
        b.remembered["email"] = email
        self._visit_unverified(b, body)

    @rule(
        i=st.integers(0, BROWSERS - 1),
        who=st.sampled_from(CONTACTS),
        external_id=st.sampled_from(EXTERNAL_IDS),
    )
    def log_in(self, i: int, who: str, external_id: str | None) -> None:
        b = self.browsers[i]
        claims: dict[str, Any] = {
            "userId": f"{who}-{self.example}",
            "email": f"{who}-{self.example}@example.com",
        }
        if external_id is not None:
            claims["externalId"] = external_id
        minted = self.run(mint_contact_token(self.world.api, self.org, **claims))
        self.contact_ids[who] = minted["contactId"]
        new_visitor = b.visitor_token is None
        extra = {} if new_visitor else {"visitorToken": b.visitor_token}
        body = self.run(
            resolved(self.world.api, self.org, user={"token": minted["token"]}, **extra)
        )
        self._check_login(b, body, minted["contactId"], external_id, new_visitor)
        b.login_token, b.login_contact, b.login_external_id = minted["token"], who, external_id

    @precondition(lambda self: any(b.login_token for b in self.browsers))
    @rule(i=st.integers(0, BROWSERS - 1))
    def reload_with_the_same_token(self, i: int) -> None:
        b = self.browsers[i]
        if b.login_token is None or b.login_contact is None:
            return
        extra = {} if b.visitor_token is None else {"visitorToken": b.visitor_token}
        reply = self.run(visit(self.world.api, self.org, user={"token": b.login_token}, **extra))
        if b.login_token in self.revoked_tokens:
            assert (reply.status, reply.json["code"]) == (401, "token_revoked")
            return
        assert reply.status == 200, reply.body
        new_visitor = b.visitor_token is None
        contact = self.contact_ids[b.login_contact]
        self._check_login(b, reply.json, contact, b.login_external_id, new_visitor)

    def _check_login(
        self,
        b: ModelBrowser,
        body: dict[str, Any],
        contact_id: str,
        external_id: str | None,
        new_visitor: bool,
    ) -> None:
        identity = body["identity"]
        assert identity["level"] == "verified"
        assert identity["contactId"] == contact_id
        assert (identity["externalId"], identity["externalIdVerified"]) == (
            external_id,
            external_id is not None,
        )
        assert identity["attributes"]["email"]["source"] == "server"
        expect_merge = not new_visitor and b.unmerged
        assert (body["merge"] is not None) == expect_merge, (body["merge"], b.unmerged)
        if expect_merge:
            b.unmerged = False
        b.remembered.pop("email", None)  # a signed email replaces the typed one for good
        self._accept(b, body)

    @precondition(lambda self: any(b.sessions for b in self.browsers))
    @rule(i=st.integers(0, BROWSERS - 1), data=st.data())
    def chat(self, i: int, data: st.DataObject) -> None:
        b = self.browsers[i]
        live = [s for s in b.sessions if not s.ended and not s.revoked]
        if not live:
            return
        session = data.draw(st.sampled_from(live))
        text = f"msg-{uuid.uuid4().hex[:8]}"
        self.run(say(self.world.pool, session.body["sessionId"], text))
        self.conversations[text] = (
            ("contact", session.contact, session.external_id)
            if session.contact is not None
            else ("visitor", session.visitor_id)
        )

    @precondition(lambda self: any(b.sessions for b in self.browsers))
    @rule(i=st.integers(0, BROWSERS - 1))
    def log_out(self, i: int) -> None:
        b = self.browsers[i]
        live = [s for s in b.sessions if not s.ended]
        if not live:
            return
        reply = self.run(logout(self.world.api, live[-1].body))
        assert reply.status == 200, reply.body
        assert reply.json["visitorToken"] != b.visitor_token
        for s in b.sessions:
            s.ended = True
        b.visitor_token = reply.json["visitorToken"]
        b.visitor_id = None
        b.remembered = {}
        b.unmerged = False
        b.login_token = b.login_contact = None

    @precondition(lambda self: bool(self.contact_ids))
    @rule(who=st.sampled_from(CONTACTS))
    def revoke_tokens(self, who: str) -> None:
        contact = self.contact_ids.get(who)
        if contact is None:
            return
        reply = self.run(
            self.world.api.post(f"/v1/contacts/{contact}/revoke-tokens", token=self.org.api_key)
        )
        assert reply.status == 200, reply.body
        for b in self.browsers:
            for s in b.sessions:
                if s.contact == contact:
                    s.revoked = True
            if b.login_contact == who and b.login_token is not None:
                self.revoked_tokens.add(b.login_token)

    # --- invariants ------------------------------------------------------------------------

    def _expected_texts(self, session: ModelSession) -> set[str]:
        scope: tuple[str, ...] = (
            ("contact", session.contact, session.external_id)
            if session.contact is not None
            else ("visitor", session.visitor_id)
        )
        return {text for text, where in self.conversations.items() if where == scope}

    @invariant()
    def every_session_sees_exactly_its_scope(self) -> None:
        for b in self.browsers:
            for session in b.sessions[-4:]:
                reply = self.run(history(self.world.api, session.body))
                if session.ended and session.revoked:
                    # Revoked, then logged out: whichever ending was recorded first answers.
                    assert reply.status == 401
                    assert reply.json["code"] in {"session_ended", "token_revoked"}
                elif session.ended:
                    assert (reply.status, reply.json["code"]) == (401, "session_ended")
                elif session.revoked:
                    assert (reply.status, reply.json["code"]) == (401, "token_revoked")
                else:
                    assert reply.status == 200, reply.body
                    texts = {m["text"] for c in reply.json["conversations"] for m in c["messages"]}
                    assert texts == self._expected_texts(session)

    @invariant()
    def published_scopes_agree_with_the_model(self) -> None:
        sessions = [s for b in self.browsers for s in b.sessions]
        if not sessions:
            return
        rows = self.run(
            self.world.pool.fetch(
                """SELECT session_id, level, visitor_id, contact_id, external_id, ended_at
                   FROM session_scopes WHERE session_id = ANY($1::uuid[])""",
                [uuid.UUID(s.body["sessionId"]) for s in sessions],
            )
        )
        by_id = {str(r["session_id"]): r for r in rows}
        for s in sessions:
            row = by_id[s.body["sessionId"]]
            assert str(row["visitor_id"]) == s.visitor_id
            assert (None if row["contact_id"] is None else str(row["contact_id"])) == s.contact
            assert row["external_id"] == s.external_id
            assert (row["level"] == "verified") == (s.contact is not None)
            if not s.revoked:  # a revoked session is recorded as ended asynchronously
                assert (row["ended_at"] is not None) == s.ended


def test_identity_invariants_hold_for_random_histories(settings: Settings) -> None:
    loop = Loop()
    try:

        async def start() -> tuple[Any, Api, asyncpg.Pool, OrgFixture]:
            app = service_app(settings, name="identity-machine")
            token_issuance.setup_routes(app)
            session_resolution.setup_routes(app)
            session_resolution.setup_consumers(app)
            context = running(app)
            api = await context.__aenter__()
            org = await provision_org(api, origins=(ORIGIN,))
            return context, api, await create_pool(settings), org

        context, api, pool, org = loop.run(start())
        try:
            IdentityMachine.world = World(loop=loop, api=api, pool=pool, org=org)
            machine_settings = settings_for_machine()
            IdentityMachine.TestCase.settings = machine_settings
            IdentityMachine.TestCase().runTest()
        finally:
            loop.run(pool.close())
            loop.run(context.__aexit__(None, None, None))
    finally:
        loop.close()


def settings_for_machine() -> Any:
    return hypothesis_settings(
        max_examples=25,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        print_blob=True,
    )
