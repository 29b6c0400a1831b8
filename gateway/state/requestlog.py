"""The request log: one entry per request to a source, in Redis, for operators.

An entry says what happened (outcome, statuses, Salesforce id and error code, idempotency result,
latencies, the code-map version and entries used) and never carries patient data in the clear. What
only PHI-entitled operators may see (the patient reference, and for failed or queued bookings the
input itself, kept so it can be replayed) is sealed (`gateway.state.sealing`) inside the entry.

Entries are written in the background in batches (one script call per batch), so logging adds no
Redis round trip to a booking; a crash loses at most the last batch (`flush_seconds`). All keys
share one hash tag, so each script touches one cluster slot.

Retention keeps what an operator may act on. Entries of the ACTIONABLE outcomes (failed, refused,
unmapped, queued: the ones with a kept input) are a class of their own, bounded by their own count
and age; every other entry is bounded by `max_entries` and `retention_hours` among the others, so a
flood of other entries never pushes an actionable one out. Both are bounded together by bytes
(`max_bytes`, counted in the batch script as each entry's JSON plus ENTRY_OVERHEAD): over it, the
oldest other entries go first, and actionable ones, oldest first, only when no other entry is left.
An evicted entry leaves every index with it. One entry stays small: quoted values are cut
(`errors.cut`), at most LOGGED_ISSUES issues and LOGGED_MAPS map entries are listed, and an input
over `max_input_bytes` is not kept (the entry says its size).

Requests refused at the door (no key, an unknown one, another source's, a certificate that does not
name the source, the source's rate limit) are counted by the metrics but sampled here: per source
and worker, at most one such entry a second (DOOR_SECONDS) is stored, carrying in `suppressed` how
many were not stored since the one before.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable
from typing import Any

import msgspec
import redis.asyncio as redis

from gateway.errors import Issue, cut
from gateway.logs import log
from gateway.state.redis_mux import MultiplexedRedis
from gateway.state.sealing import SealError, Sealer

# booked; replayed (an earlier answer again); queued (202); held (202: the org does not know the
# patient yet); refused (by Salesforce); unmapped (a 422 before any call: a code without a mapping or a
# Salesforce rule); unmatched (a 422: a participant the org holds no record for, or several);
# conflict (409, or a key reused); throttled (429: the source's rate limit); rejected (any other 4xx:
# not authorised, not FHIR, too large); failed (5xx)
OUTCOMES = ("booked", "replayed", "queued", "held", "refused", "unmapped", "unmatched", "conflict", "throttled",
            "rejected", "failed",
            # Health Cloud's callouts: nothing booked (proposed), answered from the EHR's own booking
            # (existing), cancelled, a search or read answered (found; partial: an EHR failed in it)
            "proposed", "existing", "cancelled", "found", "partial")
# the ops of Health Cloud's callouts (the second direction); every other op is a booking's
CALLOUT_OPS = frozenset({"find", "slot-status", "create", "cancel", "read"})
HEALTHCLOUD = "healthcloud"  # the source of a callout entry that spans several EHRs (a search)
# outcomes whose input is kept (sealed) for a replay: the operator fixes a map or waits out Salesforce
KEEP_INPUT = frozenset({"queued", "held", "refused", "failed", "unmapped", "unmatched"})
# outcomes an operator may act on: their entries are retained as a class of their own
ACTIONABLE = KEEP_INPUT
# what one entry costs in Redis beyond its JSON (its key, index members, Salesforce-id pointer),
# roughly: the byte bound counts each entry as its JSON plus this
ENTRY_OVERHEAD = 512
LOGGED_ISSUES = 20  # issues listed in an entry; the rest are counted in one more
LOGGED_MAPS = 50  # distinct map entries listed in an entry
PATIENT_LIMIT = 128  # a FHIR id has at most 64 characters; a longer reference is cut
DOOR_SECONDS = 1.0  # refusals at the door: one entry per source per worker per this


class LoggedIssue(msgspec.Struct, frozen=True, omit_defaults=True):
    code: str
    diagnostics: str
    expression: tuple[str, ...] = ()
    severity: str = "error"  # a booked entry's issues are warnings: what the mapping left out
    location: tuple[str, ...] = ()  # a header or query parameter (`http.Idempotency-Key`)


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
    ehr_status: int | None = None  # a callout's EHR call: its HTTP status (the last one), time and error code
    ehr_ms: float | None = None
    ehr_error: str | None = None
    maps_version: str | None = None
    maps_used: tuple[str, ...] = ()
    issues: tuple[LoggedIssue, ...] = ()  # why it was refused: paths and codes, no values
    replay_of: str | None = None
    replayed_by: str | None = None
    suppressed: int | None = None  # refusals at the door like this one not stored since the last stored
    input_too_large: int | None = None  # the size in bytes of an input not kept (over max_input_bytes)


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
# shares its hash tag). ARGV: base; age ms and max count of class a (actionable), then of class o
# (the others); max bytes; the overhead per entry; then 8 per entry: id, time ms, JSON, source,
# outcome, key digest ('' none), Salesforce id ('' none), class. `:cls:<class>` indexes the class
# with members `id|size|source|outcome|key digest|Salesforce id`, which name everything an eviction
# undoes; `:bytes` is the running total of the sizes.
_APPEND = """
local base = ARGV[1]
local age = {a = tonumber(ARGV[2]), o = tonumber(ARGV[4])}
local cap = {a = tonumber(ARGV[3]), o = tonumber(ARGV[5])}
local max_bytes, overhead = tonumber(ARGV[6]), tonumber(ARGV[7])
local longest = math.max(age.a, age.o)
local total = base .. ':bytes'
local bytes = tonumber(redis.call('GET', total) or '0')
local touched, newest = {}, 0
for i = 8, #ARGV, 8 do
  local id, t, json, class = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 7]
  if t > newest then newest = t end
  local size = #json + overhead
  local member = table.concat({id, size, ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]}, '|')
  -- counted once: an entry written again (a retried batch) is already a member
  if redis.call('ZADD', base .. ':cls:' .. class, t, member) == 1 then bytes = bytes + size end
  redis.call('SET', base .. ':e:' .. id, json, 'PX', age[class])
  redis.call('ZADD', KEYS[1], t, id)
  local indexes = {base .. ':src:' .. ARGV[i + 3], base .. ':out:' .. ARGV[i + 4]}
  if ARGV[i + 5] ~= '' then indexes[3] = base .. ':key:' .. ARGV[i + 5] end
  for _, index in ipairs(indexes) do
    redis.call('ZADD', index, t, id)
    touched[index] = true
  end
  if ARGV[i + 6] ~= '' then redis.call('SET', base .. ':sf:' .. ARGV[i + 6], id, 'PX', age[class]) end
