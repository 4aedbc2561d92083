"""Event handlers of the history consumer group (the merge consumer).

Each handler runs inside the consumer's transaction, which also records the event as
processed: a redelivered event is skipped before it gets here, and a crash rolls both back.
"""

from __future__ import annotations

import asyncpg
from prometheus_client import Counter

from services.history import merges
from shared.consumer import Handler
from shared.events import Event, HistoryMergeRequested
from shared.outbox import Outbox

GROUP = "history"

MERGES_APPLIED = Counter(
    "wi_history_merges_total", "Merge requests handled by the merge consumer", ["outcome"]
)
CONVERSATIONS_MOVED = Counter(
    "wi_history_conversations_moved_total", "Conversations re-pointed by merges"
)


def merge_requested_handler(outbox: Outbox) -> Handler:
    async def handle(event: HistoryMergeRequested, conn: asyncpg.Connection) -> None:
        outcome = await merges.apply_requested_merge(conn, outbox, event.org_id, event.data)
        # Counted before commit: a rolled-back attempt is counted again on retry, which is
        # acceptable for a rate metric.
        MERGES_APPLIED.labels(outcome.status).inc()
        if outcome.moved:
            CONVERSATIONS_MOVED.inc(outcome.moved)

    return handle


def handlers(outbox: Outbox) -> dict[type[Event], Handler]:
    return {HistoryMergeRequested: merge_requested_handler(outbox)}
