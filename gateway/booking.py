"""The booking path, in the order data flows:
adapter -> canonical booking -> code maps -> Salesforce rules -> idempotency -> Salesforce -> answer.

`prepare` is pure (no I/O): the dry run and the CLI use it alone. `book` adds the idempotency record
and the Salesforce call. No booking is sent without its record claimed first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adapters import get_adapter
from gateway.canonical import CanonicalBooking
from gateway.codemaps import EMPTY, SourceMaps
from gateway.errors import (
    GatewayError,
    IdempotencyKeyReused,
    InFlight,
    NotFound,
    SalesforceRefused,
    Unprocessable,
)
from gateway.fhir import FHIR_JSON, booked_appointment, error_body
from gateway.idempotency import IdempotencyStore, fingerprint, key_material
from gateway.mapping import Mapped, map_booking
from gateway.rules import check
from gateway.salesforce.client import CallRecord, SalesforceClient
from gateway.settings import SourceSettings


@dataclass(frozen=True, slots=True)
class Prepared:
    booking: CanonicalBooking
    mapped: Mapped


@dataclass(slots=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]


@dataclass(slots=True)
class Trace:
    """What the summary log line says about one request: outcomes and timings, never content."""

    idempotency: str = "none"
    salesforce: CallRecord = field(default_factory=CallRecord)
    maps_version: str | None = None


class Booker:
    def __init__(
        self,
        sources: dict[str, SourceSettings],
        maps: dict[str, SourceMaps],
        store: IdempotencyStore | None = None,
        client: SalesforceClient | None = None,
        *,
        in_flight_retry_after: int = 2,
    ) -> None:
        self._sources = sources
        self._maps = maps
        self._adapters = {name: get_adapter(s.adapter) for name, s in sources.items() if s.adapter != "hl7v2"}
        self._store = store
        self._client = client
        self._in_flight_retry_after = in_flight_retry_after

    def source(self, name: str) -> SourceSettings:
        found = self._sources.get(name)
        if found is None:
            raise NotFound("no source of that name is configured", expression=("source",))
        return found

    def prepare(self, source_name: str, body: bytes) -> Prepared:
        """Parse, map and check; raises with every problem found, changes nothing anywhere."""
        source = self.source(source_name)
        adapter = self._adapters.get(source_name)
        if adapter is None:
            raise NotFound("this source takes HL7 v2 over MLLP, not FHIR over HTTP")
        booking = adapter.parse(body)
        mapped = map_booking(booking, source, self._maps.get(source_name, EMPTY))
        issues = list(mapped.issues) + check(booking, mapped.request)
        if any(i.severity in ("error", "fatal") for i in issues):
            raise Unprocessable(issues=sorted(issues, key=lambda i: i.severity != "error"))
        return Prepared(booking, mapped)

    async def book(self, source_name: str, body: bytes, key_header: str | None, trace: Trace) -> Answer:
        assert self._store is not None and self._client is not None, "booking needs Redis and Salesforce"
        prepared = self.prepare(source_name, body)  # refusals found here are never stored
        trace.maps_version = prepared.mapped.maps_version
        fp = fingerprint(prepared.booking)
        key = self._store.record_key(source_name, key_material(key_header, prepared.booking, fp))
        claim = await self._store.claim(key, fp)
        trace.idempotency = claim.state
        if claim.state == "done":
            headers = {"Content-Type": FHIR_JSON, "Idempotent-Replayed": "true"}
            if claim.location:
                headers["Location"] = claim.location
            return Answer(claim.status, claim.body, headers)
        if claim.state == "busy":
            raise InFlight(
                "a booking with this idempotency key is still being processed",
                retry_after=max(1, min(self._in_flight_retry_after, claim.retry_after_ms // 1000 + 1)),
            )
        if claim.state == "mismatch":
            raise IdempotencyKeyReused(
                "this idempotency key was used before with a different booking", expression=("Idempotency-Key",)
            )

        try:
            booked = await self._client.book(prepared.mapped.request, trace.salesforce)
        except SalesforceRefused as refused:
            # Salesforce's refusal is this booking's final answer: a retry gets it again
            answer = Answer(refused.status, error_body(refused), {"Content-Type": FHIR_JSON})
            await self._store.complete(claim, answer.status, answer.body)
            return answer
        except GatewayError:
            # Not booked as far as the gateway can tell: free the key so the EHR's retry is a fresh
            # attempt. A lost answer after sending (trace.salesforce.in_doubt) is freed too for now;
            # the look-up before re-sending such a booking is not built yet.
            await self._store.release(claim)
            raise
        location = f"/fhir/{source_name}/Appointment/{booked.id}"
        answer = Answer(201, booked_appointment(prepared.booking, booked.id), {"Content-Type": FHIR_JSON, "Location": location})
        await self._store.complete(claim, 201, answer.body, location)
        return answer
