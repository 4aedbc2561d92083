"""Merge rules: applying a requested merge exactly once, explicit contact merges, undo.

A merge re-points every conversation of a source scope (a visitor, or a contact + externalId)
to a target contact scope; nothing is copied, so a conversation is always in exactly one
scope. Each merge is one row in ``merges`` whose id comes from the request, so however often
the request is delivered it has one effect. Merges into or out of an erased contact fail:
erasure is final, and no replay can bring the data back.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import asyncpg

from services.history import queries
from services.history.schemas import ContactMerge, MergeOut, Scope
from shared.bus.events import (
    HistoryMerged,
    HistoryMergeRequested,
    HistoryMergeUndone,
    MergedData,
    MergeRequestedData,
    MergeUndoneData,
)
from shared.bus.outbox import Outbox
from shared.errors import Problem, WidgetIdentityError, not_found, validation_failed
from shared.identity.contacts import contact_is_live

log = logging.getLogger(__name__)

REASONS = frozenset({"login", "admin"})
MAX_EXTERNAL_ID = 256


class InvalidMergeRequest(WidgetIdentityError):
    """The event can never be applied (malformed ids, no or two sources): dead-letter it."""


def _optional_uuid(value: str | None, what: str) -> str | None:
    return None if value is None else _uuid(value, what)


def _uuid(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidMergeRequest(f"{what} is not a UUID: {value!r}") from None


@dataclass(frozen=True, slots=True)
class MergeSpec:
    merge_id: str
    org_id: str
    reason: str
    source_visitor_id: str | None
    source_contact_id: str | None
    source_external_id: str
    target_contact_id: str
    target_external_id: str

    @classmethod
    def from_event(cls, org_id: str, data: MergeRequestedData) -> MergeSpec:
        if (data.source_visitor_id is None) == (data.source_contact_id is None):
            raise InvalidMergeRequest("exactly one of sourceVisitorId / sourceContactId is needed")
        if data.reason not in REASONS or (
            data.reason == "admin" and data.source_contact_id is None
        ):
            raise InvalidMergeRequest(f"reason {data.reason!r} does not fit this merge")
        if data.source_visitor_id is not None and data.source_external_id:
            raise InvalidMergeRequest("a visitor scope has no externalId")
        for external_id in (data.source_external_id, data.target_external_id):
            if len(external_id) > MAX_EXTERNAL_ID or "\x00" in external_id:
                raise InvalidMergeRequest("externalId is too long or contains NUL")
        return cls(
            merge_id=_uuid(data.merge_id, "mergeId"),
            org_id=_uuid(org_id, "orgId"),
            reason=data.reason,
            source_visitor_id=_optional_uuid(data.source_visitor_id, "sourceVisitorId"),
            source_contact_id=_optional_uuid(data.source_contact_id, "sourceContactId"),
            source_external_id=data.source_external_id,
            target_contact_id=_uuid(data.target_contact_id, "targetContactId"),
            target_external_id=data.target_external_id,
        )

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> MergeSpec:
        def text(value: object) -> str | None:
            return None if value is None else str(value)

        return cls(
            merge_id=str(row["id"]),
            org_id=str(row["org_id"]),
            reason=row["reason"],
            source_visitor_id=text(row["source_visitor_id"]),
            source_contact_id=text(row["source_contact_id"]),
            source_external_id=row["source_external_id"],
            target_contact_id=str(row["target_contact_id"]),
            target_external_id=row["target_external_id"],
        )

    @property
    def source_entity(self) -> tuple[str, str]:
        if self.source_visitor_id is not None:
            return ("visitor", self.source_visitor_id)
        assert self.source_contact_id is not None
        return ("contact", self.source_contact_id)

    @property
    def target_entity(self) -> tuple[str, str]:
        return ("contact", self.target_contact_id)

    @property
    def contact_ids(self) -> list[str]:
        ids = {self.target_contact_id}
        if self.source_contact_id is not None:
            ids.add(self.source_contact_id)
        return sorted(ids)

    def same_scope(self) -> bool:
        return (
            self.source_contact_id == self.target_contact_id
            and self.source_external_id == self.target_external_id
        )


@dataclass(frozen=True, slots=True)
class MergeOutcome:
    status: str  # done | failed | skipped (already applied, or not this org's)
    moved: int = 0


def lock_key(kind: str, entity_id: str) -> int:
    """A stable signed 64-bit advisory-lock key for a visitor or contact (any process, any
    language computes the same one)."""
    digest = hashlib.blake2b(f"wi:history:{kind}:{entity_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def lock_scopes(
    conn: asyncpg.Connection, *, into: tuple[str, str], out_of: tuple[str, str]
) -> None:
    """Serialise moves that could interleave badly, without serialising harmless ones.

    Moving history out of an entity takes its lock exclusively; moving history into one takes
    it shared. Merges into one contact therefore do not wait for each other here (only,
    briefly, on the contact's event sequence row as they commit), while a merge out of X waits
    for every merge into X and vice versa, so crossing merges (A->B with B->A) and chains
    (A->B with B->C) run one after the other as if sequential. Keys are taken in sorted
    order, so no two transactions ever wait on each other in a cycle.
    """
    modes = {lock_key(*into): True}
    modes[lock_key(*out_of)] = False
    await queries.advisory_locks(conn, sorted(modes.items()))


def _contact_problem(live: dict[str, bool], contact_id: str, role: str) -> str | None:
    if contact_id not in live:
        return f"{role} contact {contact_id} not found"
    if not live[contact_id]:
        return f"{role} contact {contact_id} was erased"
    return None


async def _move(conn: asyncpg.Connection, spec: MergeSpec) -> int:
    if spec.source_visitor_id is not None:
        return await queries.move_visitor_scope(
            conn,
            org_id=spec.org_id,
            merge_id=spec.merge_id,
            visitor_id=spec.source_visitor_id,
            target_contact_id=spec.target_contact_id,
            target_external_id=spec.target_external_id,
        )
    assert spec.source_contact_id is not None
    return await queries.move_contact_scope(
        conn,
        org_id=spec.org_id,
        merge_id=spec.merge_id,
        contact_id=spec.source_contact_id,
        external_id=spec.source_external_id,
        target_contact_id=spec.target_contact_id,
        target_external_id=spec.target_external_id,
    )


async def _announce(conn: asyncpg.Connection, outbox: Outbox, spec: MergeSpec, moved: int) -> None:
    await outbox.emit(
        conn,
        HistoryMerged,
        org_id=spec.org_id,
        subject=spec.target_contact_id,
        data=MergedData(
            merge_id=spec.merge_id,
            target_contact_id=spec.target_contact_id,
            target_external_id=spec.target_external_id,
            conversations_moved=moved,
        ),
    )


async def apply_requested_merge(
    conn: asyncpg.Connection, outbox: Outbox, org_id: str, data: MergeRequestedData
) -> MergeOutcome:
    """Apply a history.merge_requested event inside the consumer's transaction."""
    spec = MergeSpec.from_event(org_id, data)
    inserted = await queries.insert_merge(
        conn,
        merge_id=spec.merge_id,
        org_id=spec.org_id,
        reason=spec.reason,
        source_visitor_id=spec.source_visitor_id,
        source_contact_id=spec.source_contact_id,
        source_external_id=spec.source_external_id,
        target_contact_id=spec.target_contact_id,
        target_external_id=spec.target_external_id,
    )
    if inserted:
        # New row: ours alone until commit, and exactly the event's request.
        return await _perform(conn, outbox, spec)
    row = await queries.lock_merge(conn, spec.merge_id)
    if row is None or str(row["org_id"]) != spec.org_id:
        # A merge id reused by another org: never touch that org's merge.
        log.warning("merge id belongs to another org; ignored", extra={"mergeId": spec.merge_id})
        return MergeOutcome("skipped")
    if row["status"] != "pending":
        return MergeOutcome("skipped")
    # The recorded request is what gets applied (an explicit merge was recorded by the API).
    return await _perform(conn, outbox, MergeSpec.from_row(row))


async def _perform(conn: asyncpg.Connection, outbox: Outbox, spec: MergeSpec) -> MergeOutcome:
    if spec.same_scope():
        await queries.fail_merge(conn, spec.merge_id, "source and target are the same scope")
        return MergeOutcome("failed")
    await lock_scopes(conn, into=spec.target_entity, out_of=spec.source_entity)
    live = await queries.lock_contacts(conn, spec.org_id, spec.contact_ids)
    problem = _contact_problem(live, spec.target_contact_id, "target")
    if problem is None and spec.source_contact_id is not None:
        problem = _contact_problem(live, spec.source_contact_id, "source")
    if problem is not None:
        await queries.fail_merge(conn, spec.merge_id, problem)
        return MergeOutcome("failed")
    moved = await _move(conn, spec)
    await _announce(conn, outbox, spec, moved)
    return MergeOutcome("done", moved)


async def apply_requested_merges(
    conn: asyncpg.Connection, outbox: Outbox, requests: Sequence[tuple[str, MergeRequestedData]]
) -> list[MergeOutcome]:
    """``apply_requested_merge`` for several (org id, request) pairs in the caller's one
    transaction, in stream order, with the effect of applying them one after the other.

    Concurrent batches must not deadlock, so the locks are taken phase by phase, each phase
    in one sorted round trip, in the order of the module's lock order: the merge rows, the
    scope advisory locks of every merge, their contacts, the conversations, and last the
    target subjects' event sequences (history.merged is emitted in subject order).
    """
    specs = [MergeSpec.from_event(org_id, data) for org_id, data in requests]
    outcomes: list[MergeOutcome] = [MergeOutcome("skipped")] * len(specs)
    first: dict[str, int] = {}  # merge id -> index of its first request
    for i, spec in enumerate(specs):
        # Asked twice in one batch: the second finds it applied, as it would one by one.
        if specs[first.setdefault(spec.merge_id, i)].org_id != spec.org_id:
            log.warning(
                "merge id belongs to another org; ignored", extra={"mergeId": spec.merge_id}
            )
    inserted = await queries.insert_merges(conn, [_row_of(specs[i]) for i in first.values()])
    todo = {i: specs[i] for i in first.values() if specs[i].merge_id in inserted}
    recorded = [specs[i].merge_id for i in first.values() if i not in todo]
    if recorded:
        for row in await queries.lock_merges(conn, recorded):
            spec = MergeSpec.from_row(row)
            if spec.org_id != specs[first[spec.merge_id]].org_id:
                log.warning(
                    "merge id belongs to another org; ignored", extra={"mergeId": spec.merge_id}
                )
            elif row["status"] == "pending":
                todo[first[spec.merge_id]] = spec

    errors = {i: "source and target are the same scope" for i, s in todo.items() if s.same_scope()}
    active = sorted(i for i in todo if i not in errors)
    modes: dict[int, bool] = {}  # advisory key -> shared; out of an entity is exclusive
    for i in active:
        into = lock_key(*todo[i].target_entity)
        modes[into] = modes.get(into, True)
    for i in active:
        modes[lock_key(*todo[i].source_entity)] = False
    if modes:
        await queries.advisory_locks(conn, sorted(modes.items()))
    pairs = sorted(
        {(todo[i].org_id, c) for i in active for c in todo[i].contact_ids}, key=_by_contact
    )
    live = await queries.lock_contacts_of_orgs(conn, pairs) if pairs else {}
    for i in active:
        spec = todo[i]
        mine = {c: live[(spec.org_id, c)] for c in spec.contact_ids if (spec.org_id, c) in live}
        problem = _contact_problem(mine, spec.target_contact_id, "target")
        if problem is None and spec.source_contact_id is not None:
            problem = _contact_problem(mine, spec.source_contact_id, "source")
        if problem is not None:
            errors[i] = problem
    if errors:
        await queries.fail_merges(conn, [(todo[i].merge_id, e) for i, e in sorted(errors.items())])
        for i in errors:
            outcomes[i] = MergeOutcome("failed")

    applying = [todo[i] for i in active if i not in errors]
    moved = await _move_all(conn, applying)
    for i, spec in sorted(
        ((i, todo[i]) for i in active if i not in errors), key=lambda p: p[1].target_contact_id
    ):
        await _announce(conn, outbox, spec, moved[spec.merge_id])
        outcomes[i] = MergeOutcome("done", moved[spec.merge_id])
    return outcomes


def _row_of(spec: MergeSpec) -> queries.MergeRow:
    return (
        spec.merge_id,
        spec.org_id,
        spec.reason,
        spec.source_visitor_id,
        spec.source_contact_id,
        spec.source_external_id,
        spec.target_contact_id,
        spec.target_external_id,
    )


def _by_contact(pair: tuple[str, str]) -> str:
    return pair[1]


async def _move_all(conn: asyncpg.Connection, specs: list[MergeSpec]) -> dict[str, int]:
    """Re-point the source scopes' conversations of locked, checked merges; merge id ->
    conversations moved."""
    sources = [spec.source_entity for spec in specs]
    independent = len(set(sources)) == len(sources) and not set(sources) & {
        spec.target_entity for spec in specs
    }
    if not independent:
        # A chain or a shared source inside the batch: one move after the other, each seeing
        # what the one before did.
        return {spec.merge_id: await _move(conn, spec) for spec in specs}
    # No conversation is in two source scopes and none moves into a later source: all the
    # visitor scopes move in one statement (contact scopes are rare: admin merges).
    visitors = [spec for spec in specs if spec.source_visitor_id is not None]
    moved = (
        await queries.move_visitor_scopes(
            conn,
            [
                (
                    spec.merge_id,
                    spec.org_id,
                    cast(str, spec.source_visitor_id),
                    spec.target_contact_id,
                    spec.target_external_id,
                )
                for spec in visitors
            ],
        )
        if visitors
        else {}
    )
    for spec in specs:
        if spec.source_visitor_id is None:
            moved[spec.merge_id] = await _move(conn, spec)
    return moved


async def request_contact_merge(
    conn: asyncpg.Connection, outbox: Outbox, org_id: str, target_id: str, body: ContactMerge
) -> str:
    """Record an explicit contact-into-contact merge as pending and ask the consumer to apply
    it (the same path as login merges). Two verified contacts merge only through this."""
    source_id = str(body.source_contact_id)
    if source_id == target_id:
        raise validation_failed("a contact cannot be merged into itself")
    for contact_id in (target_id, source_id):
        if not await contact_is_live(conn, org_id, contact_id):
            raise not_found("contact")
    merge_id = str(uuid.uuid4())
    await queries.insert_merge(
        conn,
        merge_id=merge_id,
        org_id=org_id,
        reason="admin",
        source_visitor_id=None,
        source_contact_id=source_id,
        source_external_id=body.external_id,
        target_contact_id=target_id,
        target_external_id=body.external_id,
    )
    await outbox.emit(
        conn,
        HistoryMergeRequested,
        org_id=org_id,
        subject=target_id,
        data=MergeRequestedData(
            merge_id=merge_id,
            reason="admin",
            target_contact_id=target_id,
            target_external_id=body.external_id,
            source_contact_id=source_id,
            source_external_id=body.external_id,
        ),
    )
    return merge_id


def not_undoable(detail: str, status: str) -> Problem:
    return Problem(409, "merge_not_undoable", detail, mergeStatus=status)


async def undo_merge(conn: asyncpg.Connection, outbox: Outbox, org_id: str, merge_id: str) -> int:
    """Move the merge's conversations that are still in its target scope back to its source
    scope; return how many. Only a done merge can be undone, once."""
    row = await queries.lock_merge(conn, merge_id)
    if row is None or str(row["org_id"]) != org_id:
        raise not_found("merge")
    status = row["status"]
    if status != "done":
        raise not_undoable(f"the merge is {status}; only a done merge can be undone", status)
    spec = MergeSpec.from_row(row)
    # Undo moves history out of the target and into the source: the mirror of the merge.
    await lock_scopes(conn, into=spec.source_entity, out_of=spec.target_entity)
    live = await queries.lock_contacts(conn, org_id, spec.contact_ids)
    problem = _contact_problem(live, spec.target_contact_id, "target")
    if problem is None and spec.source_contact_id is not None:
        problem = _contact_problem(live, spec.source_contact_id, "source")
    if problem is not None:
        raise not_undoable(f"cannot undo: {problem}", status)
    restored = await queries.undo_moves(
        conn,
        org_id=org_id,
        merge_id=merge_id,
        conversation_ids=list(row["conversation_ids"]),
        target_contact_id=spec.target_contact_id,
        target_external_id=spec.target_external_id,
        source_visitor_id=spec.source_visitor_id,
        source_contact_id=spec.source_contact_id,
        source_external_id=spec.source_external_id,
    )
    await outbox.emit(
        conn,
        HistoryMergeUndone,
        org_id=org_id,
        subject=spec.target_contact_id,
        data=MergeUndoneData(merge_id=merge_id, conversations_restored=restored),
    )
    return restored


def merge_out(row: asyncpg.Record) -> MergeOut:
    spec = MergeSpec.from_row(row)
    source = (
        Scope(type="visitor", visitor_id=spec.source_visitor_id)
        if spec.source_visitor_id is not None
        else Scope(
            type="contact", contact_id=spec.source_contact_id, external_id=spec.source_external_id
        )
    )
    ids = [str(i) for i in row["conversation_ids"]]
    return MergeOut(
        id=spec.merge_id,
        status=row["status"],
        reason=spec.reason,
        source=source,
        target=Scope(
            type="contact", contact_id=spec.target_contact_id, external_id=spec.target_external_id
        ),
        conversation_ids=ids,
        conversations_moved=len(ids),
        error=row["error"],
        requested_at=row["requested_at"],
        completed_at=row["completed_at"],
        undone_at=row["undone_at"],
    )
