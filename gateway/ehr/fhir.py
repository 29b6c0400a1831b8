"""A plain FHIR R4 server's scheduling (IHE ITI Scheduling): Slot search with its Schedules, a full
Appointment created (conditionally, by its identifier, where the server says it can), and a cancel
by an update of its status.

Conditional create (`If-None-Exist`) is FHIR's own guard against a duplicate: with it, sending a
booking again after its answer was lost gives back the one stored, so the call may be re-sent after
a token renewal; without it a create is never re-sent, and a lost answer is looked up
(`find_booked`) before anything is sent again.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

import msgspec

from gateway.canonical import Coding
from gateway.ehr.base import EhrClient, read_json
from gateway.ehr.model import BookRequest, EhrAppointment, EhrSlot, SlotQuery
from gateway.errors import EhrFailed, EhrRefused, NotFound
from gateway.outbound.calls import CallRecord

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # R4's id type
PAGE_SIZE = 50
MAX_PAGES = 20  # a search that runs past this many pages is cut there, not followed forever
CANCEL_REASONS = "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason"
# R4's appointment-cancellation-reason codes: a reason that is one is sent as it, any other as `other`
_REASON_CODES = frozenset({
    "pat", "pat-crs", "pat-cpp", "pat-dec", "pat-fb", "pat-lt", "pat-mt", "pat-mv", "pat-preg", "pat-swl",
    "pat-ucp", "prov", "prov-pers", "prov-dch", "prov-edu", "prov-hosp", "prov-labs", "prov-mri", "prov-onc",
    "maint", "meds-inc", "other", "oth-cms", "oth-err", "oth-fin", "oth-iv", "oth-int", "oth-mu", "oth-room",
    "oth-oerr", "oth-swie", "oth-weath"})


# -- what is read back (R4's shapes, the elements the gateway uses) -----------------------------------

class _Ref(msgspec.Struct, kw_only=True):
    reference: str | None = None


class _Coding(msgspec.Struct, kw_only=True):
    system: str | None = None
    code: str | None = None
    display: str | None = None


class _Concept(msgspec.Struct, kw_only=True):
    coding: list[_Coding] = []


class _Slot(msgspec.Struct, kw_only=True):
    id: str
    start: str
    end: str
    status: str
    schedule: _Ref
    serviceType: list[_Concept] = []


class _Schedule(msgspec.Struct, kw_only=True):
    id: str
    actor: list[_Ref] = []


class _Participant(msgspec.Struct, kw_only=True):
    actor: _Ref | None = None


class _Identifier(msgspec.Struct, kw_only=True):
    system: str | None = None
    value: str | None = None


class _Meta(msgspec.Struct, kw_only=True):
    versionId: str | None = None


class _Appointment(msgspec.Struct, kw_only=True):
    id: str
    status: str
    start: str | None = None
    end: str | None = None
    slot: list[_Ref] = []
    participant: list[_Participant] = []
    identifier: list[_Identifier] = []
    serviceType: list[_Concept] = []
    meta: _Meta | None = None


class _Typed(msgspec.Struct):
    resourceType: str


class _Entry(msgspec.Struct, kw_only=True):
    resource: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))  # read by its type


class _Link(msgspec.Struct, kw_only=True):
    relation: str
    url: str


class _Bundle(msgspec.Struct, kw_only=True):
    resourceType: str
    link: list[_Link] = []
    entry: list[_Entry] = []


class _Resource(msgspec.Struct, kw_only=True):
    conditionalCreate: bool | None = None
    type: str | None = None


class _Rest(msgspec.Struct, kw_only=True):
    mode: str
    resource: list[_Resource] = []


class _Capability(msgspec.Struct, kw_only=True):
    resourceType: str
    rest: list[_Rest] = []




def _id(reference: str | None, kind: str) -> str | None:
    """The id of a `Kind/id` reference (relative or absolute), else None."""
    if not reference:
        return None
    parts = reference.split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == kind and parts[-1] else None


def _first(references: list[str | None], kind: str) -> str | None:
    return next((i for i in (_id(r, kind) for r in references) if i), None)


def _codings(concepts: list[_Concept]) -> tuple[Coding, ...]:
    return tuple(Coding(system=c.system, code=c.code, display=c.display) for cc in concepts for c in cc.coding)


def _concept(codings: tuple[Coding, ...]) -> dict[str, Any]:
    return {"coding": [msgspec.to_builtins(c) for c in codings]}


def _checked(value: str, what: str) -> str:
    """An id as it goes into a path: R4's id type, so nothing from outside can steer the URL."""
    if not _ID.fullmatch(value):
        raise NotFound(f"no such {what}: not a FHIR id")
    return value


