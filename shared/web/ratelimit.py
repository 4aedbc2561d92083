"""Rate limits shared by every replica: fixed one-minute windows counted in Redis.

One round trip (a small Lua script, so one command however many limits; on a Redis Cluster
one per slot, sent together) checks several limits at once (per IP, per widget token, per
visitor...). Fixed windows allow a burst of up to 2x at a window edge; that is accepted for
abuse protection, which is what these limits are for.

While Redis is unreachable (``RedisBreaker``) each process counts on its own, in the same
windows (``LocalWindows``): a client gets at most the limit per replica then, and legitimate
callers are not turned away for an outage of the counter.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass

from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from shared.errors import rate_limited
from shared.redis import TRANSIENT_REDIS_ERRORS, Redis, RedisBreaker

WINDOW_SECONDS = 60

# INCR every key, and give a key its expiry when this request created it (the window is in
# the key, so one expiry per key is enough). One command instead of two per limit: the client
# side of redis-py costs more per command than Redis does.
_COUNT_SCRIPT = """
local counts = {}
for i, key in ipairs(KEYS) do
    local n = redis.call('INCR', key)
    if n == 1 then redis.call('EXPIRE', key, ARGV[1]) end
    counts[i] = n
end
return counts
"""
_COUNT_SHA = hashlib.sha1(_COUNT_SCRIPT.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True, slots=True)
class Limit:
    """``per_minute`` requests allowed for ``key`` (e.g. "ip:203.0.113.9")."""

    key: str
    per_minute: int


class LocalWindows:
    """This process's own counts, keyed like the Redis ones (the window is in the key), for
    while Redis is unreachable. Bounded: old windows pile up only during an outage, and past
    ``max_keys`` they are all dropped at once (a fresh minute for everybody)."""

    def __init__(self, *, max_keys: int = 10_000) -> None:
        self._max = max_keys
        self._counts: dict[str, int] = {}

    def get(self, key: str) -> int:
        return self._counts.get(key, 0)

    def incr(self, keys: list[str]) -> list[int]:
        if len(self._counts) + len(keys) > self._max:
            self._counts.clear()
        counts = []
        for key in keys:
            self._counts[key] = n = self._counts.get(key, 0) + 1
            counts.append(n)
        return counts


class RateLimiter:
    def __init__(self, redis: Redis, prefix: str, breaker: RedisBreaker) -> None:
        self._redis = redis
        self._prefix = prefix
        self._breaker = breaker
        self._local = LocalWindows()

    async def check(self, *limits: Limit) -> None:
        """Count this request against every limit; raise 429 with Retry-After if any is over."""
        if not limits:
            return
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        keys = [f"{self._prefix}rl:{limit.key}:{window}" for limit in limits]
        try:
            counts = await self._breaker.call(lambda: _count(self._redis, keys))
        except TRANSIENT_REDIS_ERRORS:
            counts = self._local.incr(keys)
        for limit, count in zip(limits, counts, strict=True):
            if int(count) > limit.per_minute:
                raise rate_limited(_retry_after(window, now))


# The process's one limiter (its fallback counts must outlive a request); base_app opens it.
RATE_LIMITER: web.AppKey[RateLimiter] = web.AppKey("rate_limiter", RateLimiter)


class FailureThrottle:
    """Failures per key (a client IP) in the same fixed one-minute windows: ``check`` refuses
    with 429 once ``per_minute`` failures were ``record``-ed in this window; successes cost
    nothing. Counted in Redis, so every replica sees them; while Redis is unreachable each
    process counts on its own rather than failing the request (an attacker gets at most
    ``per_minute`` per replica then, and the legitimate caller is not turned away)."""

    def __init__(self, prefix: str, per_minute: int, *, max_local_keys: int = 10_000) -> None:
        self._prefix = prefix
        self._per_minute = per_minute
        self._local = LocalWindows(max_keys=max_local_keys)

    def _key(self, key: str, window: int) -> str:
        return f"{self._prefix}rl:fail:{key}:{window}"

    async def check(self, redis: Redis, breaker: RedisBreaker, key: str) -> None:
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        name = self._key(key, window)
        try:
            raw = await breaker.call(lambda: redis.get(name))
            count = int(raw) if raw is not None else 0
        except TRANSIENT_REDIS_ERRORS:
            count = self._local.get(name)
        if count >= self._per_minute:
            raise rate_limited(_retry_after(window, now))

    async def record(self, redis: Redis, breaker: RedisBreaker, key: str) -> None:
        name = self._key(key, int(time.time() // WINDOW_SECONDS))
        try:
            await breaker.call(lambda: _count(redis, [name]))
        except TRANSIENT_REDIS_ERRORS:
            self._local.incr([name])


async def _count(redis: Redis, keys: list[str]) -> list[int]:
    """INCR every key in one round trip; a key gets its expiry when this call created it.

    On a cluster a script's keys must share a slot, and one request's limits (per IP, per
    widget token, per visitor) do not: one script call per slot then, all sent at once, so
    still one round trip's wait. (A hash tag common to every limit would put the whole
    service's counting on one node.)"""
    if isinstance(redis, RedisCluster) and len(keys) > 1:
        by_slot: dict[int, list[int]] = {}
        for at, key in enumerate(keys):
            by_slot.setdefault(redis.keyslot(key), []).append(at)
        if len(by_slot) > 1:
            groups = list(by_slot.values())
            replies = await asyncio.gather(
                *(_count_in_one_slot(redis, [keys[at] for at in group]) for group in groups)
            )
            counts = [0] * len(keys)
            for group, reply in zip(groups, replies, strict=True):
                for at, count in zip(group, reply, strict=True):
                    counts[at] = count
            return counts
    return await _count_in_one_slot(redis, keys)


async def _count_in_one_slot(redis: Redis, keys: list[str]) -> list[int]:
    ttl = WINDOW_SECONDS * 2
    try:
        counts: list[int] = await redis.evalsha(_COUNT_SHA, len(keys), *keys, ttl)
    except NoScriptError:  # first use on this Redis (or after SCRIPT FLUSH / a restart)
        counts = await redis.eval(_COUNT_SCRIPT, len(keys), *keys, ttl)
    return counts


def _retry_after(window: int, now: float) -> int:
    return max(1, int((window + 1) * WINDOW_SECONDS - now) + 1)
