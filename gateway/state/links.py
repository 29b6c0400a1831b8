"""Where an EHR's appointment is in Salesforce, and its own record, kept in Redis per source for
`retention_days`: from each identifier the EHR gave it to the Salesforce id, and the appointment's
record (status, version, what the last answer given for it held). The record is also the proof that a source
booked the appointment: a change by Salesforce id is allowed only where it exists (`Booker._owned`).

A change (`PUT …/Appointment/{id}` or `?identifier=…`) and a conditional create (`If-None-Exist`)
start here. The links and record of a booking are written by the idempotency store's answer script
(`STORE_LUA`), in the same round trip as the answer, on a single Redis; on a Cluster they live in
other slots, so they are written just after (`write`). There is no org-wide look-up behind a missing
link: what this source did not book here is not found.

- **Links**: one hash per identifier *value* (used as a set: a small hash is a listpack, half a
  set's memory), whose fields are `<system tag>|<Salesforce id>` (the tag a digest of the system,
  `-` for none). So `system|value` finds the appointments booked under that system, `|value` those
  without one, and `value` alone those under any system, and each search counts what it matched:
  FHIR answers a conditional request that matches several with 412.
- **Record**: a hash `st` (booked, cancelled), `v` (the version: 1 when booked, one more for each
  change, answered as `ETag: W/"<v>"` and `meta.versionId`), `a` and `av` (what the last answer
  held, `gateway.booking.fhir.AppointmentContent`, sealed under the data key since it names the patient,
  none without a key; and its version) and, while a change holds the version, `by`.
  A change takes its version before it is sent (`take_version`, which checks If-Match atomically),
  gives it back when Salesforce certainly did not apply it, and the answer it stores is written
  only over its own version, so a slower change never overwrites a newer one.

Keys hold digests of the identifiers, never the identifiers; values hold Salesforce ids, status
words, versions and sealed answers' content. Links and records written before versions (a string per
`system|value` under `…:link:`, a status string under `…:appt:`) are still read (`_legacy_*`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.canonical import Identifier
from gateway.state.sealing import Sealer, SealError

BOOKED, CANCELLED = "booked", "cancelled"

# The writes that record an appointment, as a Lua function for the scripts that make them (the
# idempotency store's answer script includes it). KEYS[k..]: n link sets, then the record, if a key
# is left; ARGV[a..]: ttl ms, n, the n members (hash fields), then the record's status, version and
# sealed content.
STORE_LUA = """
local function store_appointment(k, a)
  local ttl, n = ARGV[a], tonumber(ARGV[a + 1])
  for i = 0, n - 1 do
    redis.call('HSET', KEYS[k + i], ARGV[a + 2 + i], 1)
    redis.call('PEXPIRE', KEYS[k + i], ttl)
  end
  local key = KEYS[k + n]
  if key then
    local r = a + 2 + n
    local v = redis.call('HGET', key, 'v')
    if not v or v == ARGV[r + 1] then  -- the answer of an older version never overwrites a newer one's
      redis.call('HSET', key, 'st', ARGV[r], 'v', ARGV[r + 1], 'a', ARGV[r + 2], 'av', ARGV[r + 1])
      redis.call('HDEL', key, 'by')
    end
    redis.call('PEXPIRE', key, ttl)
  end
