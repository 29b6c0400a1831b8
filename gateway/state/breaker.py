"""A circuit breaker toward a called system (Salesforce, an EHR), shared by every worker and every
gateway on one Redis: one per system, by `name`.

The hot path costs no Redis round trip: while closed, `before_call` and `record_*` only touch local
counters. A background `run()` loop pushes those counters to Redis every `sync_interval_seconds` in
one Lua script, which also decides whether to open and returns the shared state. So a breaker opens
at most one sync interval after the failures that tripped it.

Shared state (all keys in one cluster slot):
- `state`: present (with PX) while open; its expiry ends the open period.
- `tripped`: set when opening, deleted when a probe succeeds. `tripped` without `state` = half-open.
- `win`: a hash of fixed buckets `<n>:s` / `<n>:f` (n = Redis TIME // window); the failure ratio is
  estimated over the current bucket plus the previous one weighted by what is left of it.
- `probe`: SET NX PX by the single caller let through while half-open.

Bucket and open-period times come from Redis (TIME, PX), never from a worker's clock; a worker only
uses its monotonic clock to turn open into half-open between two syncs.
"""

from __future__ import annotations

import asyncio
import math
import time
from contextvars import ContextVar
from typing import Literal

import msgspec
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from gateway.errors import CircuitOpen
from gateway.logs import log

State = Literal["closed", "open", "half_open"]

_REDIS_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)

# a tripped marker outlives the open period so a quiet breaker still probes first; after a day
# without a single call it lapses and the breaker starts closed
_TRIPPED_EXTRA_MS = 24 * 3600 * 1000

# KEYS: state, tripped, win. ARGV: successes, failures, window_ms, min_calls, failure_ratio,
# open_ms, tripped_ms. Returns {state, ms until half-open, window calls, window failures}.
_SYNC = """
local open_left = redis.call('PTTL', KEYS[1])
if open_left > 0 then return {'open', open_left, 0, 0} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'half_open', 0, 0, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[3])
local n = math.floor(now / window)
local s, f = tonumber(ARGV[1]), tonumber(ARGV[2])
if s > 0 then redis.call('HINCRBY', KEYS[3], n .. ':s', s) end
if f > 0 then redis.call('HINCRBY', KEYS[3], n .. ':f', f) end
local v = redis.call('HMGET', KEYS[3], n .. ':s', n .. ':f', (n - 1) .. ':s', (n - 1) .. ':f')
local cs, cf = tonumber(v[1]) or 0, tonumber(v[2]) or 0
local ps, pf = tonumber(v[3]) or 0, tonumber(v[4]) or 0
local w = 1 - (now % window) / window
local calls = cs + cf + (ps + pf) * w
local fails = cf + pf * w
if calls > 0 and calls >= tonumber(ARGV[4]) and fails >= tonumber(ARGV[5]) * calls then
  redis.call('SET', KEYS[1], 'open', 'PX', ARGV[6])
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[7])
  redis.call('DEL', KEYS[3])
  return {'open', tonumber(ARGV[6]), math.floor(calls + 0.5), math.floor(fails + 0.5)}
end
if s + f > 0 then
  for _, field in ipairs(redis.call('HKEYS', KEYS[3])) do
    local b = tonumber(string.match(field, '^(%d+)'))
    if not b or b < n - 1 then redis.call('HDEL', KEYS[3], field) end
  end
  redis.call('PEXPIRE', KEYS[3], 2 * window + 1000)
end
return {'closed', 0, math.floor(calls + 0.5), math.floor(fails + 0.5)}
"""

# KEYS: state, tripped, probe. ARGV: probe_ms. Re-checks the shared state, since the caller's view
# may be a sync old. Returns {'open', ms} | {'closed', 0} | {'probe', 0} | {'busy', probe ms left}.
_PROBE = """
local open_left = redis.call('PTTL', KEYS[1])
if open_left > 0 then return {'open', open_left} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {'closed', 0} end
if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[1]) then return {'probe', 0} end
return {'busy', redis.call('PTTL', KEYS[3])}
"""

