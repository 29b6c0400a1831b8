"""The org's records found for the EHRs' ids, cached in Redis for every worker and instance.

One key per EHR id, its name a digest of (kind, SourceSystem, value), since a patient's id is patient
data; its value what the org holds for it (`gateway.identity.Found`, msgpack), or nothing found.
Each kind keeps for its own time (`[identity]`: practitioners, facilities and devices for hours,
patients for minutes, a miss for at most a minute). All keys share one hash tag, so a booking's ids
are read in one MGET on a Cluster too.

One look-up in flight per id: a worker about to ask the org for ids takes a short lock on each
(SET NX, as long as it waits for a look-up at most); the ids another worker has locked it waits for,
reading the cache until they appear (`wait`). Within a worker, the same id asked twice at once is
one look-up (`Flights`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as redis

from gateway.state.redis_mux import MultiplexedRedis, pack

# KEYS: the keys; ARGV: value, ttl ms for each, in order
_PUT = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[2 * i - 1], 'PX', ARGV[2 * i])
end
return #KEYS
"""
# KEYS: the locks; ARGV: token, ttl ms. Returns 1 for each lock taken, 0 for one another holds
_LOCK = """
local taken = {}
for i, key in ipairs(KEYS) do
  taken[i] = redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
end
return taken
"""
# KEYS: the locks; ARGV: token. Only this holder's locks are given back
_UNLOCK = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 1
"""
_POLL_SECONDS = 0.025

T = TypeVar("T")


def digest(kind: str, system: str, value: str) -> str:
    return hashlib.sha256(f"{kind}\0{system}\0{value}".encode()).hexdigest()[:32]


class IdentityCache:
    """`scripts`: the pipelined link on a single Redis, else redis-py's client (a Cluster's);
    `client`: redis-py's, for the operators' forget (a scan)."""

    def __init__(self, scripts: MultiplexedRedis | Any, client: redis.Redis, prefix: str) -> None:
        self._scripts, self._client, self._prefix = scripts, client, prefix
        self._tag = f"{{{prefix}:ident}}"
        self._put = scripts.register_script(_PUT)
        self._lock = scripts.register_script(_LOCK)
        self._unlock = scripts.register_script(_UNLOCK)

    def key(self, name: str) -> str:
        return f"{self._prefix}:ident:{self._tag}:{name}"

    def lock_key(self, name: str) -> str:
        return f"{self._prefix}:ident:{self._tag}:lock:{name}"

    async def get(self, names: Sequence[str]) -> list[bytes | None]:
        if not names:
            return []
        keys = [self.key(n) for n in names]
        if isinstance(self._scripts, MultiplexedRedis):
            return list(await self._scripts.execute("MGET", *keys))
        return list(await self._scripts.execute_command("MGET", *keys))

    def get_soon(self, names: tuple[str, ...]) -> Awaitable[list[bytes | None]]:
        """`get`, its command sent in this tick's write (with the call the caller makes next, such as
        the idempotency claim: one round trip for both, and no task between them) where the link
        allows. The caller awaits it, or lets `settle` look at it."""
        if names and isinstance(self._scripts, MultiplexedRedis):
            sent = self._scripts.send(self._mget(names))
            if sent is not None:
                return sent
        return asyncio.ensure_future(self.get(names))

    @functools.lru_cache(maxsize=4_096)  # noqa: B019 (one cache per process: its entries are a few bytes)
    def _mget(self, names: tuple[str, ...]) -> bytes:
        """The MGET of these names, packed once: the same people are asked for again and again."""
        return pack([b"MGET", *(self.key(n) for n in names)])

    async def put(self, entries: Sequence[tuple[str, bytes, int]]) -> None:
        """(name, value, ttl ms) for each."""
        if entries:
            await self._put(keys=[self.key(n) for n, _, _ in entries],
                            args=[x for _, value, ttl in entries for x in (value, max(1, ttl))])

    async def lock(self, names: Sequence[str], token: str, ttl_ms: int) -> list[bool]:
        if not names:
            return []
        taken = await self._lock(keys=[self.lock_key(n) for n in names], args=[token, max(1, ttl_ms)])
        return [bool(t) for t in taken]

    async def unlock(self, names: Sequence[str], token: str) -> None:
        if names:
            await self._unlock(keys=[self.lock_key(n) for n in names], args=[token])

    async def wait(self, names: Sequence[str], seconds: float) -> list[bytes | None]:
        """The values of ids another worker is looking up, read until they are all there or `seconds`
        have passed (then what is there; None where it still is not)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            values = await self.get(names)
            if all(v is not None for v in values) or loop.time() >= deadline:
                return values
            await asyncio.sleep(_POLL_SECONDS)

    async def forget(self) -> int:
        """Every cached id and lock dropped (an operator's action, after records were fixed in the org)."""
        dropped = 0
        batch: list[Any] = []
        async for key in self._client.scan_iter(match=f"{self._prefix}:ident:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                dropped += await self._client.unlink(*batch)
                batch = []
        if batch:
            dropped += await self._client.unlink(*batch)
        return dropped


def settle(asked: Awaitable[Any]) -> None:
    """An answer asked for (`get_soon`) that will not be awaited: its failure, if any, looked at now or
    when it comes, so that it is not logged as never retrieved."""
    if isinstance(asked, asyncio.Future):
        if not asked.done():
            asked.add_done_callback(settle)
        elif not asked.cancelled():
            asked.exception()


class Flights:
    """Within one worker, one call per key at a time: a second caller for a key in flight awaits the first's result."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Future[Any]] = {}

    def running(self, key: str) -> asyncio.Future[Any] | None:
        return self._running.get(key)

    async def run(self, keys: Sequence[str], work: Callable[[], Awaitable[T]]) -> T:
        """Run `work` with `keys` marked in flight; the futures of `keys` get its result or error."""
        loop = asyncio.get_running_loop()
        futures = {k: loop.create_future() for k in keys if k not in self._running}
        self._running.update(futures)
        try:
            result = await work()
        except BaseException as exc:
            for f in futures.values():
                if not f.done():
                    f.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
                    f.exception()  # retrieved: a key nobody waited on must not warn
            raise
        else:
            for f in futures.values():
                if not f.done():
                    f.set_result(result)
            return result
        finally:
            for k in futures:
                self._running.pop(k, None)
