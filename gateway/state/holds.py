"""Bookings held for their patient (`unknown_patient = "hold"`): kept durably in Redis, per source.

A booking whose patient the org does not know yet is kept here, with its idempotency record parked
as held (the record says `held` to the EHR's retries; the hold only carries the work, as the queue
does). Each worker takes the held bookings that are due (`take`: their due time moves a lease ahead,
so no other worker takes them meanwhile), looks their patients up again, and books, reschedules or
refuses each under its record's lease. A later change of the same appointment finds it by an
identifier (`find`) and replaces it (`amend`: its version moves on, so an older writer's write is
dropped); a cancel ends it (`settle`); past its deadline, or refused by an operator, it goes to the
source's dead-letter stream of held bookings (`bury`), where operators see it.

Keys of a source share its hash tag (the queue's), so each script touches one Cluster slot:
`items` (hash: hold id -> the held booking), `due` (sorted set: hold id -> when it is next tried),
`ids` (hash: a digest of each EHR identifier -> hold id) and `dead` (stream). Identifiers are kept
only as digests; the booking and its request are sealed under the data key (patient data).
"""

from __future__ import annotations

import hashlib

import msgspec
import redis.asyncio as redis

from gateway.canonical import Identifier


class HeldBooking(msgspec.Struct, frozen=True, kw_only=True):
    """One held booking. `booking` and `request` carry patient data (sealed when `sealed`, bound to
    `record_key`); the rest is what operators may see."""

    hold_id: str
    record_key: str  # the booking's idempotency record: its lease guards every change of this hold
    fingerprint: str
    source: str
    booking: bytes  # the canonical booking, JSON
    request: bytes  # the Salesforce request, JSON, with the EHR's ids (resolved again at each try)
    sealed: bool = False
    accepted_ms: int  # Redis time the booking was first held
    deadline_ms: int  # past this it is refused (`hold_hours`)
    attempts: int = 0  # look-ups made since
    last_error: str | None = None  # why it waits: patient-unknown, a Salesforce error code, ...
    version: int = 1  # moved on by each change of the appointment while held
    identifiers: tuple[str, ...] = ()  # digests of its EHR identifiers (`ids` fields)
    due_ms: int = 0  # in a listing: when it is tried next
    refused: str | None = None  # in the dead-letter stream: why


_decoder = msgspec.json.Decoder(HeldBooking)
_encoder = msgspec.json.Encoder()

# KEYS: items, due, ids. ARGV: hold id, item, delay ms, digests...
_ADD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
for i = 4, #ARGV do redis.call('HSET', KEYS[3], ARGV[i], ARGV[1]) end
return 1
"""
# KEYS: items, due. ARGV: lease ms, count. The due items, each leased (its due time moved ahead).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(due) do
  local item = redis.call('HGET', KEYS[1], id)
  if item then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), id)
    out[#out + 1] = item
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return out
"""
# The current item, if its version is ARGV[2]; else nothing is written (a newer writer came first).
_CURRENT = """
local item = redis.call('HGET', KEYS[1], ARGV[1])
if not item or cjson.decode(item)['version'] ~= tonumber(ARGV[2]) then return false end
"""
# KEYS: items, due. ARGV: hold id, version, new item, due ms (a delay from now).
_RESCHEDULE = _CURRENT + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
return 1
"""
# KEYS: items, due, ids[, dead]. ARGV: hold id, version[, dead entry]. The hold ends (buried, with KEYS[4]).
_END = _CURRENT + """
for _, digest in ipairs(cjson.decode(item)['identifiers'] or {}) do
  if redis.call('HGET', KEYS[3], digest) == ARGV[1] then redis.call('HDEL', KEYS[3], digest) end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if KEYS[4] then redis.call('XADD', KEYS[4], '*', 'e', ARGV[3]) end
return 1
"""
# KEYS: items, due. ARGV: hold id. Tried at once (an operator's release).
_NOW = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return 1
"""


def hold_id(record_key: str) -> str:
    return hashlib.sha256(record_key.encode()).hexdigest()[:24]


def identifier_digests(source: str, identifiers: tuple[Identifier, ...]) -> tuple[str, ...]:
    """Each identifier twice: under its system (`system|value` finds it, `|value` one without a
    system) and under its value alone (a search in any system)."""
    out = []
    for i in identifiers:
        out.append(_digest(source, i.system or "", i.value))
        out.append(_digest(source, None, i.value))
    return tuple(dict.fromkeys(out))