# KEYS: state, tripped, win, probe. ARGV: 'ok' | 'fail', open_ms, tripped_ms. A late probe result
# never overrides a newer open period, and a failure after another probe closed it is a plain failure.
_PROBE_DONE = """
local open_left = redis.call('PTTL', KEYS[1])
if open_left > 0 then return {'open', open_left} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {'closed', 0} end
redis.call('DEL', KEYS[4])
if ARGV[1] == 'ok' then
  redis.call('DEL', KEYS[2], KEYS[3])
  return {'closed', 0}
end
redis.call('SET', KEYS[1], 'open', 'PX', ARGV[2])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
return {'open', tonumber(ARGV[2])}
"""


class BreakerSnapshot(msgspec.Struct, frozen=True):
    state: State
    unsynced_successes: int
    unsynced_failures: int
    window_calls: int  # shared estimate from the last sync
    window_failures: int
    redis_ok: bool  # did the last sync reach Redis


class CircuitBreaker:
    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        prefix: str,
        *,
        failure_ratio: float = 0.5,
        min_calls: int = 20,
        window_seconds: float = 10.0,
        open_seconds: float = 15.0,
        sync_interval_seconds: float = 0.5,
        probe_timeout_seconds: float,
        name: str = "",
        called: str = "Salesforce",
    ) -> None:
        """`name`: the system's part of the keys ("" is Salesforce's, as keyed before there were
        others); `called`: its name in a refusal's message and the log."""
        if not 0 < failure_ratio <= 1:
            raise ValueError("failure_ratio must be in (0, 1]")
        if min_calls < 1:
            raise ValueError("min_calls must be at least 1")
        for setting, value in (("window_seconds", window_seconds), ("open_seconds", open_seconds),
                               ("sync_interval_seconds", sync_interval_seconds),
                               ("probe_timeout_seconds", probe_timeout_seconds)):
            if value <= 0:
                raise ValueError(f"{setting} must be positive")
        tag = f"{prefix}:cb:{name}" if name else f"{prefix}:cb"
        base = f"{prefix}:cb:{{{tag}}}" + (f":{name}" if name else "")  # one hash tag: one cluster slot
        self.called = called
        self.keys = {name: f"{base}:{name}" for name in ("state", "tripped", "win", "probe")}
        self._failure_ratio = failure_ratio
        self._min_calls = min_calls
        self._window_ms = max(1, int(window_seconds * 1000))
        self._open_ms = max(1, int(open_seconds * 1000))
        self._tripped_ms = self._open_ms + _TRIPPED_EXTRA_MS
        self._probe_ms = max(1, int(probe_timeout_seconds * 1000))
        self._probe_timeout = probe_timeout_seconds
        self._sync_interval = sync_interval_seconds
        self._sync = client.register_script(_SYNC)
        self._probe = client.register_script(_PROBE)
        self._probe_done = client.register_script(_PROBE_DONE)

        self._state: State = "closed"
        self._open_until = 0.0  # monotonic; open turns half-open locally after it
        self._hold_until = 0.0  # monotonic; half-open callers are refused locally before it
        self._successes = 0
        self._failures = 0
        self._window = (0, 0)
        self._redis_ok = True
        # which call is the probe: per task context, so a concurrent ordinary call finishing in this
        # worker is never taken for the probe's result
        self._in_probe: ContextVar[bool] = ContextVar(f"breaker_probe_{id(self)}", default=False)

    @property
    def state(self) -> State:
        if self._state == "open" and time.monotonic() >= self._open_until:
            return "half_open"
        return self._state

    def snapshot(self) -> BreakerSnapshot:
        return BreakerSnapshot(self.state, self._successes, self._failures, *self._window, self._redis_ok)

    async def before_call(self, *, counted: bool = True) -> None:
        """Returns at once while closed; raises CircuitOpen (a 503) when the call must not go to Salesforce.
        A call that is not `counted` (a look-up) is refused while open but never takes the probe:
        it could not tell whether Salesforce books again."""
        state = self.state
        if state == "closed" or (state == "half_open" and not counted):
            return
        now = time.monotonic()
        if state == "open":
            raise _refused(self.called, self._open_until - now)
        if now < self._hold_until:  # a probe is in flight (here or elsewhere): no round trip
            raise _refused(self.called, min(2.0, self._hold_until - now))
        self._hold_until = now + self._probe_timeout  # concurrent callers here wait for this probe
        try:
            reply = await self._probe(keys=[self.keys["state"], self.keys["tripped"], self.keys["probe"]],
                                      args=[self._probe_ms])
        except _REDIS_ERRORS:
            self._hold_until = time.monotonic() + 1
            raise _refused(self.called, 1) from None
        except BaseException:
            self._hold_until = 0.0
            raise
        kind, ms = _text(reply[0]), int(reply[1])
        if kind == "probe":
            self._in_probe.set(True)
            return
        self._hold_until = 0.0
        if kind == "busy":
            self._hold_until = time.monotonic() + min(max(ms, 0) / 1000, self._sync_interval)
            raise _refused(self.called, min(2.0, ms / 1000))
        self._apply(kind, ms)
        if kind == "open":
            raise _refused(self.called, ms / 1000)

    async def record_success(self) -> None:
        if self._in_probe.get():
            await self._finish_probe(ok=True)
        else:
            self._successes += 1

    async def record_failure(self) -> None:
        if self._in_probe.get():
            await self._finish_probe(ok=False)
        else:
            self._failures += 1

    async def _finish_probe(self, *, ok: bool) -> None:
        self._in_probe.set(False)
        self._hold_until = 0.0
        keys = [self.keys["state"], self.keys["tripped"], self.keys["win"], self.keys["probe"]]
        try:
            reply = await self._probe_done(keys=keys, args=["ok" if ok else "fail", self._open_ms, self._tripped_ms])
        except _REDIS_ERRORS:
            # act on what this worker saw; the next sync brings back the shared view
            self._apply("closed" if ok else "open", self._open_ms)
            return
        kind, ms = _text(reply[0]), int(reply[1])
        self._apply(kind, ms)
        if kind == "closed" and not ok:
            self._failures += 1

    async def sync(self) -> State:
        """One round trip: push local counts, let Redis decide, adopt its state. Never raises."""
        successes, failures = self._successes, self._failures
        try:
            reply = await self._sync(
                keys=[self.keys["state"], self.keys["tripped"], self.keys["win"]],
                args=[successes, failures, self._window_ms, self._min_calls, repr(self._failure_ratio),
                      self._open_ms, self._tripped_ms],
            )
        except _REDIS_ERRORS:
            self._redis_ok = False  # counts stay for the next sync, the view stays as it was
            return self.state
        # calls may have finished during the await: subtract, don't reset
        self._successes -= successes
        self._failures -= failures
        self._redis_ok = True
        kind, ms = _text(reply[0]), int(reply[1])
        self._window = (int(reply[2]), int(reply[3]))
        self._apply(kind, ms)
        return self.state

    async def run(self) -> None:
        """Sync forever; cancel the task to stop."""
        while True:
            try:
                await self.sync()
            except Exception:  # a bug here must not stop the breaker from following the others
                log.exception("circuit_breaker_sync_failed")
            await asyncio.sleep(self._sync_interval)

    def _apply(self, kind: str, ms: int) -> None:
        before = self.state
        if kind == "open":
            self._state = "open"
            self._open_until = time.monotonic() + ms / 1000
            self._hold_until = 0.0  # the next half-open period starts with a fresh probe election
        elif kind == "closed":
            self._state = "closed"
            self._hold_until = 0.0
        elif kind == "half_open":
            self._state = "half_open"
        else:
            raise ValueError(f"unexpected breaker state {kind!r}")
        if self.state != before:
            log.info("circuit_breaker", state=self.state, previous=before,
                     **({"called": self.called} if self.called != "Salesforce" else {}))


def _text(value: bytes | str) -> str:
    # the client may or may not be built with decode_responses
    return value.decode() if isinstance(value, bytes) else value


def _refused(called: str, seconds: float) -> CircuitOpen:
    return CircuitOpen(
        f"{called} calls are paused after repeated failures (circuit open)",
        retry_after=max(1, math.ceil(seconds)),
    )
