"""Idempotency records in Redis: each booking becomes one Salesforce call, whatever the retries.

A record is a hash: the booking's fingerprint, the state (`f` in flight, with a lease and the holder's
token, or `d` done, with the final answer). Claim-or-replay is one round trip (one Lua script); storing
the answer is one more. Every write after the claim is checked against the holder's token, so a slow
old holder can never overwrite a newer result. Lease times come from the Redis server's clock, so
gateways on different machines agree on them.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Literal

import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError

from gateway.canonical import CanonicalBooking
from gateway.errors import InvalidRequest, Unavailable

_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rec = redis.call('HMGET', KEYS[1], 'fp', 'st', 'lease', 'code', 'body', 'loc')
if not rec[2] then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'st', 'f', 'tok', ARGV[2], 'lease', now + tonumber(ARGV[3]))
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {'new'}
end
if rec[1] ~= ARGV[1] then return {'mismatch'} end
if rec[2] == 'd' then return {'done', rec[4], rec[5], rec[6]} end
local lease = tonumber(rec[3])
if lease <= now then
  redis.call('HSET', KEYS[1], 'tok', ARGV[2], 'lease', now + tonumber(ARGV[3]))
  return {'takeover'}
end
return {'busy', tostring(lease - now)}
"""

_COMPLETE = """
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'st', 'd', 'code', ARGV[2], 'body', ARGV[3], 'loc', ARGV[4])
redis.call('HDEL', KEYS[1], 'lease', 'tok')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


def fingerprint(booking: CanonicalBooking) -> str:
    """Same booking, same fingerprint: the canonical form is dialect-free and deterministic."""
    return hashlib.blake2b(msgspec.json.encode(booking), digest_size=16).hexdigest()


def parse_key_header(value: str | None) -> str | None:
    """The `Idempotency-Key` header: 1 to 255 printable ASCII characters; a quoted string is accepted."""
    if value is None:
        return None
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not 1 <= len(value) <= 255 or not all(" " <= ch <= "~" for ch in value):
        raise InvalidRequest(
            "Idempotency-Key must be 1 to 255 printable ASCII characters", expression=("Idempotency-Key",)
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
    state: Literal["new", "takeover", "done", "busy", "mismatch"]
    key: str
    token: str
    status: int = 0
    body: bytes = b""
    location: str = ""
    retry_after_ms: int = 0


class IdempotencyStore:
    def __init__(self, client: redis.Redis, prefix: str, *, lease_seconds: float, retention_hours: float) -> None:
        self._redis = client
        self._prefix = prefix
        self._lease_ms = int(lease_seconds * 1000)
        self._retention_ms = int(retention_hours * 3600 * 1000)
        self._claim = client.register_script(_CLAIM)
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)

    def record_key(self, source: str, material: str) -> str:
        # the key material may hold an EHR identifier: only its digest goes to Redis. The hash tag
        # keeps every record in one cluster slot per key.
        digest = hashlib.sha256(f"{source}\0{material}".encode()).hexdigest()[:40]
        return f"{self._prefix}:idem:{{{source}:{digest}}}"

    async def claim(self, key: str, fp: str) -> Claim:
        token = secrets.token_hex(8)
        try:
            reply = await self._claim(keys=[key], args=[fp, token, self._lease_ms, self._retention_ms])
        except RedisError:
            raise Unavailable("the idempotency store (Redis) is unavailable; nothing was sent", retry_after=5) from None
        state = reply[0].decode()
        if state == "done":
            return Claim("done", key, token, int(reply[1]), reply[2], reply[3].decode())
        if state == "busy":
            return Claim("busy", key, token, retry_after_ms=int(reply[1]))
        return Claim(state, key, token)  # type: ignore[arg-type]

    async def complete(self, claim: Claim, status: int, body: bytes, location: str = "") -> bool:
        """Store the final answer; False when the lease was lost to another holder."""
        try:
            return bool(await self._complete(keys=[claim.key], args=[claim.token, status, body, location, self._retention_ms]))
        except RedisError:
            # Salesforce has answered but the record could not be finished: a retry will find the
            # record in flight until its lease runs out. Say so rather than pretend.
            raise Unavailable("the booking was sent but its answer could not be stored; retry later", retry_after=5) from None

    async def release(self, claim: Claim) -> None:
        """Forget a claim whose booking certainly did not reach Salesforce, so a retry starts fresh."""
        try:
            await self._release(keys=[claim.key], args=[claim.token])
        except RedisError:
            pass  # the lease runs out on its own
