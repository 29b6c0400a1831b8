"""The twin of Oracle Health (Cerner) Millennium R4's scheduling API, from `scheduling-out.md` §3 and
Cerner's own documentation (content/millennium/r4/base/workflow/{slot,schedule,appointment}.md):

- `GET Slot`: `service-type` (unless `_id`), `start` twice (`ge…` and `lt…`), `schedule.actor`
  (Practitioner/<id>,…), `-location` (Location/<id>,…), `_count`, `_include=Slot:schedule`; each at
  most once, values comma-separated; any other parameter is refused (400), as Cerner refuses
  unsupported ones. Free slots only, by start; pages linked by an absolute `next` URL.
- `GET Slot/{id}`: whatever its status.
- `POST Appointment`: the documented booked body only (422 otherwise); 201, empty body, `Location`,
  `ETag: W/"0"`; a taken slot is 422.
- `GET Appointment/{id}`, `GET Appointment?patient|practitioner|location=…&date=…` (one of the three).
- `PATCH Appointment/{id}`: JSON Patch, `If-Match` required (412 without it, as Cerner documents),
  409 when stale; `replace /status` to `cancelled` with an optional `add /cancelationReason`.
- `GET Patient/{id}` (404 for an unknown id), `GET Patient?identifier=…|_id=…` (individuals/patient.md):
  `identifier` once, one value, `<system>|<value>` or a bare `<value>` (any system); `_id` values
  comma-separated; `_count`. Cerner's demographic parameters are refused here (400): the twin does not
  match people by name. Its MRN: `urn:oid:2.16.840.1.113883.6.1000`, of type MRN (code set 4, v2 MR).
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any
from urllib.parse import parse_qsl, urlencode

import msgspec
from litestar import Request, get, patch, post
from litestar.params import FromPath
from litestar.types import ASGIApp

from gateway.twins.app import answer, gate, outcome, stored_then_failed, twin, utc
from gateway.twins.calendar import Appointment, Slot, Taken
from gateway.twins.config import CERNER_TENANT, MRN_SYSTEMS, TwinPatient, TwinSchedule

BASE_PATH = f"/r4/{CERNER_TENANT}"
SERVICE_SYSTEM = f"https://fhir.cerner.com/{CERNER_TENANT}/codeSet/14249"
CANCEL_SYSTEM = "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason"
LOCATION_EXTENSION = "https://fhir-ehr.cerner.com/r4/StructureDefinition/scheduling-location"
DEFAULT_COUNT, MAX_COUNT = 20, 100
PAGE = "-pageContext"  # the twin's own paging parameter, only ever read back from a `next` link

_SLOT_PARAMS = {"_id", "service-type", "start", "schedule.actor", "-location", "_count", "_include", PAGE}
_APPOINTMENT_PARAMS = {"_id", "patient", "practitioner", "location", "date", "status", "_count"}
# a booked create: what Cerner's create documents, and `comment` (an element of Cerner's Appointment
# that its proposed create takes; nothing else is written)
_CREATE_ELEMENTS = {"resourceType", "status", "slot", "participant", "reasonCode", "comment"}


class Refused(Exception):
    """A request Cerner would refuse: the status and the OperationOutcome's text."""

    def __init__(self, status: int, text: str, code: str = "invalid") -> None:
        super().__init__(text)
        self.status, self.text, self.code = status, text, code

    def answer(self) -> ASGIApp:
        return outcome(self.status, self.code, self.text)


def _query(request: Request[Any, Any, Any]) -> list[tuple[str, str]]:
    """The query's pairs in order, repeats kept (Cerner's rules count them)."""
    return parse_qsl(request.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)


