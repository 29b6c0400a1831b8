"""Rate limits shared by every worker and instance through Redis: per source, and on failed admin
keys per client address.

GCRA (the generic cell rate algorithm) in one Lua script: one key per subject holding the
theoretical arrival time, so a limit costs one round trip and a few bytes, and a subject may spend
its whole minute's allowance at once but no more. Only sources with `rate_limit_per_minute` pay
the round trip. If Redis cannot answer, a source's request goes on (the idempotency claim that
follows fails closed anyway); the admin throttle fails closed itself.
"""

from __future__ import annotations

import math

import redis.asyncio as redis

from gateway.errors import PayloadTooLarge, TooManyRequests, Unavailable
from gateway.state.idempotency import REDIS_FAILURES

# KEYS: the subject's key. ARGV: emission interval ms, burst (requests), 1 to only look (spend
# nothing), cost (requests this one counts for). Returns {allowed, wait ms}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval * tonumber(ARGV[4] or 1)
local allow_at = new_tat - interval * burst
if allow_at > now then return {0, allow_at - now} end
if ARGV[3] ~= '1' then redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now) + 1000) end
return {1, 0}
"""


class RateLimiter:
    def __init__(self, client: redis.Redis, prefix: str, limits: dict[str, int]) -> None:
        self._limits = {source: per_minute for source, per_minute in limits.items() if per_minute}
        self._prefix = prefix
        self._gcra = client.register_script(_GCRA)

    async def check(self, source: str, cost: int = 1) -> None:
        """Spend `cost` requests of the source's allowance (a batch spends one per entry), or raise
        429; a cost over the whole minute's allowance can never pass: 413."""
        per_minute = self._limits.get(source)
        if per_minute is None:
            return
        if cost > per_minute:
            raise PayloadTooLarge(f"this batch has more entries than this source may send in a minute ({per_minute})")
        interval_ms = 60_000 / per_minute
        try:
            allowed, wait_ms = await self._gcra(keys=[f"{self._prefix}:rate:{{{source}}}"],
                                                args=[interval_ms, per_minute, 0, cost])
        except REDIS_FAILURES:
            return
        if not allowed:
            raise TooManyRequests(
                f"this source is over its rate limit of {per_minute} requests per minute",
                retry_after=max(1, math.ceil(int(wait_ms) / 1000)),
            )


class FailureThrottle:
    """Failed admin keys per client address: after `burst` failures an address waits, one more try
    coming back every 60/`per_minute` seconds. Looked at before a key is verified, so an address
    that is waiting learns nothing from its guesses. Fails closed when Redis cannot answer."""

    def __init__(self, client: redis.Redis, prefix: str, *, per_minute: int = 10, burst: int = 10) -> None:
        self._prefix = prefix
        self._interval_ms = 60_000 / per_minute
        self._burst = burst
        self._gcra = client.register_script(_GCRA)

    async def _run(self, address: str, look: bool) -> tuple[int, int]:
        try:
            allowed, wait_ms = await self._gcra(keys=[f"{self._prefix}:rate:admin:{{{address}}}"],
                                                args=[self._interval_ms, self._burst, 1 if look else 0])
        except REDIS_FAILURES:
            raise Unavailable("the admin service cannot check sign-in attempts now", retry_after=5) from None
        return int(allowed), int(wait_ms)

    async def check(self, address: str) -> None:
        allowed, wait_ms = await self._run(address, look=True)
        if not allowed:
            raise TooManyRequests("too many failed admin keys from this address; wait before trying again",
                                  retry_after=max(1, math.ceil(wait_ms / 1000)))

    async def failed(self, address: str) -> None:
        await self._run(address, look=False)
