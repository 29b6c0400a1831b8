"""The durable booking queue: Redis Streams, one stream per source.

A booking for a `delivery = "queue"` source that Salesforce cannot take now is added to the source's
stream and answered 202. Workers read it through a consumer group, acknowledge it when it is settled,
and reclaim with XAUTOCLAIM what a dead consumer left pending. A failed attempt moves the entry to a
sorted set of delayed entries (due time as score) and a due entry moves back to the stream; after
`max_attempts` it goes to the dead-letter stream, where operators list, replay or drop it.

All of one source's keys share a hash tag, so each script touches one cluster slot. The idempotency
record (another slot) is never written here: it is the booking's truth, the queue only carries work.
"""

from __future__ import annotations

import os
import random
import re
import socket
from dataclasses import dataclass
from typing import Literal

import msgspec
import redis.asyncio as redis
from redis.exceptions import ResponseError

GROUP = "delivery"
# a whole stream entry id, `<ms>-<seq>`: anything else names no entry (Redis refuses malformed ids
# with an error, and reads `<ms>` alone as a range)
_ENTRY_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")


def is_entry_id(entry_id: str) -> bool:
    m = _ENTRY_ID.fullmatch(entry_id)
    return m is not None and all(int(part) < 2**64 for part in m.groups())


class QueuedBooking(msgspec.Struct, frozen=True, kw_only=True):
    """One queue entry. `request` and `booking` carry patient data (they are needed to deliver);
    listing shows only the rest."""

    record_key: str
    fingerprint: str
    source: str
    request: bytes  # the Salesforce request, JSON (sealed when `sealed`)
    booking: bytes  # the canonical booking, JSON, to render the FHIR answer when delivered (sealed too)
    accepted_ms: int
    since_ms: int
    attempts: int = 0
    last_error: str | None = None
    due_ms: int = 0
    sealed: bool = False  # request and booking sealed with the data key (gateway.state.sealing), bound to record_key
    # the request names the org's records (gateway/identity); else the EHR's ids, found at delivery
    resolved: bool = False


_decoder = msgspec.json.Decoder(QueuedBooking)
_encoder = msgspec.json.Encoder()

# Move due entries from the delayed set back to the stream. KEYS: delayed, stream. ARGV: max count.
_PROMOTE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'e', member)
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

# Settle a delivered entry and, unless ARGV[2] is empty, put its next form somewhere.
# KEYS: stream, delayed, dead. ARGV: entry id, next entry JSON, where ('delay' | 'dead'), due ms.
_MOVE = """
if redis.call('XACK', KEYS[1], 'delivery', ARGV[1]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[1])
if ARGV[3] == 'delay' then redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), ARGV[2])
elseif ARGV[3] == 'dead' then redis.call('XADD', KEYS[3], '*', 'e', ARGV[2]) end
return 1
"""


