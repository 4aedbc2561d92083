"""Token revocation on the hot path: Postgres holds the truth, each process caches it.

Truth: ``contacts.tokens_not_before`` and ``contacts.erased_at``, written in the same
transaction as the ``contact.tokens_revoked`` / ``contact.erased`` outbox event.

Each process keeps contact id -> (not-before, erased) in memory, filled by one DB read on the
first sight of a contact and kept for ``ttl`` seconds as a safety net. A token that is fine
therefore costs no round trip at all. Every process also runs ``RevocationListener``:

- it subscribes to the pub/sub channel ``{prefix}revocations``, on which the revoking process
  PUBLISHes right after commit (the fast path: milliseconds, no wait for the relay; on a
  Redis Cluster a PUBLISH reaches every node, so the listener subscribes on any one), and
- it tails the events stream with plain XREAD (no consumer group: every replica must see
  every revocation) for ``contact.tokens_revoked`` and ``contact.erased`` (the reliable path:
  erasure by another service, or a PUBLISH lost in a crash).

Either one drops the contact's cache entry; the next verification re-reads Postgres. While
the listener is not connected, the cache may be missing invalidations, so it is cleared and
bypassed: every verification reads Postgres (and fails with 503 when that is down). Nothing
stale is ever trusted.

The same channel carries ``kid:<kid>`` when a signing key is deleted, so every process drops
that key at once, and the admin changes that end or alter other credentials (a
``CredentialChange``): ``apikey:<id>`` (revoked), ``widget:<id>`` (revoked, or its origins or
settings changed) and ``org:<id>`` (disabled, enabled, or its policy changed). Every cache of
such credentials in the process registers with the one ``RevocationFeed`` and drops the
affected entries at once; like the contact cache, each is cleared and bypassed while the
listener is not connected (shared.identity.credential_cache). These changes have no stream
event, so a PUBLISH lost on the publisher's side is covered only by the caches' short TTLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol, cast

import asyncpg
import msgspec
import redis.exceptions
from aiohttp import web
from redis.asyncio.client import PubSub

from shared.bus.events import (
    EVENT_FIELD,
    ContactErased,
    ContactTokensRevoked,
    event_decoder,
    header_decoder,
)
from shared.config import SETTINGS, Settings
from shared.lifecycle import add_worker, sleep_or_stop
from shared.redis import (
    TRANSIENT_REDIS_ERRORS,
    WORKER_REDIS,
    Redis,
    block_within_timeout,
    node_demoted,
    subscriber,
)

log = logging.getLogger(__name__)

_WATCHED_TYPES = frozenset({ContactTokensRevoked.type_name(), ContactErased.type_name()})
_CONTACT = b"contact:"
_KID = b"kid:"
_NEW_KID = b"newkid:"

ChangeKind = Literal["api_key", "widget_token", "org"]
_CHANGE_PREFIXES: dict[ChangeKind, bytes] = {
    "api_key": b"apikey:",
    "widget_token": b"widget:",
    "org": b"org:",
}


@dataclass(frozen=True, slots=True)
class CredentialChange:
    """An admin change that ends or alters a credential: every cache holding ``id`` (or, for
    an org, anything of that org) drops it."""

    kind: ChangeKind
    id: str

    def message(self) -> bytes:
        return _CHANGE_PREFIXES[self.kind] + self.id.encode()

    @staticmethod
    def parse(message: bytes) -> CredentialChange | None:
        for kind, prefix in _CHANGE_PREFIXES.items():
            if message.startswith(prefix):
                return CredentialChange(kind, message[len(prefix) :].decode(errors="replace"))
        return None


class Invalidated(Protocol):
    """A cache the revocation listener keeps honest."""

    def set_live(self, live: bool) -> None:
        """False: the listener lost its connection (drop everything, cache nothing); True:
        connected again (drop everything: some invalidations may have been missed)."""

    def changed(self, change: CredentialChange) -> None:
        """Drop what ``change`` makes stale."""


def revocation_channel(settings: Settings) -> str:
    return f"{settings.stream_prefix}revocations"


@dataclass(frozen=True, slots=True)
class ContactState:
    """What revocation needs to know about one contact."""

    exists: bool
    erased: bool
    not_before: float | None  # epoch seconds; tokens with iat before it are revoked
    # The contact's org is disabled: its contact tokens are refused (the verifier's call),
    # and accepted again once it is enabled. Not part of ``revokes``: what a disabled org
    # means for sessions already open is session resolution's to decide.
    org_disabled: bool = False

    def revokes(self, issued_at: int) -> bool:
        if not self.exists or self.erased:
            return True
        return self.not_before is not None and issued_at < self.not_before


_MISSING = ContactState(exists=False, erased=False, not_before=None)


class RevocationCache:
    def __init__(self, *, ttl: float = 60.0, max_entries: int = 100_000) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._entries: dict[str, tuple[float, str, ContactState]] = {}  # id -> (until, org, ...)
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
            if cached is not None and cached[0] > now and cached[1] == org_id:
                return cached[2]
        generation = self._generation
        state = await self._read(pool, org_id, contact_id)
        if self.live and generation == self._generation:
            if len(self._entries) >= self._max:
                # Drop the oldest insertion (dicts keep insertion order): O(1), bounded.
                self._entries.pop(next(iter(self._entries)))
            self._entries[contact_id] = (now + self._ttl, org_id, state)
        return state

    async def _read(self, pool: asyncpg.Pool, org_id: str, contact_id: str) -> ContactState:
        self.db_reads += 1
        row = await pool.fetchrow(
            """SELECT c.tokens_not_before, c.erased_at, o.disabled_at IS NOT NULL AS org_disabled
               FROM contacts c JOIN orgs o ON o.id = c.org_id
               WHERE c.id = $1 AND c.org_id = $2""",
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
            org_disabled=row["org_disabled"],
        )

    def invalidate(self, contact_id: str) -> None:
        self._generation += 1
        self._entries.pop(contact_id, None)

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()
        self.resets += 1

    def set_live(self, live: bool) -> None:
        self.live = live
        self.clear()

    def changed(self, change: CredentialChange) -> None:
        if change.kind == "org":
            self._generation += 1
            for contact_id in [c for c, (_, org, _) in self._entries.items() if org == change.id]:
                del self._entries[contact_id]

    def __len__(self) -> int:
        return len(self._entries)


async def announce_revocation(redis: Redis, settings: Settings, contact_id: str) -> None:
    """Tell every process at once (best effort: the stream event is the reliable path)."""
    await _announce(redis, settings, _CONTACT + contact_id.encode())


async def announce_key_deleted(redis: Redis, settings: Settings, kid: str) -> None:
    await _announce(redis, settings, _KID + kid.encode())


async def announce_key_added(redis: Redis, settings: Settings, kid: str) -> None:
    """A new signing key exists: verifiers that looked for it in the last second and cached
    "unknown" look again at once instead of rejecting a brand-new org's first logins."""
    await _announce(redis, settings, _NEW_KID + kid.encode())


