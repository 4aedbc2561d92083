"""Event handlers of the history consumer group (the merge consumer, which also finishes
erasures in Redis: ``event_scrubber``).

Each handler runs inside the consumer's transaction, which also records the event as
processed: a redelivered event is skipped before it gets here, and a crash rolls both back.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
from prometheus_client import Counter

from services.history import merges
from services.history.event_scrubber import EventScrubber
from shared.bus.events import ContactErased, Event, HistoryMergeRequested
from shared.bus.handlers import Batched, BatchHandler, Handler
from shared.bus.outbox import Outbox

GROUP = "history"

MERGES_APPLIED = Counter(
    "wi_history_merges_total", "Merge requests handled by the merge consumer", ["outcome"]
)
CONVERSATIONS_MOVED = Counter(
    "wi_history_conversations_moved_total", "Conversations re-pointed by merges"
)


def _count(outcome: merges.MergeOutcome) -> None:
    # Counted before commit: a rolled-back attempt is counted again on retry, which is
    # acceptable for a rate metric.
    MERGES_APPLIED.labels(outcome.status).inc()
    if outcome.moved:
        CONVERSATIONS_MOVED.inc(outcome.moved)


def merge_requested_handler(outbox: Outbox) -> Handler:
    async def handle(event: HistoryMergeRequested, conn: asyncpg.Connection) -> None:
        _count(await merges.apply_requested_merge(conn, outbox, event.org_id, event.data))

    return handle


def merge_requested_batch_handler(outbox: Outbox) -> BatchHandler:
    """Several merge requests (of different subjects) in one transaction: a backlog drains
    with a fraction of the round trips of one transaction per merge."""

    async def handle(events: Sequence[HistoryMergeRequested], conn: asyncpg.Connection) -> None:
        requests = [(event.org_id, event.data) for event in events]
        for outcome in await merges.apply_requested_merges(conn, outbox, requests):
            _count(outcome)

    return handle


def handlers(outbox: Outbox, scrubber: EventScrubber) -> dict[type[Event], Handler]:
    return {
        HistoryMergeRequested: Batched(
            one=merge_requested_handler(outbox), many=merge_requested_batch_handler(outbox)
        ),
        ContactErased: scrubber.handle,
    }
