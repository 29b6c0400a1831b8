"""Epic: availability and booking through its STU3 operations (`Appointment/$find`, `$book`), reads
through STU3 Appointment and Slot, and cancels through its incoming HL7 v2 scheduling interface over
MLLP, since Epic publishes no FHIR cancel (scheduling-out.md §3 "Epic").

- A slot is a *proposed* appointment of `$find`; its id is what `$book` takes. `read_slot` reads it
  with STU3 `Slot.Read` (the proposed appointment's id is its slot's): free or busy as Epic says now,
  where MuleSoft's support stops at "partial".
- `$book` carries no identifier of ours, so a booking whose answer was lost is found by searching the
  patient's appointments on that day and matching start and practitioner.
- A cancel is `SRM^S04` (a request to cancel, sent by a system that is not the scheduling authority;
  `SIU^S15` notifies a cancel the filler already made, the other way round), ARQ-2 the Epic
  appointment id, then the appointment read back. The message carries the patient (PID-3) so Epic
  can check it; no error here repeats it.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta, timezone

import hl7
import msgspec

from gateway.canonical import Coding
from gateway.ehr.base import EhrClient, segment
from gateway.ehr.model import BookRequest, EhrAppointment, EhrSlot, SlotQuery
from gateway.errors import EhrFailed, EhrRefused, NotFound, Unavailable
from gateway.outbound.calls import CallRecord
from gateway.outbound.http import Lost, NeverSent
from gateway.outbound.mllp import MllpClient

HL7_VERSION = "2.5.1"
_UNKNOWN_KEY = "204"  # HL7 table 0357: unknown key identifier


# -- the STU3 shapes read --------------------------------------------------------------------------------

class _Reference(msgspec.Struct):
    reference: str | None = None


class _Concept(msgspec.Struct):
    coding: list[Coding] = []


class _Participant(msgspec.Struct):
    actor: _Reference | None = None


class _Meta(msgspec.Struct, rename="camel"):
    version_id: str | None = None


class _Issue(msgspec.Struct):
    severity: str = "error"
    code: str = "unknown"


class _Resource(msgspec.Struct, rename="camel"):
    """A Bundle entry's resource: an Appointment or an OperationOutcome (others are skipped)."""

    resource_type: str
    id: str | None = None
    status: str | None = None
    start: str | None = None
    end: str | None = None
    participant: list[_Participant] = []
    service_type: list[_Concept] = []
    meta: _Meta | None = None
    issue: list[_Issue] = []


class _Entry(msgspec.Struct):
    resource: _Resource | None = None


class _Bundle(msgspec.Struct, rename="camel"):
    resource_type: str
    entry: list[_Entry] = []


class _Schedule(msgspec.Struct, rename="camel"):
    resource_type: str
    actor: list[_Reference] = []


class _Slot(msgspec.Struct, rename="camel"):
    resource_type: str
    id: str
    status: str
    start: str
    end: str
    schedule: _Reference | None = None
    service_type: list[_Concept] = []


def _actor(participants: list[_Participant], kind: str) -> str | None:
    for p in participants:
        ref = p.actor.reference if p.actor is not None else None
        if ref and ref.startswith(f"{kind}/"):
            return ref.removeprefix(f"{kind}/")
    return None


def _codings(concepts: list[_Concept]) -> tuple[Coding, ...]:
    return tuple(c for concept in concepts for c in concept.coding)


