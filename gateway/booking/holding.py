"""A booking whose patient the org does not know yet, held (`unknown_patient = "hold"`, contract v3).

The lease holder of a booking's record hands it here when its patient is not found: the booking is
kept in the hold store (gateway/state/holds.py) and its record parked as held, so the EHR's retries
answer 202 until it is booked (the FHIR answer 202, an ACK AA). The holds' worker (`HoldWorker`)
tries each again with backoff under the same record's lease, through the same path as any booking
(`Booker.release_held`), so it is booked exactly once; past `hold_hours`, or refused by an operator,
the record keeps the refusal as its final answer and the booking goes to the dead-letter stream of
held bookings.
"""

from __future__ import annotations

import msgspec

from gateway.booking.fhir import FHIR_JSON, error_body, operation_outcome
from gateway.booking.job import Answer, Job, Trace, pack, unpack
from gateway.canonical import CanonicalBooking
from gateway.errors import GatewayError, Issue, PatientUnknown, Unavailable
from gateway.salesforce.wire import BookingRequest
from gateway.settings import IdentitySettings, SourceSettings
from gateway.state.holds import HeldBooking, HoldStore, hold_id, identifier_digests
from gateway.state.idempotency import REDIS_FAILURES, Claim, IdempotencyStore
from gateway.state.sealing import Sealer

HELD_TEXT = ("the org does not know this booking's patient yet: the booking is held and will be booked as soon as "
             "it does; the same request again answers 202 until then, then the booking's answer")
_HELD = operation_outcome([Issue(code="informational", severity="information", diagnostics=HELD_TEXT)])


def held_answer(trace: Trace) -> Answer:
    """202 with the OperationOutcome that says so, and where its request-log entry is."""
    headers = {"Content-Type": FHIR_JSON, "Retry-After": "60"}
    if trace.request_id:
        headers["Location"] = f"/admin/api/requests/{trace.request_id}"
    return Answer(202, _HELD, headers)


class Holding:
    def __init__(self, store: HoldStore, records: IdempotencyStore, sources: dict[str, SourceSettings],
                 settings: IdentitySettings, sealer: Sealer | None) -> None:
        self.store, self._records, self._sources, self._settings = store, records, sources, settings
        self._sealer = sealer

    def delay_ms(self, attempts: int) -> int:
        """Backoff: `hold_retry_seconds`, then twice as long each time, up to `hold_retry_max_seconds`."""
        s = self._settings
        return int(min(s.hold_retry_max_seconds, s.hold_retry_seconds * 2 ** min(attempts, 30)) * 1000)

    async def hold(self, job: Job, trace: Trace, why: str = "patient-unknown") -> Answer:
        """Hold the job's booking (a first hold), or, for a hold being released, try it again later;
        past its deadline it is refused instead. The record is parked as held either way."""
        claim = job.claim
        try:
            if job.held is None:
                await self.store.add(self._item(job, why), self.delay_ms(0))
            elif claim.now_ms >= job.held.deadline_ms:
                return await self.refuse(job, why, trace)
            else:
                again = msgspec.structs.replace(job.held, attempts=job.held.attempts + 1, last_error=why)
                return await self.keep(job.held, again, self.delay_ms(again.attempts), claim, trace)
            return await self._parked(claim, trace)
        except REDIS_FAILURES:
            raise Unavailable("the booking's patient is not known yet and it cannot be held now (Redis)",
                              retry_after=5) from None

    async def keep(self, item: HeldBooking, new: HeldBooking, delay_ms: int, claim: Claim, trace: Trace) -> Answer:
        """The hold goes on as `new` (tried after `delay_ms`), its record given back as held: the 202."""
        await self.store.reschedule(item, new, delay_ms)
        return await self._parked(claim, trace)

    async def _parked(self, claim: Claim, trace: Trace) -> Answer:
        await self._records.park(claim, held=True)
        trace.parked = "held"
        return held_answer(trace)

    async def refuse(self, job: Job, why: str, trace: Trace, error: GatewayError | None = None) -> Answer:
        """A held booking refused for good (its deadline passed, a gap in configuration, an operator):
        the record keeps the refusal as its final answer, the booking goes to the dead-letter stream."""
        error = error or _expired(self._sources[job.source].identity.hold_hours)
        answer = Answer(error.status, error_body(error), {"Content-Type": FHIR_JSON})
        await self._records.complete(job.claim, answer.status, answer.body)
        if job.held is not None:
            await self.store.bury(job.held, why)
        trace.unmatched = error
        return answer

    def _item(self, job: Job, why: str) -> HeldBooking:
        claim, source = job.claim, self._sources[job.source]
        booking, request = pack(self._sealer, claim.key, job.booking, job.request)
        accepted = claim.since_ms or claim.now_ms
        return HeldBooking(hold_id=hold_id(claim.key), record_key=claim.key, fingerprint=job.fp, source=job.source,
                           booking=booking, request=request, sealed=self._sealer is not None, accepted_ms=accepted,
                           deadline_ms=accepted + int(source.identity.hold_hours * 3_600_000), last_error=why,
                           identifiers=identifier_digests(job.source, job.booking.identifiers))

    def opened(self, item: HeldBooking) -> tuple[CanonicalBooking, BookingRequest]:
        return unpack(self._sealer, item.record_key, item.booking, item.request, sealed=item.sealed, kept_by="held")

    def amended(self, item: HeldBooking, booking: CanonicalBooking, request: BookingRequest) -> HeldBooking:
        """The held booking changed by a later message of the same appointment (its next version)."""
        raw_booking, raw_request = pack(self._sealer, item.record_key, booking, request)
        return msgspec.structs.replace(item, booking=raw_booking, request=raw_request, version=item.version + 1,
                                       identifiers=tuple(dict.fromkeys(
                                           (*item.identifiers, *identifier_digests(item.source, booking.identifiers)))))


def _expired(hours: float) -> GatewayError:
    return PatientUnknown(issues=[Issue(
        code="not-found", expression=("Appointment.participant",),
        diagnostics=f"the org did not come to know this booking's patient within {hours:g} hours; the booking "
                    "was not made (operators see it among the refused held bookings)")])
