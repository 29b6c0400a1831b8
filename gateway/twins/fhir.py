"""The twin of a plain FHIR R4 server's scheduling (IHE ITI Scheduling), below `/fhir`.

Written from FHIR R4's RESTful API and `scheduling-out.md` §3, never from the gateway's client:
- `GET /fhir/metadata` (public): the CapabilityStatement, saying whether conditional create is served.
- `GET /fhir/Slot?schedule.actor=…&start=ge…&start=lt…&service-type=…&status=free[&_include=Slot:schedule]
  [&_count=]`: a searchset sorted by start, paged by absolute `next` links. FHIR's rules: a repeated
  parameter is an AND, commas inside one are an OR; a parameter the server does not know is ignored
  (and left out of the `self` link), or refused (400) under `Prefer: handling=strict`.
- `GET /fhir/Slot/{id}` (any status), `GET /fhir/Schedule/{id}`, `GET /fhir/Schedule?actor=…` (a
  practitioner's or location's schedules).
- `POST /fhir/Appointment`: a full booked Appointment on one free slot. `If-None-Exist:
  identifier=system|value` when conditional create is on: one match answers it (200, nothing
  created), several 412; a server without it (`conditional_create` off) never reads the header. A slot
  already taken is 409 (`conflict`: FHIR's answer to a clash with the server's current state;
  Cerner's 422 is a business rule of its own). 201 with the Appointment (none under
  `Prefer: return=minimal`, or ever with `return_minimal`), `Location: …/Appointment/{id}/_history/1`,
  `ETag: W/"1"`.
- `GET /fhir/Appointment/{id}`, `GET /fhir/Appointment?identifier=…|patient=…&date=…&slot=…&status=…`.
- `PUT /fhir/Appointment/{id}`: only a change of status to `cancelled`, with a cancelationReason
  (anything else is 422: this server reschedules by a cancel and a new booking); `If-Match` honoured.
- `permissive` (TwinConfig): the server that enforces nothing beyond the spec, as many do: it books
  a taken slot, leaves `Slot.status` as it was, and takes any participant and time (only the slot must
  be one of its own, to place the appointment on its calendar); Slots are never updated by a client.
  Otherwise, as an EHR that checks references: an unknown Patient is refused (400, `not-found`).
- `GET /fhir/Patient/{id}` (404 unknown), `GET /fhir/Patient?identifier=…&_id=…[&_count=&_offset=]`:
  FHIR's token forms (`system|value`, `|value` no system, `value` any system), commas an OR, repeats an
  AND, unknown parameters ignored as above. The MRN: `urn:mrn:example`, of type v2-0203 MR.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, urlencode

import msgspec
from litestar import Request, get, post, put
from litestar.types import ASGIApp

from gateway.twins.app import answer, gate, outcome, stored_then_failed, twin, utc
from gateway.twins.calendar import Appointment, Slot, Taken
from gateway.twins.config import MRN_SYSTEMS, TwinConfig, TwinPatient, TwinSchedule

BASE_PATH = "/fhir"
_FAR_PAST = datetime(1, 1, 2, tzinfo=timezone.utc)
_FAR_FUTURE = datetime(9999, 12, 30, tzinfo=timezone.utc)
_PAGE, _MAX_PAGE = 50, 200
_SLOT_PARAMS = frozenset({"schedule.actor", "schedule", "start", "service-type", "status", "_include", "_count",
                          "_offset"})
_SCHEDULE_PARAMS = frozenset({"actor", "_id", "_count"})
_APPOINTMENT_PARAMS = frozenset({"identifier", "patient", "date", "status", "slot", "_count"})
_INCLUDES = frozenset({"Slot:schedule", "Slot:schedule:Schedule"})
_PATIENT_PARAMS = frozenset({"_id", "identifier", "_count", "_offset"})
MRN_SYSTEM = MRN_SYSTEMS["fhir"]


# -- what the twin reads (FHIR R4's shapes; unknown elements are let through, as servers do) -----------

class _Ref(msgspec.Struct, kw_only=True):
    reference: str | None = None
    display: str | None = None


class _Participant(msgspec.Struct, kw_only=True):
    status: str  # 1..1 in R4
    actor: _Ref | None = None


class _Identifier(msgspec.Struct, kw_only=True):
    system: str | None = None
    value: str | None = None


class _Coding(msgspec.Struct, kw_only=True, omit_defaults=True):
    system: str | None = None
    code: str | None = None
    display: str | None = None


class _Concept(msgspec.Struct, kw_only=True, omit_defaults=True):
    coding: list[_Coding] = []
    text: str | None = None


class _AppointmentIn(msgspec.Struct, kw_only=True):
    resourceType: str
    status: str
    id: str | None = None
    slot: list[_Ref] = []
    participant: list[_Participant] = []
    start: str | None = None
    end: str | None = None
    identifier: list[_Identifier] = []
    comment: str | None = None
    serviceType: list[_Concept] = []
    appointmentType: _Concept | None = None
    cancelationReason: _Concept | None = None


class _Records:
    """What FHIR keeps of an appointment beyond the shared calendar: when each version was made, and
    the coded elements it was booked (or cancelled) with."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._updated: dict[tuple[str, int], str] = {}
        self._coded: dict[str, dict[str, Any]] = {}

    def stamp(self, a: Appointment, **coded: Any) -> None:
        with self._lock:
            self._updated[(a.id, a.version)] = utc(datetime.now(timezone.utc))
            self._coded.setdefault(a.id, {}).update({k: v for k, v in coded.items() if v})

    def updated(self, a: Appointment) -> str:
        with self._lock:
            return self._updated.get((a.id, a.version)) or utc(datetime.now(timezone.utc))

    def coded(self, appointment_id: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._coded.get(appointment_id, {}))


