"""Idempotency records in Redis: each booking becomes one appointment, whatever the retries.

A record is a hash: the booking's fingerprint and a state: leased (`f`, with the holder's token and
lease end), in doubt (`u`: an attempt may have reached Salesforce and its answer was lost), queued
(`q`: the durable queue owns delivery) or done (`d`, with the final answer). Claim-or-replay is one
round trip (one Lua script); storing the answer is one more. A claim that takes a record over from a
lapsed lease or from doubt says so, and its holder looks the booking up before sending. Every write
after the claim is checked against the holder's token, so a slow old holder can never overwrite a
newer result. Times come from the Redis server's clock, so gateways on different machines agree.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import Literal

import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError

from gateway.canonical import CanonicalBooking
from gateway.ids import new_id
from gateway.state.links import STORE_LUA, Writes
from gateway.state.redis_mux import MultiplexedRedis
from gateway.state.sealing import SealError, Sealer

# What a Redis call can raise when Redis or the link to it fails. redis-py lets some transport
# errors through unwrapped (a write on a connection torn down under it raises AttributeError or
# TypeError; redis-py issue #4287), so they are caught here, around the Redis call alone.
REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, OSError, AttributeError, TypeError)
from gateway.errors import InvalidRequest, Unavailable, http

# Record fields: fp (booking fingerprint), st (f leased, u in doubt, q queued, d done), tok and lease
# (the holder's token and lease end), dbt ('1': an earlier attempt may have reached Salesforce), since
# (first attempt, for the look-up), sent (when the last doubtful attempt ended), q ('1': the durable
# queue owns delivery), code and a (the final answer: its status, and `a`: for a booking, only
# Salesforce's id, since the same fingerprint means the same booking and so the same 201 body, rebuilt
# on replay; for a refusal, its location and body packed, see `_pack_answer`). Records written before
# either hold body and loc instead, and are still read.
# ARGV: fp, token, lease ms, retention ms, mode ('e' the EHR's request, 'q' the queue's or the holds'
# worker), since, and for 'q' the flag a record made anew gets ('1' the queue's, 'h' held).
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'fp', 'st', 'lease', 'code', 'a', 'dbt', 'since', 'sent', 'q', 'body', 'loc')
local lease = now + tonumber(ARGV[3])
if not r[2] then
  if ARGV[5] == 'q' then
    -- a queued or held booking whose record is gone (dropped, or outlived): its history is unknown
    redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'st', 'f', 'tok', ARGV[2], 'lease', lease,
               'since', ARGV[6], 'dbt', '1', 'sent', '0', 'q', ARGV[7])
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
    return {'takeover', '1', ARGV[6], '0', tostring(now)}
  end
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'st', 'f', 'tok', ARGV[2], 'lease', lease, 'since', now)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {'new', tostring(now)}
end
if r[1] ~= ARGV[1] then return {'mismatch'} end
if r[2] == 'd' then return {'done', r[4], r[5] or '', r[10] or '', r[11] or ''} end
if ARGV[5] == 'e' and r[9] == '1' then return {'queued'} end
if ARGV[5] == 'e' and r[9] == 'h' then return {'held'} end
if r[2] == 'f' and tonumber(r[3]) > now then return {'busy', tostring(tonumber(r[3]) - now)} end
local doubt, sent = r[6] or '0', r[8] or '0'
if r[2] == 'f' then doubt, sent = '1', r[3] end  -- the lapsed holder may have sent; its call ended by then
redis.call('HSET', KEYS[1], 'st', 'f', 'tok', ARGV[2], 'lease', lease, 'dbt', doubt, 'sent', sent)
return {'takeover', doubt, r[7] or tostring(now), sent, tostring(now)}
"""

# KEYS[2..] with ARGV[5..]: the appointment's links and record (gateway/state/links.py), written with the
# answer; only on a single Redis, where one script may touch any key.
_COMPLETE = STORE_LUA + """
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'st', 'd', 'code', ARGV[2], 'a', ARGV[3])
redis.call('HDEL', KEYS[1], 'lease', 'tok', 'dbt', 'since', 'sent', 'q')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if #KEYS > 1 then store_appointment(2, 5) end
return 1
"""

