"""What Health Cloud's callouts keep in Redis, beside each create's idempotency record:

- **Bound appointments**: an EHR appointment a create booked (or adopted) is bound to that one
  Salesforce appointment, with the answer the create gave, so that a read or a cancel answers the same
  Appointment (Health Cloud's codes, identifiers and participants), and so that two Salesforce
  appointments never share one EHR appointment: a bind to another's is refused atomically.
- **Slot holds**: one create at a time per (EHR, slot), across workers and instances, while it is in
  flight; many FHIR servers do not refuse a taken slot, so the gateway guards it itself.
- **Booked slots**: the slots the callouts booked, until cancelled, so that Find leaves them out
  without asking the EHR again (a plain FHIR server may go on calling them free).
- **Known patients**: whether the EHR has a patient, remembered for a while, so a create for a patient
  the EHR does not know is refused (404) without a read each time.

Keys hold digests of the EHR's ids, never the ids; the answer kept names the patient and is sealed
under the data key when there is one (as the idempotency store keeps its answers).
"""

from __future__ import annotations

import hashlib
from typing import Any

from gateway.state.redis_mux import MultiplexedRedis
from gateway.state.sealing import Sealer, SealError

# KEYS[1]: the appointment's binding; ARGV: Salesforce id, answer, ttl ms. The Salesforce id it is
# bound to now: this one's (bound, or already), or another's (refused, nothing written).
_BIND = """
local owner = redis.call('HGET', KEYS[1], 'sf')
if owner and owner ~= ARGV[1] then return owner end
redis.call('HSET', KEYS[1], 'sf', ARGV[1], 'a', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return ARGV[1]
"""

# KEYS[1]: a slot's hold; ARGV: owner, ttl ms. 1 when this owner holds it (taken now, or already its own).
_HOLD = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_PLAIN, _SEALED = b"p", b"s"


class CalloutState:
    def __init__(self, client: Any, prefix: str, *, retention_days: float, sealer: Sealer | None = None,
                 scripts: MultiplexedRedis | Any = None) -> None:
        """`scripts`: the pipelined link, for Find's one read (redis-py's `client` when absent)."""
        self._redis, self._prefix, self._sealer = client, prefix, sealer
        self._scripts = scripts if scripts is not None else client
        self._ttl_ms = int(retention_days * 86_400_000)
        self._bind = client.register_script(_BIND)
        self._hold = client.register_script(_HOLD)
        self._release = client.register_script(_RELEASE)

    def _key(self, kind: str, source: str, value: str) -> str:
        digest = hashlib.sha256(f"{source}\0{value}".encode()).hexdigest()[:40]
        return f"{self._prefix}:hc:{kind}:{{{source}:{digest}}}"

    # -- bound appointments -------------------------------------------------------------------------

    async def bind(self, source: str, appointment_id: str, salesforce_id: str, answer: bytes) -> str:
        """Bind the EHR appointment to the Salesforce appointment, keeping `answer`; the Salesforce id
        it is bound to (another's when it was bound already: then nothing changed)."""
        key = self._key("appt", source, appointment_id)
        sealed = _SEALED + self._sealer.seal(answer, key.encode()) if self._sealer is not None else _PLAIN + answer
        owner = await self._bind(keys=[key], args=[salesforce_id, sealed, self._ttl_ms])
        return owner.decode() if isinstance(owner, bytes) else str(owner)

    async def owner(self, source: str, appointment_id: str) -> str | None:
        found = await self._redis.hget(self._key("appt", source, appointment_id), "sf")
        return found.decode() if found is not None else None

    async def answer(self, source: str, appointment_id: str) -> bytes | None:
        """The answer the create gave for this EHR appointment, or None when none is kept (or this
        gateway's data keys cannot open it)."""
        key = self._key("appt", source, appointment_id)
        blob = await self._redis.hget(key, "a")
        if not blob:
            return None
        if blob[:1] == _PLAIN:
            return blob[1:]
        if self._sealer is None:
            return None
        try:
            return self._sealer.open(blob[1:], key.encode())
        except SealError:
            return None

    # -- slot holds ------------------------------------------------------------------------------------

    async def hold_slot(self, source: str, slot: str, owner: str, ttl_seconds: float) -> bool:
        return bool(await self._hold(keys=[self._key("slot", source, slot)], args=[owner, int(ttl_seconds * 1000)]))

    async def release_slot(self, source: str, slot: str, owner: str) -> None:
        await self._release(keys=[self._key("slot", source, slot)], args=[owner])

    # -- booked slots ----------------------------------------------------------------------------------

    def _booked_key(self, source: str, slot: str) -> str:
        # one hash tag per source: a Find's share is one MGET, on a Cluster too
        digest = hashlib.sha256(f"{source}\0{slot}".encode()).hexdigest()[:40]
        return f"{self._prefix}:hc:booked:{{{self._prefix}:hc:{source}}}:{digest}"

    async def mark_booked(self, source: str, slot: str, appointment_id: str, ttl_seconds: float | None = None) -> None:
        """`ttl_seconds`: until the slot is past (a cancel made in the EHR itself, not through the
        callouts, leaves the mark no longer than that); else the retention."""
        ttl_ms = self._ttl_ms if ttl_seconds is None else max(60_000, min(self._ttl_ms, int(ttl_seconds * 1000)))
        await self._redis.set(self._booked_key(source, slot), appointment_id.encode(), px=ttl_ms)

    async def unmark_booked(self, source: str, slot: str, appointment_id: str) -> None:
        await self._release(keys=[self._booked_key(source, slot)], args=[appointment_id])

    async def booked(self, source: str, slots: list[str]) -> set[str]:
        """Those of `slots` the callouts booked: one MGET."""
        if not slots:
            return set()
        keys = [self._booked_key(source, slot) for slot in slots]
        if isinstance(self._scripts, MultiplexedRedis):
            found = await self._scripts.execute("MGET", *keys)
        else:
            found = await self._scripts.execute_command("MGET", *keys)
        return {slot for slot, value in zip(slots, found) if value is not None}

    # -- known patients -------------------------------------------------------------------------------

    async def patient_known(self, source: str, patient: str) -> bool | None:
        found = await self._redis.get(self._key("pt", source, patient))
        return None if found is None else found == b"1"

    async def remember_patient(self, source: str, patient: str, known: bool, ttl_seconds: float) -> None:
        await self._redis.set(self._key("pt", source, patient), b"1" if known else b"0",
                              px=max(1, int(ttl_seconds * 1000)))