async def announce_change(redis: Redis, settings: Settings, change: CredentialChange) -> None:
    """Right after the change committed: every process drops what it makes stale."""
    await _announce(redis, settings, change.message())


async def _announce(redis: Redis, settings: Settings, message: bytes) -> None:
    try:
        await redis.publish(revocation_channel(settings), message)
    except TRANSIENT_REDIS_ERRORS as exc:
        # Listeners that missed this are disconnected, hence bypassing their caches; the
        # outbox event still reaches the connected ones through the stream.
        log.warning("revocation publish failed", extra={"error": repr(exc)})


class RevocationFeed:
    """Everything in this process that the one revocation listener keeps honest: contact
    revocation caches, credential caches (API keys, widget tokens, org policies) and signing
    key hooks. One per app: ``install_revocation_feed``."""

    def __init__(self) -> None:
        self._contacts: list[RevocationCache] = []
        self._caches: list[Invalidated] = []
        self._key_deleted: list[Callable[[str], None]] = []
        self._key_added: list[Callable[[str], None]] = []
        self.live = False

    def watch(self, cache: Invalidated) -> None:
        self._caches.append(cache)

    def watch_contacts(self, cache: RevocationCache) -> None:
        self._contacts.append(cache)
        self._caches.append(cache)

    def on_key_deleted(self, hook: Callable[[str], None]) -> None:
        self._key_deleted.append(hook)

    def on_key_added(self, hook: Callable[[str], None]) -> None:
        self._key_added.append(hook)

    def set_live(self, live: bool) -> None:
        if not live and not self.live:
            return  # already cleared and bypassing
        self.live = live
        for cache in self._caches:
            cache.set_live(live)

    def changed(self, change: CredentialChange) -> None:
        """Also called by the process that made the change, right after its commit, so its
        own next request never waits for the broadcast."""
        for cache in self._caches:
            cache.changed(change)

    def contact_revoked(self, contact_id: str) -> None:
        for cache in self._contacts:
            cache.invalidate(contact_id)

    def apply(self, message: bytes) -> None:
        """One message from the revocations channel."""
        if message.startswith(_CONTACT):
            self.contact_revoked(message[len(_CONTACT) :].decode(errors="replace"))
        elif message.startswith(_KID):
            for hook in self._key_deleted:
                hook(message[len(_KID) :].decode(errors="replace"))
        elif message.startswith(_NEW_KID):
            for hook in self._key_added:
                hook(message[len(_NEW_KID) :].decode(errors="replace"))
        elif (change := CredentialChange.parse(message)) is not None:
            self.changed(change)


