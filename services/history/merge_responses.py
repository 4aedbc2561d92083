"""A merge row as the API shows it (``GET /v1/merges/{id}``)."""

from __future__ import annotations

import asyncpg

from services.history.merge_rules import MergeSpec
from services.history.schemas import MergeOut, Scope


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
