"""The Redis side of session resolution: the fast path for returning visitors and session
tokens. Postgres stays the truth; Redis only saves reads and, above all, writes.

Keys (``{prefix}`` is ``Settings.stream_prefix``):

- ``{prefix}sr:v:<sha256(visitor token) hex>`` -> the visitor's state: id, org, remembered
  browser values, last seen, and its current session (id, fingerprint, expiry, wrapped token).
- ``{prefix}sr:s:<sha256(session token) hex>`` -> the session record behind a session token.

Invalidation must never lose a race with a reader that is about to (re)fill the cache from
an older Postgres read: logout and device revocation *bury* keys (write a tombstone) before
their transaction commits, and every fill is a conditional write that leaves a tombstone in
place (one Lua script). A buried visitor token therefore reads as "unknown" and gets a new
visitor; a buried session token reads as ended.

While Redis is unreachable (``RedisBreaker``: a short per-call timeout, then no calls for a
few seconds) reads are misses and fills are skipped, so requests answer from Postgres without
waiting on Redis. Burying is the exception: a tombstone that could not be written would let
a cached session outlive its logout once Redis is back, so ``bury`` fails (and with it the
logout's transaction, as 503 redis_unavailable).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, Literal

import msgspec

from shared.redis import TRANSIENT_REDIS_ERRORS, Redis, RedisBreaker

log = logging.getLogger(__name__)

TOMBSTONE = b"\x00ended"
Buried = Literal["buried"]
BURIED: Buried = "buried"

# Fill unless buried. ARGV: value, ttl in ms, tombstone.
_FILL = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class CurrentSession(msgspec.Struct, frozen=True, array_like=True):
    id: str
    fingerprint: str
    expires_at: float  # epoch seconds
    wrapped: bytes  # the session token, sealed to the visitor token (session_tokens.py)
    contact_token_iat: int | None
    # Appended with defaults: entries cached before these fields existed still decode.
    verified_kid: str | None = None
    minted_by: str | None = None


class VisitorState(msgspec.Struct, frozen=True, array_like=True):
    visitor_id: str
    org_id: str
    attributes: dict[str, str | int | float | bool | None]
    last_seen: float  # epoch seconds
    session: CurrentSession | None


class SessionRecord(msgspec.Struct, frozen=True, array_like=True):
    """What a session token unlocks, without a Postgres read."""

    id: str
    org_id: str
    visitor_id: str
    widget_token_id: str
    level: str
    contact_id: str | None
    external_id: str
    expires_at: float  # epoch seconds
    contact_token_iat: int | None
    # The credentials a verified session stands on (session_access.ended_credential).
    verified_kid: str | None = None
    minted_by: str | None = None


_visitor_decoder = msgspec.msgpack.Decoder(VisitorState)
_session_decoder = msgspec.msgpack.Decoder(SessionRecord)
_encoder = msgspec.msgpack.Encoder()


class SessionCache:
    def __init__(self, redis: Redis, prefix: str, breaker: RedisBreaker) -> None:
        self._redis = redis
        self._breaker = breaker
        self._prefix = f"{prefix}sr:"
        self._fill_script = redis.register_script(_FILL)

    async def _get(self, key: str) -> Any:
        """The raw value, or None when Redis cannot say (a miss: Postgres answers)."""
        try:
            return await self._breaker.call(lambda: self._redis.get(key))
        except TRANSIENT_REDIS_ERRORS:
            return None

    async def _fill(self, key: str, value: bytes, ttl_seconds: float) -> None:
        """Best effort: Postgres has it already; a skipped fill only costs a later read."""
        args: list[bytes | int] = [value, max(1, int(ttl_seconds * 1000)), TOMBSTONE]
        with contextlib.suppress(*TRANSIENT_REDIS_ERRORS):
            await self._breaker.call(lambda: self._fill_script(keys=[key], args=args))

    def _visitor_key(self, visitor_token_hash: bytes) -> str:
        return f"{self._prefix}v:{visitor_token_hash.hex()}"

    def _session_key(self, session_token_hash: bytes) -> str:
        return f"{self._prefix}s:{session_token_hash.hex()}"

    async def visitor(self, visitor_token_hash: bytes) -> VisitorState | Buried | None:
        raw = await self._get(self._visitor_key(visitor_token_hash))
        if not isinstance(raw, bytes):
            return None
        if raw == TOMBSTONE:
            return BURIED
        try:
            return _visitor_decoder.decode(raw)
        except msgspec.DecodeError:
            return None  # an older layout: read Postgres and refill

    async def put_visitor(
        self, visitor_token_hash: bytes, state: VisitorState, ttl_seconds: float
    ) -> None:
        await self._fill(self._visitor_key(visitor_token_hash), _encoder.encode(state), ttl_seconds)

    async def session(self, session_token_hash: bytes) -> SessionRecord | Buried | None:
        raw = await self._get(self._session_key(session_token_hash))
        if not isinstance(raw, bytes):
            return None
        if raw == TOMBSTONE:
            return BURIED
        try:
            return _session_decoder.decode(raw)
        except msgspec.DecodeError:
            return None

    async def put_session(
        self, session_token_hash: bytes, record: SessionRecord, ttl_seconds: float
    ) -> None:
        await self._fill(
            self._session_key(session_token_hash), _encoder.encode(record), ttl_seconds
        )

    async def bury(
        self,
        *,
        visitor_token_hashes: list[bytes],
        session_token_hashes: list[tuple[bytes, float]],
        visitor_ttl_seconds: float,
    ) -> None:
        """Tombstone a visitor token and session tokens (each kept while it could be live).
        Raises when Redis is unreachable: the caller's change must not commit without it."""
        pipe = self._redis.pipeline(transaction=False)
        for token_hash in visitor_token_hashes:
            pipe.set(
                self._visitor_key(token_hash),
                TOMBSTONE,
                px=max(1, int(visitor_ttl_seconds * 1000)),
            )
        for token_hash, ttl in session_token_hashes:
            pipe.set(self._session_key(token_hash), TOMBSTONE, px=max(1, int(ttl * 1000)))
        await self._breaker.call(pipe.execute, short=False)


async def fill_quietly(fill: Awaitable[None]) -> None:
    """Await a cache fill, best effort: Postgres has everything already, and a failed fill only
    means the next request reads Postgres."""
    try:
        await fill
    except TRANSIENT_REDIS_ERRORS as exc:
        log.warning("session cache fill failed", extra={"error": repr(exc)})