_records_lock = threading.Lock()


def _records(request: Request[Any, Any, Any]) -> _Records:
    with _records_lock:
        found = getattr(request.app.state, "fhir_records", None)
        if found is None:
            found = request.app.state.fhir_records = _Records()
        return found


# -- resources as the twin answers them -------------------------------------------------------------------

def _base(request: Request[Any, Any, Any]) -> str:
    return str(request.base_url).rstrip("/") + BASE_PATH


def _concepts(codes: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
    return [{"coding": [{"system": system, "code": code}]} for system, code in codes]


def _slot(s: Slot) -> dict[str, Any]:
    return {"resourceType": "Slot", "id": s.id, "serviceType": _concepts(s.schedule.service_types),
            "schedule": {"reference": f"Schedule/{s.schedule.id}"}, "status": s.status,
            "start": utc(s.start), "end": utc(s.end)}


def _schedule(s: TwinSchedule) -> dict[str, Any]:
    return {"resourceType": "Schedule", "id": s.id, "active": True, "serviceType": _concepts(s.service_types),
            "actor": [{"reference": f"Practitioner/{s.practitioner}"}, {"reference": f"Location/{s.location}"}]}


def _patient(p: TwinPatient) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Patient", "id": p.id, "meta": {"versionId": "1"},
        "identifier": [{"use": "usual", "system": MRN_SYSTEM, "value": p.mrn,
                        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                             "code": "MR"}]}}],
        "active": True, "name": [{"use": "official", "family": p.family, "given": list(p.given)}],
        "gender": p.gender, "birthDate": p.birthDate,
    }
    if p.phone:
        resource["telecom"] = [{"system": "phone", "value": p.phone, "use": "home"}]
    return resource