end
"""
_STORE = STORE_LUA + "store_appointment(1, 1)\nreturn 1"

# A change takes the next version before it is sent. KEYS[1]: the record. ARGV: the versions If-Match
# allows (',2,3,'; '' for any), the version and status of a record that predates versions, the
# change's own key (its idempotency record), ttl ms. {1, version} or {0, current version}.
_TAKE = """
local r = redis.call('HMGET', KEYS[1], 'v', 'by')
local v = tonumber(r[1] or ARGV[2])
if r[2] == ARGV[4] then return {1, v} end  -- this change's own earlier attempt took it: the retry keeps it
if ARGV[1] ~= '' and not string.find(ARGV[1], ',' .. v .. ',', 1, true) then return {0, v} end
redis.call('HSET', KEYS[1], 'v', v + 1, 'by', ARGV[4])
redis.call('HSETNX', KEYS[1], 'st', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {1, v + 1}
"""

# Salesforce certainly did not apply the change: its version is given back, if still its own.
# ARGV: the version taken, the change's key.
_GIVE_BACK = """
local r = redis.call('HMGET', KEYS[1], 'v', 'by')
if r[1] ~= ARGV[1] or r[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'v', tonumber(ARGV[1]) - 1)
redis.call('HDEL', KEYS[1], 'by')
return 1
"""


@dataclass(frozen=True, slots=True)
class Record:
    """The appointment's own record."""

    status: str
    version: int
    content: bytes | None = None  # what the last answer held, sealed; None when not kept
    answered: int | None = None  # the version of that answer


@dataclass(frozen=True, slots=True)
class Writes:
    """What records one appointment: a (set key, member) per identifier, and its record."""

    links: list[tuple[str, str]]
    record_key: str
    status: str
    version: int
    content: bytes  # sealed; empty when there is no data key

    def keys(self) -> list[str]:
        return [*(key for key, _ in self.links), self.record_key]

    def args(self, ttl_ms: int) -> list[Any]:
        return [ttl_ms, len(self.links), *(member for _, member in self.links), self.status, self.version, self.content]


def _system_tag(system: str | None) -> str:
    return hashlib.sha256(system.encode()).hexdigest()[:12] if system else "-"


class Links:
    def __init__(self, client: Any, prefix: str, *, retention_days: float, sealer: Sealer | None = None) -> None:
        self._redis = client  # redis-py's client (single Redis or Cluster)
        self._prefix = prefix
        self._sealer = sealer  # the answers kept name the patient: sealed, or not kept at all
        self.ttl_ms = int(retention_days * 86_400_000)
        self._store = client.register_script(_STORE)
        self._take = client.register_script(_TAKE)
        self._give_back = client.register_script(_GIVE_BACK)

    def identifier_key(self, source: str, value: str) -> str:
        digest = hashlib.sha256(f"{source}\0{value}".encode()).hexdigest()[:40]
        return f"{self._prefix}:ids:{{{source}:{digest}}}"

    def record_key(self, source: str, salesforce_id: str) -> str:
        return f"{self._prefix}:appointment:{{{source}:{salesforce_id}}}"

    def _legacy_link_key(self, source: str, system: str | None, value: str) -> str:
        digest = hashlib.sha256(f"{source}\0{system or ''}|{value}".encode()).hexdigest()[:40]
        return f"{self._prefix}:link:{{{source}:{digest}}}"

    def _legacy_record_key(self, source: str, salesforce_id: str) -> str:
        return f"{self._prefix}:appt:{{{source}:{salesforce_id}}}"

    def writes(self, source: str, salesforce_id: str, status: str, version: int, identifiers: Iterable[Identifier],
               content: bytes) -> Writes:
        """The links and record of an appointment, with `content` (what the answer just given holds,
        packed) sealed."""
        key = self.record_key(source, salesforce_id)
        sealed = self._sealer.seal(content, key.encode()) if self._sealer is not None else b""
        links = [(self.identifier_key(source, i.value), f"{_system_tag(i.system)}|{salesforce_id}") for i in identifiers]
        return Writes(links, key, status, version, sealed)

    async def write(self, writes: Writes) -> None:
        for key, member in writes.links:  # one key a call: on a Cluster each may live on another shard
            await self._store(keys=[key], args=[self.ttl_ms, 1, member])
        await self._store(keys=[writes.record_key], args=[self.ttl_ms, 0, writes.status, writes.version, writes.content])

    async def resolve(self, source: str, system: str | None, value: str, *, any_system: bool = False) -> list[str]:
        """The Salesforce ids this source booked under the identifier (`any_system`: whatever its
        system), each once: the caller decides what several mean."""
        tag = _system_tag(system)
        found = set()
        for member in await self._redis.hkeys(self.identifier_key(source, value)):
            member_tag, _, salesforce_id = member.decode().partition("|")
            if any_system or member_tag == tag:
                found.add(salesforce_id)
        if not found:  # a link from before the sets: one id per exact system|value
            legacy = await self._redis.get(self._legacy_link_key(source, None if any_system else system, value))
            if legacy:
                found.add(legacy.decode())
        return sorted(found)

    async def record(self, source: str, salesforce_id: str) -> Record | None:
        status, version, content, answered = await self._redis.hmget(
            self.record_key(source, salesforce_id), "st", "v", "a", "av")
        if status is None:  # a record from before versions: a status alone, version 1
            legacy = await self._redis.get(self._legacy_record_key(source, salesforce_id))
            return Record(legacy.decode(), 1) if legacy else None
        return Record(status.decode(), int(version or 1), content or None, int(answered) if answered else None)

    def content(self, source: str, salesforce_id: str, record: Record) -> bytes | None:
        """What the last answer given for the appointment held, unsealed; None when none was kept or
        this gateway's data keys cannot open it."""
        if record.content is None or self._sealer is None:
            return None
        try:
            return self._sealer.open(record.content, self.record_key(source, salesforce_id).encode())
        except SealError:
            return None

    async def take_version(self, source: str, salesforce_id: str, allowed: tuple[str, ...] | None, owner: str,
                           record: Record) -> tuple[bool, int]:
        """Take the appointment's next version for a change, if `allowed` (If-Match's tags; None or
        () for any) names its current one: (True, the new version), else (False, the current one)."""
        condition = "" if not allowed else "," + ",".join(tag for tag in allowed if tag.isdigit()) + ","
        ok, version = await self._take(keys=[self.record_key(source, salesforce_id)],
                                       args=[condition, record.version, record.status, owner, self.ttl_ms])
        return bool(ok), int(version)

    async def give_back_version(self, source: str, salesforce_id: str, version: int, owner: str) -> None:
        await self._give_back(keys=[self.record_key(source, salesforce_id)], args=[version, owner])
