"""Where an EHR's appointment is in Salesforce: from each identifier the EHR gave it to the Salesforce
id, and the appointment's own record (booked or cancelled), kept in Redis per source for
`retention_days`. The record is also the proof that a source booked the appointment: a change by
Salesforce id is allowed only where it exists (`Booker._owned`).

A change (`PUT …/Appointment/{id}` or `?identifier=system|value`) starts here. The links of a booking
are written by the idempotency store's answer script, in the same round trip as the answer, on a
single Redis; on a Cluster they live in other slots, so they are written just after (`write`). There
is no org-wide look-up behind a missing link: what this source did not book here is not found.
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
        """The keys and values that record an appointment: a link per identifier, and the
        appointment's record with its status (whose presence says this source booked it)."""
        pairs = [(self.identifier_key(source, i.system, i.value), salesforce_id) for i in identifiers]
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
