"""The booking path, in the order data flows:
adapter -> canonical booking -> code maps -> Salesforce rules -> idempotency -> Salesforce -> answer.

`prepare` is pure (no I/O): the dry run and the CLI use it alone. `book` adds the idempotency record
and the Salesforce call; `deliver_queued` is the queue worker's way in. No booking is sent without
its record's lease, and no attempt that may follow one that reached Salesforce sends before looking
the booking up (`_deliver`): that is what makes each booking one appointment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import msgspec

from adapters import get_adapter
from adapters.hl7v2 import parse_siu
from gateway.canonical import CanonicalBooking
from gateway.booking.codemaps import EMPTY, SourceMaps
from gateway.errors import (
    CircuitOpen,
    GatewayError,
    IdempotencyKeyReused,
    InFlight,
    InvalidRequest,
    Issue,
    NotFound,
    PatientUnknown,
    PreconditionFailed,
    SalesforceFailed,
    SalesforceRefused,
    Unavailable,
    Unmatched,
    Unprocessable,
    http,
)
from gateway.booking.fhir import (
    FHIR_JSON,
    answered_version,
    appointment_body,
    appointment_content,
    booked_appointment,
    error_body,
    etag,
    operation_outcome,
    pack_content,
    unpack_content,
)
from gateway.state.idempotency import REDIS_FAILURES, Claim, IdempotencyStore, fingerprint, key_material
from gateway.state.links import BOOKED, CANCELLED, Links, Record
from gateway.booking.holding import Holding, held_answer
from gateway.booking.job import Answer, Job, Trace, pack, unpack
from gateway.booking.mapping import Mapped, cancellation_reason, map_booking, with_references
from gateway.state.holds import HeldBooking
from gateway.state.queue import BookingQueue, QueuedBooking
from gateway.booking.rules import check
from gateway.identity import EhrId, Found, IdentityRecord, Resolver
from gateway.identity.create import OPERATORS_DECIDE, NeedsOperator, PatientCreator
from gateway.salesforce.client import SalesforceClient
from gateway.salesforce.wire import BookingRequest, FoundSlots
from gateway.state.sealing import Sealer
from gateway.booking.slots import slot_resources, slots_request
from gateway.settings import SourceSettings

__all__ = ["Answer", "Booker", "Prepared", "Target", "Trace"]

_encoder = msgspec.json.Encoder()
# one answer for an id that does not exist and for one this source may not see
NO_SUCH_APPOINTMENT = "no appointment has that id (the id is the Salesforce id the gateway answered with)"


@dataclass(frozen=True, slots=True)
class Prepared:
    booking: CanonicalBooking
    mapped: Mapped

    @property
    def warnings(self) -> tuple[Issue, ...]:
        """What the mapping left out (a category with no map for its codings) and let pass."""
        return tuple(i for i in self.mapped.issues if i.severity == "warning")


@dataclass(frozen=True, slots=True)
class Target:
    """What a PUT changes, or a conditional create looks for: the Salesforce id, or the EHR's
    identifier to find it by (`any_system`: a value searched for under whatever system)."""

    salesforce_id: str | None = None
    system: str | None = None
    value: str | None = None
    any_system: bool = False


def identifier_target(token: str, where: str) -> Target:
    """A FHIR search token naming the EHR's identifier: `system|value` (in that system), `|value`
    (without one) or `value` (in any system, so it may match several appointments)."""
    system, bar, value = token.rpartition("|")
    if not value:
        raise InvalidRequest(f"{where} names one identifier: system|value", location=http(where))
    return Target(system=system or None, value=value) if bar else Target(value=value, any_system=True)


def if_none_exist(header: str | None) -> Target | None:
    """FHIR's conditional create: `If-None-Exist: identifier=system|value` (the one search parameter
    this gateway can answer from its links); any other is a 400."""
    if header is None:
        return None
    pairs = parse_qsl(header.strip().removeprefix("?"), keep_blank_values=True)
    if len(pairs) != 1 or pairs[0][0] != "identifier":
        raise InvalidRequest("If-None-Exist takes one search parameter: identifier=system|value",
                             location=http("If-None-Exist"))
    return identifier_target(pairs[0][1], "If-None-Exist")


class Booker:
    def __init__(
        self,
        sources: dict[str, SourceSettings],
        maps: dict[str, SourceMaps],
        store: IdempotencyStore | None = None,
        client: SalesforceClient | None = None,
        queue: BookingQueue | None = None,
        *,
        in_flight_retry_after: int = 2,
        in_doubt_settle_seconds: float = 60.0,
        sealer: Sealer | None = None,
        links: Links | None = None,
        resolver: Resolver | None = None,
        holding: Holding | None = None,
        creator: PatientCreator | None = None,
    ) -> None:
        self._sources = sources
        self._creator = creator  # unknown_patient = "create"
        self._resolver = resolver  # the EHR's ids as the org's records (gateway/identity)
        self._holding = holding  # bookings whose patient the org does not know yet
        self._links = links
        self._maps = maps
        self._adapters = {name: get_adapter(s.adapter) for name, s in sources.items() if s.adapter != "hl7v2"}
        self._store = store
        self._client = client
        self._queue = queue
        self._sealer = sealer  # patient data waiting in the queue is sealed at rest
        self._in_flight_retry_after = in_flight_retry_after
        self._settle_ms = int(in_doubt_settle_seconds * 1000)
        self._settle_retry_after = max(1, math.ceil(in_doubt_settle_seconds))

    @property
    def sources(self) -> dict[str, SourceSettings]:
        return self._sources

    def source(self, name: str) -> SourceSettings:
        found = self._sources.get(name)
        if found is None:
            raise NotFound("no source of that name is configured")  # the path's segment: no FHIRPath, no parameter
        return found

    def _fhir_adapter(self, source_name: str) -> Any:
        self.source(source_name)
        adapter = self._adapters.get(source_name)
        if adapter is None:
            raise NotFound("this source takes HL7 v2 over MLLP, not FHIR over HTTP")
        return adapter

    def _parse(self, source_name: str, body: bytes) -> CanonicalBooking:
        return self._fhir_adapter(source_name).parse(body)

    def prepare(self, source_name: str, body: bytes, trace: Trace | None = None) -> Prepared:
        """Parse, map and check; raises with every problem found, changes nothing anywhere."""
        return self.check(source_name, self._parse(source_name, body), trace)

    def check(self, source_name: str, booking: CanonicalBooking, trace: Trace | None = None) -> Prepared:
        """Map and check a parsed booking (an HL7 v2 message's arrives parsed)."""
        source = self.source(source_name)
        mapped = map_booking(booking, source, self._maps.get(source_name, EMPTY))
        issues = list(mapped.issues) + check(booking, mapped.request)
        if trace is not None:  # for the request log, refused or not
            trace.maps_version, trace.maps_used = mapped.maps_version, mapped.used
            trace.patient = patient.reference if (patient := booking.first("Patient")) else None
            trace.warnings = tuple(i for i in issues if i.severity == "warning")
        if any(i.severity in ("error", "fatal") for i in issues):
            raise Unprocessable(issues=sorted(issues, key=lambda i: i.severity != "error"))
        return Prepared(booking, mapped)

    async def book(self, source_name: str, body: bytes, key_header: str | None, trace: Trace,
                   *, retry_refusal: bool = False, condition: Target | None = None) -> Answer:
        """`retry_refusal`: an operator's replay; a refusal stored for this booking is forgotten so
        the booking is tried again (with the maps as they are now). `condition`: FHIR's conditional
        create (If-None-Exist): an appointment this source booked under that identifier is answered
        (200) and nothing is booked; several are 412; none, the booking goes on."""
        booking = self._parse(source_name, body)
        if condition is not None and (found := await self._existing(source_name, condition, trace)) is not None:
            return found
        return await self.book_prepared(source_name, self.check(source_name, booking, trace), key_header, trace,
                                        retry_refusal=retry_refusal)  # refusals found in prepare are never stored

    async def _existing(self, source_name: str, condition: Target, trace: Trace) -> Answer | None:
        """The appointment a conditional create names, as last answered (rebuilt from what its record
        keeps of that answer, sealed); None when this source booked none under that identifier."""
        assert self._links is not None
        salesforce_id, record = await self._find(source_name, condition, where="If-None-Exist")
        if salesforce_id is None:
            return None
        trace.salesforce_id, trace.result = salesforce_id, "replayed"  # answered from Redis, nothing sent
        headers = {"Content-Type": FHIR_JSON, "Location": _location(source_name, salesforce_id)}
        packed = self._links.content(source_name, salesforce_id, record) if record is not None else None
        if record is None or packed is None or record.answered is None:
            headers["ETag"] = etag(record.version if record is not None else 1)
            return Answer(200, _EXISTS, headers)
        headers["ETag"] = etag(record.answered)  # the version of what is shown
        return Answer(200, appointment_body(unpack_content(packed), salesforce_id, status=record.status,
                                            version=record.answered), headers)

    async def book_prepared(self, source_name: str, prepared: Prepared, key_header: str | None, trace: Trace,
                            *, retry_refusal: bool = False) -> Answer:
        assert self._store is not None and self._client is not None, "booking needs Redis and Salesforce"
        assert self._resolver is not None, "booking needs the identity resolver"
        fp = fingerprint(prepared.booking)
        material = key_material(key_header, prepared.booking, fp)
        trace.key_material = material
        key = self._store.record_key(source_name, material)
        ids = self._resolver.ids(source_name, prepared.booking)
        # the identity cache is asked with the claim: one round trip on the pipelined link, not two
        asked = self._resolver.ask_cache(ids)
        try:
            claim = await self._store.claim(key, fp)
        except BaseException:
            self._resolver.unread(asked)
            raise
        if retry_refusal and claim.state == "done" and claim.status >= 400 and await self._store.forget_refusal(key, fp):
            claim = await self._store.claim(key, fp)
        trace.idempotency = claim.state
        if claim.state not in ("new", "takeover"):
            self._resolver.unread(asked)  # answered without the booking's people
        if claim.state == "done":
            return _replayed(claim, prepared.booking, source_name)
        if claim.state == "queued":
            return _accepted()
        if claim.state == "held":
            return held_answer(trace)
        if claim.state == "busy":
            raise InFlight(
                "a booking with this idempotency key is still being processed",
                retry_after=max(1, min(self._in_flight_retry_after, claim.retry_after_ms // 1000 + 1)),
            )
        if claim.state == "mismatch":
            raise IdempotencyKeyReused(
                "this idempotency key was used before with a different booking", location=http("Idempotency-Key")
            )
        source = self.source(source_name)
        # a queue source keeps its lease through a failure, so the booking passes to the queue whole
        held = self._queue is not None and source.delivery == "queue"
        cached = await self._resolver.collect(ids, asked)
        job = Job(source_name, prepared.booking, prepared.mapped.request, claim, fp, hold=held, ids=ids, cached=cached)
        try:
            return await self._deliver(job, trace)
        except (Unavailable, SalesforceFailed) as failure:
            if not held:
                raise
            return await self._enqueue(job, fp, failure, trace)

    async def change(self, source_name: str, body: bytes, target: Target, key_header: str | None,
                     trace: Trace, *, allowed: tuple[str, ...] | None = None) -> Answer:
        """A PUT of a booked appointment: `status: cancelled` cancels it (Salesforce's PATCH), a booked
        one with other times, slot or participants reschedules it (Salesforce's PUT). Exactly once per
        idempotency key like a booking; both Salesforce calls are idempotent, so a lost answer is simply
        sent again on the retry. A cancelled appointment stays cancelled (Cerner's fixed paths, and
        FHIR's): changing it is 422. `allowed`: If-Match's tags (None: no If-Match), checked against
        the appointment's version as the change takes the next one; another is 412, nothing changed."""
        booking = self._parse(source_name, body)
        if booking.resource_path != "Appointment":
            raise InvalidRequest("an update's body is the Appointment itself, not $book Parameters",
                                 expression=("resourceType",))
        return await self.change_booking(source_name, booking, target, key_header, trace, allowed=allowed)

    async def change_booking(self, source_name: str, booking: CanonicalBooking, target: Target,
                             key_header: str | None, trace: Trace, *, allowed: tuple[str, ...] | None = None) -> Answer:
        assert self._store is not None
        if target.salesforce_id is not None:
            _same_id(booking, target.salesforce_id, required=True)
        status, mapped, reason = self._check_change(source_name, booking, trace)
        try:
            salesforce_id, record = await self._owned(source_name, target)
        except NotFound:
            if (held := await self._held(source_name, target)) is None:
                raise
            return await self._change_held(held, booking, status, mapped, trace)
        _same_id(booking, salesforce_id, required=False)  # a conditional update: the one it found
        fp = fingerprint(booking)
        material = f"u:{salesforce_id}:" + (f"h:{key_header}" if key_header is not None else fp)
        trace.key_material = material
        claim = await self._store.claim(self._store.record_key(source_name, material), fp)
        trace.idempotency = claim.state
        if claim.state == "done":
            return _replayed(claim, booking, source_name)
        if claim.state == "busy":
            raise InFlight("a change with this idempotency key is still being processed",
                           retry_after=max(1, min(self._in_flight_retry_after, claim.retry_after_ms // 1000 + 1)))
        if claim.state == "mismatch":
            raise IdempotencyKeyReused("this idempotency key was used before with a different change",
                                       location=http("Idempotency-Key"))
        if record.status == CANCELLED:
            await self._store.park(claim)
            raise Unprocessable(issues=[Issue(
                code="business-rule", expression=(f"{booking.resource_path}.status",),
                diagnostics="this appointment is cancelled; a cancelled appointment cannot be changed (book a new one)",
            )])
        if status != CANCELLED:  # a reschedule names its participants again: as the org's records
            try:
                mapped = msgspec.structs.replace(mapped, request=await self._resolved(source_name, booking,
                                                                                      mapped.request, trace))
            except GatewayError:
                await self._store.park(claim)
                raise
        return await self._send_change(source_name, booking, status, mapped, reason, salesforce_id, record, claim,
                                       allowed, trace)

    async def _resolved(self, source_name: str, booking: CanonicalBooking, request: BookingRequest,
                        trace: Trace) -> BookingRequest:
        """A change's request with the org's records: a participant it lacks is refused (422), a patient
        included (a change is not held: the appointment it changes was booked, with its patient)."""
        assert self._resolver is not None
        ids = self._resolver.ids(source_name, booking)
        try:
            found = await self._resolver.find(ids, trace.identity)
            return with_references(request, booking, self._resolver.references(booking, ids, found))
        except Unmatched as gap:
            trace.identity.unmatched = ("patient",) if isinstance(gap, PatientUnknown) else ("participant",)
            raise

    async def _held(self, source_name: str, target: Target) -> HeldBooking | None:
        """The held booking an identifier names (a change by Salesforce id cannot name one: it has none)."""
        if self._holding is None or target.value is None:
            return None
        try:
            return await self._holding.store.find(source_name, target.system, target.value, any_system=target.any_system)
        except REDIS_FAILURES:
            raise Unavailable("held bookings (Redis) cannot be read; nothing was changed", retry_after=5) from None

    async def _change_held(self, item: HeldBooking, booking: CanonicalBooking, status: str, mapped: Mapped,
                           trace: Trace) -> Answer:
        """A later message of an appointment still held for its patient applies to the held booking,
        under the booking's own record's lease (one being tried now is 409, sent again shortly): a
        cancel ends the hold, nothing having been booked; any other change replaces what is held, which
        is then tried at once."""
        assert self._store is not None and self._holding is not None
        claim = await self._claim_held(item)
        trace.idempotency = claim.state
        if claim.state != "takeover":  # being tried (busy), or just settled (done): the retry sees which
            raise InFlight("this appointment's held booking is being processed; send the change again shortly",
                           retry_after=self._in_flight_retry_after)
        try:
            if status == CANCELLED:
                await self._store.complete(claim, 422, _CANCELLED_WHILE_HELD)
                await self._holding.store.settle(item)
                trace.result = "cancelled"
                return Answer(200, _HELD_CANCELLED, {"Content-Type": FHIR_JSON})
            return await self._holding.keep(item, self._holding.amended(item, booking, mapped.request), 0, claim, trace)
        except REDIS_FAILURES:
            raise Unavailable("the held booking cannot be changed now (Redis); send the change again",
                              retry_after=5) from None

    async def _claim_held(self, item: HeldBooking) -> Claim:
        """The lease of a held booking's record, taken as the holds' worker takes it (not answered 202)."""
        assert self._store is not None
        return await self._store.claim(item.record_key, item.fingerprint, by_queue=True, since_ms=item.accepted_ms,
                                       held=True)

    def _check_change(self, source_name: str, booking: CanonicalBooking, trace: Trace) -> tuple[str, Mapped, str | None]:
        """A change's status, mapped request and cancellation reason, once it is one Salesforce can take."""
        source = self.source(source_name)
        maps = self._maps.get(source_name, EMPTY)
        trace.patient = patient.reference if (patient := booking.first("Patient")) else None
        status = (booking.status or "").lower()
        mapped = map_booking(booking, source, maps)
        reason = None
        if status == CANCELLED:
            # a cancellation needs only the appointment and its reason: the rest is not re-checked
            reason, issues, used = cancellation_reason(booking, maps)
            trace.maps_version, trace.maps_used = maps.version, used
            if issues:
                raise Unprocessable(issues=list(issues))
        elif status in (BOOKED, "pending", "proposed"):
            trace.maps_version, trace.maps_used = mapped.maps_version, mapped.used
            problems = list(mapped.issues) + check(booking, mapped.request)
            trace.warnings = tuple(i for i in problems if i.severity == "warning")
            if any(i.severity in ("error", "fatal") for i in problems):
                raise Unprocessable(issues=sorted(problems, key=lambda i: i.severity != "error"))
        else:
            raise Unprocessable(issues=[Issue(
                code="not-supported", expression=(f"{booking.resource_path}.status",),
                diagnostics=f"an appointment {status or 'without a status'} cannot be sent: Salesforce takes "
                            "reschedules (status booked) and cancellations (status cancelled)",
            )])
        return status, mapped, reason

    async def _send_change(self, source_name: str, booking: CanonicalBooking, status: str, mapped: Mapped,
                           reason: str | None, salesforce_id: str, record: Record, claim: Claim,
                           allowed: tuple[str, ...] | None, trace: Trace) -> Answer:
        """The claim holder's change: take the next version (If-Match checked), send, answer, record."""
        assert self._store is not None and self._client is not None and self._links is not None
        version = None
        try:
            version = await self._take_version(source_name, salesforce_id, allowed, claim.key, record)
            if status == CANCELLED:
                await self._client.cancel(salesforce_id, reason, booking.comment, mapped.request, trace.salesforce)
            else:
                await self._client.update(salesforce_id, mapped.request, trace.salesforce)
        except SalesforceRefused as refused:
            await self._give_back_version(source_name, salesforce_id, version, claim.key)  # nothing was changed
            if trace.salesforce.status == 404:  # Salesforce has no appointment with that id (any more)
                await self._store.park(claim)
                raise NotFound(NO_SUCH_APPOINTMENT) from None
            trace.refusal = refused
            answer = Answer(refused.status, error_body(refused), {"Content-Type": FHIR_JSON})
            await self._store.complete(claim, answer.status, answer.body)
            return answer
        except GatewayError:
            if not trace.salesforce.in_doubt:  # certainly not applied; else the version stays taken
                await self._give_back_version(source_name, salesforce_id, version, claim.key)
            await self._store.park(claim)  # the calls are idempotent: the retry may simply send again
            raise
        assert version is not None  # taken before the call
        new_status = CANCELLED if status == CANCELLED else BOOKED
        trace.salesforce_id, trace.result = salesforce_id, ("cancelled" if new_status == CANCELLED else "rescheduled")
        location = _location(source_name, salesforce_id)
        content = appointment_content(booking)
        answer = Answer(200, appointment_body(content, salesforce_id, status=new_status, version=version),
                        {"Content-Type": FHIR_JSON, "Location": location, "ETag": etag(version)})
        await self._store.complete(claim, 200, answer.body, location)
        try:
            await self._links.write(self._links.writes(source_name, salesforce_id, new_status, version,
                                                       booking.identifiers, pack_content(content)))
        except REDIS_FAILURES:
            pass  # Salesforce has the change; without the status here, Salesforce itself judges the next one
        return answer

    async def _take_version(self, source_name: str, salesforce_id: str, allowed: tuple[str, ...] | None,
                            owner: str, record: Record) -> int:
        """The appointment's next version, taken for this change before it is sent, so If-Match is
        checked against what no other change can move meanwhile; a version If-Match does not name is 412."""
        assert self._links is not None
        try:
            ok, version = await self._links.take_version(source_name, salesforce_id, allowed, owner, record)
        except REDIS_FAILURES:
            raise Unavailable("the appointment's record (Redis) is unavailable; nothing was sent", retry_after=5) from None
        if not ok:
            raise PreconditionFailed(
                f"If-Match names another version of this appointment (it is at {etag(version)}); nothing was changed",
                location=http("If-Match"))
        return version

    async def _give_back_version(self, source_name: str, salesforce_id: str, version: int | None, owner: str) -> None:
        if version is None or self._links is None:
            return
        try:
            await self._links.give_back_version(source_name, salesforce_id, version, owner)
        except REDIS_FAILURES:
            pass  # the version stays taken: a stale If-Match is refused, never a change lost

    async def _owned(self, source_name: str, target: Target) -> tuple[str, Record]:
        """The Salesforce id a change names and its record, only for an appointment this source
        booked: its identifier's link, or the appointment's own record (both kept per source). Any
        other appointment, of another source or never booked here, is the same 404 as an id that
        does not exist, before anything is sent: a source can neither change nor find it."""
        salesforce_id, record = await self._find(source_name, target)
        if salesforce_id is None:
            if target.salesforce_id is None:
                raise NotFound("no appointment with that identifier was booked through this gateway",
                               location=http("identifier"))
            raise NotFound(NO_SUCH_APPOINTMENT)
        # a link is this source's: booked here (before records of status, if it is old)
        return salesforce_id, record or Record(BOOKED, 1)

    async def _find(self, source_name: str, target: Target, *, where: str = "identifier",
                    ) -> tuple[str | None, Record | None]:
        """The one appointment of this source a target names, and its record: (None, None) for none;
        several (an identifier value under more than one system, or one identifier booked twice) is
        412, since FHIR's conditional update and create may act only on one."""
        assert self._links is not None
        try:
            if target.salesforce_id is not None:
                record = await self._links.record(source_name, target.salesforce_id)
                return (target.salesforce_id, record) if record is not None else (None, None)
            assert target.value is not None
            found = await self._links.resolve(source_name, target.system, target.value, any_system=target.any_system)
            if len(found) > 1:
                raise PreconditionFailed(issues=[Issue(
                    code="multiple-matches", location=http(where),
                    diagnostics=f"{len(found)} appointments of this source have that identifier; name one by its "
                                "system|value or its id; nothing was changed")])
            return (found[0], await self._links.record(source_name, found[0])) if found else (None, None)
        except REDIS_FAILURES:
            raise Unavailable("the appointment's record (Redis) is unavailable; nothing was sent", retry_after=5) from None

    async def find_slots(self, source_name: str, params: Any, trace: Trace) -> FoundSlots:
        """A slot search (gateway/booking/slots.py): its codes mapped as a booking's, then Salesforce's Get Slots."""
        assert self._client is not None and self._resolver is not None
        self._fhir_adapter(source_name)
        source = self.source(source_name)
        maps = self._maps.get(source_name, EMPTY)
        search = slots_request(params, source, maps)
        trace.maps_version, trace.maps_used = maps.version, search.used
        # the actors as the org's records: Get Slots takes HPF and Asset ids, never the EHR's
        actors = list(search.actors)
        ids = self._resolver.ids_of(source_name, actors + ([search.location] if search.location else []))
        found = await self._resolver.find(ids, trace.identity)
        located = (search.location, ids[-1]) if search.location else None
        records = self._resolver.resources(actors, ids[:len(actors)], found, located)
        request = msgspec.structs.replace(search.request, resources=slot_resources(search.actors, records))
        slots = await self._client.get_slots(request, trace.salesforce)
        trace.result = "ok"
        # each slot's schedule named as the search named its actor
        named = {r: a.value for a, rs in zip(actors, records) for r in rs}
        return msgspec.structs.replace(slots, slots=tuple(
            msgspec.structs.replace(s, resource_id=named.get(s.resource_id, s.resource_id)) for s in slots.slots))

    async def deliver_queued(self, item: QueuedBooking, trace: Trace) -> str:
        """The queue worker's attempt at one entry: 'done' (booked, adopted, refused or already
        settled), 'retry' (Salesforce still cannot take it), 'paused' (the circuit is open: not
        tried) or 'busy' (someone else holds the lease)."""
        assert self._store is not None
        claim = await self._store.claim(item.record_key, item.fingerprint, by_queue=True, since_ms=item.since_ms)
        trace.idempotency = claim.state
        if claim.state in ("done", "mismatch"):
            return "done"
        if claim.state == "busy":
            return "busy"
        booking, request = unpack(self._sealer, item.record_key, item.booking, item.request, sealed=item.sealed,
                                  kept_by="queued")
        job = Job(item.source, booking, request, claim, item.fingerprint, origin="queue", resolved=item.resolved)
        try:
            await self._deliver(job, trace)
        except CircuitOpen as paused:
            trace.paused_for = paused.retry_after  # Salesforce was not tried: no attempt spent
            return "paused"
        except (Unavailable, SalesforceFailed):
            return "retry"
        return "done"

    async def _deliver(self, job: Job, trace: Trace) -> Answer:
        """The lease holder's work: the participants as the org's records, settle an earlier attempt's
        doubt, send, and store the outcome. On a transient failure the record is parked (in doubt if
        this attempt may have reached Salesforce) and the error raised; `trace.parked` then says the
        lease was given back."""
        assert self._store is not None and self._client is not None
        claim = job.claim
        if not job.resolved:
            refs = self._resolver.ready(job.booking, job.ids, job.cached, trace.identity) if self._resolver else None
            if refs is not None:  # the same people as lately: their references, no look-up
                job.request, job.resolved = with_references(job.request, job.booking, refs), True
            elif (stopped := await self._identify(job, trace)) is not None:
                return stopped  # held for its patient, or refused for good
        if claim.doubt:
            # never re-send blind: an earlier attempt may have booked it
            try:
                found = await self._client.find_booking(job.request, claim.since_ms, trace.lookup)
            except CircuitOpen:
                trace.looked_up = "failed"
                await self._park(job, trace, in_doubt=False)
                raise
            except GatewayError:
                trace.looked_up = "failed"
                await self._park(job, trace, in_doubt=False)
                raise Unavailable(
                    "an earlier attempt's outcome is unknown and Salesforce cannot be asked yet; nothing was sent",
                    retry_after=self._settle_retry_after,
                ) from None
            trace.looked_up = "found" if found else "absent"
            if found:
                return await self._finish(job, found, trace, adopted=True)
            wait_ms = self._settle_ms - (claim.now_ms - claim.sent_ms)
            if wait_ms > 0:
                # Salesforce may still be working on the earlier request: wait before sending again
                await self._park(job, trace, in_doubt=False)
                raise Unavailable(
                    "an earlier attempt's outcome is not settled yet; nothing was sent",
                    retry_after=max(1, math.ceil(wait_ms / 1000)),
                )
        for resent in (False, True):
            try:
                booked = await self._client.book(job.request, trace.salesforce)
            except SalesforceRefused as refused:
                # Salesforce's own refusal (its error shape) stored nothing: this booking's final answer
                trace.refusal = refused
                answer = Answer(refused.status, error_body(refused), {"Content-Type": FHIR_JSON})
                await self._store.complete(claim, answer.status, answer.body)
                return answer
            except GatewayError as failure:
                if not trace.salesforce.in_doubt:
                    await self._park(job, trace, in_doubt=False)  # certainly not sent, or not processed
                    raise
                # any other answer may follow a stored booking: look before anything is sent again
                try:
                    found = await self._client.find_booking(job.request, claim.since_ms, trace.lookup)
                    trace.looked_up = "found" if found else "absent"
                except GatewayError:
                    found, trace.looked_up = None, "failed"
                if found:
                    return await self._finish(job, found, trace, adopted=True)
                if trace.salesforce.reauthenticated and trace.looked_up == "absent" and not resent:
                    # a 401, and the look-up with the renewed token finds nothing: send it once more
                    trace.salesforce.reauthenticated = trace.salesforce.in_doubt = False
                    continue
                if trace.salesforce.answered and trace.looked_up == "absent":
                    # Salesforce answered in full, in its own shape: it is done with the request, and
                    # the look-up is final. The next attempt sends at once, with no settle window.
                    await self._park(job, trace, in_doubt=False)
                    failure.retry_after = failure.retry_after or 1
                    raise
                await self._park(job, trace, in_doubt=True)
                failure.retry_after = failure.retry_after or self._settle_retry_after
                raise
            return await self._finish(job, booked.id, trace)
        raise AssertionError("unreachable: the second pass returns or raises")

    async def _identify(self, job: Job, trace: Trace) -> Answer | None:
        """The job's request with the org's records for the EHR's ids (gateway/identity). A patient the
        org does not know yet goes to the source's policy (`_unknown_patient`); any other gap is
        refused (`_refuse`). A failure to ask the org is raised with the lease given back, as a failed
        Book is."""
        assert self._resolver is not None
        resolver = self._resolver
        ids = job.ids = job.ids or resolver.ids(job.source, job.booking)
        try:
            found = await resolver.find(ids, trace.identity, job.cached, fresh=job.origin == "hold" and job.cached is None)
            try:
                references = resolver.references(job.booking, ids, found)
            except PatientUnknown as unknown:
                trace.identity.patient_unknown = True
                found = dict(found)  # the policy may add the patient it created: not to the cache's answer
                if (stopped := await self._unknown_patient(job, found, unknown, trace)) is not None:
                    return stopped
                references = resolver.references(job.booking, ids, found)  # the patient created: found now
        except Unmatched as gap:
            trace.identity.unmatched = _kinds(gap, job.booking, ids)
            return await self._refuse(job, gap, trace)
        except GatewayError:
            await self._park(job, trace, in_doubt=False)
            raise
        job.request, job.resolved = with_references(job.request, job.booking, references), True
        return None

    async def _unknown_patient(self, job: Job, found: dict[EhrId, Found], unknown: PatientUnknown,
                               trace: Trace) -> Answer | None:
        """The source's `unknown_patient` policy: `hold` (the 202 answered), `refuse` (`unknown` raised,
        a gap like any other), or `create` (None: the patient is in `found` now). A patient that cannot
        be created without a person deciding is held for the operators, and not created again on its
        next tries."""
        assert self._resolver is not None
        policy = self.source(job.source).identity.unknown_patient
        held_for_operators = job.held is not None and job.held.last_error in OPERATORS_DECIDE
        if policy == "create" and self._creator is not None and not held_for_operators:
            patient = job.booking.first("Patient")
            assert patient is not None  # PatientUnknown names the booking's patient
            ehr = job.ids[job.booking.participants.index(patient)]
            try:
                account = await self._creator.create(job.source, job.booking, patient, ehr, trace.identity)
            except NeedsOperator as why:
                return await self._hold(job, trace, why.reason)
            found[ehr] = Found(records=(account,))
            trace.identity.created = True
            await self._resolver.remember(ehr, found[ehr])
            return None
        if held_for_operators:
            return await self._hold(job, trace, job.held.last_error)  # type: ignore[union-attr,arg-type]
        if policy in ("hold", "create"):
            return await self._hold(job, trace, "patient-unknown")
        raise unknown

    async def _hold(self, job: Job, trace: Trace, why: str) -> Answer:
        if self._holding is None:
            raise Unavailable("bookings cannot be held here; send it again later", retry_after=60)
        return await self._holding.hold(job, trace, why)

    async def _refuse(self, job: Job, error: Unmatched, trace: Trace) -> Answer:
        """A participant the org lacks: an EHR's request is refused at once (nothing kept); a queued or
        held booking keeps the refusal as its final answer (a held one goes to its dead letters)."""
        assert self._store is not None
        if job.origin == "request":
            await self._store.park(job.claim)  # released: nothing of it stays (a doubt stays a doubt)
            trace.parked = "released"
            raise error
        if job.held is not None and self._holding is not None:
            return await self._holding.refuse(job, "unmatched", trace, error)
        answer = Answer(error.status, error_body(error), {"Content-Type": FHIR_JSON})
        await self._store.complete(job.claim, answer.status, answer.body)
        trace.unmatched = error
        return answer

    async def prefetch(self, items: list[HeldBooking], record: IdentityRecord) -> dict[EhrId, Found] | None:
        """The held bookings' people asked of the org together, once (the ids not yet known, however
        recently missed: a hold's tries are spaced already): one call for a batch, where each asking
        alone would make one each. None when the org cannot be asked: each try then finds out alone."""
        if self._resolver is None or self._holding is None:
            return None
        ids: list[EhrId] = []
        for item in items:
            try:
                ids += self._resolver.ids(item.source, self._holding.opened(item)[0])
            except (GatewayError, msgspec.DecodeError, msgspec.ValidationError):
                continue
        try:
            return await self._resolver.find(ids, record, fresh=True)
        except GatewayError:
            return None

    async def release_held(self, item: HeldBooking, trace: Trace, found: dict[EhrId, Found] | None = None) -> str:
        """One try of a held booking, under its record's lease: 'booked' (or adopted, or refused by
        Salesforce: 'refused'), 'held' (its patient still unknown: tried later), 'unmatched' (a gap
        now, or the deadline passed: refused for good), 'done' (already settled), 'busy' (another holds
        the lease), 'paused' (the circuit is open) or 'retry' (the org could not be asked or booked)."""
        assert self._store is not None and self._holding is not None
        holds = self._holding.store
        claim = await self._claim_held(item)
        trace.idempotency = claim.state
        if claim.state in ("done", "mismatch"):
            await holds.settle(item)  # booked, refused or cancelled meanwhile: the hold is over
            return "done"
        if claim.state == "busy":
            await holds.reschedule(item, item, self._holding.delay_ms(0))
            return "busy"
        # what is held now: a change may have replaced it between the take and this lease (none can after)
        current = await holds.get(item.source, item.hold_id)
        if current is None:
            await self._store.park(claim)
            return "done"
        item = current
        booking, request = self._holding.opened(item)
        job = Job(item.source, booking, request, claim, item.fingerprint, origin="hold", held=item, cached=found)
        try:
            answer = await self._deliver(job, trace)
        except CircuitOpen as paused:
            await holds.reschedule(item, item, (paused.retry_after or 5) * 1000)
            trace.paused_for = paused.retry_after
            return "paused"
        except (Unavailable, SalesforceFailed) as failure:
            why = failure.issues[0].details_code or trace.salesforce.error_code or type(failure).__name__
            again = msgspec.structs.replace(item, attempts=item.attempts + 1, last_error=why)
            await holds.reschedule(item, again, self._holding.delay_ms(again.attempts))
            return "retry"
        if answer.status == 202:
            return "held"
        if trace.unmatched is not None:
            return "unmatched"
        await holds.settle(item)
        return "refused" if answer.status >= 400 else "booked"

    # -- what operators ask of identity and holds -------------------------------------------------

    async def check_identity(self, source_name: str, body: bytes) -> list[dict[str, Any]]:
        """How each participant of a booking (FHIR, or an HL7 v2 message for an hl7v2 source) resolves
        in the org, nothing booked: its element, kind, SourceSystem, record, or why it has none. The
        EHR's ids are not repeated (the caller has them in its file)."""
        assert self._resolver is not None
        source = self.source(source_name)
        booking = (parse_siu(body, source.time_zone).booking if source.adapter == "hl7v2"
                   else self._parse(source_name, body))
        ids = self._resolver.ids(source_name, booking)
        found = await self._resolver.find(ids, IdentityRecord())
        return [{"element": p.path, "kind": i.kind, "source_system": i.system, "by": "identifier" if p.system else "id",
                 "record": record, "problem": issue.code if issue else None,
                 "why": issue.diagnostics if issue else None}
                for p, i, (record, issue) in zip(booking.participants, ids, self._resolver.explain(booking, ids, found))]

    async def held(self, source_name: str) -> list[HeldBooking]:
        assert self._holding is not None
        return await self._holding.store.list(source_name)

    def held_patient(self, item: HeldBooking) -> str | None:
        """Whom a held booking waits for (patient data: for PHI operators only)."""
        assert self._holding is not None
        booking, _ = self._holding.opened(item)
        patient = booking.first("Patient")
        if patient is None:
            return None
        return f"{patient.system}|{patient.value}" if patient.system else patient.reference

    async def release_now(self, source_name: str, hold: str) -> bool:
        """An operator's release: the held booking is tried at the next turn of the holds' worker."""
        assert self._holding is not None
        return await self._holding.store.release_now(source_name, hold)

    async def refuse_held(self, source_name: str, hold: str) -> bool:
        """An operator gives a held booking up: the record keeps the refusal, the hold its dead letter.
        False when no such booking is held; InFlight when it is being tried right now."""
        assert self._store is not None and self._holding is not None
        item = await self._holding.store.get(source_name, hold)
        if item is None:
            return False
        claim = await self._claim_held(item)
        if claim.state == "busy":
            raise InFlight("this held booking is being tried right now; refuse it again shortly",
                           retry_after=self._in_flight_retry_after)
        if claim.state != "takeover":  # settled meanwhile (booked, refused or cancelled)
            await self._holding.store.settle(item)
            return False
        booking, request = self._holding.opened(item)
        job = Job(source_name, booking, request, claim, item.fingerprint, origin="hold", held=item)
        await self._holding.refuse(job, "refused-by-operator", Trace(), _REFUSED_BY_OPERATOR)
        return True

    async def _finish(self, job: Job, salesforce_id: str, trace: Trace, *, adopted: bool = False) -> Answer:
        assert self._store is not None
        trace.adopted = adopted
        trace.salesforce_id = salesforce_id
        content = appointment_content(job.booking)
        answer = Answer(201, appointment_body(content, salesforce_id, version=1),
                        {"Content-Type": FHIR_JSON, "Location": _location(job.source, salesforce_id), "ETag": etag(1)})
        links = (self._links.writes(job.source, salesforce_id, BOOKED, 1, job.booking.identifiers, pack_content(content))
                 if self._links else None)
        if self._store.writes_links or links is None:  # in the answer's own script: no extra round trip
            await self._store.complete_booked(job.claim, salesforce_id, links, self._links.ttl_ms if self._links else 0)
        else:
            await self._store.complete_booked(job.claim, salesforce_id)
            try:
                await self._links.write(links)  # type: ignore[union-attr]
            except REDIS_FAILURES:
                pass  # booked and answered; a later change finds it by a look-up instead
        return answer

    async def _park(self, job: Job, trace: Trace, *, in_doubt: bool) -> None:
        assert self._store is not None
        job.in_doubt = in_doubt or job.claim.doubt
        if job.hold:
            return
        await self._store.park(job.claim, in_doubt=in_doubt)
        trace.parked = "in-doubt" if job.in_doubt else "released"

    async def _enqueue(self, job: Job, fp: str, failure: GatewayError, trace: Trace) -> Answer:
        """Salesforce cannot take it now: the durable queue takes the booking over, answered 202.
        The entry is written before the record says 'queued', so a crash between the two leaves a
        lapsing lease (the next holder looks before sending), never a record with no entry."""
        assert self._store is not None and self._queue is not None
        claim = job.claim
        booking, request = pack(self._sealer, claim.key, job.booking, job.request)
        item = QueuedBooking(
            record_key=claim.key, fingerprint=fp, source=job.source, sealed=self._sealer is not None,
            request=request, booking=booking,
            accepted_ms=claim.now_ms, since_ms=claim.since_ms, resolved=job.resolved,
            last_error=failure.issues[0].details_code or trace.salesforce.error_code or type(failure).__name__,
        )
        try:
            await self._queue.add(item)
        except REDIS_FAILURES:
            await self._store.park(claim, in_doubt=job.in_doubt)
            raise Unavailable("Salesforce is unavailable and the queue cannot be written", retry_after=5) from None
        await self._store.park(claim, in_doubt=job.in_doubt, queued=True)
        trace.parked = "queued"
        return _accepted()


def _kinds(gap: Unmatched, booking: CanonicalBooking, ids: list[EhrId]) -> tuple[str, ...]:
    """The kinds of the participants a refusal names (for the metric by kind)."""
    named = {e for i in gap.issues for e in i.expression}
    return tuple(dict.fromkeys(i.kind for i, p in zip(ids, booking.participants) if p.path in named))


def _same_id(booking: CanonicalBooking, salesforce_id: str, *, required: bool) -> None:
    """FHIR's update: the body's id is the appointment's (the URL's, or the one a conditional update
    found); missing, it is refused only where the URL names the appointment. Nothing is changed."""
    if booking.resource_id == salesforce_id or (booking.resource_id is None and not required):
        return
    path = f"{booking.resource_path}.id"
    raise InvalidRequest(
        f"{path} is missing: an update's body carries the appointment's id, as in the URL" if booking.resource_id is None
        else f"{path} differs from the id of the appointment the request names", expression=(path,))


def _location(source: str, salesforce_id: str) -> str:
    return f"/fhir/{source}/Appointment/{salesforce_id}"


def _replayed(claim: Claim, booking: CanonicalBooking, source: str) -> Answer:
    headers = {"Content-Type": FHIR_JSON, "Idempotent-Replayed": "true"}
    body, location = claim.body, claim.location
    version = answered_version(body) if claim.status < 300 and body else None  # a change's stored answer
    if claim.salesforce_id:  # the same fingerprint, so the same booking: the same body as the first answer
        version = 1 if claim.versioned else None
        body = booked_appointment(booking, claim.salesforce_id, version=version)
        location = _location(source, claim.salesforce_id)
    if location:
        headers["Location"] = location
    if version is not None:
        headers["ETag"] = etag(version)
    return Answer(claim.status, body, headers)


# a conditional create's match whose answer is not kept (no data key, or booked before answers were)
_EXISTS = operation_outcome([Issue(
    code="informational", severity="information",
    diagnostics="an appointment this source booked has that identifier, so nothing was booked; Location names "
                "it (its content is not kept by this gateway)",
)])

_REFUSED_BY_OPERATOR = Unprocessable(issues=[Issue(
    code="business-rule", expression=("Appointment.participant",),
    diagnostics="an operator refused this booking while it was held for its patient; it was never booked")])
# the final answer of a held booking whose appointment was cancelled before its patient was known
_CANCELLED_WHILE_HELD = operation_outcome([Issue(
    code="business-rule", diagnostics="this appointment was cancelled while it was held for its patient; it was "
                                      "never booked in Salesforce")])
_HELD_CANCELLED = operation_outcome([Issue(
    code="informational", severity="information",
    diagnostics="the appointment was held for its patient and is now cancelled: the hold ended and nothing was "
                "booked in Salesforce")])

_ACCEPTED = operation_outcome([Issue(
    code="informational", severity="information",
    diagnostics="Salesforce cannot take the booking now; it is held in the durable queue and will be "
                "delivered. Send the same request again to learn the outcome.",
)])


def _accepted() -> Answer:
    return Answer(202, _ACCEPTED, {"Content-Type": FHIR_JSON, "Retry-After": "30"})
