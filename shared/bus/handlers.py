"""What a service gives a consumer group: one handler per event type, and how a handler
says that a message can never succeed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

Handler = Callable[[Any, asyncpg.Connection], Awaitable[None]]
"""Applies one event inside the transaction that also records it as processed."""

BatchHandler = Callable[[Sequence[Any], asyncpg.Connection], Awaitable[None]]
"""Applies several events of one type inside the one transaction that also records them as
processed. The events are of different subjects and in stream order; applying them must have
the effect of applying them one after the other. Several such transactions run at once, so
it must take every lock it needs in one global order (all keys sorted, phase by phase), or
two of them could deadlock."""


@dataclass(frozen=True, slots=True)
class Batched:
    """A handler that can also apply a batch of events (see ``BatchHandler``). Called with
    one event it is the plain handler, which the consumer falls back to when a batch fails."""

    one: Handler
    many: BatchHandler

    async def __call__(self, event: Any, conn: asyncpg.Connection) -> None:
        await self.one(event, conn)


class PoisonMessage(Exception):
    """The message can never be handled, however often it is delivered: its payload is
    undecodable, or a handler raises this for an event it can never apply. The consumer
    dead-letters it on the first such failure instead of retrying it, while the other
    messages keep flowing. Any other exception from a handler counts as possibly transient:
    the message is retried until CONSUMER_MAX_DELIVERIES deliveries, then dead-lettered.

    Raised from a ``BatchHandler`` it cannot say which event is poison: the batch is rolled
    back and each event applied alone, where the plain handler can raise it for its own."""