def _once(pairs: list[tuple[str, str]], allowed: set[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in pairs:
        if name not in allowed:
            raise Refused(400, f"the search parameter {name[:40]} is not supported")
        found.setdefault(name, []).append(value)
    return found


def _moment(text: str, upper: bool = False) -> datetime:
    """A date-time with an offset, or a date (its midnight, UTC)."""
    try:
        if "T" not in text:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise Refused(400, "a date parameter is not a date or a date-time") from None
    if moment.tzinfo is None:
        raise Refused(400, "a date-time parameter needs an offset")
    return moment


def _range(values: list[str], name: str, *, single_ok: bool) -> tuple[datetime | None, datetime | None]:
    """`ge…` and `lt…` (both, or with `single_ok` one of them): the range [lower, upper)."""
    prefixes = sorted(v[:2] for v in values)
    if prefixes != ["ge", "lt"] and not (single_ok and len(values) == 1 and prefixes[0] in ("ge", "lt")):
        raise Refused(400, f"{name} must be given twice, once with ge and once with lt")
    bounds = {v[:2]: _moment(v[2:]) for v in values}
    lower, upper = bounds.get("ge"), bounds.get("lt")
    if lower is not None and upper is not None and lower >= upper:
        raise Refused(400, f"{name}: the lower bound is not before the upper bound")
    return lower, upper


def _single(found: dict[str, list[str]], name: str) -> list[str]:
    """A parameter given at most once, its comma-separated values (none: [])."""
    values = found.get(name, [])
    if len(values) > 1:
        raise Refused(400, f"{name} may be given once, its values comma-separated")
    return [v for v in values[0].split(",") if v] if values else []


def _references(values: list[str], kind: str, name: str, *, bare_ok: bool = False) -> set[str]:
    ids = set()
    for value in values:
        if value.startswith(f"{kind}/"):
            value = value[len(kind) + 1:]
        elif not bare_ok or "/" in value:
            raise Refused(400, f"{name} takes {kind} references")
        ids.add(value)
    return ids


def _count(found: dict[str, list[str]]) -> int:
    values = _single(found, "_count")
    if not values:
        return DEFAULT_COUNT
    if not values[0].isdigit() or not 1 <= int(values[0]) <= MAX_COUNT:
        raise Refused(400, f"_count is a number from 1 to {MAX_COUNT}")
    return int(values[0])


# -- shapes -------------------------------------------------------------------------------------------

def _services(schedule: TwinSchedule) -> list[dict[str, Any]]:
    return [{"coding": [{"system": system, "code": code, "userSelected": True}]}
            for system, code in schedule.service_types]


def _slot(slot: Slot) -> dict[str, Any]:
    location = {"reference": f"Location/{slot.schedule.location}"}
    return {"resourceType": "Slot", "id": slot.id,
            "extension": [{"url": LOCATION_EXTENSION, "valueReference": location}],
            "serviceType": _services(slot.schedule), "schedule": {"reference": f"Schedule/{slot.schedule.id}"},
            "status": slot.status, "start": utc(slot.start), "end": utc(slot.end)}


def _schedule(schedule: TwinSchedule) -> dict[str, Any]:
    return {"resourceType": "Schedule", "id": schedule.id, "active": True, "serviceType": _services(schedule),
            "actor": [{"reference": f"Practitioner/{schedule.practitioner}"},
                      {"reference": f"Location/{schedule.location}"}]}


def _appointment(a: Appointment) -> dict[str, Any]:
    s = a.schedule
    actors = (f"Patient/{a.patient}", f"Practitioner/{s.practitioner}", f"Location/{s.location}")
    body: dict[str, Any] = {
        "resourceType": "Appointment", "id": a.id, "meta": {"versionId": str(a.version)}, "status": a.status,
        "serviceType": _services(s), "start": utc(a.start), "end": utc(a.end),
        "minutesDuration": int((a.end - a.start).total_seconds() // 60), "slot": [{"reference": f"Slot/{a.slot}"}],
        "participant": [{"actor": {"reference": ref}, "required": "required", "status": "accepted"}
                        for ref in actors],
    }
    if a.comment:
        body["comment"] = a.comment
    if a.status == "cancelled" and a.cancel_reason:
        system, _, code = a.cancel_reason.rpartition("|")
        body["cancelationReason"] = {"coding": [{"system": system or CANCEL_SYSTEM, "code": code}]}
    return body


def _base(request: Request[Any, Any, Any]) -> str:
    return str(request.base_url).rstrip("/") + BASE_PATH


def _searchset(request: Request[Any, Any, Any], kind: str, entries: list[dict[str, Any]],
               next_pairs: list[tuple[str, str]] | None) -> dict[str, Any]:
    base = _base(request)
    query = request.scope.get("query_string", b"").decode("latin-1")
    links = [{"relation": "self", "url": f"{base}/{kind}" + (f"?{query}" if query else "")}]
    if next_pairs is not None:
        links.append({"relation": "next", "url": f"{base}/{kind}?{urlencode(next_pairs)}"})
    return {"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries}


def _entry(request: Request[Any, Any, Any], resource: dict[str, Any], mode: str) -> dict[str, Any]:
    return {"fullUrl": f"{_base(request)}/{resource['resourceType']}/{resource['id']}", "resource": resource,
            "search": {"mode": mode}}


def _page(request: Request[Any, Any, Any], found: dict[str, list[str]], items: list[Any]
          ) -> tuple[list[Any], list[tuple[str, str]] | None]:
    """This page of `items`, and the query of the next page (None: the last)."""
    count, where = _count(found), _single(found, PAGE)
    if where and not where[0].isdigit():
        raise Refused(400, "the page context is not one this server gave")
    offset = int(where[0]) if where else 0
    if offset + count >= len(items):
        return items[offset:], None
    return items[offset:offset + count], [p for p in _query(request) if p[0] != PAGE] + [(PAGE, str(offset + count))]


# -- Slot ---------------------------------------------------------------------------------------------

def _wanted_services(values: list[str]) -> set[tuple[str, str]]:
    if not values:
        raise Refused(400, "service-type is required unless _id is given")
    wanted = set()
    for value in values:
        system, sep, code = value.partition("|")
        if not (sep and system and code):
            raise Refused(400, "service-type takes system|code")
        wanted.add((system, code))
    return wanted


def _slot_search(request: Request[Any, Any, Any]) -> ASGIApp:
    calendar = twin(request).calendar
    found = _once(_query(request), _SLOT_PARAMS)
    include = _single(found, "_include")
    if include not in ([], ["Slot:schedule"]):
        raise Refused(400, "_include takes Slot:schedule")
    ids = _single(found, "_id")
    if ids:  # by id: whatever their status
        slots = [s for s in map(calendar.slot, ids) if s is not None]
    else:
        wanted = _wanted_services(_single(found, "service-type"))
        lower, upper = _range(found.get("start", []), "start", single_ok=False)
        practitioners = _references(_single(found, "schedule.actor"), "Practitioner", "schedule.actor")
        locations = _references(_single(found, "-location"), "Location", "-location", bare_ok=True)
        schedules = [s for s in calendar.schedules if wanted & set(s.service_types)
                     and (not practitioners or s.practitioner in practitioners)
                     and (not locations or s.location in locations)]
        assert lower is not None and upper is not None
        slots = calendar.slots(lower, upper, schedules) if schedules else []  # free ones, by start
    page, next_pairs = _page(request, found, slots)
    entries = [_entry(request, _slot(s), "match") for s in page]
    if include:
        schedules_seen = {s.schedule.id: s.schedule for s in page}
        entries += [_entry(request, _schedule(s), "include") for s in schedules_seen.values()]
    return answer(200, _searchset(request, "Slot", entries, next_pairs))


@get(f"{BASE_PATH}/Slot")
async def search_slots(request: Request[Any, Any, Any]) -> ASGIApp:
    if (refused := await gate(request, "searches")) is not None:
        return refused
    try:
        return _slot_search(request)
    except Refused as exc:
        return exc.answer()


@get(f"{BASE_PATH}/Slot/{{slot_id:str}}")
async def read_slot(request: Request[Any, Any, Any], slot_id: FromPath[str]) -> ASGIApp:
    if (refused := await gate(request, "reads")) is not None:
        return refused
    slot = twin(request).calendar.slot(slot_id)
    if slot is None:
        return outcome(404, "not-found", "no such Slot")
    return answer(200, _slot(slot))


# -- Appointment --------------------------------------------------------------------------------------

def _reference(value: Any, kind: str, where: str) -> str:
    """The id of `{"reference": "<kind>/<id>"}`; 422 for anything else."""
    if not isinstance(value, dict) or set(value) - {"reference", "display"}:
        raise Refused(422, f"{where} must be a reference", "structure")
    reference = value.get("reference")
    if not isinstance(reference, str) or not reference.startswith(f"{kind}/") or len(reference) == len(kind) + 1:
        raise Refused(422, f"{where} must reference a {kind}", "structure")
    return reference[len(kind) + 1:]


def _create_body(raw: bytes) -> tuple[str, str, str | None]:
    """The slot, patient and comment of a booked create, shaped exactly as Cerner documents it."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise Refused(400, "the body is not JSON", "structure") from None
    if not isinstance(body, dict) or body.get("resourceType") != "Appointment":
        raise Refused(422, "the body is not an Appointment", "structure")
    unknown = sorted(set(body) - _CREATE_ELEMENTS)
    if unknown:
        raise Refused(422, f"Appointment.{unknown[0][:40]} is not supported on create", "not-supported")
    if body.get("status") != "booked":
        raise Refused(422, "Appointment.status must be booked (proposed creates are not served here)", "business-rule")
    slots, participants = body.get("slot"), body.get("participant")
    if not isinstance(slots, list) or len(slots) != 1:
        raise Refused(422, "Appointment.slot must hold exactly one Slot reference", "structure")
    if not isinstance(participants, list) or len(participants) != 1 or not isinstance(participants[0], dict):
        raise Refused(422, "Appointment.participant must hold exactly one Patient participant", "structure")
    participant = participants[0]
    if "type" in participant:
        raise Refused(422, "Appointment.participant.type must not be set", "structure")
    if set(participant) - {"actor", "status", "required"} or participant.get("status") != "accepted":
        raise Refused(422, "Appointment.participant must be an accepted Patient (actor, status)", "structure")
    reasons, comment = body.get("reasonCode"), body.get("comment")
    if reasons is not None and not (isinstance(reasons, list) and len(reasons) == 1 and isinstance(reasons[0], dict)):
        raise Refused(422, "Appointment.reasonCode must hold exactly one CodeableConcept", "structure")
    if comment is not None and not isinstance(comment, str):
        raise Refused(422, "Appointment.comment must be a string", "structure")
    return (_reference(slots[0], "Slot", "Appointment.slot"),
            _reference(participant.get("actor"), "Patient", "Appointment.participant.actor"), comment)


def _media(request: Request[Any, Any, Any]) -> str:
    return (request.headers.get("content-type") or "").split(";")[0].strip().lower()


@post(f"{BASE_PATH}/Appointment", status_code=201)
async def create_appointment(request: Request[Any, Any, Any]) -> ASGIApp:
    if (refused := await gate(request, "creates")) is not None:
        return refused
    state = twin(request)
    if _media(request) not in ("application/fhir+json", "application/json"):
        return outcome(415, "not-supported", "the body must be application/fhir+json")
    try:
        slot_id, patient, comment = _create_body(await request.body())
    except Refused as exc:
        return exc.answer()
    try:
        booked = state.calendar.book(slot_id, patient, comment=comment)
    except KeyError:
        return outcome(422, "business-rule", "the slot does not exist")
    except Taken:
        return outcome(422, "business-rule", "the slot is no longer available")
    if (failed := stored_then_failed(request)) is not None:
        return failed
    return answer(201, None, headers={"Location": f"{_base(request)}/Appointment/{booked.id}", "ETag": 'W/"0"'})


@get(f"{BASE_PATH}/Appointment/{{appointment_id:str}}")
async def read_appointment(request: Request[Any, Any, Any], appointment_id: FromPath[str]) -> ASGIApp:
    if (refused := await gate(request, "reads")) is not None:
        return refused
    found = twin(request).calendar.get(appointment_id)
    if found is None:
        return outcome(404, "not-found", "no such Appointment")
    return answer(200, _appointment(found), headers={"ETag": f'W/"{found.version}"'})


_ACTORS = {"patient": "Patient", "practitioner": "Practitioner", "location": "Location"}


def _appointment_search(request: Request[Any, Any, Any]) -> ASGIApp:
    calendar = twin(request).calendar
    found = _once(_query(request), _APPOINTMENT_PARAMS)
    ids = _single(found, "_id")
    if ids:
        matches = [a for a in map(calendar.get, ids) if a is not None]
    else:
        by = [name for name in _ACTORS if name in found]
        if len(by) != 1:
            raise Refused(400, "exactly one of patient, practitioner and location is required (never combined)")
        wanted = _references(_single(found, by[0]), _ACTORS[by[0]], by[0], bare_ok=True)
        if not found.get("date"):
            raise Refused(400, "date is required with patient, practitioner or location")
        lower, upper = _range(found["date"], "date", single_ok=True)
        statuses = set(_single(found, "status"))

        def actor(a: Appointment) -> str:
            s = a.schedule
            return {"patient": a.patient, "practitioner": s.practitioner, "location": s.location}[by[0]]

        # those that start and end within the range, never proposed ones (Cerner's `date`)
        matches = sorted((a for a in calendar.appointments() if actor(a) in wanted and a.status != "proposed"
                          and (lower is None or a.start >= lower) and (upper is None or a.end <= upper)
                          and (not statuses or a.status in statuses)), key=lambda a: (a.start, actor(a)))
    page, next_pairs = _page(request, found, matches)
    return answer(200, _searchset(request, "Appointment", [_entry(request, _appointment(a), "match") for a in page],
                                  next_pairs))


@get(f"{BASE_PATH}/Appointment")
async def search_appointments(request: Request[Any, Any, Any]) -> ASGIApp:
    if (refused := await gate(request, "searches")) is not None:
        return refused
    try:
        return _appointment_search(request)
    except Refused as exc:
        return exc.answer()


def _patch_ops(raw: bytes) -> str | None:
    """The cancellation a JSON Patch asks for: its reason (`system|code`, or None without one).
    Only `replace /status` to cancelled and `add /cancelationReason` are served (422 otherwise)."""
    try:
        ops = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise Refused(400, "the body is not JSON", "structure") from None
    if not isinstance(ops, list) or not ops or not all(isinstance(o, dict) for o in ops):
        raise Refused(422, "the body must be a JSON Patch (a list of operations)", "structure")
    cancel, reason = False, None
    for op in ops:
        kind, path, value = op.get("op"), op.get("path"), op.get("value")
        if (kind, path) == ("replace", "/status") and value == "cancelled":
            cancel = True
        elif (kind, path) == ("add", "/cancelationReason") and isinstance(value, dict):
            codings = value.get("coding")
            if not (isinstance(codings, list) and len(codings) == 1 and isinstance(codings[0], dict)
                    and isinstance(codings[0].get("code"), str)):
                raise Refused(422, "cancelationReason must hold one coding", "structure")
            reason = f"{codings[0].get('system') or ''}|{codings[0]['code']}"
        else:
            raise Refused(422, "only replace /status (cancelled) and add /cancelationReason are supported",
                          "not-supported")
    if not cancel:
        raise Refused(422, "the patch does not cancel the appointment", "not-supported")
    return reason


def _version(if_match: str | None) -> int:
    if if_match is None:
        raise Refused(412, "If-Match is required", "conflict")
    tag = if_match.strip().removeprefix("W/").strip('"')
    if not tag.isdigit():
        raise Refused(400, 'If-Match must be W/"<version>"', "invalid")
    return int(tag)


@patch(f"{BASE_PATH}/Appointment/{{appointment_id:str}}")
async def patch_appointment(request: Request[Any, Any, Any], appointment_id: FromPath[str]) -> ASGIApp:
    if (refused := await gate(request, "cancels")) is not None:
        return refused
    state = twin(request)
    if _media(request) != "application/json-patch+json":
        return outcome(415, "not-supported", "the body must be application/json-patch+json")
    if state.calendar.get(appointment_id) is None:
        return outcome(404, "not-found", "no such Appointment")
    try:
        version = _version(request.headers.get("if-match"))
        if state.take("stale_writes"):  # someone else changed it first (twin fault)
            state.calendar.touch(appointment_id)
        current = state.calendar.get(appointment_id)
        assert current is not None
        if version != current.version:
            raise Refused(409, "the appointment has changed: If-Match names another version", "conflict")
        reason = _patch_ops(await request.body())
        if current.status == "cancelled":
            raise Refused(422, "the appointment is already cancelled", "business-rule")
    except Refused as exc:
        return exc.answer()
    changed = state.calendar.cancel(appointment_id, reason)
    return answer(200, None, headers={"ETag": f'W/"{changed.version}"'})


# -- Patient --------------------------------------------------------------------------------------------

MRN_SYSTEM = MRN_SYSTEMS["cerner"]
_MRN_TYPE = {"coding": [{"system": f"https://fhir.cerner.com/{CERNER_TENANT}/codeSet/4", "code": "10",
                         "display": "MRN", "userSelected": True},
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR",
                         "display": "Medical record number", "userSelected": False}],
             "text": "MRN"}
_PATIENT_PARAMS = {"_id", "identifier", "_count", PAGE}
# Cerner searches by these too; the twin does not match people by their demographics
_DEMOGRAPHICS = {"name", "family", "given", "birthdate", "phone", "email", "address-postalcode", "gender",
                 "_revinclude"}


def _patient(p: TwinPatient) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Patient", "id": p.id, "meta": {"versionId": "0"},
        "identifier": [{"use": "usual", "type": _MRN_TYPE, "system": MRN_SYSTEM, "value": p.mrn}],
        "active": True,
        "name": [{"use": "official", "text": f"{p.family}, {' '.join(p.given)}", "family": p.family,
                  "given": list(p.given)}],
        "gender": p.gender, "birthDate": p.birthDate,
    }
    if p.phone:
        body["telecom"] = [{"system": "phone", "value": p.phone, "use": "home", "rank": 1}]
    return body


def _holds(p: TwinPatient, token: str) -> bool:
    """Whether the patient holds the identifier: `system|value` in that system; a bare value in any
    system; `|value` (no system, as FHIR reads it) in none of the twin's."""
    system, bar, value = token.partition("|")
    if not bar:
        return p.mrn == system
    return value == p.mrn and system == MRN_SYSTEM


def _patient_search(request: Request[Any, Any, Any]) -> ASGIApp:
    found = _once(_query(request), _PATIENT_PARAMS | _DEMOGRAPHICS)
    if set(found) & _DEMOGRAPHICS:
        raise Refused(400, "this server searches patients by _id or identifier only")
    ids, identifiers = _single(found, "_id"), _single(found, "identifier")
    if not ids and not identifiers:
        raise Refused(400, "_id or identifier is required")
    if len(identifiers) > 1:
        raise Refused(400, "identifier may have only a single value")
    if identifiers and not identifiers[0].rpartition("|")[2]:
        raise Refused(400, "identifier needs a value: system|value, or value")
    patients = twin(request).patients
    matches = [p for p in map(patients.get, ids) if p is not None] if ids else patients.all()
    matches = [p for p in matches if not identifiers or _holds(p, identifiers[0])]
    page, next_pairs = _page(request, found, matches)
    bundle = _searchset(request, "Patient", [_entry(request, _patient(p), "match") for p in page], next_pairs)
    if not page:  # as Cerner answers no match: no entry at all (FHIR has no empty arrays)
        del bundle["entry"]
    return answer(200, {**bundle, "total": len(matches)})


@get(f"{BASE_PATH}/Patient")
async def search_patients(request: Request[Any, Any, Any]) -> ASGIApp:
    if (refused := await gate(request, "searches", "patient_reads")) is not None:
        return refused
    try:
        return _patient_search(request)
    except Refused as exc:
        return exc.answer()


@get(f"{BASE_PATH}/Patient/{{patient_id:str}}")
async def read_patient(request: Request[Any, Any, Any], patient_id: FromPath[str]) -> ASGIApp:
    if (refused := await gate(request, "reads", "patient_reads")) is not None:
        return refused
    found = twin(request).patients.get(patient_id)
    if found is None:
        return outcome(404, "not-found", "no such Patient")
    return answer(200, _patient(found), headers={"ETag": 'W/"0"'})


def route_handlers() -> list[Any]:
    return [search_slots, read_slot, create_appointment, read_appointment, search_appointments, patch_appointment,
            search_patients, read_patient]