# KEYS: dead, stream. ARGV: entry id, the entry as it goes back. Only one replay of an entry wins.
_REPLAY = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
return 1
"""


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    item: QueuedBooking
    where: Literal["ready", "delayed", "dead"]


def consumer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class BookingQueue:
    def __init__(self, client: redis.Redis, prefix: str, *, max_attempts: int = 8,
                 backoff_base_seconds: float = 2.0, backoff_max_seconds: float = 300.0) -> None:
        self._redis = client
        self._prefix = prefix
        self.max_attempts = max_attempts
        self._base_ms = backoff_base_seconds * 1000
        self._cap_ms = backoff_max_seconds * 1000
        self._promote = client.register_script(_PROMOTE)
        self._move = client.register_script(_MOVE)
        self._replay = client.register_script(_REPLAY)
        self._groups: set[str] = set()

    def keys(self, source: str) -> tuple[str, str, str]:
        base = f"{self._prefix}:queue:{{{self._prefix}:{source}}}"
        return base, base + ":delayed", base + ":dead"

    async def ensure_group(self, source: str) -> None:
        if source in self._groups:
            return
        try:
            await self._redis.xgroup_create(self.keys(source)[0], GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(source)

    async def add(self, item: QueuedBooking) -> str:
        await self.ensure_group(item.source)
        return (await self._redis.xadd(self.keys(item.source)[0], {"e": _encoder.encode(item)})).decode()

    async def read(self, source: str, consumer: str, *, count: int, block_ms: int, reclaim_idle_ms: int) -> list[Entry]:
        """Due delayed entries move to the stream; entries a dead consumer left pending longer than
        `reclaim_idle_ms` are taken over; then new entries are read, blocking up to `block_ms`."""
        await self.ensure_group(source)
        stream, delayed, _ = self.keys(source)
        await self._promote(keys=[delayed, stream], args=[count])
        claimed = await self._redis.xautoclaim(stream, GROUP, consumer, reclaim_idle_ms, "0-0", count=count)
        entries = [self._entry(i, f, "ready") for i, f in claimed[1] if f]
        if entries:
            return entries
        reply = await self._redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=count, block=block_ms)
        return [self._entry(i, f, "ready") for _, batch in reply or [] for i, f in batch if f]

    async def retry(self, entry: Entry, error: str | None, *, count_attempt: bool = True,
                    delay_seconds: float | None = None) -> str:
        """Delay the entry with exponential backoff and full jitter, or dead-letter it when its
        attempts are spent. An uncounted retry waits `delay_seconds` (default: the backoff base).
        Returns 'delayed' or 'dead'."""
        item = entry.item
        attempts = item.attempts + (1 if count_attempt else 0)
        where = "dead" if attempts >= self.max_attempts else "delay"
        delay_ms = random.uniform(0, min(self._cap_ms, self._base_ms * 2 ** max(0, attempts - 1)))
        if not count_attempt:
            delay_ms = self._base_ms if delay_seconds is None else delay_seconds * 1000
        time_ms = await self._now_ms()
        nxt = msgspec.structs.replace(item, attempts=attempts, last_error=error or item.last_error,
                                      due_ms=int(time_ms + delay_ms) if where == "delay" else 0)
        stream, delayed, dead = self.keys(item.source)
        await self._move(keys=[stream, delayed, dead], args=[entry.id, _encoder.encode(nxt), where, nxt.due_ms])
        return "dead" if where == "dead" else "delayed"

    async def done(self, entry: Entry) -> None:
        stream, delayed, dead = self.keys(entry.item.source)
        await self._move(keys=[stream, delayed, dead], args=[entry.id, "", "", 0])

    async def list(self, source: str) -> list[Entry]:
        """Every entry of a source: ready or being delivered, delayed, dead."""
        stream, delayed, dead = self.keys(source)
        out = [self._entry(i, f, "ready") for i, f in await self._redis.xrange(stream) if f]
        # a delayed entry has no stream id until it is due again
        out += [Entry("-", _decoder.decode(m), "delayed") for m in await self._redis.zrange(delayed, 0, -1)]
        out += [self._entry(i, f, "dead") for i, f in await self._redis.xrange(dead) if f]
        return out

    async def replay(self, source: str, entry_id: str) -> bool:
        """Send a dead-lettered entry back to the stream with its attempts reset."""
        if not is_entry_id(entry_id):
            return False
        stream, _, dead = self.keys(source)
        found = await self._redis.xrange(dead, entry_id, entry_id)
        if not found:
            return False
        item = _decoder.decode(found[0][1][b"e"])
        await self.ensure_group(source)
        fresh = _encoder.encode(msgspec.structs.replace(item, attempts=0, due_ms=0))
        return bool(await self._replay(keys=[dead, stream], args=[entry_id, fresh]))

    async def drop(self, source: str, entry_id: str) -> QueuedBooking | None:
        """Remove a dead-lettered entry; the caller releases its idempotency record."""
        if not is_entry_id(entry_id):
            return None
        _, _, dead = self.keys(source)
        found = await self._redis.xrange(dead, entry_id, entry_id)
        if not found or not await self._redis.xdel(dead, entry_id):
            return None
        return _decoder.decode(found[0][1][b"e"])

    async def depth(self, source: str) -> dict[str, int]:
        stream, delayed, dead = self.keys(source)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xlen(stream)
            pipe.zcard(delayed)
            pipe.xlen(dead)
            ready, waiting, dead_n = await pipe.execute()
        return {"ready": ready, "delayed": waiting, "dead": dead_n}

    async def _now_ms(self) -> int:
        seconds, micros = await self._redis.time()
        return seconds * 1000 + micros // 1000

    @staticmethod
    def _entry(entry_id: bytes, fields: dict[bytes, bytes], where: Literal["ready", "delayed", "dead"]) -> Entry:
        return Entry(entry_id.decode(), _decoder.decode(fields[b"e"]), where)


