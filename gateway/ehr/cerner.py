"""Oracle Health (Cerner) Millennium R4's scheduling API (scheduling-out.md §3):

- slots: one `GET Slot` by Cerner's rules (`service-type` required, as `system|code` comma-joined;
  `start=ge…&start=lt…`; `schedule.actor` and `-location` once each, comma-joined;
  `_include=Slot:schedule` for the practitioner and location), its `next` links followed up to a cap;
- book: `POST Appointment` with the documented body only (Cerner keeps no identifier of ours), 201
  with an empty body and the id in `Location`; never sent twice unless refused at the door (401);
- cancel: `PATCH` (JSON Patch) with `If-Match` on the version just read; a 409 is read again and
  retried once;
- a lost booking is found by the patient's appointments around the slot's time, matched by slot.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import msgspec

from gateway.canonical import Coding
from gateway.ehr.base import EhrClient
from gateway.ehr.model import BookRequest, EhrAppointment, EhrSlot, SlotQuery
from gateway.errors import EhrFailed, GatewayError, Unprocessable
from gateway.outbound.calls import CallRecord
from gateway.outbound.http import Answer

JSON_PATCH = "application/json-patch+json"
CANCEL_SYSTEM = "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason"
LOCATION_EXTENSION = "https://fhir-ehr.cerner.com/r4/StructureDefinition/scheduling-location"


# -- what is read of Cerner's answers (unknown elements ignored: Cerner adds its own) ----------------

class _Ref(msgspec.Struct):
    reference: str | None = None


class _Coding(msgspec.Struct):
    system: str | None = None
    code: str | None = None


class _Concept(msgspec.Struct):
    coding: list[_Coding] = []


class _Extension(msgspec.Struct):
    url: str | None = None
    valueReference: _Ref | None = None


class _Meta(msgspec.Struct):
    versionId: str | None = None


class _Participant(msgspec.Struct):
    actor: _Ref | None = None
    status: str | None = None


class _Resource(msgspec.Struct, kw_only=True):
    """A Slot, a Schedule or an Appointment: the elements the client reads of each."""

    resourceType: str
    id: str | None = None
    meta: _Meta | None = None
    status: str | None = None
    start: str | None = None
    end: str | None = None
    schedule: _Ref | None = None  # Slot
    serviceType: list[_Concept] = []
    extension: list[_Extension] = []
    actor: list[_Ref] = []  # Schedule
    slot: list[_Ref] = []  # Appointment
    participant: list[_Participant] = []


class _Link(msgspec.Struct):
    relation: str
    url: str


class _Entry(msgspec.Struct):
    resource: _Resource | None = None


class _Bundle(msgspec.Struct):
    resourceType: str
    link: list[_Link] = []
    entry: list[_Entry] = []


def _id_of(reference: str | None, kind: str) -> str | None:
    """`<kind>/<id>` (or an absolute URL ending so) → id; anything else → None."""
    if not reference:
        return None
    head, sep, tail = reference.rpartition(f"{kind}/")
    if not sep or (head and not head.endswith("/")):
        return None
    return tail.split("/")[0] or None  # a version (`…/_history/n`) left out


def _codings(concepts: list[_Concept]) -> tuple[Coding, ...]:
    return tuple(Coding(system=c.system, code=c.code) for concept in concepts for c in concept.coding if c.code)


def _version(response: Answer, resource: _Resource) -> str | None:
    """The version from the ETag (`W/"<n>"`), else `meta.versionId`."""
    tag = response.headers.get("etag", "").strip().removeprefix("W/").strip('"')
    return tag or (resource.meta.versionId if resource.meta else None)


def _utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _moment(text: str) -> datetime:
    if "T" not in text:
        day = date.fromisoformat(text)
        return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _slot(resource: _Resource, schedules: dict[str, _Resource]) -> EhrSlot:
    """A Slot, its practitioner and location read from its Schedule when it was included (the
    location else from Cerner's scheduling-location extension)."""
    if not (resource.id and resource.start and resource.end):
        raise EhrFailed("the EHR answered a Slot without its id, start or end")
    schedule_id = _id_of(resource.schedule.reference if resource.schedule else None, "Schedule")
    actors = [a.reference for a in schedules[schedule_id].actor] if schedule_id in schedules else []
    actors += [e.valueReference.reference for e in resource.extension
               if e.url == LOCATION_EXTENSION and e.valueReference is not None]
    return EhrSlot(id=resource.id, start=resource.start, end=resource.end, status=resource.status or "free",
                   schedule=schedule_id, practitioner=_first(actors, "Practitioner"),
                   location=_first(actors, "Location"),
                   service_types=_codings(resource.serviceType))


def _first(references: list[str | None], kind: str) -> str | None:
    """The id of the first reference to a `kind`."""
    return next((found for found in (_id_of(r, kind) for r in references) if found), None)


def _appointment(resource: _Resource, version: str | None) -> EhrAppointment:
    if resource.resourceType != "Appointment" or not resource.id or not resource.status:
        raise EhrFailed("the EHR answered an Appointment without its id or status")
    actors = [p.actor.reference for p in resource.participant if p.actor]
    return EhrAppointment(id=resource.id, status=resource.status, start=resource.start, end=resource.end,
                          slot=_id_of(resource.slot[0].reference, "Slot") if resource.slot else None,
                          patient=_first(actors, "Patient"), practitioner=_first(actors, "Practitioner"),
                          location=_first(actors, "Location"),
                          version=version, service_types=_codings(resource.serviceType))


class CernerClient(EhrClient):
    dialect = "cerner"
    page_cap = 10  # Slot pages followed at most: the earliest slots are on the first ones

    async def _search(self, path: str, params: list[tuple[str, str]], record: CallRecord,
                      what: str) -> list[_Resource]:
        """Every resource of a search, its `next` links followed up to `page_cap` pages (only on the
        EHR's own base: the token goes nowhere else)."""
        found: list[_Resource] = []
        base = self.settings.base_url.rstrip("/") + "/"
        target: str = path
        sent: list[tuple[str, str]] | None = params
        for _ in range(self.page_cap):  # beyond the cap, the pages not read are left out
            response = await self.call("GET", target, record, params=sent)
            if response.status != 200:
                raise self.failure(response, record, what)
            bundle = self.decoded(response, _Bundle, record, what)
            found += [e.resource for e in bundle.entry if e.resource is not None]
            following = next((link.url for link in bundle.link if link.relation == "next"), None)
            if following is None:
                break
            if not following.startswith(base):
                raise EhrFailed(f"the {self.source} EHR's next page of {what} is not on its base URL")
            target, sent = following, None  # the link carries the query
        return found

    async def find_slots(self, query: SlotQuery, record: CallRecord) -> list[EhrSlot]:
        if not query.service_types:  # Cerner refuses a Slot search without one: nothing is sent
            raise Unprocessable(f"the {self.source} EHR (Cerner) finds slots by service type; none was given",
                                expression=("service-type",))
        params = [("service-type", ",".join(f"{c.system}|{c.code}" if c.system else c.code or ""
                                            for c in query.service_types)),
                  ("start", f"ge{query.start}"), ("start", f"lt{query.end}")]
        if query.practitioners:
            params.append(("schedule.actor", ",".join(f"Practitioner/{p}" for p in query.practitioners)))
        if query.locations:
            params.append(("-location", ",".join(f"Location/{loc}" for loc in query.locations)))
        params.append(("_include", "Slot:schedule"))
        resources = await self._search("/Slot", params, record, "the slot search")
        schedules = {r.id: r for r in resources if r.resourceType == "Schedule" and r.id}
        slots = [_slot(r, schedules) for r in resources if r.resourceType == "Slot"]
        record.matches = len(slots)
        return slots

    async def read_slot(self, slot_id: str, record: CallRecord) -> EhrSlot:
        response = await self.call("GET", f"/Slot/{self.path_id(slot_id, 'Slot.id')}", record)
        if response.status != 200:
            raise self.failure(response, record, "the slot read of a slot")
        resource = self.decoded(response, _Resource, record, "a slot read")
        if resource.resourceType != "Slot":
            raise EhrFailed(f"the {self.source} EHR answered a slot read with no Slot")
        return _slot(resource, {})

    async def read(self, appointment_id: str, record: CallRecord) -> EhrAppointment:
        response = await self.call("GET", f"/Appointment/{self.path_id(appointment_id, 'Appointment.id')}", record)
        if response.status != 200:
            raise self.failure(response, record, "the read of an appointment")
        resource = self.decoded(response, _Resource, record, "an appointment read")
        return _appointment(resource, _version(response, resource))

    async def book(self, request: BookRequest, record: CallRecord) -> EhrAppointment:
        # exactly Cerner's documented body: it takes no identifier, and refuses what it does not document
        body: dict[str, object] = {
            "resourceType": "Appointment", "status": "booked", "slot": [{"reference": f"Slot/{request.slot}"}],
            "participant": [{"actor": {"reference": f"Patient/{request.patient}"}, "status": "accepted"}]}
        if request.comment:
            body["comment"] = request.comment
        response = await self.call("POST", "/Appointment", record, body=body, resend=False)
        if response.status == 401 and record.reauthenticated:
            # refused at the door, before anything was booked: sent once more with the renewed token
            response = await self.call("POST", "/Appointment", record, body=body, resend=False)
        if response.status != 201:
            raise self.failure(response, record, "the booking of a slot")
        appointment_id = _id_of(response.headers.get("location"), "Appointment")
        if appointment_id is None:  # booked, but which appointment is unknown: in doubt
            record.in_doubt = True
            raise EhrFailed(f"the {self.source} EHR booked the slot without naming the appointment")
        booked = EhrAppointment(id=appointment_id, status="booked", start=request.start, end=request.end,
                                slot=request.slot, patient=request.patient, practitioner=request.practitioner,
                                location=request.location, service_types=request.service_types,
                                version=response.headers.get("etag", "").strip().removeprefix("W/").strip('"') or None)
        try:  # Cerner answers no body: the stored appointment is read back
            return await self.read(appointment_id, CallRecord())
        except GatewayError:
            return booked  # the booking stands; what the request said of it is what is known

    def _cancel_ops(self, reason: str | None) -> list[dict[str, object]]:
        ops: list[dict[str, object]] = [{"op": "replace", "path": "/status", "value": "cancelled"}]
        if reason:
            system, sep, code = reason.rpartition("|")
            ops.append({"op": "add", "path": "/cancelationReason",
                        "value": {"coding": [{"system": system if sep else CANCEL_SYSTEM, "code": code}]}})
        return ops

    async def cancel(self, appointment_id: str, reason: str | None, record: CallRecord) -> EhrAppointment:
        current = await self.read(appointment_id, record)
        path = f"/Appointment/{self.path_id(appointment_id, 'Appointment.id')}"
        for attempt in (1, 2):
            if current.status == "cancelled":
                return current  # already done: nothing is sent
            if current.version is None:
                raise EhrFailed(f"the {self.source} EHR gave no version of the appointment to cancel")
            response = await self.call("PATCH", path, record, body=self._cancel_ops(reason), media_type=JSON_PATCH,
                                       headers={"If-Match": f'W/"{current.version}"'})
            if response.status == 409 and attempt == 1:
                current = await self.read(appointment_id, record)  # changed meanwhile: once more on the new version
                continue
            if response.status != 200:
                raise self.failure(response, record, "the cancellation of an appointment")
            version = response.headers.get("etag", "").strip().removeprefix("W/").strip('"') or None
            return msgspec.structs.replace(current, status="cancelled", version=version)
        raise AssertionError("the second attempt always returns")

    async def find_booked(self, request: BookRequest, record: CallRecord) -> EhrAppointment | None:
        """Cerner keeps no identifier of ours: the patient's appointments around the slot's time,
        matched by slot."""
        start, end = request.start, request.end
        if start is None:
            slot = await self.read_slot(request.slot, record)
            start, end = slot.start, slot.end
        try:
            lower, upper = _moment(start) - timedelta(days=1), _moment(end or start) + timedelta(days=1)
        except ValueError:
            raise Unprocessable("the booking's start or end is not a date-time") from None
        params = [("patient", request.patient), ("date", f"ge{_utc(lower)}"), ("date", f"lt{_utc(upper)}")]
        resources = await self._search("/Appointment", params, record, "the appointment search")
        found = [_appointment(r, r.meta.versionId if r.meta else None) for r in resources
                 if r.resourceType == "Appointment"]
        matches = [a for a in found if a.slot == request.slot and a.status != "cancelled"]
        record.matches = len(matches)
        return matches[0] if matches else None