end

-- evictions per call: a backlog (a lowered bound) is worked off over the next batches
local budget = 1000
local function evict(member)
  local id, size, src, out, key, sf = string.match(member, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  redis.call('DEL', base .. ':e:' .. id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', base .. ':src:' .. src, id)
  redis.call('ZREM', base .. ':out:' .. out, id)
  if key ~= '' then redis.call('ZREM', base .. ':key:' .. key, id) end
  if sf ~= '' and redis.call('GET', base .. ':sf:' .. sf) == id then redis.call('DEL', base .. ':sf:' .. sf) end
  bytes = bytes - tonumber(size)
  budget = budget - 1
end
-- evict the class's oldest entries while want(time, count left) says so
local function shed(class, want)
  local index = base .. ':cls:' .. class
  local n = redis.call('ZCARD', index)
  while budget > 0 and n > 0 do
    local oldest = redis.call('ZRANGE', index, 0, 63, 'WITHSCORES')
    local gone = 0
    for j = 1, #oldest, 2 do
      if budget == 0 or not want(tonumber(oldest[j + 1]), n) then break end
      evict(oldest[j])
      gone, n = gone + 1, n - 1
    end
    if gone > 0 then redis.call('ZREMRANGEBYRANK', index, 0, gone - 1) end
    if gone == 0 or gone < #oldest / 2 then return end
  end
end
for _, class in ipairs({'a', 'o'}) do  -- each class by its own age and count
  local cutoff = newest - age[class]
  shed(class, function(t, n) return t <= cutoff or n > cap[class] end)
end
local function over() return bytes > max_bytes end
shed('o', over)  -- then by bytes: the others first
shed('a', over)
if bytes < 0 or redis.call('ZCARD', base .. ':cls:a') + redis.call('ZCARD', base .. ':cls:o') == 0 then
  bytes = 0  -- nothing left to count: a total that drifted starts again
end
redis.call('SET', total, bytes, 'PX', longest)

redis.call('PEXPIRE', base .. ':cls:a', longest)
redis.call('PEXPIRE', base .. ':cls:o', longest)
touched[KEYS[1]] = true
for index in pairs(touched) do  -- backstops only: an eviction takes its members out
  redis.call('ZREMRANGEBYSCORE', index, '-inf', newest - longest)
  redis.call('ZREMRANGEBYRANK', index, 0, -(cap.a + cap.o + 1))
  redis.call('PEXPIRE', index, longest)
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


def logged_issues(issues: Iterable[Issue]) -> tuple[LoggedIssue, ...]:
    """An entry's issues: the first LOGGED_ISSUES, then one more counting the rest."""
    logged = [LoggedIssue(i.code, i.diagnostics, i.expression, i.severity, i.location) for i in issues]
    if len(logged) > LOGGED_ISSUES:
        more = len(logged) - LOGGED_ISSUES
        logged[LOGGED_ISSUES:] = [LoggedIssue("too-costly", f"and {more} more issues, not listed here")]
    return tuple(logged)


def logged_maps(used: tuple[str, ...]) -> tuple[str, ...]:
    """An entry's map entries used: each once, at most LOGGED_MAPS."""
    return used if len(used) <= 1 else tuple(dict.fromkeys(used))[:LOGGED_MAPS]


class RequestLog:
    def __init__(self, client: redis.Redis, prefix: str, *, sealer: Sealer | None, max_entries: int = 100_000,
                 retention_hours: float = 168.0, max_actionable_entries: int = 100_000,
                 actionable_retention_hours: float = 168.0, max_bytes: int = 256 * 1024 * 1024,
                 max_input_bytes: int = 65_536, flush_seconds: float = 0.2,
                 scripts: redis.Redis | MultiplexedRedis | None = None) -> None:
        """`scripts`: what runs the batch writes, when not `client` (the gateway's pipelined link)."""
        self._redis = client
        self._base = f"{prefix}:log:{{{prefix}:log}}"
        self._sealer = sealer
        self._max = max_entries
        # the script's bounds: per class (actionable, other) age ms and count, then bytes
        self._bounds = (int(actionable_retention_hours * 3_600_000), max_actionable_entries,
                        int(retention_hours * 3_600_000), max_entries, max_bytes, ENTRY_OVERHEAD)
        self._max_input = max_input_bytes
        self._flush_seconds = flush_seconds
        self._pending: list[Entry] = []
        self._door: dict[str, tuple[float, int]] = {}  # source -> (when one was last stored, not stored since)
        self._append = (scripts or client).register_script(_APPEND)
        self._link = client.register_script(_LINK)
        self._lock = asyncio.Lock()

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

    def with_sealed(self, entry: Entry, patient: str | None, body: bytes | None, media_type: str | None,
                    key: str | None) -> Entry:
        """The entry with its sealed part: the patient reference, and `body` (the input to keep, or
        None) when it is within `max_input_bytes`; a larger one is not kept, its size is shown."""
        if self._sealer is None:
            return entry
        keep = body is not None and len(body) <= self._max_input
        sealed = Sealed(patient=cut(patient, PATIENT_LIMIT) if patient else None,
                        input=body.decode("utf-8", "replace") if keep and body else None,
                        media_type=media_type, idempotency_key=key)
        return msgspec.structs.replace(entry, has_input=keep, sealed=self.seal(entry.id, sealed),
                                       input_too_large=len(body) if body is not None and not keep else None)

    def at_the_door(self, source: str) -> int | None:
        """For a request refused at the door: None when this worker stored one of the source's less
        than DOOR_SECONDS ago (drop this one), else how many it dropped since (store this one)."""
        now = time.monotonic()
        last, dropped = self._door.get(source, (-DOOR_SECONDS, 0))
        if now - last < DOOR_SECONDS:
            self._door[source] = (last, dropped + 1)
            return None
        self._door[source] = (now, 0)
        return dropped

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
                    args: list[Any] = [self._base, *self._bounds]
                    for e in batch[done:done + _SLICE]:
                        args += [e.id, e.time_ms, _encoder.encode(e), e.source, e.outcome, e.key_digest or "",
                                 e.sf_id or "", "a" if e.outcome in ACTIONABLE else "o"]
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
                     cap: int = 1000, direction: str | None = None) -> list[Entry]:
        """Newest first. The most selective index is read, the other filters applied to what it gives.
        `cap` bounds `limit` (the API's pages; the dashboard's statistics read more). `direction`:
        "in" (bookings from the EHRs) or "out" (Health Cloud's callouts to them)."""
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
            wanted = limit if (index == self._key("all") or (outcome is None and key is None)) and direction is None \
                else limit * 20
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
            if direction is not None and (e.op in CALLOUT_OPS) != (direction == "out"):
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
