"""What the booking path carries from step to step: one request's `Trace` (what its summary says),
the `Answer` it gives, the `Job` a record's lease holder works on, and a booking as the queue and the
holds keep it (`pack`, `unpack`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import msgspec

from gateway.canonical import CanonicalBooking
from gateway.errors import GatewayError, Issue, SalesforceRefused, Unavailable
from gateway.identity import EhrId, Found, IdentityRecord
from gateway.outbound.calls import CallRecord
from gateway.salesforce.wire import BookingRequest
from gateway.state.holds import HeldBooking
from gateway.state.idempotency import Claim
from gateway.state.sealing import Sealer

_encoder = msgspec.json.Encoder()


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
    lookup: CallRecord = field(default_factory=CallRecord)
    looked_up: str | None = None  # found | absent | failed: the check of an earlier attempt
    adopted: bool = False  # answered with the appointment an earlier attempt made
    parked: str | None = None  # released | in-doubt | queued | held: the lease given back without an answer
    paused_for: int | None = None  # the circuit was open: seconds until Salesforce may be tried
    maps_version: str | None = None
    maps_used: tuple[str, ...] = ()
    patient: str | None = None  # PHI: only ever sealed into the request log
    key_material: str | None = None  # what the idempotency record is keyed on (may hold identifiers)
    warnings: tuple[Issue, ...] = ()  # what the mapping left out: shown in $translate and the request log
    salesforce_id: str | None = None
    refusal: SalesforceRefused | None = None  # Salesforce refused: answered (422), not raised
    result: str | None = None  # what a 200 did: "rescheduled" or "cancelled" (a PUT), "ok" (a search)
    identity: IdentityRecord = field(default_factory=IdentityRecord)
    unmatched: GatewayError | None = None  # a participant the org lacks, answered (stored) rather than raised
    request_id: str | None = None  # this request's log entry: a held booking's 202 names it


Origin = Literal["request", "queue", "hold"]


class Job:
    """One booking in the hands of its record's lease holder: from an EHR's request, the durable
    queue, or the holds (a booking held for its patient, `held`)."""

    __slots__ = ("source", "booking", "request", "claim", "fp", "hold", "in_doubt", "origin", "ids", "cached",
                 "resolved", "held")

    def __init__(self, source: str, booking: CanonicalBooking, request: BookingRequest, claim: Claim, fp: str, *,
                 origin: Origin = "request", hold: bool = False, resolved: bool = False,
                 ids: list[EhrId] | None = None, cached: dict[EhrId, Found] | None = None,
                 held: HeldBooking | None = None) -> None:
        self.source, self.booking, self.request, self.claim, self.fp = source, booking, request, claim, fp
        self.origin = origin
        self.hold = hold  # keep the lease through a failure (the caller hands the booking to the queue)
        self.in_doubt = False  # this or an earlier attempt may have reached Salesforce
        self.resolved = resolved  # `request` names the org's records, not the EHR's ids
        self.ids = ids or []  # each participant's EHR id as the org keeps it
        self.cached = cached  # what the identity cache already said of them
        self.held = held  # the hold this job releases (origin "hold")


def pack(sealer: Sealer | None, record_key: str, booking: CanonicalBooking,
         request: BookingRequest) -> tuple[bytes, bytes]:
    """A booking and its request as the queue and the holds keep them: JSON, sealed under the data key
    and bound to their idempotency record when the gateway has one (they carry patient data)."""
    raw_booking, raw_request = _encoder.encode(booking), _encoder.encode(request)
    if sealer is None:
        return raw_booking, raw_request
    context = record_key.encode()
    return sealer.seal(raw_booking, context), sealer.seal(raw_request, context)


def unpack(sealer: Sealer | None, record_key: str, booking: bytes, request: bytes, *, sealed: bool,
           kept_by: str) -> tuple[CanonicalBooking, BookingRequest]:
    """What `pack` kept, read back; Unavailable when it is sealed and this gateway has no data key."""
    if sealed:
        if sealer is None:
            raise Unavailable(f"a {kept_by} booking is sealed and this gateway has no data key")
        context = record_key.encode()
        booking, request = sealer.open(booking, context), sealer.open(request, context)
    return msgspec.json.decode(booking, type=CanonicalBooking), msgspec.json.decode(request, type=BookingRequest)
