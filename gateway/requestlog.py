"""The request log: one entry per request to a source, in Redis, for operators.

An entry says what happened (outcome, statuses, Salesforce id and error code, idempotency result,
latencies, the code-map version and entries used) and never carries patient data in the clear. What
only PHI-entitled operators may see (the patient reference, and for failed or queued bookings the
input itself, kept so it can be replayed) is sealed (`gateway.sealing`) inside the entry.

Entries are written in the background in batches (one script call per batch), so logging adds no
Redis round trip to a booking; a crash loses at most the last batch (`flush_seconds`). All keys
share one hash tag, so each script touches one cluster slot. Retention is bounded by count and age.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import msgspec
import redis.asyncio as redis

from gateway.logs import log
from gateway.redis_mux import MultiplexedRedis
from gateway.sealing import SealError, Sealer

# booked; replayed (an earlier answer again); queued (202); refused (by Salesforce); unmapped (a 422
# before any call: a code without a mapping or a Salesforce rule); conflict (409, or a key reused);
# throttled (429: the source's rate limit); rejected (any other 4xx: not authorised, not FHIR, too
# large); failed (5xx)
OUTCOMES = ("booked", "replayed", "queued", "refused", "unmapped", "conflict", "throttled", "rejected", "failed")
# outcomes whose input is kept (sealed) for a replay: the operator fixes a map or waits out Salesforce
KEEP_INPUT = frozenset({"queued", "refused", "failed", "unmapped"})


class LoggedIssue(msgspec.Struct, frozen=True, omit_defaults=True):
    code: str
    diagnostics: str
    expression: tuple[str, ...] = ()


class Sealed(msgspec.Struct, frozen=True, omit_defaults=True):
    """The PHI part of an entry, sealed at rest."""

    patient: str | None = None
    input: str | None = None  # the body as received, for a replay
    media_type: str | None = None
    idempotency_key: str | None = None  # the header, so a replay uses the same key


class _Shown(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What any operator may see of an entry."""

    id: str
    time_ms: int
    source: str
    op: str
    outcome: str
    status: int
    idempotency: str | None = None
    sf_status: int | None = None
    sf_id: str | None = None
    sf_error: str | None = None
    ms: float = 0.0
    sf_ms: float | None = None
    maps_version: str | None = None
    maps_used: tuple[str, ...] = ()
    issues: tuple[LoggedIssue, ...] = ()  # why it was refused: paths and codes, no values
    replay_of: str | None = None
    replayed_by: str | None = None


class Entry(_Shown, kw_only=True, omit_defaults=True):
    """An entry as stored."""

    key_digest: str | None = None
    has_input: bool = False
    sealed: bytes | None = None


class View(_Shown, kw_only=True, omit_defaults=True):
    """An entry as the admin API shows it; `patient` and `input` only to a PHI key."""

    replayable: bool = False
    patient: str | None = None
    input: str | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Entry)
_SLICE = 32  # entries per script call

# One batch of entries in one script. KEYS: the `all` index (it routes the script; every other key
# shares its hash tag). ARGV: base, age ms, max count, then 7 per entry: id, time ms, JSON, source,
# outcome, key digest ('' none), Salesforce id ('' none). Indexes are trimmed once per batch.
_APPEND = """
local base, age, max = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local touched, newest = {}, 0
for i = 4, #ARGV, 7 do
  local id, t = ARGV[i], tonumber(ARGV[i + 1])
  if t > newest then newest = t end
  redis.call('SET', base .. ':e:' .. id, ARGV[i + 2], 'PX', age)
  redis.call('ZADD', KEYS[1], t, id)
  local indexes = {base .. ':src:' .. ARGV[i + 3], base .. ':out:' .. ARGV[i + 4]}
  if ARGV[i + 5] ~= '' then indexes[3] = base .. ':key:' .. ARGV[i + 5] end
  for _, index in ipairs(indexes) do
    redis.call('ZADD', index, t, id)
    touched[index] = true
  end
  if ARGV[i + 6] ~= '' then redis.call('SET', base .. ':sf:' .. ARGV[i + 6], id, 'PX', age) end
end
local over = redis.call('ZCARD', KEYS[1]) - max
if over > 0 then  -- the oldest entries go, over the count
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, over - 1)) do redis.call('DEL', base .. ':e:' .. id) end
end
touched[KEYS[1]] = true
for index in pairs(touched) do
  redis.call('ZREMRANGEBYSCORE', index, '-inf', newest - age)
  redis.call('ZREMRANGEBYRANK', index, 0, -(max + 1))
  redis.call('PEXPIRE', index, age)
end
return 1
"""

