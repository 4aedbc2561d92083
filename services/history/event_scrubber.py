"""The Redis half of an erasure: the stream entries that still carry the person's data.

Events name the person (a ``contact.authenticated`` carries userId, email and externalId; a
session or merge event carries an externalId), and the event payloads are a published
contract, so they keep carrying what consumers need. Erasure therefore deletes the entries
themselves. The erasure's transaction deleted the outbox rows and recorded, in
``erasure_scrubs``, the stream ids Redis had given the published ones and the ids (contact
and bound browsers) that name the person. When history's consumer handles the erasure's
``contact.erased`` event, this removes:

- the recorded entries (XDEL by id);
- any other entry naming the person published after the newest entry the outbox had recorded
  when the erasure ran: a relay batch read before the erasure committed is published after
  it (its rows were deleted before it could record their ids), but the relay publishes in
  outbox order, so such an entry lies before the ``contact.erased`` being handled. Entries
  up to that mark were published by committed batches, so their rows carried their ids (a
  stream without such a mark is scanned whole);
- every dead letter naming the person, in every dead-letter stream (they are few, and a
  message may have been parked long ago).

The erasure's own events (ids only) are kept. The handler runs in the consumer's
exactly-once transaction: a Redis failure rolls it back and the event is delivered again, so
a Redis outage at erasure time only delays this; the ``erasure_scrubs`` row goes once done.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

import asyncpg
import msgspec

from services.history.erasure import ERASURE_EVENT_TYPES
from shared.bus.events import EVENT_FIELD, ContactErased, header_decoder
from shared.bus.messages import stream_entries
from shared.config import Settings
from shared.redis import Redis

log = logging.getLogger(__name__)

_PAGE = 500


class EventScrubber:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings

    async def handle(self, event: ContactErased, conn: asyncpg.Connection) -> None:
        await self.scrub(conn, event.data.receipt_id, erased_event_id=event.id)

    async def scrub(
        self, conn: asyncpg.Connection, receipt_id: str, *, erased_event_id: str
    ) -> int:
        """Remove the erased person's entries from Redis; return how many went. The stream is
        scanned up to the erasure's own ``contact.erased`` entry: what comes after it was
        committed after the erasure (a merge request naming the tombstone, which must still
        reach the merge consumer to fail)."""
        row = await conn.fetchrow(
            """SELECT subjects, streams, entry_ids, tail_streams, tail_after
               FROM erasure_scrubs WHERE receipt_id = $1 FOR UPDATE""",
            uuid.UUID(receipt_id),
        )
        if row is None:
            return 0  # done already (or an erasure from before this table existed)
        needles = [subject.encode() for subject in row["subjects"]]
        removed = await self._delete_recorded(row["streams"], row["entry_ids"])
        tails = dict(zip(row["tail_streams"], row["tail_after"], strict=True))
        # Every partition: the person's browsers are subjects of their own, so their events
        # may sit in other partitions than the contact's. Only the erasure's own partition
        # holds the ``until`` entry; the others are scanned to their end, which may also
        # remove a later event naming the tombstone (its merge request then fails from
        # Postgres, by the overdue-merge worker, instead of by its event).
        for stream in {*self._settings.event_streams, *row["streams"]}:
            start = "(" + tails[stream] if stream in tails else "-"
            removed += await self._delete_naming(
                stream, needles, start=start, until=erased_event_id.encode()
            )
        async for key in self._redis.scan_iter(
            match=self._settings.dead_letter_pattern(), _type="stream", count=1000
        ):
            removed += await self._delete_naming(key, needles, start="-")
        await conn.execute(
            "DELETE FROM erasure_scrubs WHERE receipt_id = $1", uuid.UUID(receipt_id)
        )
        log.info(
            "erased person's stream entries removed",
            extra={"receiptId": receipt_id, "removed": removed},
        )
        return removed

    async def _delete_recorded(self, streams: Sequence[str], entry_ids: Sequence[str]) -> int:
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id in zip(streams, entry_ids, strict=True):
            by_stream.setdefault(stream, []).append(entry_id)
        removed = 0
        for stream, ids in by_stream.items():
            for at in range(0, len(ids), _PAGE):
                removed += int(await self._redis.xdel(stream, *ids[at : at + _PAGE]))
        return removed

    async def _delete_naming(
        self,
        stream: str | bytes,
        needles: list[bytes],
        *,
        start: str,
        until: bytes | None = None,
    ) -> int:
        """Delete the entries of ``stream`` from ``start`` on that name the person (in any
        field: a dead letter's error text too), except the erasure's own events; stop at the
        entry holding the event ``until`` (the whole rest of the stream if it is not there)."""
        removed = 0
        cursor = start
        while True:
            page = stream_entries(await self._redis.xrange(stream, min=cursor, count=_PAGE))
            doomed: list[bytes] = []
            reached = False
            for mid, fields in page:
                if until is not None and until in (fields or {}).get(EVENT_FIELD, b""):
                    reached = True
                    break
                if _names(fields or {}, needles):
                    doomed.append(mid)
            if doomed:
                removed += int(await self._redis.xdel(stream, *doomed))
            if reached or len(page) < _PAGE:
                return removed
            cursor = "(" + page[-1][0].decode()


def _names(fields: dict[bytes, bytes], needles: list[bytes]) -> bool:
    if not any(needle in value for value in fields.values() for needle in needles):
        return False
    raw = fields.get(EVENT_FIELD)
    if raw:
        try:
            if header_decoder.decode(raw).type in ERASURE_EVENT_TYPES:
                return False
        except msgspec.MsgspecError:
            pass  # undecodable but naming the person: it goes
    return True
