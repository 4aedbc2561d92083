"""Rate limits shared by every replica: fixed one-minute windows counted in Redis.

One round trip (a small Lua script, so one command however many limits) checks several limits at once (per IP, per widget token, per
visitor...). Fixed windows allow a burst of up to 2x at a window edge; that is accepted for
abuse protection, which is what these limits are for.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from shared.errors import rate_limited

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


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

    async def check(self, *limits: Limit) -> None:
        """Count this request against every limit; raise 429 with Retry-After if any is over."""
        if not limits:
            return
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        keys = [f"{self._prefix}rl:{limit.key}:{window}" for limit in limits]
        ttl = WINDOW_SECONDS * 2
        try:
            counts = await self._redis.evalsha(_COUNT_SHA, len(keys), *keys, ttl)
        except NoScriptError:  # first use on this Redis (or after SCRIPT FLUSH / a restart)
            counts = await self._redis.eval(_COUNT_SCRIPT, len(keys), *keys, ttl)
        for limit, count in zip(limits, counts, strict=True):
            if int(count) > limit.per_minute:
                retry_after = max(1, int((window + 1) * WINDOW_SECONDS - now) + 1)
                raise rate_limited(retry_after)
