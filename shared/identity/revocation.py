"""Token revocation on the hot path: Postgres holds the truth, each process caches it.

Truth: ``contacts.tokens_not_before`` and ``contacts.erased_at``, written in the same
transaction as the ``contact.tokens_revoked`` / ``contact.erased`` outbox event.

Each process keeps contact id -> (not-before, erased) in memory, filled by one DB read on the
first sight of a contact and kept for ``ttl`` seconds as a safety net. A token that is fine
therefore costs no round trip at all. Every process also runs ``RevocationListener``:

- it subscribes to the pub/sub channel ``{prefix}revocations``, on which the revoking process
  PUBLISHes right after commit (the fast path: milliseconds, no wait for the relay), and
- it tails the events stream with plain XREAD (no consumer group: every replica must see
  every revocation) for ``contact.tokens_revoked`` and ``contact.erased`` (the reliable path:
  erasure by another service, or a PUBLISH lost in a crash).

Either one drops the contact's cache entry; the next verification re-reads Postgres. While
the listener is not connected, the cache may be missing invalidations, so it is cleared and
bypassed: every verification reads Postgres (and fails with 503 when that is down). Nothing
stale is ever trusted.

The same channel carries ``kid:<kid>`` when a signing key is deleted, so every process drops
that key at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import asyncpg
import msgspec
import redis.asyncio as aioredis

from shared.bus.events import (
    EVENT_FIELD,
    ContactErased,
    ContactTokensRevoked,
    event_decoder,
    header_decoder,
)
from shared.config import Settings
from shared.lifecycle import sleep_or_stop
from shared.redis import TRANSIENT_REDIS_ERRORS, block_within_timeout

log = logging.getLogger(__name__)

_WATCHED_TYPES = frozenset({ContactTokensRevoked.type_name(), ContactErased.type_name()})
_CONTACT = b"contact:"
_KID = b"kid:"
_NEW_KID = b"newkid:"


def revocation_channel(settings: Settings) -> str:
    return f"{settings.stream_prefix}revocations"


@dataclass(frozen=True, slots=True)
class ContactState:
    """What revocation needs to know about one contact."""

    exists: bool
    erased: bool
    not_before: float | None  # epoch seconds; tokens with iat before it are revoked

    def revokes(self, issued_at: int) -> bool:
        if not self.exists or self.erased:
            return True
        return self.not_before is not None and issued_at < self.not_before


_MISSING = ContactState(exists=False, erased=False, not_before=None)


class RevocationCache:
    def __init__(self, *, ttl: float = 60.0, max_entries: int = 100_000) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._entries: dict[str, tuple[float, ContactState]] = {}
        # Bumped by every invalidation: a DB read that raced with one is not cached (it may
        # have read the row just before the revocation committed).
        self._generation = 0
        # True only while the listener is connected; otherwise nothing is cached or trusted.
        self.live = False
        self.db_reads = 0
        self.resets = 0  # how often the cache was wiped because invalidations may be lost

    async def state(self, pool: asyncpg.Pool, org_id: str, contact_id: str) -> ContactState:
        now = time.monotonic()
        if self.live:
            cached = self._entries.get(contact_id)
            if cached is not None and cached[0] > now:
                return cached[1]
        generation = self._generation
        state = await self._read(pool, org_id, contact_id)
        if self.live and generation == self._generation:
            if len(self._entries) >= self._max:
                # Drop the oldest insertion (dicts keep insertion order): O(1), bounded.
                self._entries.pop(next(iter(self._entries)))
            self._entries[contact_id] = (now + self._ttl, state)
        return state

    async def _read(self, pool: asyncpg.Pool, org_id: str, contact_id: str) -> ContactState:
        self.db_reads += 1
        row = await pool.fetchrow(
            "SELECT tokens_not_before, erased_at FROM contacts WHERE id = $1 AND org_id = $2",
            contact_id,
            org_id,
        )
        if row is None:
            return _MISSING
        not_before: datetime | None = row["tokens_not_before"]
        return ContactState(
            exists=True,
            erased=row["erased_at"] is not None,
            not_before=None if not_before is None else not_before.timestamp(),
        )

    def invalidate(self, contact_id: str) -> None:
        self._generation += 1
        self._entries.pop(contact_id, None)

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()
        self.resets += 1

    def __len__(self) -> int:
        return len(self._entries)


async def announce_revocation(redis: aioredis.Redis, settings: Settings, contact_id: str) -> None:
    """Tell every process at once (best effort: the stream event is the reliable path)."""
    await _announce(redis, settings, _CONTACT + contact_id.encode())


async def announce_key_deleted(redis: aioredis.Redis, settings: Settings, kid: str) -> None:
    await _announce(redis, settings, _KID + kid.encode())


async def announce_key_added(redis: aioredis.Redis, settings: Settings, kid: str) -> None:
    """A new signing key exists: verifiers that looked for it in the last second and cached
    "unknown" look again at once instead of rejecting a brand-new org's first logins."""
    await _announce(redis, settings, _NEW_KID + kid.encode())


