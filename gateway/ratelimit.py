"""Per-source rate limits, shared by every worker and instance through Redis.

GCRA (the generic cell rate algorithm) in one Lua script: one key per source holding the
theoretical arrival time, so a limit costs one round trip and a few bytes, and a source may spend
its whole minute's allowance at once but no more. Only sources with `rate_limit_per_minute` pay
the round trip. If Redis cannot answer, the request goes on: the idempotency claim that follows
fails closed anyway.
"""

from __future__ import annotations

import math

import redis.asyncio as redis

from gateway.errors import TooManyRequests
from gateway.idempotency import REDIS_FAILURES

# KEYS: the source's key. ARGV: emission interval ms, burst (requests). Returns {allowed, wait ms}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if allow_at > now then return {0, allow_at - now} end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now) + 1000)
return {1, 0}
"""


class RateLimiter:
    def __init__(self, client: redis.Redis, prefix: str, limits: dict[str, int]) -> None:
        self._limits = {source: per_minute for source, per_minute in limits.items() if per_minute}
        self._prefix = prefix
        self._gcra = client.register_script(_GCRA)

    async def check(self, source: str) -> None:
        per_minute = self._limits.get(source)
        if per_minute is None:
            return
        interval_ms = 60_000 / per_minute
        try:
            allowed, wait_ms = await self._gcra(keys=[f"{self._prefix}:rate:{{{source}}}"], args=[interval_ms, per_minute])
        except REDIS_FAILURES:
            return
        if not allowed:
            raise TooManyRequests(
                f"this source is over its rate limit of {per_minute} requests per minute",
                retry_after=max(1, math.ceil(int(wait_ms) / 1000)),
            )
