"""Undoing a done merge: its conversations still in the target scope go back to the source
scope, once, recorded in the merge row and announced as history.merge_undone."""

from __future__ import annotations

import asyncpg

from services.history.merge_rules import MergeSpec, contact_problem, scope_locks
from services.history.queries import locks, merge_rows
from shared.bus.events import HistoryMergeUndone, MergeUndoneData
from shared.bus.outbox import Outbox
from shared.errors import Problem, not_found
from shared.identity.contacts import lock_contacts


def not_undoable(detail: str, status: str) -> Problem:
    return Problem(409, "merge_not_undoable", detail, mergeStatus=status)


async def undo_merge(conn: asyncpg.Connection, outbox: Outbox, org_id: str, merge_id: str) -> int:
    """Move the merge's conversations that are still in its target scope back to its source
    scope; return how many. Only a done merge can be undone, once."""
    row = await merge_rows.lock_merge(conn, merge_id)
    if row is None or str(row["org_id"]) != org_id:
        raise not_found("merge")
    status = row["status"]
    if status != "done":
        raise not_undoable(f"the merge is {status}; only a done merge can be undone", status)
    spec = MergeSpec.from_row(row)
    # Undo moves history out of the target and into the source: the mirror of the merge.
    await locks.advisory_locks(conn, scope_locks([(spec.source_entity, spec.target_entity)]))
    live = await lock_contacts(conn, org_id, spec.contact_ids)
    problem = contact_problem(spec, live)
    if problem is not None:
        raise not_undoable(f"cannot undo: {problem}", status)
    restored = await merge_rows.undo_moves(
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