def _moment(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def _escape(value: str) -> str:
    """A value as an HL7 field holds it in the standard delimiters (no line breaks)."""
    out = value.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\")
    return out.replace("~", "\\R\\").replace("\r", " ").replace("\n", " ")


class EpicClient(EhrClient):
    dialect = "epic"
    # Epic's ids run past R4's 64 characters (its $book example's proposed appointment id has 66; 70 and
    # more are reported for its R4 resources): the id type's alphabet, to a limit of its own
    longest_id = 256

    # -- reading answers

    def _bundle(self, content: bytes, what: str, record: CallRecord) -> list[_Resource]:
        bundle = self.decoded(content, _Bundle, record, what)
        if bundle.resource_type != "Bundle":
            raise EhrFailed(f"the {self.source} EHR's answer to {what} is no Bundle")
        resources = [e.resource for e in bundle.entry if e.resource is not None]
        failed = [i for r in resources if r.resource_type == "OperationOutcome" for i in r.issue
                  if i.severity in ("error", "fatal")]
        if failed:  # Epic reports some refusals as an outcome entry of a 200
            raise EhrRefused(f"the {self.source} EHR refused {what}: {failed[0].code[:64]}")
        return resources

    def _appointment(self, r: _Resource) -> EhrAppointment:
        if not r.id or not r.status:
            raise EhrFailed(f"the {self.source} EHR answered an appointment without id or status")
        version = r.meta.version_id if r.meta is not None else None
        return EhrAppointment(id=r.id, status=r.status, start=r.start, end=r.end, version=version,
                              patient=_actor(r.participant, "Patient"),
                              practitioner=_actor(r.participant, "Practitioner"),
                              location=_actor(r.participant, "Location"), service_types=_codings(r.service_type))

    # -- availability

    async def find_slots(self, query: SlotQuery, record: CallRecord) -> list[EhrSlot]:
        """`$find` in Epic's names; each proposed appointment becomes a free slot."""
        parameters: list[dict[str, object]] = [{"name": "startTime", "valueDateTime": query.start},
                                               {"name": "endTime", "valueDateTime": query.end}]
        parameters += [{"name": "service-type", "valueCodeableConcept": {"coding": [msgspec.to_builtins(c)]}}
                       for c in query.service_types]
        parameters += [{"name": "provider", "valueReference": {"reference": f"Practitioner/{p}"}}
                       for p in query.practitioners]
        parameters += [{"name": "location", "valueReference": {"reference": f"Location/{loc}"}}
                       for loc in query.locations]
        response = await self.call("POST", "/Appointment/$find", record,
                                   body={"resourceType": "Parameters", "parameter": parameters})
        if response.status != 200:
            raise self.failure(response, record, "the availability search")
        slots = [EhrSlot(id=r.id, start=r.start, end=r.end, practitioner=_actor(r.participant, "Practitioner"),
                         location=_actor(r.participant, "Location"), service_types=_codings(r.service_type))
                 for r in self._bundle(response.content, "the availability search", record)
                 if r.resource_type == "Appointment" and r.status == "proposed" and r.id and r.start and r.end]
        record.matches = len(slots)
        return sorted(slots, key=lambda s: _moment(s.start) or datetime.min.replace(tzinfo=timezone.utc))

    async def read_slot(self, slot_id: str, record: CallRecord) -> EhrSlot:
        """The slot behind a proposed appointment, by STU3 Slot.Read: free or busy as Epic has it now."""
        response = await self.call("GET", f"/Slot/{self.path_id(slot_id, 'Slot.id')}", record)
        if response.status != 200:
            raise self.failure(response, record, "the slot read")
        slot = self.decoded(response, _Slot, record, "the slot read")
        schedule = slot.schedule.reference.removeprefix("Schedule/") if slot.schedule and slot.schedule.reference else None
        return EhrSlot(id=slot.id, start=slot.start, end=slot.end, status=slot.status, schedule=schedule,
                       service_types=_codings(slot.service_type))

    # -- booking

    async def book(self, request: BookRequest, record: CallRecord) -> EhrAppointment:
        """`$book` of the proposed appointment; never re-sent (Epic's `$book` has no idempotency)."""
        parameters: list[dict[str, object]] = [
            {"name": "patient", "valueReference": {"reference": f"Patient/{request.patient}"}},
            {"name": "appointment", "valueIdentifier": {"value": request.slot}}]
        if request.comment:
            parameters.append({"name": "appointmentNote", "valueString": request.comment})
        response = await self.call("POST", "/Appointment/$book", record, resend=False,
                                   body={"resourceType": "Parameters", "parameter": parameters})
        if response.status not in (200, 201):
            raise self.failure(response, record, "the booking")
        booked = [r for r in self._bundle(response.content, "the booking", record) if r.resource_type == "Appointment"]
        if len(booked) != 1:
            raise EhrFailed(f"the {self.source} EHR's booking answer holds {len(booked)} appointments, not one")
        return self._appointment(booked[0])

    async def read(self, appointment_id: str, record: CallRecord) -> EhrAppointment:
        response = await self.call("GET", f"/Appointment/{self.path_id(appointment_id, 'Appointment.id')}", record)
        if response.status != 200:
            raise self.failure(response, record, "the appointment read")
        found = self.decoded(response, _Resource, record, "the appointment read")
        if found.resource_type != "Appointment":
            raise EhrFailed(f"the {self.source} EHR answered no Appointment")
        return self._appointment(found)

    async def find_booked(self, request: BookRequest, record: CallRecord) -> EhrAppointment | None:
        """The patient's live appointment on this very slot. Epic's appointments name no slot, so:
        the slot must be busy (Slot.Read), and the appointment at its start and end, with its
        schedule's practitioner and location (Schedule.Read, else those the request names). When
        nothing tells the patient's appointments apart, the look-up is inconclusive (in doubt), never
        a guess: adopting another appointment would leave this booking's in Epic with nothing
        pointing to it."""
        slot = await self.read_slot(request.slot, record)
        if slot.status == "free":  # nothing is booked on it, this booking's least of all
            record.matches = 0
            return None
        practitioner, location = await self._actors(slot.schedule, record)
        practitioner, location = practitioner or request.practitioner, location or request.location
        if practitioner is None and location is None:
            raise EhrFailed(f"the {self.source} EHR's slot names no schedule to tell this booking's appointment "
                            "from the patient's others")
        start, end = _moment(slot.start), _moment(slot.end)
        if start is None:
            raise EhrFailed(f"the {self.source} EHR's slot has no readable start")
        day = start.astimezone(timezone.utc).date()
        params = [("patient", request.patient), ("date", f"ge{day.isoformat()}"),
                  ("date", f"lt{(day + timedelta(days=1)).isoformat()}")]
        response = await self.call("GET", "/Appointment", record, params=params)
        if response.status != 200:
            raise self.failure(response, record, "the appointment search")
        found = [self._appointment(r) for r in self._bundle(response.content, "the appointment search", record)
                 if r.resource_type == "Appointment" and r.status not in ("cancelled", "entered-in-error", "proposed",
                                                                          "noshow")
                 and _moment(r.start) == start and (end is None or _moment(r.end) == end)
                 and (practitioner is None or _actor(r.participant, "Practitioner") == practitioner)
                 and (location is None or _actor(r.participant, "Location") == location)]
        record.matches = len(found)
        if len(found) > 1:
            raise EhrFailed(f"the {self.source} EHR holds several of the patient's appointments on this schedule and "
                            "time; which is this booking's is unknown")
        return found[0] if found else None

    async def _actors(self, schedule: str | None, record: CallRecord) -> tuple[str | None, str | None]:
        """The practitioner and location of a schedule (STU3 Schedule.Read); none when Epic has none."""
        if not schedule:
            return None, None
        response = await self.call("GET", f"/Schedule/{segment(schedule)}", record)
        if response.status == 404:
            return None, None
        if response.status != 200:
            raise self.failure(response, record, "the schedule read")
        found = self.decoded(response, _Schedule, record, "the schedule read")
        refs = [_Participant(actor=a) for a in found.actor]
        return _actor(refs, "Practitioner"), _actor(refs, "Location")

    # -- cancel, over HL7 v2

    async def cancel(self, appointment_id: str, reason: str | None, record: CallRecord) -> EhrAppointment:
        if not self.settings.mllp_out:
            raise EhrFailed(f"the {self.source} EHR cancels only through HL7 v2, and no mllp_out is configured; "
                            "nothing was sent")
        current = await self.read(appointment_id, record)
        if current.status == "cancelled":
            return current
        control = secrets.token_hex(10)
        message = self._cancel_message(current, reason, control)
        mllp = MllpClient(self.settings.mllp_out, connect_timeout=self.settings.connect_timeout_seconds,
                          timeout=self.settings.timeout_seconds)
        try:
            raw = await mllp.exchange(message)
        except NeverSent:
            record.error_code = "MLLP_UNREACHABLE"
            raise Unavailable(f"the {self.source} EHR's HL7 v2 interface cannot be reached; nothing was sent",
                              retry_after=self.retry_after()) from None
        except Lost as exc:
            record.in_doubt, record.error_code = True, f"MLLP_{exc.kind}"
            raise EhrFailed(f"the {self.source} EHR's acknowledgement did not arrive; "
                            "the cancel may or may not have been applied") from None
        self._acknowledged(raw, control, record)
        after = await self.read(appointment_id, record)
        if after.status != "cancelled":  # an AA the calendar does not show: not to be reported as done
            raise EhrFailed(f"the {self.source} EHR acknowledged the cancel but the appointment is {after.status[:32]}")
        return after

    def _cancel_message(self, appointment: EhrAppointment, reason: str | None, control: str) -> bytes:
        """SRM^S04 in v2.5.1: ARQ-1 our placer id, ARQ-2 Epic's id (filler), ARQ-6 the reason; PID-3
        the patient; RGS, which SRM requires."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S+0000")
        sender = _escape(self.source)[:20]
        segments = [
            f"MSH|^~\\&|EHRGATEWAY|{sender}|EPIC|EPIC|{stamp}||SRM^S04^SRM_S01|{control}|P|{HL7_VERSION}",
            f"ARQ|{control}^EHRGATEWAY|{_escape(appointment.id)}^EPIC||||{_escape(reason or 'CANCELLED')}",
            "RGS|1|D",
        ]
        if appointment.patient:
            segments.insert(2, f"PID|1||{_escape(appointment.patient)}")
        return ("\r".join(segments) + "\r").encode("utf-8")

    def _acknowledged(self, raw: bytes, control: str, record: CallRecord) -> None:
        """AA: done. AE: refused (NotFound for an unknown appointment). AR, or an ACK that is not
        ours or cannot be read: the EHR did not take it in (a failure; its texts are not passed on)."""
        try:
            ack = hl7.parse(raw.decode("utf-8"))
            code, answered = str(ack.extract_field("MSA", 1, 1)), str(ack.extract_field("MSA", 1, 2))
            error = str(ack.extract_field("ERR", 1, 3)) if _has(ack, "ERR") else ""
        except Exception:  # noqa: BLE001 - python-hl7 raises several kinds for unreadable text
            record.in_doubt, record.error_code = True, "MLLP_UNREADABLE"
            raise EhrFailed(f"the {self.source} EHR's acknowledgement cannot be read; "
                            "the cancel may or may not have been applied") from None
        record.error_code = None if code == "AA" else f"HL7_{code[:2]}"
        if answered != control:
            record.in_doubt = True
            raise EhrFailed(f"the {self.source} EHR acknowledged another message; the cancel's outcome is unknown")
        if code in ("AA", "CA"):
            return
        if code in ("AE", "CE"):
            if error == _UNKNOWN_KEY:
                raise NotFound(f"the {self.source} EHR has no such appointment")
            raise EhrRefused(f"the {self.source} EHR refused the cancel (HL7 {code[:2]}"
                             + (f", error {error[:8]})" if error.isdigit() else ")"), details_code=f"HL7_{code[:2]}")
        raise EhrFailed(f"the {self.source} EHR rejected the cancel message (HL7 {code[:2]})")


def _has(message: hl7.Message, segment: str) -> bool:
    return any(str(s[0]) == segment for s in message)