def _digest(source: str, system: str | None, value: str) -> str:
    scope = "*" if system is None else f"={system}"
    return hashlib.sha256(f"{source}\0{scope}\0{value}".encode()).hexdigest()[:32]


class HoldStore:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._redis, self._prefix = client, prefix
        self._add = client.register_script(_ADD)
        self._take = client.register_script(_TAKE)
        self._reschedule = client.register_script(_RESCHEDULE)
        self._end = client.register_script(_END)
        self._now = client.register_script(_NOW)

    def keys(self, source: str) -> tuple[str, str, str, str]:
        base = f"{self._prefix}:hold:{{{self._prefix}:{source}}}"
        return base + ":items", base + ":due", base + ":ids", base + ":dead"

    async def add(self, item: HeldBooking, delay_ms: int) -> None:
        """Hold a booking (again, if it is: the same record is the same hold), tried after `delay_ms`."""
        items, due, ids, _ = self.keys(item.source)
        await self._add(keys=[items, due, ids], args=[item.hold_id, _encoder.encode(item), delay_ms, *item.identifiers])

    async def take(self, source: str, *, count: int, lease_ms: int) -> list[HeldBooking]:
        items, due, _, _ = self.keys(source)
        return [_decoder.decode(raw) for raw in await self._take(keys=[items, due], args=[lease_ms, count])]

    async def reschedule(self, item: HeldBooking, new: HeldBooking, delay_ms: int) -> bool:
        """`new` in place of `item` (False: the hold changed or ended meanwhile), tried after `delay_ms`."""
        items, due, _, _ = self.keys(item.source)
        return bool(await self._reschedule(keys=[items, due],
                                           args=[item.hold_id, item.version, _encoder.encode(new), delay_ms]))

    async def settle(self, item: HeldBooking) -> bool:
        """The hold ends: its booking was booked, refused or cancelled (False: it changed meanwhile)."""
        items, due, ids, _ = self.keys(item.source)
        return bool(await self._end(keys=[items, due, ids], args=[item.hold_id, item.version]))

    async def bury(self, item: HeldBooking, why: str) -> bool:
        """The hold ends in the source's dead-letter stream of held bookings, saying why."""
        items, due, ids, dead = self.keys(item.source)
        entry = msgspec.structs.replace(item, refused=why, due_ms=0)
        return bool(await self._end(keys=[items, due, ids, dead], args=[item.hold_id, item.version,
                                                                        _encoder.encode(entry)]))

    async def release_now(self, source: str, hold: str) -> bool:
        items, due, _, _ = self.keys(source)
        return bool(await self._now(keys=[items, due], args=[hold]))

    async def get(self, source: str, hold: str) -> HeldBooking | None:
        raw = await self._redis.hget(self.keys(source)[0], hold)
        return _decoder.decode(raw) if raw is not None else None

    async def find(self, source: str, system: str | None, value: str, *, any_system: bool = False) -> HeldBooking | None:
        """The held booking an identifier names: `system|value` (None: no system), or `value` in any."""
        items, _, ids, _ = self.keys(source)
        hold = await self._redis.hget(ids, _digest(source, None if any_system else (system or ""), value))
        return await self.get(source, hold.decode()) if hold is not None else None

    async def list(self, source: str) -> list[HeldBooking]:
        """Every held booking of a source, with when it is tried next, and those refused (dead letters)."""
        items, due, _, dead = self.keys(source)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(items)
            pipe.zrange(due, 0, -1, withscores=True)
            pipe.xrange(dead)
            held, times, buried = await pipe.execute()
        when = {k.decode(): int(v) for k, v in times}
        out = [msgspec.structs.replace(h, due_ms=when.get(h.hold_id, 0))
               for h in (_decoder.decode(raw) for raw in held.values())]
        out.sort(key=lambda h: h.accepted_ms)
        return out + [_decoder.decode(fields[b"e"]) for _, fields in buried if b"e" in fields]

    async def count(self, source: str) -> tuple[int, int]:
        """How many are held, and how many were refused (dead letters)."""
        items, _, _, dead = self.keys(source)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hlen(items)
            pipe.xlen(dead)
            held, buried = await pipe.execute()
        return int(held), int(buried)
