"""Per-subject order: a subject's messages are handled one at a time, in stream order, and
none overtakes an earlier one that failed and waits, pending, for its retry. Different
subjects run side by side."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from shared.bus.messages import Message, Outcome

HandleOne = Callable[[Message], Awaitable[Outcome]]
HandleRound = Callable[[list[Message]], Awaitable[list[Outcome]]]
"""Handles messages of pairwise different subjects at once; their outcomes, in order."""


@dataclass(slots=True)
class _Lane:
    """One subject's messages of a read batch, handled strictly in stream order."""

    messages: list[Message]
    next: int = 0


class SubjectOrder:
    def __init__(self, claim_idle_ms: int) -> None:
        # Subjects whose message failed and waits, pending, for its retry: subject -> (that
        # message's id, when it failed). Later messages of the subject wait behind it.
        self._held: dict[str, tuple[bytes, float]] = {}
        self._hold_expiry = 3 * claim_idle_ms / 1000

    def lanes(self, messages: Sequence[Message]) -> list[list[Message]]:
        """The messages by subject, each subject's in stream order, minus those held back."""
        by_subject: dict[str, list[Message]] = {}
        for message in messages:
            by_subject.setdefault(message.subject, []).append(message)
        self._hold_back(by_subject)
        return list(by_subject.values())

    async def in_order(self, lanes: list[list[Message]], handle: HandleOne) -> list[bytes]:
        """Every lane at once, each message by itself; the ids to ack."""
        done: list[bytes] = []

        async def lane(messages: list[Message]) -> None:
            for message in messages:
                outcome = await handle(message)
                self._note(message, outcome)
                if outcome is Outcome.RETRY:
                    # Later messages of this subject must wait for this one: leave them
                    # pending too, to be reclaimed in order.
                    return
                if outcome.needs_ack:
                    done.append(message.id)

        await asyncio.gather(*(lane(messages) for messages in lanes))
        return done

    async def in_rounds(self, lanes: list[list[Message]], handle: HandleRound) -> list[bytes]:
        """Round k handles the k-th message of every subject (so no two of one subject) in
        one call; round k+1 starts when round k is done. The ids to ack."""
        done: list[bytes] = []
        pending = [_Lane(messages) for messages in lanes]
        while pending:
            heads = [lane.messages[lane.next] for lane in pending]
            outcomes = await handle(heads)
            still: list[_Lane] = []
            for lane, head, outcome in zip(pending, heads, outcomes, strict=True):
                self._note(head, outcome)
                if outcome is Outcome.RETRY:
                    continue  # the rest of this subject waits, pending, for the reclaim
                if outcome.needs_ack:
                    done.append(head.id)
                lane.next += 1
                if lane.next < len(lane.messages):
                    still.append(lane)
            pending = still
        return done

    def _hold_back(self, by_subject: dict[str, list[Message]]) -> None:
        """Leave pending the new messages of a subject whose earlier message failed and waits
        for its retry, unless that message is in this batch (then all run in order): applied
        now, they would overtake it. The reclaim brings them back in stream order, after it.
        A hold outlives a few reclaim periods only if another consumer took the failed
        message over; it is dropped then, so the subject never stalls here."""
        if not self._held:
            return
        now = time.monotonic()
        for subject in [s for s in by_subject if s in self._held]:
            held_id, since = self._held[subject]
            if any(m.id == held_id for m in by_subject[subject]):
                continue
            if now - since > self._hold_expiry:
                del self._held[subject]
                continue
            del by_subject[subject]

    def _note(self, message: Message, outcome: Outcome) -> None:
        held = self._held.get(message.subject)
        if outcome is Outcome.RETRY:
            if held is None or held[0] != message.id:
                self._held[message.subject] = (message.id, time.monotonic())
        elif held is not None and held[0] == message.id:
            del self._held[message.subject]  # applied or dead-lettered: the rest may follow