# Link a replay to its original. KEYS: entry. ARGV: field JSON patch is done in Lua with cjson.
_LINK = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local e = cjson.decode(raw)
e['replayed_by'] = ARGV[1]
redis.call('SET', KEYS[1], cjson.encode(e), 'KEEPTTL')
return 1
"""


def key_digest(source: str, material: str) -> str:
    """Searchable without storing the key: the same digest is computed from the key asked for."""
    return hashlib.sha256(f"log\0{source}\0{material}".encode()).hexdigest()[:32]


class RequestLog:
    def __init__(self, client: redis.Redis, prefix: str, *, sealer: Sealer | None, max_entries: int = 100_000,
                 retention_hours: float = 168.0, flush_seconds: float = 0.2,
                 scripts: redis.Redis | MultiplexedRedis | None = None) -> None:
        """`scripts`: what runs the batch writes, when not `client` (the gateway's pipelined link)."""
        self._redis = client
        self._base = f"{prefix}:log:{{{prefix}:log}}"
        self._sealer = sealer
        self._max = max_entries
        self._age_ms = int(retention_hours * 3600 * 1000)
        self._flush_seconds = flush_seconds
        self._pending: list[Entry] = []
        self._append = (scripts or client).register_script(_APPEND)
        self._link = client.register_script(_LINK)
        self._lock = asyncio.Lock()

    @property
    def keeps_inputs(self) -> bool:
        return self._sealer is not None

    def _key(self, *parts: str) -> str:
        return ":".join((self._base, *parts))

    def seal(self, entry_id: str, sealed: Sealed) -> bytes | None:
        if self._sealer is None:
            return None
        return self._sealer.seal(_encoder.encode(sealed), entry_id.encode())

    def unseal(self, entry: Entry) -> Sealed | None:
        if self._sealer is None or entry.sealed is None:
            return None
        try:
            return msgspec.json.decode(self._sealer.open(entry.sealed, entry.id.encode()), type=Sealed)
        except (SealError, msgspec.DecodeError):
            return None

    def record(self, entry: Entry) -> None:
        """Queue the entry for the next batch: no I/O on the request's path."""
        self._pending.append(entry)

    async def flush(self) -> None:
        async with self._lock:
            batch, self._pending = self._pending, []
            if not batch:
                return
            done = 0
            try:
                # in slices: one script call holds Redis (and its encoding holds this event loop) for
                # every booking waiting behind it, so no call carries more than _SLICE entries
                while done < len(batch):
                    args: list[Any] = [self._base, self._age_ms, self._max]
                    for e in batch[done:done + _SLICE]:
                        args += [e.id, e.time_ms, _encoder.encode(e), e.source, e.outcome, e.key_digest or "",
                                 e.sf_id or ""]
                    await self._append(keys=[self._key("all")], args=args)
                    done += _SLICE
            except Exception as exc:  # Redis down: keep the rest for the next try, bounded
                batch = batch[done:]
                self._pending = (batch + self._pending)[-self._max :]
                log.warning("request_log_flush_failed", error=type(exc).__name__, entries=len(batch))
            except BaseException:
                # cancelled mid-write (shutdown): keep the rest for the final flush; writing an
                # entry twice is harmless (same key, same index members)
                self._pending = batch[done:] + self._pending
                raise

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_seconds)
            await self.flush()

    async def get(self, entry_id: str) -> Entry | None:
        await self.flush()
        raw = await self._redis.get(self._key("e", entry_id))
        return _decoder.decode(raw) if raw else None

    async def link_replay(self, original: str, replay: str) -> None:
        await self.flush()
        await self._link(keys=[self._key("e", original)], args=[replay])

    async def search(self, *, source: str | None = None, outcome: str | None = None, since_ms: int | None = None,
                     sf_id: str | None = None, key: str | None = None, limit: int = 50,
                     cap: int = 1000) -> list[Entry]:
        """Newest first. The most selective index is read, the other filters applied to what it gives.
        `cap` bounds `limit` (the API's pages; the dashboard's statistics read more)."""
        await self.flush()
        limit = max(1, min(limit, cap))
        if sf_id is not None:
            found = await self._redis.get(self._key("sf", sf_id))
            ids = [found] if found else []
        else:
            if key is not None and source is not None:
                index = self._key("key", key_digest(source, "h:" + key))
            elif source is not None:
                index = self._key("src", source)
            elif outcome is not None:
                index = self._key("out", outcome)
            else:
                index = self._key("all")
            wanted = limit if (index == self._key("all") or (outcome is None and key is None)) else limit * 20
            ids = await self._redis.zrevrangebyscore(index, "+inf", since_ms or "-inf", start=0, num=min(wanted, 20_000))
        if not ids:
            return []
        raws = await self._redis.mget([self._key("e", i.decode() if isinstance(i, bytes) else i) for i in ids])
        out = []
        for raw in raws:
            if raw is None:
                continue
            e = _decoder.decode(raw)
            if (source and e.source != source) or (outcome and e.outcome != outcome) or (since_ms and e.time_ms < since_ms):
                continue
            out.append(e)
            if len(out) >= limit:
                break
        return out

    def view(self, entry: Entry, *, phi: bool) -> View:
        fields: dict[str, Any] = {f: getattr(entry, f) for f in _Shown.__struct_fields__}
        fields["replayable"] = entry.has_input and entry.replayed_by is None
        if phi and (sealed := self.unseal(entry)) is not None:
            fields["patient"], fields["input"] = sealed.patient, sealed.input
        return View(**fields)