def _token(coding: Coding) -> str:
    return f"{coding.system}|{coding.code}" if coding.system else str(coding.code)


def _appointment(a: _Appointment) -> EhrAppointment:
    actors = [p.actor.reference for p in a.participant if p.actor is not None]
    return EhrAppointment(
        id=a.id, status=a.status, start=a.start, end=a.end, slot=_id(a.slot[0].reference, "Slot") if a.slot else None,
        patient=_first(actors, "Patient"), practitioner=_first(actors, "Practitioner"),
        location=_first(actors, "Location"),
        version=a.meta.versionId if a.meta else None, service_types=_codings(a.serviceType),
        identifiers=tuple((i.system or "", i.value) for i in a.identifier if i.value))


class FhirClient(EhrClient):
    dialect = "fhir"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._conditional: bool | None = None  # the server's CapabilityStatement, read once

    def _kind(self, entry: _Entry, record: CallRecord, what: str) -> str | None:
        """The resourceType of a Bundle entry (an OperationOutcome of warnings may sit beside the matches)."""
        typed = self.decoded(entry.resource, _Typed | None, record, what)
        return typed.resourceType if typed is not None else None

    async def conditional_create(self, record: CallRecord) -> bool:
        """Whether the server honours `If-None-Exist` on Appointment (its CapabilityStatement says)."""
        if self._conditional is None:
            response = await self.call("GET", "/metadata", record)
            if response.status != 200:
                raise self.failure(response, record, "its capability statement")
            capability = self.decoded(response, _Capability, record, "its capability statement")
            self._conditional = any(r.type == "Appointment" and r.conditionalCreate
                                    for rest in capability.rest if rest.mode == "server" for r in rest.resource)
        return self._conditional

    # -- slots ------------------------------------------------------------------------------------------

    async def find_slots(self, query: SlotQuery, record: CallRecord) -> list[EhrSlot]:
        params: list[tuple[str, str]] = [("start", f"ge{query.start}"), ("start", f"lt{query.end}"),
                                         ("status", "free"), ("_include", "Slot:schedule"), ("_count", str(PAGE_SIZE))]
        if query.service_types:
            params.append(("service-type", ",".join(_token(c) for c in query.service_types)))
        # one parameter per kind of actor: FHIR ANDs repeated parameters and ORs the values inside one
        for kind, ids in (("Practitioner", query.practitioners), ("Location", query.locations)):
            if ids:
                params.append(("schedule.actor", ",".join(f"{kind}/{i.removeprefix(kind + '/')}" for i in ids)))
        slots, schedules = await self._search_slots(params, record)
        for missing in {s.schedule.reference for s in slots} - set(schedules):
            schedules[missing] = await self._schedule(missing, record)  # a server that ignored _include
        unique = {s.id: s for s in slots}  # pages of a calendar that changed between them may overlap
        return [self._slot(s, schedules.get(s.schedule.reference)) for s in unique.values()]

    async def _search_slots(self, params: list[tuple[str, str]], record: CallRecord
                            ) -> tuple[list[_Slot], dict[str | None, _Schedule]]:
        slots: list[_Slot] = []
        schedules: dict[str | None, _Schedule] = {}
        path, sent = "/Slot", params
        for _ in range(MAX_PAGES):
            response = await self.call("GET", path, record, params=sent)
            if response.status != 200:
                raise self.failure(response, record, "a slot search")
            bundle = self.decoded(response, _Bundle, record, "a slot search")
            for entry in bundle.entry:
                kind = self._kind(entry, record, "a slot search")
                if kind == "Slot":
                    slots.append(self.decoded(entry.resource, _Slot, record, "a slot search"))
                elif kind == "Schedule":
                    found = self.decoded(entry.resource, _Schedule, record, "a slot search")
                    schedules[f"Schedule/{found.id}"] = found
            path = next((link.url for link in bundle.link if link.relation == "next"), "")
            if not path:
                break
            if not path.startswith(self.settings.base_url.rstrip("/") + "/"):
                # the token goes to the EHR's own base only
                raise EhrFailed(f"the {self.source} EHR's next page is not on its FHIR base")
            sent = None
        return slots, schedules

    async def _schedule(self, reference: str | None, record: CallRecord) -> _Schedule | None:
        schedule_id = _id(reference, "Schedule")
        if schedule_id is None:
            return None
        response = await self.call("GET", f"/Schedule/{schedule_id}", record)
        if response.status != 200:
            raise self.failure(response, record, "the schedule")
        return self.decoded(response, _Schedule, record, "a schedule read")

    def _slot(self, s: _Slot, schedule: _Schedule | None) -> EhrSlot:
        actors = [a.reference for a in schedule.actor] if schedule is not None else []
        return EhrSlot(id=s.id, start=s.start, end=s.end, status=s.status,
                       schedule=_id(s.schedule.reference, "Schedule"), practitioner=_first(actors, "Practitioner"),
                       location=_first(actors, "Location"), service_types=_codings(s.serviceType))

    async def read_slot(self, slot_id: str, record: CallRecord) -> EhrSlot:
        response = await self.call("GET", f"/Slot/{_checked(slot_id, 'slot')}", record)
        if response.status != 200:
            raise self.failure(response, record, "the slot")
        slot = self.decoded(response, _Slot, record, "a slot read")
        return self._slot(slot, await self._schedule(slot.schedule.reference, record))

    # -- appointments -----------------------------------------------------------------------------------

    async def _body(self, request: BookRequest, record: CallRecord) -> dict[str, Any]:
        """The full Appointment a booking sends (its start and end from the slot when not given)."""
        start, end = request.start, request.end
        if start is None or end is None:
            slot = await self.read_slot(request.slot, record)
            start, end = slot.start, slot.end
        participants = [("Patient", request.patient), ("Practitioner", request.practitioner),
                        ("Location", request.location)]
        body: dict[str, Any] = {
            "resourceType": "Appointment", "status": "booked",
            "identifier": [{"system": s, "value": v} if s else {"value": v} for s, v in request.identifiers],
            "serviceType": [_concept((c,)) for c in request.service_types],
            "start": start, "end": end, "slot": [{"reference": f"Slot/{request.slot}"}], "comment": request.comment,
            "participant": [{"actor": {"reference": f"{kind}/{i}"}, "required": "required", "status": "accepted"}
                            for kind, i in participants if i],
        }
        if request.appointment_types:
            body["appointmentType"] = _concept(request.appointment_types)
        return {k: v for k, v in body.items() if v not in (None, [])}

    async def book(self, request: BookRequest, record: CallRecord) -> EhrAppointment:
        body = await self._body(request, record)
        conditional = bool(request.identifiers) and await self.conditional_create(record)
        headers = {"Prefer": "return=representation"}
        if conditional:
            system, value = request.identifiers[0]
            headers["If-None-Exist"] = urlencode({"identifier": f"{system}|{value}" if system else value})
        # a create is re-sent (after a renewed token) only when the server would answer a duplicate
        # with the one it stored
        response = await self.call("POST", "/Appointment", record, body=body, headers=headers, resend=conditional)
        if response.status not in (200, 201):
            raise self.failure(response, record, "the booking")
        if not response.content:  # a server that answers `return=minimal` whatever is asked
            where = _id((response.headers.get("location") or "").split("/_history/")[0], "Appointment")
            if where is None:
                raise EhrFailed(f"the {self.source} EHR's answer to the booking names no Appointment")
            made = await self.read(where, record)
        else:
            made = _appointment(self.decoded(response, _Appointment, record, "the booking"))
        if made.slot != request.slot:  # a conditional match: the identifier already booked another slot
            record.error_code = "IDENTIFIER_ON_ANOTHER_SLOT"
            raise EhrRefused(f"the {self.source} EHR already holds a booking with this identifier on another slot",
                             details_code="IDENTIFIER_ON_ANOTHER_SLOT")
        return made

    async def _fetch(self, appointment_id: str, record: CallRecord) -> tuple[dict[str, Any], _Appointment, str]:
        """The Appointment as the server has it (to send back changed), read, and its version tag."""
        response = await self.call("GET", f"/Appointment/{_checked(appointment_id, 'appointment')}", record)
        if response.status != 200:
            raise self.failure(response, record, "the appointment")
        parsed = self.decoded(response, _Appointment, record, "an appointment read")
        raw = read_json(response)
        version = parsed.meta.versionId if parsed.meta else None
        etag = response.headers.get("etag") or (f'W/"{version}"' if version else "")
        return raw, parsed, etag

    async def read(self, appointment_id: str, record: CallRecord) -> EhrAppointment:
        return _appointment((await self._fetch(appointment_id, record))[1])

    async def cancel(self, appointment_id: str, reason: str | None, record: CallRecord) -> EhrAppointment:
        for attempt in (1, 2):
            raw, parsed, etag = await self._fetch(appointment_id, record)
            if parsed.status == "cancelled":
                return _appointment(parsed)  # already done: nothing is sent
            raw |= {"status": "cancelled", "cancelationReason": _reason(reason)}
            headers = {"If-Match": etag} if etag else {}
            response = await self.call("PUT", f"/Appointment/{appointment_id}", record, body=raw, headers=headers)
            if response.status == 412 and attempt == 1:
                continue  # changed since it was read: read again, once
            if response.status != 200:
                raise self.failure(response, record, "the cancellation")
            if not response.content:
                return await self.read(appointment_id, record)
            return _appointment(self.decoded(response, _Appointment, record, "the cancellation"))
        raise AssertionError("the second attempt always returns")

    async def find_booked(self, request: BookRequest, record: CallRecord) -> EhrAppointment | None:
        if request.identifiers:
            system, value = request.identifiers[0]
            params: list[tuple[str, str]] = [("identifier", f"{system}|{value}" if system else value)]
        else:
            start = request.start or (await self.read_slot(request.slot, record)).start
            params = [("patient", f"Patient/{request.patient}"), ("slot", f"Slot/{request.slot}"),
                      ("date", f"ge{start}"), ("date", f"le{start}")]
        response = await self.call("GET", "/Appointment", record, params=params)
        if response.status != 200:
            raise self.failure(response, record, "an appointment search")
        bundle = self.decoded(response, _Bundle, record, "an appointment search")
        found = [_appointment(self.decoded(e.resource, _Appointment, record, "an appointment search"))
                 for e in bundle.entry if self._kind(e, record, "an appointment search") == "Appointment"]
        # what this booking made: its slot and patient, and not since cancelled
        mine = [a for a in found if a.slot == request.slot and a.patient == request.patient and a.status != "cancelled"]
        record.matches = len(mine)
        return mine[0] if mine else None


def _reason(reason: str | None) -> dict[str, Any]:
    if reason in _REASON_CODES:
        return {"coding": [{"system": CANCEL_REASONS, "code": reason}]}
    concept: dict[str, Any] = {"coding": [{"system": CANCEL_REASONS, "code": "other"}]}
    return concept | ({"text": reason} if reason else {})

