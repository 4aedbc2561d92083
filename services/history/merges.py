"""Applying merges: a requested merge exactly once (alone, or a batch of them in one
transaction), and recording an explicit contact merge for the consumer to apply.

Each merge is one row in ``merges`` whose id comes from the request, so however often the
request is delivered it has one effect. The rules are in ``merge_rules``, undo in
``merge_undo``, the API's view of a merge in ``merge_responses``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import cast

import asyncpg

# What the apply functions return, re-exported for the consumer's handlers that count it.
from services.history.merge_rules import MergeOutcome as MergeOutcome
from services.history.merge_rules import MergeSpec, contact_problem, scope_locks
from services.history.queries import locks, merge_rows
from services.history.schemas import ContactMerge
from shared.bus.events import HistoryMerged, HistoryMergeRequested, MergedData, MergeRequestedData
from shared.bus.outbox import Outbox
from shared.errors import not_found, validation_failed
from shared.identity.contacts import contact_is_live, lock_contacts, lock_contacts_of_orgs

log = logging.getLogger(__name__)


async def _move(conn: asyncpg.Connection, spec: MergeSpec) -> int:
    if spec.source_visitor_id is not None:
        return await merge_rows.move_visitor_scope(
            conn,
            org_id=spec.org_id,
            merge_id=spec.merge_id,
            visitor_id=spec.source_visitor_id,
            target_contact_id=spec.target_contact_id,
            target_external_id=spec.target_external_id,
        )
    assert spec.source_contact_id is not None
    return await merge_rows.move_contact_scope(
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
    """Apply a history.merge_requested event inside the caller's transaction: the
    consumer's, or the overdue-merge worker's for a request whose event never came."""
    spec = MergeSpec.from_event(org_id, data)
    inserted = await merge_rows.insert_merge(
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
    row = await merge_rows.lock_merge(conn, spec.merge_id)
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
        await merge_rows.fail_merge(conn, spec.merge_id, "source and target are the same scope")
        return MergeOutcome("failed")
    await locks.advisory_locks(conn, scope_locks([(spec.target_entity, spec.source_entity)]))
    live = await lock_contacts(conn, spec.org_id, spec.contact_ids)
    problem = contact_problem(spec, live)
    if problem is not None:
        await merge_rows.fail_merge(conn, spec.merge_id, problem)
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
    in one sorted round trip, in the order of the queries package's lock order: the merge
    rows, the scope advisory locks of every merge, their contacts, the conversations, and last
    the target subjects' event sequences (history.merged is emitted in subject order).
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
    inserted = await merge_rows.insert_merges(conn, [_row_of(specs[i]) for i in first.values()])
    todo = {i: specs[i] for i in first.values() if specs[i].merge_id in inserted}
    recorded = [specs[i].merge_id for i in first.values() if i not in todo]
    if recorded:
        for row in await merge_rows.lock_merges(conn, recorded):
            spec = MergeSpec.from_row(row)
            if spec.org_id != specs[first[spec.merge_id]].org_id:
                log.warning(
                    "merge id belongs to another org; ignored", extra={"mergeId": spec.merge_id}
                )
            elif row["status"] == "pending":
                todo[first[spec.merge_id]] = spec

    errors = {i: "source and target are the same scope" for i, s in todo.items() if s.same_scope()}
    active = sorted(i for i in todo if i not in errors)
    keys = scope_locks((todo[i].target_entity, todo[i].source_entity) for i in active)
    if keys:
        await locks.advisory_locks(conn, keys)
    pairs = sorted(
        {(todo[i].org_id, c) for i in active for c in todo[i].contact_ids}, key=_by_contact
    )
    live = await lock_contacts_of_orgs(conn, pairs) if pairs else {}
    for i in active:
        spec = todo[i]
        mine = {c: live[(spec.org_id, c)] for c in spec.contact_ids if (spec.org_id, c) in live}
        problem = contact_problem(spec, mine)
        if problem is not None:
            errors[i] = problem
    if errors:
        await merge_rows.fail_merges(
            conn, [(todo[i].merge_id, e) for i, e in sorted(errors.items())]
        )
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


def _row_of(spec: MergeSpec) -> merge_rows.MergeRow:
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
        await merge_rows.move_visitor_scopes(
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
    await merge_rows.insert_merge(
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