async def _announce(redis: aioredis.Redis, settings: Settings, message: bytes) -> None:
    try:
        await redis.publish(revocation_channel(settings), message)
    except TRANSIENT_REDIS_ERRORS as exc:
        # Listeners that missed this are disconnected, hence bypassing their caches; the
        # outbox event still reaches the connected ones through the stream.
        log.warning("revocation publish failed", extra={"error": repr(exc)})


class RevocationListener:
    """The per-process worker that keeps ``RevocationCache`` honest (see module docstring)."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        cache: RevocationCache,
        *,
        on_key_deleted: Callable[[str], None] | None = None,
        on_key_added: Callable[[str], None] | None = None,
        block_ms: int = 1000,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._cache = cache
        self._on_key_deleted = on_key_deleted
        self._on_key_added = on_key_added
        # XREAD BLOCK shares the client's socket timeout: keep it inside.
        self._block_ms = block_within_timeout(settings, block_ms)
        self._channel = revocation_channel(settings)
        self._stream = settings.events_stream

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.1
        while not stop.is_set():
            started = loop.time()
            try:
                await self._listen(stop)
            except TRANSIENT_REDIS_ERRORS as exc:
                log.warning("revocation listener disconnected", extra={"error": repr(exc)})
            finally:
                self._cache.live = False
                self._cache.clear()
            # A listener that ran a while was connected: the next outage starts from a short
            # pause (while disconnected, every verification goes to Postgres instead).
            if loop.time() - started > 5.0:
                backoff = 0.1
            if await sleep_or_stop(stop, backoff):
                return
            backoff = min(backoff * 2, 5.0)

    async def _listen(self, stop: asyncio.Event) -> None:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            # Start after the stream's current last entry; clear the cache only once both
            # feeds are in place, so no invalidation can fall between them.
            last = await self._stream_tail()
            self._cache.clear()
            self._cache.live = True
            feeds = [
                asyncio.create_task(self._pump_pubsub(pubsub)),
                asyncio.create_task(self._pump_stream(last)),
                asyncio.create_task(stop.wait()),
            ]
            try:
                done, _ = await asyncio.wait(feeds, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in feeds:
                    task.cancel()
                await asyncio.gather(*feeds, return_exceptions=True)
            for task in done:
                error = task.exception()
                if error is not None:
                    raise error
        finally:
            self._cache.live = False
            with contextlib.suppress(*TRANSIENT_REDIS_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed only in newer redis-py

    async def _stream_tail(self) -> bytes:
        entries = cast(list[tuple[bytes, Any]], await self._redis.xrevrange(self._stream, count=1))
        return entries[0][0] if entries else b"0-0"

    async def _pump_pubsub(self, pubsub: aioredis.client.PubSub) -> None:
        subscriptions = 0
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
            if message is None:
                continue
            if message["type"] == b"subscribe" or message["type"] == "subscribe":
                subscriptions += 1
                if subscriptions > 1:
                    # The client reconnected and re-subscribed by itself: anything published
                    # in between is lost, so nothing cached can be trusted.
                    self._cache.clear()
                continue
            data = message.get("data")
            if isinstance(data, bytes):
                self.apply(data)

    def apply(self, message: bytes) -> None:
        if message.startswith(_CONTACT):
            self._cache.invalidate(message[len(_CONTACT) :].decode(errors="replace"))
        elif message.startswith(_KID) and self._on_key_deleted is not None:
            self._on_key_deleted(message[len(_KID) :].decode(errors="replace"))
        elif message.startswith(_NEW_KID) and self._on_key_added is not None:
            self._on_key_added(message[len(_NEW_KID) :].decode(errors="replace"))

    async def _pump_stream(self, last: bytes) -> None:
        while True:
            reply = await self._redis.xread({self._stream: last}, count=500, block=self._block_ms)
            for _stream, entries in cast(list[tuple[bytes, Any]], reply or []):
                for entry_id, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], entries):
                    last = entry_id
                    self._apply_event(fields.get(EVENT_FIELD))

    def _apply_event(self, raw: bytes | None) -> None:
        if raw is None:
            return
        try:
            if header_decoder.decode(raw).type not in _WATCHED_TYPES:
                return
            event = event_decoder.decode(raw)
        except msgspec.DecodeError:
            return  # not ours to judge; the consumers dead-letter poison messages
        if isinstance(event, ContactTokensRevoked | ContactErased):
            self._cache.invalidate(event.data.contact_id)
