"""Publishing through a transactional outbox, and the relay that moves it to Redis Streams.

A service never writes to Redis when it changes state: it calls ``Outbox.emit`` inside the
same Postgres transaction, so the event exists if and only if the change committed. The relay
then publishes committed rows in order and marks them published. A crash between XADD and
the mark publishes the row again: consumers are idempotent by event id, so that is safe.
"""

from __future__ import annotations

import logging
import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import msgspec
from aiohttp import web

from shared.bus.events import Event
from shared.bus.partitions import partition_sql
from shared.tracing import current_traceparent

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)


class Late:
    """A field value that the emitting SQL statement computes (a contact id an upsert
    returns, a timestamp read under a row lock), so the event can be written by the same
    statement as the state change: one round trip, atomic without BEGIN/COMMIT.

    Put ``late("column")`` where the value goes (``subject`` or any field of ``data``); the
    statement's source CTE supplies ``column``, and Postgres renders it with ``to_json``
    (text, uuid, boolean, number or timestamptz all decode as the field's type).
    """

    __slots__ = ("column",)

    def __init__(self, column: str) -> None:
        if not _COLUMN.match(column):
            raise ValueError(f"not a plain column name: {column!r}")
        self.column = column


def late(column: str) -> Any:
    """``Late(column)``, typed ``Any`` so it fits any field of an event struct."""
    return Late(column)


_SEQ_CTE = "event_seq"


@dataclass(frozen=True, slots=True)
class EventInsert:
    """CTEs (``event_seq``, ``event_row``) that insert one event into the outbox from within
    the caller's statement, with the parameters they use. ``seq_cte`` yields ``seq``;
    ``event`` still holds its ``Late`` placeholders (and seq), for ``emit`` to complete."""

    ctes: str
    params: list[Any]
    seq_cte: str
    event: Event


_COLUMN = re.compile(r"^[a-z_][a-z0-9_]*$")


class Outbox:
    """Writes events into the outbox, in the same transaction (or statement) as the change."""

    def __init__(self, streams: str | Sequence[str]) -> None:
        """``streams``: the events stream, or every partition's (``Settings.event_streams``);
        each event goes to its subject's partition (shared.bus.partitions)."""
        self.streams = (streams,) if isinstance(streams, str) else tuple(streams)
        if not self.streams:
            raise ValueError("an outbox needs at least one stream")

    async def emit(
        self,
        conn: asyncpg.Connection,
        event_type: type[E],
        *,
        org_id: str,
        subject: str,
        data: Any,
    ) -> E:
        """Record an event inside the caller's open transaction; returns it with its seq."""
        if not conn.is_in_transaction():
            # Outside a transaction the event could outlive a rolled-back change.
            raise RuntimeError("Outbox.emit must run inside the state change's transaction")
        insert = self.insert(
            event_type, org_id=org_id, subject=subject, data=data, source="src", first_param=2
        )
        seq: int = await conn.fetchval(
            f"WITH src AS (SELECT $1::text AS subject), {insert.ctes} "
            f"SELECT seq FROM {insert.seq_cte}",
            subject,
            *insert.params,
        )
        event: E = msgspec.structs.replace(insert.event, seq=seq)  # type: ignore[assignment]
        return event

    def insert(
        self,
        event_type: type[Event],
        *,
        org_id: str,
        subject: str | Late,
        data: Any,
        source: str,
        first_param: int,
    ) -> EventInsert:
        """SQL that writes this event as part of a larger statement.

        ``source`` is a CTE of that statement yielding at most one row: a ``subject`` text
        column (whatever ``subject`` is here) and one column per ``Late`` value in ``data``.
        No source row, no event: the event exists exactly when the change it reports does.
        Parameters are numbered from ``first_param``. The subject's ``seq`` is taken in the
        same statement; its row lock serialises writers per subject, so seq order is commit
        order.
        """
        nonce = secrets.token_hex(8)
        seq_cte = _SEQ_CTE
        seq = Late("seq")  # placeholder for the seq CTE's value
        slots: dict[bytes, str] = {}

        def placeholder(value: object) -> str:
            if not isinstance(value, Late):
                raise TypeError(f"cannot encode {type(value).__name__} in an event")
            # Unforgeable by the data around it because of the per-call random nonce (user
            # text could contain the quote-NUL form, but not guess the nonce); a collision
            # would still be caught below (each placeholder must occur exactly once).
            text = f"\x00{nonce}:{len(slots)}"
            column = f"{seq_cte}.seq" if value is seq else f"{source}.{value.column}"
            slots[b'"\\u0000' + text[1:].encode() + b'"'] = column
            return text

        # Every concrete event type has a ``data`` field; the envelope base does not.
        make: Any = event_type
        event: Event = make(
            id=str(uuid.uuid4()),
            org_id=org_id,
            subject=subject,
            seq=seq,
            occurred_at=datetime.now(UTC),
            traceparent=current_traceparent(),
            data=data,
        )
        payload = msgspec.json.encode(event, enc_hook=placeholder)
        cuts: list[tuple[int, bytes, str]] = []
        for needle, expression in slots.items():
            if payload.count(needle) != 1:  # cannot happen with msgspec's encoding
                raise RuntimeError("late event field not found exactly once in the payload")
            cuts.append((payload.index(needle), needle, expression))
        cuts.sort()
        # The stream: one, or the subject's partition, computed in the statement because the
        # subject may be a ``Late`` value only the statement knows.
        streams_param = f"${first_param + 1}"
        if len(self.streams) == 1:
            stream_sql = streams_param
            streams: Any = self.streams[0]
        else:
            stream_sql = (
                f"({streams_param}::text[])[1 + "
                f"{partition_sql(f'{source}.subject', f'cardinality({streams_param}::text[])')}]"
            )
            streams = list(self.streams)
        params: list[Any] = [uuid.UUID(event.id), streams, event_type.type_name()]
        parts: list[str] = []
        at = 0
        n = first_param + len(params)
        for position, needle, expression in cuts:
            params.append(payload[at:position])
            # to_json(NULL) is NULL, and NULL would swallow the whole payload.
            parts.append(
                f"${n}::bytea || convert_to(COALESCE(to_json({expression})::text, 'null'), 'UTF8')"
            )
            n += 1
            at = position + len(needle)
        params.append(payload[at:])
        parts.append(f"${n}::bytea")
        ctes = (
            f"{seq_cte} AS ("
            f"INSERT INTO subject_seqs (subject, seq) SELECT {source}.subject, 1 FROM {source} "
            f"ON CONFLICT (subject) DO UPDATE SET seq = subject_seqs.seq + 1 RETURNING seq), "
            f"event_row AS ("
            f"INSERT INTO outbox (event_id, stream, event_type, payload) "
            f"SELECT ${first_param}, {stream_sql}, ${first_param + 2}, {' || '.join(parts)} "
            f"FROM {source}, {seq_cte})"
        )
        return EventInsert(ctes=ctes, params=params, seq_cte=seq_cte, event=event)


OUTBOX: web.AppKey[Outbox] = web.AppKey("outbox", Outbox)