def _appointment(a: Appointment, records: _Records) -> dict[str, Any]:
    coded = records.coded(a.id)
    actors = (f"Patient/{a.patient}", f"Practitioner/{a.schedule.practitioner}", f"Location/{a.schedule.location}")
    resource: dict[str, Any] = {
        "resourceType": "Appointment", "id": a.id,
        "meta": {"versionId": str(a.version + 1), "lastUpdated": records.updated(a)},
        "identifier": [{"system": s, "value": v} if s else {"value": v} for s, v in a.identifiers],
        "status": a.status, "cancelationReason": coded.get("cancelationReason"),
        "serviceType": coded.get("serviceType"), "appointmentType": coded.get("appointmentType"),
        "start": utc(a.start), "end": utc(a.end), "slot": [{"reference": f"Slot/{a.slot}"}], "comment": a.comment,
        "participant": [{"actor": {"reference": r}, "required": "required", "status": "accepted"} for r in actors],
    }
    return {k: v for k, v in resource.items() if v not in (None, [], {})}


def _etag(a: Appointment) -> str:
    return f'W/"{a.version + 1}"'


def _one(request: Request[Any, Any, Any], a: Appointment, status: int, **headers: str) -> ASGIApp:
    return answer(status, _appointment(a, _records(request)), headers={"ETag": _etag(a), **headers})


def _changed(request: Request[Any, Any, Any], a: Appointment, status: int, **headers: str) -> ASGIApp:
    """The answer to a create or an update: the resource, or none where `Prefer: return=minimal`
    asks for none or the server never sends one."""
    prefer = (request.headers.get("prefer") or "").replace(" ", "").lower().replace(";", ",").split(",")
    if twin(request).config.return_minimal or "return=minimal" in prefer:
        return answer(status, None, headers={"ETag": _etag(a), **headers})
    return _one(request, a, status, **headers)


