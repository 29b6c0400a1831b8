"""A plain FHIR R4 server's scheduling (IHE ITI Scheduling): Slot search with its Schedules, a full
Appointment created (conditionally, by its identifier, where the server says it can), and a cancel
by an update of its status.

Conditional create (`If-None-Exist`) is FHIR's own guard against a duplicate: with it, sending a
booking again after its answer was lost gives back the one stored, so the call may be re-sent after
a token renewal; without it a create is never re-sent, and a lost answer is looked up
(`find_booked`) before anything is sent again.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, NamedTuple
from urllib.parse import urlencode

import msgspec

from gateway.canonical import Coding
from gateway.ehr.base import EhrClient, ehr_id, read_json, segment
from gateway.ehr.model import BookRequest, EhrAppointment, EhrSlot, SlotQuery
from gateway.errors import EhrFailed, EhrRefused, GatewayError
from gateway.outbound.calls import CallRecord

PAGE_SIZE = 50
MAX_PAGES = 20  # a search that runs past this many pages is cut there, not followed forever
_CHUNK = 40  # slots named in one appointment search (its URL stays short)
SCHEDULE_SECONDS = 300.0  # a practitioner's or location's schedules, kept this long
# the statuses of an Appointment that holds its slot
_LIVE = frozenset({"pending", "booked", "arrived", "fulfilled", "checked-in"})
# the tag on a Slot the gateway marked busy: only such a slot is freed by a cancel of the gateway's
_MARK = {"system": "urn:ehr-gateway:tag", "code": "booked-by-gateway"}
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


class _Interaction(msgspec.Struct, kw_only=True):
    code: str | None = None


class _Resource(msgspec.Struct, kw_only=True):
    conditionalCreate: bool | None = None
    type: str | None = None
    interaction: list[_Interaction] = []


class _Rest(msgspec.Struct, kw_only=True):
    mode: str
    resource: list[_Resource] = []


class _Live(NamedTuple):
    appointment: EhrAppointment
    slots: set[str]  # those it names among the slots asked about


class _Capability(msgspec.Struct, kw_only=True):
    resourceType: str | None = None
    rest: list[_Rest] = []




def _id(reference: str | None, kind: str) -> str | None:
    """The id of a `Kind/id` reference (relative or absolute), else None."""
    if not reference:
        return None
    parts = reference.split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == kind and parts[-1] else None


def _key(reference: str | None) -> str:
    """A Schedule reference as `Schedule/<id>`, relative or absolute as the server wrote it."""
    found = _id(reference, "Schedule")
    return f"Schedule/{found}" if found else ""


def _first(references: list[str | None], kind: str) -> str | None:
    return next((i for i in (_id(r, kind) for r in references) if i), None)


def _codings(concepts: list[_Concept]) -> tuple[Coding, ...]:
    return tuple(Coding(system=c.system, code=c.code, display=c.display) for cc in concepts for c in cc.coding)


def _concept(codings: tuple[Coding, ...]) -> dict[str, Any]:
    return {"coding": [msgspec.to_builtins(c) for c in codings]}


def _checked(value: str, what: str) -> str:
    """An id as it goes into a path: R4's id type (400 otherwise, as at the edge, which checked it
    already), percent-encoded all the same, so nothing from outside can steer the URL."""
    return segment(ehr_id(value, f"{what[:1].upper()}{what[1:]}.id"))


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
    """Many FHIR servers enforce nothing beyond the spec: they book a taken slot, leave `Slot.status`
    as it was, and ignore search parameters they do not serve. So the client checks what it is answered
    (the window, the status, the schedule), takes a slot as taken when a live Appointment names it, and
    marks a slot it booked `busy` where the server lets Slots be updated (and `free` again on cancel)."""

    dialect = "fhir"
    keeps_slot_status = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._capability: tuple[bool, bool] | None = None  # (conditional create, Slot update), read once
        # (practitioners, locations) -> (until, their schedules)
        self._schedules_seen: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[float, dict[str, _Schedule]]] = {}

    def _kind(self, entry: _Entry, record: CallRecord, what: str) -> str | None:
        """The resourceType of a Bundle entry (an OperationOutcome of warnings may sit beside the matches)."""
        typed = self.decoded(entry.resource, _Typed | None, record, what)
        return typed.resourceType if typed is not None else None

    async def _capabilities(self, record: CallRecord) -> tuple[bool, bool]:
        """Whether the server honours `If-None-Exist` on Appointment, and whether it lets a Slot be
        updated, as its CapabilityStatement says. A server that serves none: no conditional create,
        and a Slot update is tried (its refusal is harmless)."""
        if self._capability is None:
            response = await self.call("GET", "/metadata", record)
            if response.status >= 500 or response.status in (401, 429):
                raise self.failure(response, record, "its capability statement")
            # a server that serves none answers 404, or (routing /metadata as a type) a Bundle
            capability = self.decoded(response, _Capability, record, "its capability statement") \
                if response.status == 200 else None
            if capability is None or capability.resourceType != "CapabilityStatement":
                self._capability = (False, True)
            else:
                served = {r.type: r for rest in capability.rest if rest.mode == "server" for r in rest.resource}
                appointment, slot = served.get("Appointment"), served.get("Slot")
                self._capability = (bool(appointment and appointment.conditionalCreate),
                                    bool(slot and any(i.code == "update" for i in slot.interaction)))
        return self._capability

    async def conditional_create(self, record: CallRecord) -> bool:
        return (await self._capabilities(record))[0]

    async def _search(self, path: str, params: list[tuple[str, str]], record: CallRecord, what: str
                      ) -> dict[str, list[msgspec.Raw]]:
        """Every entry of a search by its resourceType, `next` links followed up to MAX_PAGES (only on
        the EHR's own base: the token goes nowhere else)."""
        found: dict[str, list[msgspec.Raw]] = {}
        target, sent = path, params
        base = self.settings.base_url.rstrip("/") + "/"
        for _ in range(MAX_PAGES):
            response = await self.call("GET", target, record, params=sent)
            if response.status != 200:
                raise self.failure(response, record, what)
            bundle = self.decoded(response, _Bundle, record, what)
            for entry in bundle.entry:
                kind = self._kind(entry, record, what)
                if kind is not None:
                    found.setdefault(kind, []).append(entry.resource)
            target = next((link.url for link in bundle.link if link.relation == "next"), "")
            if not target:
                break
            if not target.startswith(base):
                raise EhrFailed(f"the {self.source} EHR's next page is not on its FHIR base")
            sent = None
        return found

    # -- slots ------------------------------------------------------------------------------------------

    async def find_slots(self, query: SlotQuery, record: CallRecord) -> list[EhrSlot]:
        params: list[tuple[str, str]] = [("start", f"ge{query.start}"), ("start", f"lt{query.end}"),
                                         ("status", "free"), ("_count", str(PAGE_SIZE))]
        if query.service_types:
            params.append(("service-type", ",".join(_token(c) for c in query.service_types)))
        wanted: dict[str, _Schedule] | None = None
        if query.practitioners or query.locations:
            # the schedules first, by Schedule's own `actor`: the chained `schedule.actor` is optional in
            # FHIR, and a server without it may match nothing without a word
            wanted = await self._schedules_of(query, record)
            if not wanted:
                return []
            params.append(("schedule", ",".join(wanted)))
        else:
            params.append(("_include", "Slot:schedule"))
        found = await self._search("/Slot", params, record, "a slot search")
        schedules = dict(wanted or {})
        for raw in found.get("Schedule", []) if wanted is None else []:
            schedule = self.decoded(raw, _Schedule, record, "a slot search")
            schedules[f"Schedule/{schedule.id}"] = schedule
        lower, upper = _instant(query.start), _instant(query.end)
        unique: dict[str, _Slot] = {}  # pages of a calendar that changed between them may overlap
        for raw in found.get("Slot", []):
            slot = self.decoded(raw, _Slot, record, "a slot search")
            # what a server that ignored a parameter let through is left out here
            if slot.status == "free" and lower <= _instant(slot.start) < upper \
                    and (wanted is None or _key(slot.schedule.reference) in wanted) and _offers(slot, query):
                unique[slot.id] = slot
        for missing in {_key(s.schedule.reference) for s in unique.values()} - set(schedules):
            schedules[missing] = await self._schedule(missing, record)  # a server that ignored _include
        # a slot booked elsewhere that the server still calls free is offered here (one call per search
        # is kept): the scheduler leaves out what the callouts booked, and a create checks the slot
        record.matches = len(unique)
        return [self._slot(s, schedules.get(_key(s.schedule.reference))) for s in unique.values()]

    async def _schedules_of(self, query: SlotQuery, record: CallRecord) -> dict[str, _Schedule]:
        """The schedules of the query's practitioners and of its locations (both, when both are named),
        kept a few minutes: a schedule's actors change rarely, and a search then costs one call."""
        key = (query.practitioners, query.locations)
        kept = self._schedules_seen.get(key)
        if kept is not None and kept[0] > time.monotonic():
            return kept[1]
        if len(self._schedules_seen) > 1000:
            self._schedules_seen.clear()
        found = await self._search_schedules(query, record)
        self._schedules_seen[key] = (time.monotonic() + SCHEDULE_SECONDS, found)
        return found

    async def _search_schedules(self, query: SlotQuery, record: CallRecord) -> dict[str, _Schedule]:
        found: dict[str, _Schedule] | None = None
        for kind, ids in (("Practitioner", query.practitioners), ("Location", query.locations)):
            if not ids:
                continue
            named = set(ids)
            params = [("actor", ",".join(f"{kind}/{i}" for i in ids)), ("_count", str(PAGE_SIZE))]
            schedules = [self.decoded(raw, _Schedule, record, "a schedule search")
                         for raw in (await self._search("/Schedule", params, record, "a schedule search")).get("Schedule", [])]
            mine = {f"Schedule/{s.id}": s for s in schedules if any(_id(a.reference, kind) in named for a in s.actor)}
            found = mine if found is None else {k: v for k, v in found.items() if k in mine}
        return found or {}

    async def _occupied(self, slot_ids: list[str], record: CallRecord) -> set[str]:
        """The slots among these that a live Appointment names: taken, whatever `Slot.status` says."""
        return {slot for a in await self._live_on(slot_ids, record) for slot in a.slots if slot in slot_ids}

    async def _live_on(self, slot_ids: list[str], record: CallRecord) -> list[_Live]:
        """The live Appointments naming any of these slots."""
        found: list[_Live] = []
        for at in range(0, len(slot_ids), _CHUNK):
            chunk = set(slot_ids[at:at + _CHUNK])
            params = [("slot", ",".join(f"Slot/{i}" for i in sorted(chunk))), ("_count", str(PAGE_SIZE))]
            for raw in (await self._search("/Appointment", params, record, "an appointment search")).get("Appointment", []):
                a = self.decoded(raw, _Appointment, record, "an appointment search")
                slots = {i for i in (_id(r.reference, "Slot") for r in a.slot) if i in chunk}
                if a.status in _LIVE and slots:
                    found.append(_Live(_appointment(a), slots))
        return found

    async def _schedule(self, reference: str | None, record: CallRecord) -> _Schedule | None:
        schedule_id = _id(reference, "Schedule")
        if schedule_id is None:
            return None
        response = await self.call("GET", f"/Schedule/{segment(schedule_id)}", record)
        if response.status != 200:
            raise self.failure(response, record, "the schedule")
        return self.decoded(response, _Schedule, record, "a schedule read")

    def _slot(self, s: _Slot, schedule: _Schedule | None, status: str | None = None) -> EhrSlot:
        actors = [a.reference for a in schedule.actor] if schedule is not None else []
        return EhrSlot(id=s.id, start=s.start, end=s.end, status=status or s.status,
                       schedule=_id(s.schedule.reference, "Schedule"), practitioner=_first(actors, "Practitioner"),
                       location=_first(actors, "Location"), service_types=_codings(s.serviceType))

    async def read_slot(self, slot_id: str, record: CallRecord) -> EhrSlot:
        """The slot as the server has it, `busy` when a live Appointment names it."""
        return (await self._slot_and_bookings(slot_id, record))[0]

    async def _slot_and_bookings(self, slot_id: str, record: CallRecord) -> tuple[EhrSlot, list[EhrAppointment]]:
        response = await self.call("GET", f"/Slot/{_checked(slot_id, 'slot')}", record)
        if response.status != 200:
            raise self.failure(response, record, "the slot")
        slot = self.decoded(response, _Slot, record, "a slot read")
        schedule = await self._schedule(slot.schedule.reference, record)
        live = [found.appointment for found in await self._live_on([slot.id], record)]
        return self._slot(slot, schedule, "busy" if live and slot.status == "free" else None), live

    async def _mark(self, slot_id: str, status: str, record: CallRecord) -> None:
        """Set the slot's status where the server lets Slots be updated, tagged as the gateway's doing
        so that only a slot the gateway marked busy is freed by it. A refusal changes nothing: the
        Appointments on the slot still say it is taken."""
        if not (await self._capabilities(record))[1]:
            return
        response = await self.call("GET", f"/Slot/{_checked(slot_id, 'slot')}", record)
        raw = read_json(response) if response.status == 200 else None
        if not isinstance(raw, dict) or raw.get("status") == status:
            return
        tags = [t for t in (raw.get("meta") or {}).get("tag", []) if t != _MARK]
        if status == "free" and len(tags) == len((raw.get("meta") or {}).get("tag", [])):
            return  # not the gateway's mark: someone else made it busy
        raw["status"] = status
        raw["meta"] = {**(raw.get("meta") or {}), "tag": tags + ([_MARK] if status == "busy" else [])}
        if not raw["meta"]["tag"]:
            del raw["meta"]["tag"]
        etag = response.headers.get("etag")
        await self.call("PUT", f"/Slot/{_checked(slot_id, 'slot')}", record, body=raw,
                        headers={"If-Match": etag} if etag else {})

    # -- appointments -----------------------------------------------------------------------------------

    def _body(self, request: BookRequest, slot: EhrSlot) -> dict[str, Any]:
        """The full Appointment a booking sends: its start and end, practitioner and location from the
        slot and its schedule where the request does not name them."""
        participants = [("Patient", request.patient), ("Practitioner", request.practitioner or slot.practitioner),
                        ("Location", request.location or slot.location)]
        body: dict[str, Any] = {
            "resourceType": "Appointment", "status": "booked",
            "identifier": [{"system": s, "value": v} if s else {"value": v} for s, v in request.identifiers],
            "serviceType": [_concept((c,)) for c in request.service_types],
            "start": request.start or slot.start, "end": request.end or slot.end,
            "slot": [{"reference": f"Slot/{request.slot}"}], "comment": request.comment,
            "participant": [{"actor": {"reference": f"{kind}/{i}"}, "required": "required", "status": "accepted"}
                            for kind, i in participants if i],
        }
        if request.appointment_types:
            body["appointmentType"] = _concept(request.appointment_types)
        return {k: v for k, v in body.items() if v not in (None, [])}

    async def book(self, request: BookRequest, record: CallRecord) -> EhrAppointment:
        slot, live = await self._slot_and_bookings(request.slot, record)
        ours = [a for a in live if request.identifiers and request.identifiers[0] in a.identifiers]
        if ours:  # an earlier send of this very booking: nothing is sent again
            return ours[0]
        if slot.status != "free":  # the server would book it again: the gateway does not
            record.error_code = "SLOT_TAKEN"
            raise EhrRefused(f"the {self.source} EHR's slot is not free", details_code="SLOT_TAKEN")
        body = self._body(request, slot)
        conditional = bool(request.identifiers) and await self.conditional_create(record)
        if request.identifiers and not conditional:
            # no If-None-Exist here: the identifier is looked for first, so one booking is one Appointment
            system, value = request.identifiers[0]
            params = [("identifier", f"{system}|{value}" if system else value)]
            for raw in (await self._search("/Appointment", params, record, "an appointment search")).get("Appointment", []):
                earlier = _appointment(self.decoded(raw, _Appointment, record, "an appointment search"))
                if earlier.status in _LIVE and request.identifiers[0] in earlier.identifiers:
                    if earlier.slot == request.slot:
                        return earlier
                    record.error_code = "IDENTIFIER_ON_ANOTHER_SLOT"
                    raise EhrRefused(f"the {self.source} EHR already holds a booking with this identifier on "
                                     "another slot", details_code="IDENTIFIER_ON_ANOTHER_SLOT")
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
        await self._mark(request.slot, "busy", CallRecord())
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
            response = await self.call("PUT", f"/Appointment/{_checked(appointment_id, 'appointment')}", record,
                                       body=raw, headers=headers)
            if response.status == 412 and attempt == 1:
                continue  # changed since it was read: read again, once
            if response.status != 200:
                raise self.failure(response, record, "the cancellation")
            if not response.content:
                done = await self.read(appointment_id, record)
            else:
                done = _appointment(self.decoded(response, _Appointment, record, "the cancellation"))
            if done.slot and done.status == "cancelled":
                try:  # the slot the gateway marked busy is free again, unless another booking holds it
                    if not await self._occupied([done.slot], CallRecord()):
                        await self._mark(done.slot, "free", CallRecord())
                except GatewayError:
                    pass  # the cancel stands; the slot stays marked until someone frees it
            return done
        raise AssertionError("the second attempt always returns")

    async def find_booked(self, request: BookRequest, record: CallRecord) -> EhrAppointment | None:
        """This booking's live appointment on its very slot: by its identifier where the server keeps
        and searches it, else by its patient and slot; never one carrying another booking's identifier."""
        searches: list[list[tuple[str, str]]] = []
        if request.identifiers:
            system, value = request.identifiers[0]
            searches.append([("identifier", f"{system}|{value}" if system else value)])
        searches.append([("patient", f"Patient/{request.patient}"), ("slot", f"Slot/{request.slot}")])
        for params in searches:
            found = [_appointment(self.decoded(raw, _Appointment, record, "an appointment search")) for raw in
                     (await self._search("/Appointment", params, record, "an appointment search")).get("Appointment", [])]
            mine = [a for a in found if a.slot == request.slot and a.patient == request.patient and a.status in _LIVE
                    and not _foreign(a, request)]
            record.matches = len(mine)
            if mine:
                return mine[0]
        return None


def _foreign(a: EhrAppointment, request: BookRequest) -> bool:
    """The appointment carries an identifier of the request's system with another value: another
    booking's, whatever else matches."""
    ours = dict(request.identifiers)
    return any(system in ours and value != ours[system] for system, value in a.identifiers)


def _instant(value: str) -> datetime:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00")) if "T" in value else \
        datetime.fromisoformat(value + "T00:00:00+00:00")
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _offers(slot: _Slot, query: SlotQuery) -> bool:
    """The slot offers one of the query's services (a slot that names none is let through: its
    schedule may say what it offers)."""
    if not query.service_types or not slot.serviceType:
        return True
    offered = {(c.system, c.code) for cc in slot.serviceType for c in cc.coding} | \
        {(None, c.code) for cc in slot.serviceType for c in cc.coding}
    return any((c.system, c.code) in offered for c in query.service_types)


def _reason(reason: str | None) -> dict[str, Any]:
    if reason in _REASON_CODES:
        return {"coding": [{"system": CANCEL_REASONS, "code": reason}]}
    concept: dict[str, Any] = {"coding": [{"system": CANCEL_REASONS, "code": "other"}]}
    return concept | ({"text": reason} if reason else {})