REVOCATION_FEED: web.AppKey[RevocationFeed] = web.AppKey("revocation_feed", RevocationFeed)


def install_revocation_feed(app: web.Application) -> RevocationFeed:
    """Idempotent: the app's feed, and the one listener worker that drives it. Caches
    register with ``watch`` before start-up."""
    if REVOCATION_FEED in app:
        return app[REVOCATION_FEED]
    feed = app[REVOCATION_FEED] = RevocationFeed()
    settings = app[SETTINGS]
    add_worker(
        app,
        "token-revocations",
        lambda app: RevocationListener(settings, app[WORKER_REDIS], feed).run,
    )
    return feed


class RevocationListener:
    """The per-process worker that keeps a ``RevocationFeed`` honest (see module docstring)."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        feed: RevocationFeed,
        *,
        block_ms: int = 1000,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._feed = feed
        # XREAD BLOCK shares the client's socket timeout: keep it inside.
        self._block_ms = block_within_timeout(settings, block_ms)
        self._channel = revocation_channel(settings)
        self._streams = settings.event_streams

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.1
        while not stop.is_set():
            started = loop.time()
            try:
                await self._listen(stop)
            except TRANSIENT_REDIS_ERRORS as exc:
                log.warning("revocation listener disconnected", extra={"error": repr(exc)})
            except redis.exceptions.ResponseError as exc:
                if not node_demoted(exc):
                    raise
                log.warning("revocation listener's node failed over", extra={"error": repr(exc)})
            finally:
                self._feed.set_live(False)
            # A listener that ran a while was connected: the next outage starts from a short
            # pause (while disconnected, every verification goes to Postgres instead).
            if loop.time() - started > 5.0:
                backoff = 0.1
            if await sleep_or_stop(stop, backoff):
                return
            backoff = min(backoff * 2, 5.0)

    async def _listen(self, stop: asyncio.Event) -> None:
        pubsub = await subscriber(self._redis)  # on a cluster: a node picked at random
        try:
            await pubsub.subscribe(self._channel)
            # Start after the stream's current last entry; go live (clearing every cache) only
            # once both feeds are in place, so no invalidation can fall between them.
            tails = [await self._stream_tail(stream) for stream in self._streams]
            self._feed.set_live(True)
            feeds = [
                asyncio.create_task(self._pump_pubsub(pubsub)),
                # One reader per partition: an XREAD of several would be cross-slot on a
                # cluster.
                *(
                    asyncio.create_task(self._pump_stream(stream, last))
                    for stream, last in zip(self._streams, tails, strict=True)
                ),
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
            self._feed.set_live(False)
            with contextlib.suppress(*TRANSIENT_REDIS_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed only in newer redis-py

    async def _stream_tail(self, stream: str) -> bytes:
        entries = cast(list[tuple[bytes, Any]], await self._redis.xrevrange(stream, count=1))
        return entries[0][0] if entries else b"0-0"

    async def _pump_pubsub(self, pubsub: PubSub) -> None:
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
                    self._feed.set_live(True)
                continue
            data = message.get("data")
            if isinstance(data, bytes):
                self._feed.apply(data)

    async def _pump_stream(self, stream: str, last: bytes) -> None:
        while True:
            reply = await self._redis.xread({stream: last}, count=500, block=self._block_ms)
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
            self._feed.contact_revoked(event.data.contact_id)