# Give the lease back without an answer. ARGV: token, in doubt ('1': this attempt may have reached
# Salesforce), queued ('1': the durable queue takes the booking over; 'h': it is held for its patient).
# A record with no doubt and neither is deleted, so the EHR's retry is a fresh attempt; otherwise it
# waits, idle, for the next holder.
_PARK = """
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return 0 end
if ARGV[2] == '1' then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'dbt', '1', 'sent', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
if ARGV[3] ~= '0' then redis.call('HSET', KEYS[1], 'q', ARGV[3]) end
local r = redis.call('HMGET', KEYS[1], 'q', 'dbt')
if r[1] == '1' or r[1] == 'h' then redis.call('HSET', KEYS[1], 'st', 'q')
elseif r[2] == '1' then redis.call('HSET', KEYS[1], 'st', 'u')
else return redis.call('DEL', KEYS[1]) end
redis.call('HDEL', KEYS[1], 'tok', 'lease')
return 1
"""

# An operator replays a booking Salesforce refused: forget the stored refusal (only a refusal, only
# of this booking) so the replay is tried again. ARGV: fp.
_FORGET_REFUSAL = """
local r = redis.call('HMGET', KEYS[1], 'st', 'code', 'fp')
if r[1] ~= 'd' or r[3] ~= ARGV[1] or tonumber(r[2]) < 400 then return 0 end
return redis.call('DEL', KEYS[1])
"""

# An operator dropped a queued booking: the queue no longer owns it. Only an idle queued record.
_UNQUEUE = """
local r = redis.call('HMGET', KEYS[1], 'st', 'dbt')
if r[1] ~= 'q' then return 0 end
if r[2] == '1' then
  redis.call('HSET', KEYS[1], 'st', 'u')
  redis.call('HDEL', KEYS[1], 'q')
  return 1
end
return redis.call('DEL', KEYS[1])
"""


# The answers' common text, for deflate. Frozen: records written with it must stay readable, so a
# new dictionary needs a new format byte, not an edit of this one.
_ANSWER_DICT = (
    b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing","details":'
    b'{"text":"Salesforce refused the booking: ","coding":[{"system":"urn:ehr-gateway:salesforce:errorCode",'
    b'"code":""}]},"expression":["Appointment."]}]}'
    b'{"resourceType":"Appointment","id":"","status":"booked","identifier":[{"value":"","system":"urn:oid:"},'
    b'{"value":"","system":"urn:ehr-gateway:salesforce:appointment"}],"start":"T:00:00.000Z","end":"T:00:00.000Z",'
    b'"slot":[{"reference":"Slot/"}],"participant":[{"actor":{"reference":"Location/"}},'
    b'{"actor":{"reference":"Practitioner/"}},{"actor":{"reference":"Patient/"}}]}\n/fhir//Appointment/'
)
# format bytes of `a`: deflated; deflated then sealed; a booking's Salesforce id (answered without a
# version); a booking's Salesforce id, answered as version 1 (`meta.versionId` and `ETag`)
_PACKED, _SEALED, _BOOKED, _BOOKED_V1 = b"\x01", b"\x02", b"\x03", b"\x04"


def fingerprint(booking: CanonicalBooking) -> str:
    """Same booking, same fingerprint: the canonical form is dialect-free and deterministic. The
    resource's own id is not the booking (a create ignores it), nor are the patient's demographics a
    message carried (a resent message with a name corrected is the same appointment): left out."""
    if booking.resource_id is not None or booking.patient is not None:
        booking = msgspec.structs.replace(booking, resource_id=None, patient=None)
    return hashlib.blake2b(msgspec.json.encode(booking), digest_size=16).hexdigest()


def parse_key_header(value: str | None) -> str | None:
    """The `Idempotency-Key` header: 1 to 255 printable ASCII characters; a quoted string is accepted."""
    if value is None:
        return None
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not 1 <= len(value) <= 255 or not all(" " <= ch <= "~" for ch in value):
        raise InvalidRequest(
            "Idempotency-Key must be 1 to 255 printable ASCII characters", location=http("Idempotency-Key")
        )
    return value