def _bundle(request: Request[Any, Any, Any], links: list[tuple[str, str]], total: int,
            entries: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    base = _base(request)
    return {"resourceType": "Bundle", "type": "searchset", "total": total,
            "link": [{"relation": relation, "url": url} for relation, url in links],
            "entry": [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": mode}}
                      for r, mode in entries]}


def _capability(request: Request[Any, Any, Any], config: TwinConfig) -> dict[str, Any]:
    def params(*named: tuple[str, str, str]) -> list[dict[str, str]]:
        return [{"name": n, "type": t, "documentation": d} for n, t, d in named]

    slot = {"type": "Slot", "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchInclude": ["Slot:schedule"],
            "searchParam": params(("schedule", "reference", "also chained: schedule.actor=Practitioner/…,Location/…"),
                                  ("start", "date", "ge, gt, le, lt, eq"), ("service-type", "token", "system|code"),
                                  ("status", "token", "free, busy"))}
    schedule = {"type": "Schedule", "interaction": [{"code": "read"}, {"code": "search-type"}],
                "searchParam": params(("actor", "reference", "Practitioner/id, Location/id"),
                                      ("_id", "token", "the Schedule's id"))}
    appointment = {"type": "Appointment",
                   "interaction": [{"code": c} for c in ("create", "read", "update", "search-type")],
                   "versioning": "versioned-update", "readHistory": False, "updateCreate": False,
                   "conditionalCreate": config.conditional_create, "conditionalUpdate": False,
                   "searchParam": params(("identifier", "token", "system|value"),
                                         ("patient", "reference", "Patient/id"),
                                         ("date", "date", "the start"), ("slot", "reference", "Slot/id"),
                                         ("status", "token", "appointmentstatus"))}
    patient = {"type": "Patient", "interaction": [{"code": "read"}, {"code": "search-type"}],
               "searchParam": params(("_id", "token", "the Patient's id"), ("identifier", "token", "system|value"))}
    return {"resourceType": "CapabilityStatement", "status": "active",
            "date": datetime.now(timezone.utc).date().isoformat(), "publisher": "ehr-gateway EHR twin",
            "kind": "instance", "implementation": {"description": "plain FHIR R4 scheduling (IHE ITI Scheduling)",
                                                   "url": _base(request)},
            "fhirVersion": "4.0.1", "format": ["application/fhir+json", "json"],
            "rest": [{"mode": "server",
                      "security": {"description": "OAuth 2.0 client credentials (Bearer) from /oauth2/token"},
                      "resource": [slot, schedule, appointment, patient]}]}


# -- search parameters ------------------------------------------------------------------------------------

def _pairs(request: Request[Any, Any, Any]) -> list[tuple[str, str]]:
    return parse_qsl(request.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)


def _strict(request: Request[Any, Any, Any]) -> bool:
    prefer = (request.headers.get("prefer") or "").replace(" ", "").lower()
    return "handling=strict" in prefer.replace(";", ",").split(",")


def _instants(raw: str) -> tuple[datetime, datetime]:
    """The range a date or dateTime search value stands for (a day, or a second: R4's dateTime has
    its seconds)."""
    if len(raw) == 10:
        day = date.fromisoformat(raw)
        low = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        return low, low + timedelta(days=1)
    moment = datetime.fromisoformat(raw)
    moment = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    return moment, moment + timedelta(seconds=1)


def _date_test(value: str) -> Callable[[datetime], bool]:
    prefix = value[:2] if value[:2] in ("ge", "gt", "le", "lt", "eq") else "eq"
    raw = value[2:] if value[:2] == prefix else value
    try:
        low, high = _instants(raw)
    except (ValueError, IndexError):
        raise ValueError("a date search value is not a date or dateTime") from None
    return {"ge": lambda t: t >= low, "gt": lambda t: t >= high, "le": lambda t: t < high,
            "lt": lambda t: t < low, "eq": lambda t: low <= t < high}[prefix]


def _token_test(value: str) -> Callable[[tuple[str, str]], bool]:
    """`system|code`, `|code` (no system) or `code` (any system)."""
    if "|" not in value:
        return lambda coded: coded[1] == value
    system, _, code = value.partition("|")
    return lambda coded: coded == (system, code)


def _reference_ids(value: str, kind: str) -> set[str]:
    return {v.removeprefix(f"{kind}/") for v in value.split(",")}


def _slot_tests(pairs: list[tuple[str, str]]) -> list[Callable[[Slot], bool]]:
    """One test per parameter (ANDed); raises ValueError for a value it cannot read."""
    tests: list[Callable[[Slot], bool]] = []
    for name, value in pairs:
        if name == "start":
            on = _date_test(value)
            tests.append(lambda s, on=on: on(s.start))
        elif name == "service-type":
            any_of = [_token_test(v) for v in value.split(",")]
            tests.append(lambda s, any_of=any_of: any(t(c) for t in any_of for c in s.schedule.service_types))
        elif name == "status":
            tests.append(lambda s, values=set(value.split(",")): s.status in values)
        elif name == "schedule":
            tests.append(lambda s, ids=_reference_ids(value, "Schedule"): s.schedule.id in ids)
        elif name == "schedule.actor":
            refs = set(value.split(","))
            tests.append(lambda s, refs=refs: bool(refs & {f"Practitioner/{s.schedule.practitioner}",
                                                           f"Location/{s.schedule.location}", s.schedule.practitioner,
                                                           s.schedule.location}))
    return tests


def _appointment_tests(pairs: list[tuple[str, str]]) -> list[Callable[[Appointment], bool]]:
    tests: list[Callable[[Appointment], bool]] = []
    for name, value in pairs:
        if name == "identifier":
            any_of = [_token_test(v) for v in value.split(",")]
            tests.append(lambda a, any_of=any_of: any(t(i) for t in any_of for i in a.identifiers))
        elif name == "patient":
            tests.append(lambda a, ids=_reference_ids(value, "Patient"): a.patient in ids)
        elif name == "slot":
            tests.append(lambda a, ids=_reference_ids(value, "Slot"): a.slot in ids)
        elif name == "status":
            tests.append(lambda a, values=set(value.split(",")): a.status in values)
        elif name == "date":
            on = _date_test(value)
            tests.append(lambda a, on=on: on(a.start))
    return tests


def _patient_tests(pairs: list[tuple[str, str]]) -> list[Callable[[TwinPatient], bool]]:
    tests: list[Callable[[TwinPatient], bool]] = []
    for name, value in pairs:
        if name == "identifier":
            any_of = [_token_test(v) for v in value.split(",")]
            tests.append(lambda p, any_of=any_of: any(t((MRN_SYSTEM, p.mrn)) for t in any_of))
        elif name == "_id":
            tests.append(lambda p, ids=set(value.split(",")): p.id in ids)
    return tests


def _unknown(pairs: list[tuple[str, str]], known: frozenset[str]) -> list[str]:
    names = {n for n, v in pairs if n not in known or (n == "_include" and v not in _INCLUDES)}
    return sorted(names)


def _page(pairs: list[tuple[str, str]]) -> tuple[int, int]:
    values = dict(pairs)
    try:
        count, offset = int(values.get("_count", _PAGE)), int(values.get("_offset", 0))
    except ValueError:
        raise ValueError("_count and _offset are whole numbers") from None
    if count < 0 or offset < 0:
        raise ValueError("_count and _offset are not negative")
    return min(count, _MAX_PAGE), offset


def _links(request: Request[Any, Any, Any], kind: str, used: list[tuple[str, str]], count: int, offset: int,
           total: int) -> list[tuple[str, str]]:
    """A page's `self` link, and its `next` link when more follow (absolute, as FHIR's paging is)."""
    url = f"{_base(request)}/{kind}?"
    links = [("self", url + urlencode([*used, ("_count", count), ("_offset", offset)]))]
    if count and offset + count < total:
        links.append(("next", url + urlencode([*used, ("_count", count), ("_offset", offset + count)])))
    return links


# -- the routes -------------------------------------------------------------------------------------------

@get(f"{BASE_PATH}/metadata")
async def metadata(request: Request[Any, Any, Any]) -> ASGIApp:
    """Public, as FHIR's capabilities interaction is: a client reads it before it has a token."""
    twin(request).count("reads")
    return answer(200, _capability(request, twin(request).config))


@get(f"{BASE_PATH}/Slot")
async def search_slots(request: Request[Any, Any, Any]) -> ASGIApp:
    if (refused := await gate(request, "searches")) is not None:
        return refused
    state = twin(request)
    pairs = _pairs(request)
    unknown = _unknown(pairs, _SLOT_PARAMS)
    if unknown and _strict(request):
        return outcome(400, "not-supported", f"unknown search parameters: {', '.join(unknown)}")
    used = [(n, v) for n, v in pairs if n not in unknown and n not in ("_count", "_offset")]
    try:
        tests, (count, offset) = _slot_tests(used), _page(pairs)
    except ValueError as exc:
        return outcome(400, "invalid", str(exc))
    found = [s for s in state.calendar.slots(_FAR_PAST, _FAR_FUTURE, free_only=False) if all(t(s) for t in tests)]
    page = found[offset:offset + count]
    links = _links(request, "Slot", used, count, offset, len(found))
    entries = [(_slot(s), "match") for s in page]
    if any(n == "_include" for n, _ in used):
        schedules = {s.schedule.id: s.schedule for s in page}
        entries += [(_schedule(s), "include") for s in schedules.values()]
    return answer(200, _bundle(request, links, len(found), entries))


@get(f"{BASE_PATH}/Slot/{{slot_id:str}}")
async def read_slot(request: Request[Any, Any, Any]) -> ASGIApp:
    slot_id = request.path_params["slot_id"]
    if (refused := await gate(request, "reads")) is not None:
        return refused
    state = twin(request)
    found = state.calendar.slot(slot_id)
    return outcome(404, "not-found", "no such Slot") if found is None else answer(200, _slot(found))


@get(f"{BASE_PATH}/Schedule/{{schedule_id:str}}")
async def read_schedule(request: Request[Any, Any, Any]) -> ASGIApp:
    schedule_id = request.path_params["schedule_id"]
    if (refused := await gate(request, "reads")) is not None:
        return refused
    state = twin(request)
    found = next((s for s in state.calendar.schedules if s.id == schedule_id), None)
    return outcome(404, "not-found", "no such Schedule") if found is None else answer(200, _schedule(found))


@get(f"{BASE_PATH}/Schedule")
async def search_schedules(request: Request[Any, Any, Any]) -> ASGIApp:
    if (refused := await gate(request, "searches")) is not None:
        return refused
    pairs = _pairs(request)
    unknown = _unknown(pairs, _SCHEDULE_PARAMS)
    if unknown and _strict(request):
        return outcome(400, "not-supported", f"unknown search parameters: {', '.join(unknown)}")
    used = [(n, v) for n, v in pairs if n not in unknown and n != "_count"]
    found = twin(request).calendar.schedules
    for name, value in used:
        if name == "actor":
            refs = set(value.split(","))
            found = [s for s in found if {f"Practitioner/{s.practitioner}", f"Location/{s.location}"} & refs]
        elif name == "_id":
            found = [s for s in found if s.id in set(value.split(","))]
    self_link = f"{_base(request)}/Schedule?{urlencode(used)}"
    return answer(200, _bundle(request, [("self", self_link)], len(found), [(_schedule(s), "match") for s in found]))


@get(f"{BASE_PATH}/Appointment/{{appointment_id:str}}")
async def read_appointment(request: Request[Any, Any, Any]) -> ASGIApp:
    appointment_id = request.path_params["appointment_id"]
    if (refused := await gate(request, "reads")) is not None:
        return refused
    state = twin(request)
    found = state.calendar.get(appointment_id)
    return outcome(404, "not-found", "no such Appointment") if found is None else _one(request, found, 200)


@get(f"{BASE_PATH}/Appointment")
async def search_appointments(request: Request[Any, Any, Any]) -> ASGIApp:
    if (refused := await gate(request, "searches")) is not None:
        return refused
    state = twin(request)
    pairs = _pairs(request)
    unknown = _unknown(pairs, _APPOINTMENT_PARAMS)
    if unknown and _strict(request):
        return outcome(400, "not-supported", f"unknown search parameters: {', '.join(unknown)}")
    used = [(n, v) for n, v in pairs if n not in unknown and n != "_count"]
    try:
        tests = _appointment_tests(used)
    except ValueError as exc:
        return outcome(400, "invalid", str(exc))
    found = [a for a in state.calendar.appointments() if all(t(a) for t in tests)]
    records = _records(request)
    self_link = f"{_base(request)}/Appointment?{urlencode(used)}"
    return answer(200, _bundle(request, [("self", self_link)], len(found),
                               [(_appointment(a, records), "match") for a in found]))


def _decode(request: Request[Any, Any, Any], body: bytes) -> _AppointmentIn | ASGIApp:
    media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media not in ("application/fhir+json", "application/json"):
        return outcome(415, "not-supported", "this server reads application/fhir+json")
    try:
        resource = msgspec.json.decode(body, type=_AppointmentIn)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return outcome(400, "structure", f"not an R4 Appointment: {exc}")
    if resource.resourceType != "Appointment":
        return outcome(400, "structure", "the body is not an Appointment")
    return resource


def _booking(resource: _AppointmentIn, state: Any) -> tuple[Slot, str] | ASGIApp:
    """The slot and patient of a create, or the refusal of a request this server does not take."""
    if resource.status != "booked":
        return outcome(422, "business-rule", "an Appointment is created here with status booked")
    if len(resource.slot) != 1 or not (resource.slot[0].reference or "").startswith("Slot/"):
        return outcome(422, "business-rule", "an Appointment books exactly one Slot (slot.reference Slot/{id})")
    slot = state.calendar.slot(resource.slot[0].reference.removeprefix("Slot/"))
    if slot is None:
        return outcome(422, "not-found", "the Slot referenced is unknown")
    actors = [p.actor.reference or "" for p in resource.participant if p.actor is not None]
    patients = [a.removeprefix("Patient/") for a in actors if a.startswith("Patient/")]
    if len(patients) != 1 or not patients[0]:
        return outcome(422, "required", "an Appointment needs exactly one Patient participant")
    if state.config.permissive:
        return slot, patients[0]  # nothing beyond the spec: any participant, any time
    if state.patients.get(patients[0]) is None:
        return outcome(400, "not-found", "the Patient referenced is not a resource of this server")
    for kind, expected in (("Practitioner", slot.schedule.practitioner), ("Location", slot.schedule.location)):
        if any(a.startswith(f"{kind}/") and a != f"{kind}/{expected}" for a in actors):
            return outcome(422, "business-rule", f"the {kind} participant is not the Slot's schedule's")
    if resource.start is None or resource.end is None:
        return outcome(400, "invariant", "app-3: a booked Appointment has a start and an end")
    try:
        matches = (_instants(resource.start)[0], _instants(resource.end)[0]) == (slot.start, slot.end)
    except (ValueError, IndexError):
        return outcome(400, "value", "start and end are instants")
    if not matches:
        return outcome(422, "business-rule", "start and end are not the Slot's")
    return slot, patients[0]


def _conditional(request: Request[Any, Any, Any]) -> list[Appointment] | ASGIApp | None:
    """The appointments an `If-None-Exist` names, or None when it is absent or not served."""
    criteria = request.headers.get("if-none-exist")
    if criteria is None or not twin(request).config.conditional_create:
        return None  # a server without conditional create never reads the header
    pairs = parse_qsl(criteria.strip().removeprefix("?"), keep_blank_values=True)
    if not pairs or any(n != "identifier" or not v for n, v in pairs):
        return outcome(400, "not-supported", "If-None-Exist takes identifier=system|value here")
    tests = _appointment_tests(pairs)
    return [a for a in twin(request).calendar.appointments() if all(t(a) for t in tests)]


@post(f"{BASE_PATH}/Appointment", status_code=201)
async def create_appointment(request: Request[Any, Any, Any]) -> ASGIApp:
    if (refused := await gate(request, "creates")) is not None:
        return refused
    state = twin(request)
    resource = _decode(request, await request.body())
    if not isinstance(resource, _AppointmentIn):
        return resource
    booking = _booking(resource, state)
    if not isinstance(booking, tuple):
        return booking
    existing = _conditional(request)
    if existing is not None and not isinstance(existing, list):
        return existing
    if existing:  # FHIR: one match answers it; more than one is an ambiguous precondition
        if len(existing) > 1:
            return outcome(412, "duplicate", "If-None-Exist matches more than one Appointment")
        found = existing[0]
        where = f"{_base(request)}/Appointment/{found.id}/_history/{found.version + 1}"
        return _changed(request, found, 200, Location=where)
    return _store(request, resource, *booking)


def _store(request: Request[Any, Any, Any], resource: _AppointmentIn, slot: Slot, patient: str) -> ASGIApp:
    identifiers = tuple((i.system or "", i.value) for i in resource.identifier if i.value)
    try:
        made = twin(request).calendar.book(slot.id, patient, identifiers=identifiers, comment=resource.comment,
                                           exclusive=not twin(request).config.permissive)
    except Taken:
        return outcome(409, "conflict", "the Slot is no longer free")
    _records(request).stamp(made, serviceType=msgspec.to_builtins(resource.serviceType),
                            appointmentType=msgspec.to_builtins(resource.appointmentType))
    if (failed := stored_then_failed(request)) is not None:
        return failed
    return _changed(request, made, 201, Location=f"{_base(request)}/Appointment/{made.id}/_history/1")


def _changes(sent: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The elements an update would change beyond status and cancelationReason (meta and text are
    the server's)."""
    ignored = {"meta", "text", "status", "cancelationReason"}
    names = (set(sent) | set(current)) - ignored
    return sorted(n for n in names if sent.get(n) != current.get(n))


@put(f"{BASE_PATH}/Appointment/{{appointment_id:str}}", status_code=200)
async def update_appointment(request: Request[Any, Any, Any]) -> ASGIApp:
    appointment_id = request.path_params["appointment_id"]
    if (refused := await gate(request)) is not None:
        return refused
    state = twin(request)
    body = await request.body()
    resource = _decode(request, body)
    if not isinstance(resource, _AppointmentIn):
        return resource
    if resource.id != appointment_id:
        return outcome(400, "invalid", "the Appointment's id is not the one in the URL")
    current = state.calendar.get(appointment_id)
    if current is None:
        return outcome(404, "not-found", "no such Appointment (this server does not create on update)")
    # from this read to the change nothing awaits: no other request on the twin's loop comes between
    wanted = request.headers.get("if-match")
    if wanted is not None and wanted.strip().removeprefix("W/") != _etag(current).removeprefix("W/"):
        return outcome(412, "conflict", "If-Match names a version that is not the current one")
    changed = _changes(msgspec.json.decode(body), _appointment(current, _records(request)))
    if changed:
        return outcome(422, "business-rule", f"only a status change to cancelled is taken by an update here, "
                                             f"not a change of {', '.join(changed)}: cancel and book again")
    if resource.status == current.status:
        return _changed(request, current, 200)
    if resource.status != "cancelled":
        return outcome(422, "business-rule", "an update here only cancels (status cancelled)")
    if resource.cancelationReason is None:
        return outcome(422, "required", "a cancellation carries a cancelationReason")
    return _cancel(request, current, resource.cancelationReason)


def _cancel(request: Request[Any, Any, Any], current: Appointment, reason: _Concept) -> ASGIApp:
    state = twin(request)
    state.count("cancels")
    said = reason.text or next((c.code for c in reason.coding if c.code), None)
    cancelled = state.calendar.cancel(current.id, said)
    _records(request).stamp(cancelled, cancelationReason=msgspec.to_builtins(reason))
    return _changed(request, cancelled, 200)


@get(f"{BASE_PATH}/Patient")
async def search_patients(request: Request[Any, Any, Any]) -> ASGIApp:
    if (refused := await gate(request, "searches", "patient_reads")) is not None:
        return refused
    pairs = _pairs(request)
    unknown = _unknown(pairs, _PATIENT_PARAMS)
    if unknown and _strict(request):
        return outcome(400, "not-supported", f"unknown search parameters: {', '.join(unknown)}")
    used = [(n, v) for n, v in pairs if n not in unknown and n not in ("_count", "_offset")]
    try:
        tests, (count, offset) = _patient_tests(used), _page(pairs)
    except ValueError as exc:
        return outcome(400, "invalid", str(exc))
    found = [p for p in twin(request).patients.all() if all(t(p) for t in tests)]
    entries = [(_patient(p), "match") for p in found[offset:offset + count]]
    bundle = _bundle(request, _links(request, "Patient", used, count, offset, len(found)), len(found), entries)
    if not entries:  # FHIR has no empty arrays: a searchset without matches has no entry
        del bundle["entry"]
    return answer(200, bundle)


@get(f"{BASE_PATH}/Patient/{{patient_id:str}}")
async def read_patient(request: Request[Any, Any, Any]) -> ASGIApp:
    patient_id = request.path_params["patient_id"]
    if (refused := await gate(request, "reads", "patient_reads")) is not None:
        return refused
    found = twin(request).patients.get(patient_id)
    if found is None:
        return outcome(404, "not-found", "no such Patient")
    return answer(200, _patient(found), headers={"ETag": 'W/"1"'})


def route_handlers() -> list[Any]:
    return [metadata, search_slots, read_slot, read_schedule, search_schedules, read_appointment, search_appointments,
            create_appointment, update_appointment, search_patients, read_patient]
