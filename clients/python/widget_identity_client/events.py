"""A typed consumer of the identity event stream (Redis Streams, consumer groups).

Needs the ``events`` extra (``pip install 'widget-identity-client[events]'``).

Each stream entry carries one field, ``event``: the JSON envelope of the AsyncAPI contract
(``docs/asyncapi.json``), decoded here into the generated event types (``models.AnyEvent``).
Delivery is at-least-once: an entry is acknowledged (XACK) only after the handler returned,
so a crash or a handler error leaves it pending, and the next ``run`` delivers this
consumer's pending entries again before new ones. Handlers must therefore be idempotent:
deduplicate by ``event.id``. Types this version does not know (a newer server) are
acknowledged and skipped, as the contract says to.

::

    consumer = EventConsumer(redis, group="crm-sync", consumer="worker-1")
    await consumer.run(handle)   # handle(event: AnyEvent) -> Awaitable[None]

A server with ``STREAM_PARTITIONS`` > 1 writes each subject's events to one of several
streams (``event_streams``): run one ``EventConsumer`` per partition (``partition=i``), in
one process or spread over several. A subject's events are in one partition, in order; read
each partition with one process at a time to handle them in that order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
import redis.exceptions

from widget_identity_client.errors import ClientError
from widget_identity_client.models import EVENT_TYPES, AnyEvent

log = logging.getLogger("widget_identity_client.events")

Handler = Callable[[AnyEvent], Awaitable[object]]

EVENT_FIELD = "event"
DEFAULT_PREFIX = "wi:"
KNOWN_TYPES = frozenset(str(t.__struct_config__.tag) for t in EVENT_TYPES)


class _Type(msgspec.Struct):
    type: str


_type_decoder = msgspec.json.Decoder(_Type)
_event_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)


class EventDecodeError(ClientError):
    """An entry that breaks the contract: no ``event`` field, not JSON, no ``type``, or a
    known type with invalid data. It is left pending (not acknowledged); ``ack`` it to skip
    it for good."""

    def __init__(self, entry_id: str, message: str, raw: bytes | None) -> None:
        super().__init__(f"stream entry {entry_id}: {message}")
        self.entry_id = entry_id
        self.raw = raw


def decode_event(entry_id: str, fields: Mapping[Any, Any] | None) -> AnyEvent | None:
    """The typed event of one stream entry; None for a type this version does not know."""
    value = None
    if fields:
        value = fields.get(EVENT_FIELD.encode(), fields.get(EVENT_FIELD))
    if value is None:
        raise EventDecodeError(entry_id, f"no {EVENT_FIELD!r} field", None)
    raw = value.encode() if isinstance(value, str) else bytes(value)
    try:
        kind = _type_decoder.decode(raw).type
    except msgspec.MsgspecError as exc:
        raise EventDecodeError(entry_id, f"not an event envelope ({exc})", raw) from exc
    if kind not in KNOWN_TYPES:
        return None
    try:
        return _event_decoder.decode(raw)
    except msgspec.MsgspecError as exc:
        raise EventDecodeError(entry_id, f"invalid {kind} event ({exc})", raw) from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


_Entry = tuple[str, Mapping[Any, Any] | None]


def _entries(reply: Any) -> list[_Entry]:
    """XREADGROUP's entries for our one stream, in RESP2 (list) or RESP3 (dict) shape."""
    if not reply:
        return []
    streams: Sequence[Any] = list(reply.items()) if isinstance(reply, dict) else reply
    found: list[_Entry] = []
    for _, entries in streams:
        for entry_id, fields in entries:
            found.append((_text(entry_id), fields))
    return found


def event_streams(
    stream_prefix: str = DEFAULT_PREFIX, *, partitions: int = 1, cluster: bool = False
) -> list[str]:
    """The server's event streams, in partition order, as it names them for its
    ``STREAM_PREFIX``, ``STREAM_PARTITIONS`` and ``REDIS_CLUSTER``: one partition is
    ``<prefix>events``; otherwise (or on a cluster) each carries its partition as a hash tag,
    ``<prefix>events:{i}``."""
    if partitions < 1:
        raise ValueError("partitions must be at least 1")
    if partitions == 1 and not cluster:
        return [f"{stream_prefix}events"]
    return [f"{stream_prefix}events:{{{i}}}" for i in range(partitions)]


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class EventConsumer:
    """Reads one event stream (partition ``partition`` of ``partitions``; the server's one
    stream by default) as one consumer of a consumer group.

    ``start_id``: where a group created here starts: ``"0"`` (default) is every event still
    in the stream, ``"$"`` only events published from now on. ``batch`` entries per read;
    a read waits up to ``block_ms`` for new entries. ``redis`` may be a cluster client
    (``redis.asyncio.RedisCluster``): every command here names the one stream.
    """

    def __init__(
        self,
        redis: aioredis.Redis | aioredis.RedisCluster,
        *,
        group: str,
        consumer: str | None = None,
        stream_prefix: str = DEFAULT_PREFIX,
        start_id: str = "0",
        batch: int = 10,
        block_ms: int = 5000,
        partition: int = 0,
        partitions: int = 1,
        cluster: bool = False,
    ) -> None:
        if batch < 1 or block_ms < 1:
            raise ValueError("batch and block_ms must be positive")
        streams = event_streams(stream_prefix, partitions=partitions, cluster=cluster)
        if not 0 <= partition < len(streams):
            raise ValueError(f"partition must be between 0 and {len(streams) - 1}")
        self.redis = redis
        self.group = group
        self.consumer = consumer or default_consumer_name()
        self.stream = streams[partition]
        self.start_id = start_id
        self.batch = batch
        self.block_ms = block_ms
        # Our own pending entries come first (what a crash or failed handler left behind).
        self._backlog = True
        self._group_ready = False

    async def ensure_group(self) -> None:
        """XGROUP CREATE ... MKSTREAM, unless the group exists."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id=self.start_id, mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def ack(self, entry_id: str) -> None:
        await self.redis.xack(self.stream, self.group, entry_id)

    async def poll(self, handler: Handler) -> int:
        """One read: hand each entry to ``handler`` in stream order and acknowledge it once
        the handler returned. Returns how many entries were read (handled or skipped).

        A handler exception (or an ``EventDecodeError``) propagates; that entry and the
        rest of the read stay pending and come first on the next poll.
        """
        if not self._group_ready:
            await self.ensure_group()
        entries: list[_Entry] = []
        if self._backlog:
            entries = await self._read("0", block=None)
            self._backlog = bool(entries)
        if not entries:
            entries = await self._read(">", block=self.block_ms)
        try:
            for entry_id, fields in entries:
                if fields is None:
                    # Deleted from the stream (trimmed) while pending: nothing left to handle.
                    await self.ack(entry_id)
                    continue
                event = decode_event(entry_id, fields)
                if event is None:
                    log.debug("skipping entry %s of an unknown event type", entry_id)
                else:
                    await handler(event)
                await self.ack(entry_id)
        except BaseException:
            self._backlog = True
            raise
        return len(entries)

    async def _read(self, start: str, *, block: int | None) -> list[_Entry]:
        reply = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=self.batch, block=block
        )
        return _entries(reply)

    async def run(self, handler: Handler, *, stop: asyncio.Event | None = None) -> None:
        """Poll until ``stop`` is set (checked between reads) or the task is cancelled."""
        self._backlog = True
        while stop is None or not stop.is_set():
            await self.poll(handler)
