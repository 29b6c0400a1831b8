"""Where an EHR's appointment is in Salesforce: from each identifier the EHR gave it to the Salesforce
id, and whether the appointment was cancelled, kept in Redis for `retention_days`.

A conditional update (`PUT …/Appointment?identifier=system|value`) starts here. The links of a booking
are written by the idempotency store's answer script, in the same round trip as the answer, on a
single Redis; on a Cluster they live in other slots, so they are written just after (`write`). A link
missing (written before this version, or lost with Redis) falls back to a ServiceAppointment look-up.
Keys hold digests of the identifiers, never the identifiers, and values hold only Salesforce ids and
status words: nothing of the patient's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from gateway.canonical import Identifier

BOOKED, CANCELLED = "booked", "cancelled"


class Links:
    def __init__(self, client: Any, prefix: str, *, retention_days: float) -> None:
        self._redis = client  # redis-py's client (single Redis or Cluster)
        self._prefix = prefix
        self.ttl_ms = int(retention_days * 86_400_000)

    def identifier_key(self, source: str, system: str | None, value: str) -> str:
        digest = hashlib.sha256(f"{source}\0{system or ''}|{value}".encode()).hexdigest()[:40]
        return f"{self._prefix}:link:{{{source}:{digest}}}"

    def appointment_key(self, source: str, salesforce_id: str) -> str:
        return f"{self._prefix}:appt:{{{source}:{salesforce_id}}}"

    def writes(self, source: str, salesforce_id: str, status: str, identifiers: Iterable[Identifier]) -> list[tuple[str, str]]:
        """The keys and values that record an appointment: a link per identifier, and its status once
        it is cancelled (the one status that refuses what follows; no key is "booked"), so a booking
        without identifiers writes nothing here."""
        pairs = [(self.identifier_key(source, i.system, i.value), salesforce_id) for i in identifiers]
        if status == CANCELLED:
            pairs.append((self.appointment_key(source, salesforce_id), status))
        return pairs

    async def write(self, pairs: Iterable[tuple[str, str]]) -> None:
        for key, value in pairs:  # one key a call: on a Cluster each may live on another shard
            await self._redis.set(key, value, px=self.ttl_ms)

    async def resolve(self, source: str, system: str | None, value: str) -> str | None:
        found = await self._redis.get(self.identifier_key(source, system, value))
        return found.decode() if found else None

    async def status(self, source: str, salesforce_id: str) -> str | None:
        found = await self._redis.get(self.appointment_key(source, salesforce_id))
        return found.decode() if found else None
