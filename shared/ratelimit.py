"""Rate limits shared by every replica: fixed one-minute windows counted in Redis.

One pipelined round trip checks several limits at once (per IP, per widget token, per
visitor...). Fixed windows allow a burst of up to 2x at a window edge; that is accepted for
abuse protection, which is what these limits are for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from shared.errors import rate_limited

WINDOW_SECONDS = 60


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
        pipe = self._redis.pipeline(transaction=False)
        for limit in limits:
            key = f"{self._prefix}rl:{limit.key}:{window}"
            pipe.incr(key)
            pipe.expire(key, WINDOW_SECONDS * 2)
        counts = await pipe.execute()
        for limit, count in zip(limits, counts[::2], strict=True):
            if int(count) > limit.per_minute:
                retry_after = max(1, int((window + 1) * WINDOW_SECONDS - now) + 1)
                raise rate_limited(retry_after)
