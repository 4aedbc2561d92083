"""Where the events stand, per stream: what the outbox still has to publish there, and what
each consumer group has still to read or acknowledge (``widget-identity streams status``).

Its main use is changing ``STREAM_PARTITIONS`` on a running deployment: a subject's events
move to another partition with the count, so the switch is safe only once every stream of
the old layout is *drained* — nothing unpublished, nothing unread, nothing pending
(docs/architecture.md, "Partitions").
"""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec
from redis.exceptions import ResponseError

from shared.redis import Redis, as_str


class GroupStatus(msgspec.Struct, frozen=True, rename="camel"):
    name: str
    # Entries not yet delivered to the group (Redis's own count; None when Redis cannot
    # tell, after a trim or a deletion past the group's position).
    lag: int | None
    # Delivered, not yet acknowledged.
    pending: int


class StreamStatus(msgspec.Struct, frozen=True, rename="camel"):
    stream: str
    unpublished: int
    length: int
    groups: list[GroupStatus]

    @property
    def drained(self) -> bool:
        return self.unpublished == 0 and all(
            group.lag == 0 and group.pending == 0 for group in self.groups
        )


async def stream_status(
    pool: asyncpg.Pool, redis: Redis, streams: tuple[str, ...]
) -> list[StreamStatus]:
    """``streams`` and every other stream the outbox still has rows to publish to (a layout
    changed without draining shows up here), one Redis call per stream (each its own slot
    on a cluster)."""
    rows = await pool.fetch(
        """SELECT stream, count(*) AS unpublished FROM outbox
           WHERE published_at IS NULL GROUP BY stream"""
    )
    unpublished = {row["stream"]: int(row["unpublished"]) for row in rows}
    found: list[StreamStatus] = []
    for stream in dict.fromkeys([*streams, *sorted(unpublished)]):
        try:
            groups: list[dict[str, Any]] = await redis.xinfo_groups(stream)
            length = int(await redis.xlen(stream))
        except ResponseError as exc:
            if "no such key" not in str(exc).lower():
                raise
            groups, length = [], 0
        found.append(
            StreamStatus(
                stream=stream,
                unpublished=unpublished.get(stream, 0),
                length=length,
                groups=[
                    GroupStatus(
                        name=as_str(group["name"]),
                        lag=None if group.get("lag") is None else int(group["lag"]),
                        pending=int(group["pending"]),
                    )
                    for group in groups
                ],
            )
        )
    return found
