"""The pure identity rules (no I/O): levels, provenance, externalId, merge trigger, collect,
CORS origins and session-token wrapping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.session_resolution import cors
from services.session_resolution.collect import collect_block, validate_fields
from services.session_resolution.identity import (
    Attribute,
    BrowserInput,
    ServerIdentity,
    needs_login_merge,
    normalise_browser_input,
    resolve,
)
from services.session_resolution.session_tokens import (
    looks_like_visitor_token,
    new_session_token,
    new_visitor_token,
    token_hash,
    unwrap_session_token,
    wrap_session_token,
)
from shared.errors import Problem
from shared.identity.widget_tokens import parse_widget_settings

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CONTACT = "5f0c6a43-3f5e-4d43-9a43-0a1d2b3c4d5e"


def server(**claims: object) -> ServerIdentity:
    return ServerIdentity(
        contact_id=CONTACT,
        issued_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        **claims,  # type: ignore[arg-type]
    )


def browser_only(browser: BrowserInput, remembered: dict[str, object] | None = None) -> object:
    return resolve(
        server=None,
        remembered=remembered or {},  # type: ignore[arg-type]
        browser=browser,
        require_signed_external_id=False,
    )


# --- levels (promise 1, 3) -------------------------------------------------------------------


def test_widget_token_only_is_anonymous() -> None:
    res = resolve(
        server=None, remembered={}, browser=BrowserInput(), require_signed_external_id=False
    )
    assert res.level == "anonymous"
    assert res.contact_id is None
    assert res.attributes == {}


def test_promise_1_no_browser_value_raises_the_level() -> None:
    sneaky = BrowserInput(
        name="Ann",
        email="ann@example.com",
        external_id="acme",
        fields={"company": "Acme"},
        custom_data={"contactId": CONTACT, "verified": True, "level": "verified"},
    )
    res = resolve(server=None, remembered={}, browser=sneaky, require_signed_external_id=False)
    assert res.level == "unverified"
    assert res.contact_id is None
    # Browser-bound scope: an externalId from the page does not scope anything here.
    assert res.external_id == ""
    assert all(a.source == "browser" and not a.verified for a in res.attributes.values())


def test_remembered_browser_values_keep_a_returning_visitor_unverified() -> None:
    res = resolve(
        server=None,
        remembered={"email": "a@b.example"},
        browser=BrowserInput(),
        require_signed_external_id=False,
    )
    assert res.level == "unverified"
    assert res.attributes["email"] == Attribute("a@b.example", "browser", False)


def test_newest_browser_value_wins_and_typed_beats_custom_data() -> None:
    res = resolve(
        server=None,
        remembered={"email": "old@b.example", "plan": "free"},
        browser=BrowserInput(email="new@b.example", custom_data={"plan": "pro", "name": "X"}),
        require_signed_external_id=False,
    )
    assert res.visitor_attributes == {"email": "new@b.example", "plan": "pro", "name": "X"}
    res = resolve(
        server=None,
        remembered={},
        browser=BrowserInput(name="Typed", custom_data={"name": "FromOptions"}),
        require_signed_external_id=False,
    )
    assert res.attributes["name"].value == "Typed"


# --- provenance (promise 7) ------------------------------------------------------------------


def test_promise_7_server_values_win_and_browser_conflicts_are_dropped() -> None:
    res = resolve(
        server=server(name="Ann", email="ann@example.com", custom_data={"plan": "pro"}),
        remembered={"email": "typed-earlier@example.com", "color": "red"},
        browser=BrowserInput(
            name="Mallory", email="m@evil.example", custom_data={"plan": "free", "page": "/x"}
        ),
        require_signed_external_id=False,
    )
    assert res.level == "verified"
    assert res.attributes["name"] == Attribute("Ann", "server", True)
    assert res.attributes["email"] == Attribute("ann@example.com", "server", True)
    assert res.attributes["plan"] == Attribute("pro", "server", True)
    assert res.attributes["page"] == Attribute("/x", "browser", False)
    assert res.attributes["color"] == Attribute("red", "browser", False)
    # Nothing the browser said under a signed key is remembered either.
    assert "email" not in res.visitor_attributes
    assert "plan" not in res.visitor_attributes
    assert res.visitor_attributes == {"color": "red", "page": "/x"}


def test_token_name_claim_beats_its_own_custom_data() -> None:
    res = resolve(
        server=server(name="Ann", custom_data={"name": "Other", "tier": 3}),
        remembered={},
        browser=BrowserInput(),
        require_signed_external_id=False,
    )
    assert res.attributes["name"].value == "Ann"
    assert res.attributes["tier"] == Attribute(3, "server", True)


# --- externalId (promise 2) ------------------------------------------------------------------


def test_promise_2_signed_external_id_wins() -> None:
    res = resolve(
        server=server(external_id="w1"),
        remembered={},
        browser=BrowserInput(external_id="w1"),
        require_signed_external_id=True,
    )
    assert (res.external_id, res.external_id_verified) == ("w1", True)
    res = resolve(
        server=server(external_id="w1"),
        remembered={},
        browser=BrowserInput(),
        require_signed_external_id=False,
    )
    assert (res.external_id, res.external_id_verified) == ("w1", True)


def test_promise_2_browser_external_id_differing_from_the_claim_is_refused() -> None:
    with pytest.raises(Problem) as caught:
        resolve(
            server=server(external_id="w1"),
            remembered={},
            browser=BrowserInput(external_id="w2"),
            require_signed_external_id=False,
        )
    assert (caught.value.status, caught.value.code) == (403, "external_id_mismatch")


def test_promise_2_unsigned_external_id_scopes_but_is_marked_unverified() -> None:
    res = resolve(
        server=server(),
        remembered={},
        browser=BrowserInput(external_id="w2"),
        require_signed_external_id=False,
    )
    assert (res.level, res.external_id, res.external_id_verified) == ("verified", "w2", False)
    res = resolve(
        server=server(), remembered={}, browser=BrowserInput(), require_signed_external_id=True
    )
    assert (res.external_id, res.external_id_verified) == ("", False)


def test_promise_2_org_policy_can_require_a_signed_external_id() -> None:
    with pytest.raises(Problem) as caught:
        resolve(
            server=server(),
            remembered={},
            browser=BrowserInput(external_id="w2"),
            require_signed_external_id=True,
        )
    assert (caught.value.status, caught.value.code) == (403, "external_id_unsigned")


@pytest.mark.parametrize(
    ("raw", "problem_field"),
    [
        (BrowserInput(email="not-an-email"), "user.email"),
        (BrowserInput(email="a b@c.example"), "user.email"),
        (BrowserInput(external_id="x" * 257), "user.externalId"),
        (BrowserInput(external_id="tab\there"), "user.externalId"),
        (BrowserInput(name="bell\x07"), "user.name"),
    ],
)
def test_bad_browser_details_are_a_422(raw: BrowserInput, problem_field: str) -> None:
    with pytest.raises(Problem) as caught:
        normalise_browser_input(raw)
    assert caught.value.status == 422
    assert caught.value.extra["errors"][0]["field"] == problem_field


def test_blank_browser_details_count_as_absent() -> None:
    cleaned = normalise_browser_input(BrowserInput(name="  ", email="", external_id=" "))
    assert cleaned == BrowserInput()


def test_fingerprint_changes_with_anything_a_session_records() -> None:
    base = browser_only(BrowserInput(email="a@b.example"))
    same = browser_only(BrowserInput(), {"email": "a@b.example"})
    other = browser_only(BrowserInput(email="c@d.example"))
    assert base.fingerprint("w") == same.fingerprint("w")  # type: ignore[attr-defined]
    assert base.fingerprint("w") != other.fingerprint("w")  # type: ignore[attr-defined]
    assert base.fingerprint("w") != base.fingerprint("w2")  # type: ignore[attr-defined]


# --- login merge trigger (promise 4's request side) ------------------------------------------


@pytest.mark.parametrize(
    ("policy", "level", "new", "unmerged", "expected"),
    [
        (True, "verified", False, True, True),
        (False, "verified", False, True, False),
        (True, "unverified", False, True, False),
        (True, "verified", True, True, False),
        (True, "verified", False, False, False),
    ],
)
def test_login_merge_is_requested_only_for_unmerged_browser_history(
    policy: bool, level: str, new: bool, unmerged: bool, expected: bool
) -> None:
    assert (
        needs_login_merge(
            policy_merge_on_login=policy,
            level=level,  # type: ignore[arg-type]
            visitor_is_new=new,
            unmerged_browser_sessions=unmerged,
        )
        is expected
    )


# --- collect ---------------------------------------------------------------------------------

SETTINGS = parse_widget_settings(
    {
        "collectUserData": True,
        "prefillUserData": {"name": True, "email": False},
        "extraDataCollectionFields": [
            {"name": "company", "label": "Company", "maxLength": 5, "required": True},
            {"name": "seats", "label": "Seats", "type": "number"},
            {"name": "optIn", "label": "Opt in", "type": "boolean"},
            {"name": "billing", "label": "Billing email", "type": "email"},
        ],
    }
)


def test_extra_fields_are_checked_against_the_configuration() -> None:
    assert validate_fields({"company": " Acme ", "seats": 3, "optIn": False}, SETTINGS) == {
        "company": "Acme",
        "seats": 3,
        "optIn": False,
    }
    with pytest.raises(Problem) as caught:
        validate_fields(
            {
                "unknown": "x",
                "company": "too long",
                "seats": "3",
                "optIn": 1,
                "billing": "nope",
            },
            SETTINGS,
        )
    assert caught.value.status == 422
    fields = sorted(e["field"] for e in caught.value.extra["errors"])
    assert fields == [
        "fields.billing",
        "fields.company",
        "fields.optIn",
        "fields.seats",
        "fields.unknown",
    ]


def test_no_extra_fields_configured_means_none_accepted() -> None:
    with pytest.raises(Problem):
        validate_fields({"company": "x"}, parse_widget_settings({}))
    assert validate_fields(None, parse_widget_settings({})) == {}


def test_collect_asks_what_is_unknown_and_prefills_what_is_allowed() -> None:
    block = collect_block(SETTINGS, {})
    assert [f.name for f in block.ask] == ["name", "email", "company", "seats", "optIn", "billing"]
    assert block.prefill == {}
    known = {
        "name": Attribute("Ann", "server", True),
        "email": Attribute("ann@example.com", "server", True),
        "company": Attribute("Acme", "browser", False),
    }
    block = collect_block(SETTINGS, known)
    assert [f.name for f in block.ask] == ["seats", "optIn", "billing"]
    assert block.prefill == {"name": "Ann"}  # email prefill is off in these settings
    off = collect_block(parse_widget_settings({}), {})
    assert (off.collect_user_data, off.ask) == (False, [])


# --- tokens and origins ----------------------------------------------------------------------


def test_session_token_is_sealed_to_its_visitor_and_session() -> None:
    visitor, session = new_visitor_token(), new_session_token()
    sid = "0b7f7a9e-8c4e-4c33-9b3a-111111111111"
    wrapped = wrap_session_token(session, visitor_token=visitor, session_id=sid)
    assert session.encode() not in wrapped
    assert unwrap_session_token(wrapped, visitor_token=visitor, session_id=sid) == session
    assert unwrap_session_token(wrapped, visitor_token=new_visitor_token(), session_id=sid) is None
    other_sid = "0b7f7a9e-8c4e-4c33-9b3a-222222222222"
    assert unwrap_session_token(wrapped, visitor_token=visitor, session_id=other_sid) is None
    assert len(token_hash(visitor)) == 32
    assert looks_like_visitor_token(visitor) and not looks_like_visitor_token(session)


def test_origins_must_match_exactly() -> None:
    allowed = frozenset({"https://shop.example"})
    cors.check_origin(None, allowed)
    cors.check_origin("https://shop.example", allowed)
    for bad in ("https://evil.example", "null", "http://shop.example", "https://shop.example.evil"):
        with pytest.raises(Problem) as caught:
            cors.check_origin(bad, allowed)
        assert caught.value.code == "origin_not_allowed"