def key_material(header_key: str | None, booking: CanonicalBooking, fp: str) -> str:
    """What the record is keyed on: the header, else the EHR's identifiers, else the fingerprint."""
    if header_key is not None:
        return "h:" + header_key
    if booking.identifiers:
        ids = sorted(f"{i.system or ''}|{i.value}" for i in booking.identifiers)
        return "i:" + "\n".join(ids)
    return "f:" + fp


@dataclass(frozen=True, slots=True)
class Claim:
    state: Literal["new", "takeover", "done", "busy", "mismatch", "queued", "held"]
    key: str
    token: str
    status: int = 0
    body: bytes = b""
    location: str = ""
    retry_after_ms: int = 0
    doubt: bool = False  # an earlier attempt may have reached Salesforce: look before sending
    since_ms: int = 0  # Redis time of the first attempt
    sent_ms: int = 0  # Redis time the last doubtful attempt ended
    now_ms: int = 0  # Redis time of this claim
    salesforce_id: str = ""  # done, booked: the answer is rebuilt from the booking and this id
    versioned: bool = False  # ... as version 1 (records written before versions: without one)


class IdempotencyStore:
    def __init__(self, client: redis.Redis | MultiplexedRedis, prefix: str, *, lease_seconds: float,
                 retention_hours: float, sealer: Sealer | None = None) -> None:
        """`client` runs the scripts: redis-py's (any kind, Cluster too) or the pipelined link."""
        # a single Redis: other keys (the appointment's links) can be written in the answer's script
        self.writes_links = isinstance(client, MultiplexedRedis)
        self._sealer = sealer
        self._prefix = prefix
        self._lease_ms = int(lease_seconds * 1000)
        self._retention_ms = int(retention_hours * 3600 * 1000)
        self._claim = client.register_script(_CLAIM)
        self._complete = client.register_script(_COMPLETE)
        self._park = client.register_script(_PARK)
        self._unqueue = client.register_script(_UNQUEUE)
        self._forget_refusal = client.register_script(_FORGET_REFUSAL)

    def _pack_answer(self, key: str, location: str, body: bytes) -> bytes:
        """The stored answer: location and body, deflated with a dictionary of the answers' common
        text (a 500-byte Appointment becomes about 150 bytes, so a record stays well under 1 KiB), then
        sealed under the data key when there is one: the body names the patient."""
        deflate = zlib.compressobj(6, zdict=_ANSWER_DICT)
        packed = deflate.compress(location.encode() + b"\n" + body) + deflate.flush()
        if self._sealer is None:
            return _PACKED + packed
        return _SEALED + self._sealer.seal(packed, key.encode())

    def _unpack_answer(self, key: str, blob: bytes) -> tuple[str, bytes]:
        try:
            if blob[:1] == _SEALED:
                if self._sealer is None:
                    raise SealError("no data key")
                blob = self._sealer.open(blob[1:], key.encode())
            elif blob[:1] == _PACKED:
                blob = blob[1:]
            else:
                raise SealError("unknown answer format")
            inflate = zlib.decompressobj(zdict=_ANSWER_DICT)
            location, _, body = (inflate.decompress(blob) + inflate.flush()).partition(b"\n")
        except (SealError, zlib.error):
            raise Unavailable("the stored answer of this booking cannot be read (is the data key the one "
                              "it was stored under?)", retry_after=60) from None
        return location.decode(), body

    def record_key(self, source: str, material: str) -> str:
        # the key material may hold an EHR identifier: only its digest goes to Redis. The hash tag
        # keeps every record in one cluster slot per key.
        digest = hashlib.sha256(f"{source}\0{material}".encode()).hexdigest()[:40]
        return f"{self._prefix}:idem:{{{source}:{digest}}}"

    async def claim(self, key: str, fp: str, *, by_queue: bool = False, since_ms: int = 0, held: bool = False) -> Claim:
        """Claim-or-replay in one round trip. `by_queue`: the queue's worker (or, `held`, the holds')
        claims for delivery, so a queued or held record is taken rather than answered 202."""
        token = new_id()
        args = [fp, token, self._lease_ms, self._retention_ms, "q" if by_queue else "e", since_ms, "h" if held else "1"]
        try:
            reply = await self._claim(keys=[key], args=args)
        except REDIS_FAILURES:
            raise Unavailable("the idempotency store (Redis) is unavailable; nothing was sent", retry_after=5) from None
        state = reply[0].decode()
        if state == "done":
            if reply[2][:1] in (_BOOKED, _BOOKED_V1):
                return Claim("done", key, token, int(reply[1]), salesforce_id=reply[2][1:].decode(),
                             versioned=reply[2][:1] == _BOOKED_V1)
            if reply[2]:
                location, body = self._unpack_answer(key, reply[2])
            else:  # a record written before answers were packed
                location, body = reply[4].decode(), reply[3]
            return Claim("done", key, token, int(reply[1]), body, location)
        if state == "busy":
            return Claim("busy", key, token, retry_after_ms=int(reply[1]))
        if state == "takeover":
            return Claim("takeover", key, token, doubt=reply[1] == b"1", since_ms=int(float(reply[2])),
                         sent_ms=int(float(reply[3])), now_ms=int(float(reply[4])))
        if state == "new":
            now = int(float(reply[1]))
            return Claim("new", key, token, since_ms=now, now_ms=now)
        return Claim(state, key, token)  # type: ignore[arg-type]

    async def complete(self, claim: Claim, status: int, body: bytes, location: str = "") -> bool:
        """Store the final answer; False when the lease was lost to another holder."""
        try:
            packed = self._pack_answer(claim.key, location, body)
            return bool(await self._complete(keys=[claim.key], args=[claim.token, status, packed, self._retention_ms]))
        except REDIS_FAILURES:
            # Salesforce has answered but the record could not be finished: a retry finds the lease
            # lapsed, takes over as in doubt, and looks the booking up before any resend.
            raise Unavailable("the booking was sent but its answer could not be stored; retry later", retry_after=5) from None

    async def complete_booked(self, claim: Claim, salesforce_id: str, links: Writes | None = None,
                              links_ttl_ms: int = 0) -> bool:
        """Store a booking's 201, answered as version 1: Salesforce's id is all a replay needs (see the
        record fields above). Nothing of the patient's is kept, so there is nothing to seal, and the
        record stays small. The appointment's `links` (only when `writes_links`) are written in the
        same script."""
        try:
            return bool(await self._complete(
                keys=[claim.key, *(links.keys() if links else ())],
                args=[claim.token, 201, _BOOKED_V1 + salesforce_id.encode(), self._retention_ms,
                      *(links.args(links_ttl_ms) if links else ())]))
        except REDIS_FAILURES:
            raise Unavailable("the booking was sent but its answer could not be stored; retry later", retry_after=5) from None

    async def park(self, claim: Claim, *, in_doubt: bool = False, queued: bool = False, held: bool = False) -> None:
        """Give the lease back without a final answer (see _PARK); `held`: the booking waits for its
        patient. Raises Unavailable when Redis is down: the lease then runs out on its own, and the
        next holder looks before sending."""
        flag = "h" if held else "1" if queued else "0"
        try:
            await self._park(keys=[claim.key], args=[claim.token, "1" if in_doubt else "0", flag])
        except REDIS_FAILURES:
            raise Unavailable("the idempotency store (Redis) is unavailable", retry_after=5) from None

    async def forget_refusal(self, key: str, fp: str) -> bool:
        try:
            return bool(await self._forget_refusal(keys=[key], args=[fp]))
        except REDIS_FAILURES:
            raise Unavailable("the idempotency store (Redis) is unavailable", retry_after=5) from None

    async def unqueue(self, key: str) -> bool:
        """The operator dropped the queued booking: the record stops answering 202."""
        return bool(await self._unqueue(keys=[key]))
