"""Merges whose request waited too long are applied straight from Postgres (promise 13).

A login merge is recorded with the session that promises it (session resolution's view
``login_merge_requests``) and normally applied by the merge consumer from its event within
milliseconds. Should the event be late or never come (Redis lost it, the group is stuck),
this worker, in every history consumer process, applies each request that has waited
``MERGE_PENDING_TIMEOUT`` through the consumer's own apply function: the merge id is the
idempotency key, so whichever of the two comes second waits on the first's merge row and then
does nothing. Explicit contact merges, recorded pending by the API, are looked after the same
way. One that can never apply ends ``failed`` with the reason, never pending forever.

Login requests are walked oldest first from a mark kept in memory: everything before it has
a merge row. A process's first walk therefore reads every request once; afterwards only the
last moments' requests are read again. The mark stays ``_SETTLE_GRACE`` behind the newest
request it may pass, longer than any session transaction, so a request committing late with
an earlier time is never stepped over.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime

import asyncpg
from aiohttp import web
from prometheus_client import Counter, Gauge

from services.history import merges
from services.history.merge_rules import InvalidMergeRequest, MergeSpec
from services.history.queries import merge_rows
from shared import db
from shared.bus.events import MergeRequestedData
from shared.bus.outbox import OUTBOX, Outbox
from shared.config import SETTINGS, Settings
from shared.lifecycle import Worker, sleep_or_stop

log = logging.getLogger(__name__)

OVERDUE_MERGES = Counter(
    "wi_history_overdue_merges_total",
    "Merge requests applied from Postgres after waiting MERGE_PENDING_TIMEOUT for their event",
    ["outcome"],  # done | failed | skipped (the consumer was first) | retry
)
OVERDUE_FOUND = Gauge(
    "wi_history_merges_overdue", "Overdue unapplied merge requests found by the last sweep"
)

_PAGE = 200
_SETTLE_GRACE = 60.0
_START = (datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))


class OverdueMerges:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, outbox: Outbox) -> None:
        self._pool = pool
        self._outbox = outbox
        self._timeout = settings.merge_pending_timeout
        # As many tries as the consumer gives an event before dead-lettering it.
        self._max_attempts = settings.consumer_max_deliveries
        self._attempts: dict[str, int] = {}
        self._walked = _START

    @property
    def interval(self) -> float:
        """Between sweeps: a request is applied within the timeout and a quarter of it (at
        most five seconds more)."""
        return min(max(self._timeout / 4, 0.05), 5.0)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sweep()
            except db.TRANSIENT_DB_ERRORS as exc:
                log.warning("overdue merge sweep interrupted", extra={"error": repr(exc)})
            if await sleep_or_stop(stop, self.interval):
                return

    async def sweep(self) -> int:
        """Apply every request overdue now; return how many were found unapplied."""
        found = 0
        for row in await merge_rows.overdue_pending_merges(self._pool, self._timeout, _PAGE):
            found += 1
            spec = MergeSpec.from_row(row)
            await self._apply(spec.org_id, _request_of(spec))
        cursor, advancing = self._walked, True
        while True:
            rows = await merge_rows.overdue_login_requests(
                self._pool,
                after=cursor,
                older_than=self._timeout,
                settled_after=self._timeout + _SETTLE_GRACE,
                limit=_PAGE,
            )
            for row in rows:
                cursor = (row["requested_at"], row["merge_id"])
                settled = True
                if row["status"] in (None, "pending"):
                    found += 1
                    settled = await self._apply(str(row["org_id"]), _login_request_of(row))
                advancing = advancing and settled and row["final"]
                if advancing:
                    self._walked = cursor
            if len(rows) < _PAGE:
                break
        OVERDUE_FOUND.set(found)
        return found

    async def _apply(self, org_id: str, request: MergeRequestedData) -> bool:
        """Apply one request as the consumer would; True once it is settled (applied, failed,
        or found applied by someone else)."""
        merge_id = request.merge_id
        try:
            outcome = await db.in_transaction(
                self._pool,
                lambda conn: merges.apply_requested_merge(conn, self._outbox, org_id, request),
            )
        except db.TRANSIENT_DB_ERRORS:
            raise
        except InvalidMergeRequest as exc:
            return await self._fail(org_id, request, str(exc))
        except Exception as exc:
            attempts = self._attempts.get(merge_id, 0) + 1
            log.exception(
                "overdue merge could not be applied",
                extra={"mergeId": merge_id, "attempt": attempts},
            )
            if attempts < self._max_attempts:
                self._attempts[merge_id] = attempts
                OVERDUE_MERGES.labels("retry").inc()
                return False
            return await self._fail(org_id, request, f"could not be applied: {exc!r}")
        self._attempts.pop(merge_id, None)
        OVERDUE_MERGES.labels(outcome.status).inc()
        if outcome.status != "skipped":
            log.warning(
                "applied an overdue merge from Postgres (its event never came)",
                extra={"mergeId": merge_id, "outcome": outcome.status},
            )
        return True

    async def _fail(self, org_id: str, request: MergeRequestedData, error: str) -> bool:
        self._attempts.pop(request.merge_id, None)
        row = (
            request.merge_id,
            org_id,
            request.reason,
            request.source_visitor_id,
            request.source_contact_id,
            request.source_external_id,
            request.target_contact_id,
            request.target_external_id,
        )
        await merge_rows.record_failed_merge(self._pool, row, error)
        OVERDUE_MERGES.labels("failed").inc()
        log.warning("overdue merge failed", extra={"mergeId": request.merge_id, "error": error})
        return True


def _login_request_of(row: asyncpg.Record) -> MergeRequestedData:
    return MergeRequestedData(
        merge_id=str(row["merge_id"]),
        reason="login",
        target_contact_id=str(row["contact_id"]),
        target_external_id=row["external_id"],
        source_visitor_id=str(row["visitor_id"]),
    )


def _request_of(spec: MergeSpec) -> MergeRequestedData:
    return MergeRequestedData(
        merge_id=spec.merge_id,
        reason=spec.reason,
        target_contact_id=spec.target_contact_id,
        target_external_id=spec.target_external_id,
        source_visitor_id=spec.source_visitor_id,
        source_contact_id=spec.source_contact_id,
        source_external_id=spec.source_external_id,
    )


def overdue_merges_worker(app: web.Application) -> Worker:
    return OverdueMerges(app[SETTINGS], app[db.DB_POOL], app[OUTBOX]).run
