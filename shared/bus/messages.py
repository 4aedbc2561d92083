"""Stream entries as a consumer sees them, and what becomes of each one.

A ``Message`` is one entry of the events stream with its header decoded once, when read:
routing, ordering and the handler choice all need it. An ``Outcome`` is what one delivery
of a message came to, in the spirit of Ack / Nack / Reject.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import Any, cast

import msgspec

from shared.bus.events import EVENT_FIELD, EventHeader, header_decoder

# redis-py types stream replies loosely (unions over RESP versions); with bytes responses
# and RESP2 they are exactly these shapes.
Entry = tuple[bytes, dict[bytes, bytes] | None]


def stream_entries(reply: Any) -> list[Entry]:
    """redis-py's XRANGE/XREADGROUP/XAUTOCLAIM entries, typed."""
    return cast(list[Entry], reply or [])


class Outcome(enum.Enum):
    """What one delivery of a message came to. The value is the ``outcome`` label of
    ``wi_events_consumed_total``, counted once per delivery."""

    APPLIED = "handled"
    """Ack: its effect is committed, by this delivery or an earlier one."""
    SKIPPED = "skipped"
    """Ack: no handler of this group takes its type."""
    RETRY = "retry"
    """Nack: left pending; the reclaim delivers it again, and later messages of its subject
    wait behind it."""
    DEAD_LETTERED = "dead_lettered"
    """Reject: parked in the group's dead-letter stream, acked atomically with that write."""

    @property
    def needs_ack(self) -> bool:
        # A dead letter was acked with its parking; a retry must stay pending.
        return self in (Outcome.APPLIED, Outcome.SKIPPED)


@dataclass(frozen=True, slots=True)
class Message:
    id: bytes
    raw: bytes | None
    header: EventHeader | None

    @classmethod
    def parse(cls, mid: bytes, fields: dict[bytes, bytes] | None) -> Message:
        raw = fields.get(EVENT_FIELD) if fields else None
        header = None
        if raw is not None:
            # Poison when undecodable: the applier says why once the message is handled.
            with contextlib.suppress(msgspec.MsgspecError):
                header = header_decoder.decode(raw)
        return cls(mid, raw, header)

    @classmethod
    def parse_all(cls, reply: Any) -> list[Message]:
        return [cls.parse(mid, fields) for mid, fields in stream_entries(reply)]

    @property
    def subject(self) -> str:
        # Undecodable messages share one lane, in stream order.
        return "" if self.header is None else self.header.subject
