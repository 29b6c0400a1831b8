"""Epic's twin: its STU3 scheduling API (`$find`, `$book`, Appointment read and search, Slot read) and
its incoming HL7 v2 scheduling interface over MLLP, the only way to cancel (scheduling-out.md §3
"Epic"; open.epic "Scheduling/FHIR", Argonaut Scheduling).

- `POST {base}/Appointment/$find`: a `Parameters` body. `startTime` and `endTime` (valueDateTime;
  Argonaut's `start` / `end` too) are required; `service-type` (valueCodeableConcept), `provider`
  and `location` (valueReference, `Practitioner/<id>` and `Location/<id>`: a parameter of type
  Reference, as Argonaut's operation defines them) may repeat and narrow the search. Answers a
  searchset Bundle of *proposed* Appointments (free slots, by start) and an OperationOutcome entry
  with an information issue. The proposed appointment's id is its slot's id, which `Slot/{id}` reads.
- `POST {base}/Appointment/$book`: `patient` (valueReference) and `appointment` (valueIdentifier
  holding the proposed id), optional `appointmentNote` (valueString); Argonaut's `patient-id`,
  `appt-id` and `comment` (valueString or valueId) too. Answers 200 with a Bundle holding the booked
  Appointment. Refusals: 400 a missing or mis-typed parameter, 404 (`not-found`) an unknown proposed
  id, 409 (`conflict`) a slot no longer free. Epic's `$book` takes no identifier: none is kept.
- `GET {base}/Appointment/{id}`; `GET {base}/Appointment?patient=<id>[&date=<prefix><date>]…`
  (patient required; `date` may repeat, prefixes eq, ge, gt, le, lt); `GET {base}/Slot/{id}`.
- `GET …/Patient/{id}` and `GET …/Patient?identifier=…|_id=…`, under the STU3 base and R4's
  (`/api/FHIR/R4`: Patient.Read and Patient.Search exist in both; the elements are the same). Unknown
  id: 404, Epic's 4102. `identifier` once, `<system>|<value>` or `<ID type>|<value>` (`MRN|203001`:
  Epic's minimum data sets for a search), never a bare value; `_id` once; `_count` taken and ignored.
  No parameter: 400, 4110; only `_count`: 400, 4111; repeated: 400, 4112; Epic's demographic
  parameters: 400 (the twin does not match people by name). No match: a searchset with no Patient
  and Epic's 4101 warning as its outcome entry. Identifiers: the MRN (type MRN,
  `urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14`) and the FHIR id (type `FHIR STU3`).
- MLLP on `config.mllp_port` (0: any; the bound port is `TwinState.mllp_port`): `SRM^S04` (ARQ-2
  the filler appointment id, ARQ-6 the reason) and `SIU^S15` (SCH-2, SCH-6) cancel the appointment
  by its Epic id. A PID-3 naming another patient than the appointment's is refused. ACK: AA when
  cancelled (also when it already was), AE for an unknown appointment (ERR-3 204) or another
  patient, AR for what cannot be read (not HL7, no MSH-10, another message type, no appointment id).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

import hl7
from litestar import Request, get, post
from litestar.types import ASGIApp

from gateway.twins.app import answer, gate, outcome, stored_then_failed, twin, utc
from gateway.twins.calendar import Appointment, Slot, Taken
from gateway.twins.config import MRN_SYSTEMS, TwinPatient
from gateway.twins.state import TwinState

BASE_PATH = "/api/FHIR/STU3"
R4_PATH = "/api/FHIR/R4"  # reads only: Epic schedules in STU3
ERROR_SYSTEM = "urn:oid:1.2.840.114350.1.13.0.1.7.2.657369"  # Epic's FHIR error codes (its sandbox's instance)
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


# -- FHIR shapes --------------------------------------------------------------------------------------

def _instant(value: Any) -> datetime | None:
    """A FHIR dateTime (a date: its midnight UTC; a time without offset is refused, as FHIR requires one)."""
    if not isinstance(value, str):
        return None
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            return datetime.combine(date.fromisoformat(value), time(0), timezone.utc)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _participants(schedule: Any, patient: str | None = None) -> list[dict[str, Any]]:
    people = [] if patient is None else [{"actor": {"reference": f"Patient/{patient}"}, "required": "required",
                                          "status": "accepted"}]
    status = "accepted" if patient is not None else "needs-action"
    return [*people,
            {"actor": {"reference": f"Practitioner/{schedule.practitioner}"}, "required": "required", "status": status},
            {"actor": {"reference": f"Location/{schedule.location}"}, "required": "required", "status": status}]


def _services(schedule: Any) -> list[dict[str, Any]]:
    return [{"coding": [{"system": s, "code": c}]} for s, c in schedule.service_types]


def _proposed(slot: Slot) -> dict[str, Any]:
    return {"resourceType": "Appointment", "id": slot.id, "status": "proposed", "serviceType": _services(slot.schedule),
            "start": utc(slot.start), "end": utc(slot.end), "minutesDuration": int((slot.end - slot.start).seconds / 60),
            "participant": _participants(slot.schedule)}


def _appointment(a: Appointment) -> dict[str, Any]:
    found = {"resourceType": "Appointment", "id": a.id, "meta": {"versionId": str(a.version)}, "status": a.status,
             "serviceType": _services(a.schedule), "start": utc(a.start), "end": utc(a.end),
             "participant": _participants(a.schedule, a.patient)}
    if a.comment:
        found["comment"] = a.comment
    return found


def _bundle(request: Request[Any, Any, Any], resources: list[dict[str, Any]],
            note: dict[str, Any] | None = None, base_path: str = BASE_PATH) -> dict[str, Any]:
    base = str(request.base_url).rstrip("/") + base_path
    entries = [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
               for r in resources]
    if note is not None:
        entries.append({"resource": note, "search": {"mode": "outcome"}})
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources), "entry": entries}


async def _parameters(request: Request[Any, Any, Any]) -> list[dict[str, Any]] | None:
    """The body's Parameters.parameter, or None when the body is no Parameters."""
    try:
        body = await request.json()
    except Exception:  # noqa: BLE001 - any unreadable body is refused alike
        return None
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        return None
    found = body.get("parameter", [])
    return found if isinstance(found, list) and all(isinstance(p, dict) for p in found) else None


def _values(parameters: list[dict[str, Any]], names: tuple[str, ...], kind: str) -> list[Any] | None:
    """Every `value<kind>` of the parameters named one of `names`; None when one has another type."""
    found = []
    for p in parameters:
        if p.get("name") in names:
            if f"value{kind}" not in p:
                return None
            found.append(p[f"value{kind}"])
    return found


def _bad(text: str) -> ASGIApp:
    return outcome(400, "invalid", text)


# -- $find --------------------------------------------------------------------------------------------

def _referenced(values: list[Any], kind: str) -> set[str] | None:
    ids = set()
    for v in values:
        ref = v.get("reference") if isinstance(v, dict) else None
        if not isinstance(ref, str) or not ref.startswith(f"{kind}/"):
            return None
        ids.add(ref.removeprefix(f"{kind}/"))
    return ids


def _codings(values: list[Any]) -> set[tuple[str, str]] | None:
    found = set()
    for v in values:
        codings = v.get("coding") if isinstance(v, dict) else None
        if not isinstance(codings, list) or not codings:
            return None
        found |= {(c.get("system"), c.get("code")) for c in codings if isinstance(c, dict)}
    return found


@post(f"{BASE_PATH}/Appointment/$find", status_code=200)
async def find(request: Request[Any, Any, Any]) -> ASGIApp:
    if (refused := await gate(request, "searches")) is not None:
        return refused
    state = twin(request)
    parameters = await _parameters(request)
    if parameters is None:
        return _bad("the body must be a Parameters resource")
    starts = _values(parameters, ("startTime", "start"), "DateTime")
    ends = _values(parameters, ("endTime", "end"), "DateTime")
    if not starts or not ends or len(starts) > 1 or len(ends) > 1:
        return _bad("startTime and endTime are required, once each, as valueDateTime")
    start, end = _instant(starts[0]), _instant(ends[0])
    if start is None or end is None or end <= start:
        return _bad("startTime and endTime must be dateTimes with an offset, startTime before endTime")
    services = _values(parameters, ("service-type",), "CodeableConcept")
    providers = _values(parameters, ("provider",), "Reference")
    locations = _values(parameters, ("location",), "Reference")
    wanted_services = _codings(services) if services is not None else None
    wanted_providers = _referenced(providers, "Practitioner") if providers is not None else None
    wanted_locations = _referenced(locations, "Location") if locations is not None else None
    if wanted_services is None or wanted_providers is None or wanted_locations is None:
        return _bad("service-type is a valueCodeableConcept; provider and location are valueReference "
                    "to a Practitioner and a Location")
    schedules = [s for s in state.calendar.schedules
                 if (not wanted_services or wanted_services & set(s.service_types))
                 and (not wanted_providers or s.practitioner in wanted_providers)
                 and (not wanted_locations or s.location in wanted_locations)]
    slots = state.calendar.slots(start, end, schedules) if schedules else []
    note = {"resourceType": "OperationOutcome", "issue": [{"severity": "information", "code": "informational",
            "details": {"text": f"{len(slots)} appointment times found"}}]}
    return answer(200, _bundle(request, [_proposed(s) for s in slots], note))


# -- $book --------------------------------------------------------------------------------------------

def _one(parameters: list[dict[str, Any]], options: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[bool, Any]:
    """(well formed, the value) of the first of `options` (name, its value types) present; (True, None)
    when none is; (False, None) when it repeats or has another type."""
    for name, kinds in options:
        named = [p for p in parameters if p.get("name") == name]
        if named:
            values = [named[0][f"value{k}"] for k in kinds if f"value{k}" in named[0]]
            return (True, values[0]) if len(named) == 1 and values else (False, None)
    return True, None


def _book_fields(parameters: list[dict[str, Any]]) -> tuple[str, str, str | None] | str:
    """(proposed id, patient id, note) in Epic's names or Argonaut's, or the text of a refusal."""
    ok_p, patient = _one(parameters, (("patient", ("Reference",)), ("patient-id", ("String", "Id"))))
    ok_a, proposed = _one(parameters, (("appointment", ("Identifier",)), ("appt-id", ("String", "Id"))))
    ok_n, note = _one(parameters, (("appointmentNote", ("String",)), ("comment", ("String",))))
    if not (ok_p and ok_a and ok_n):
        return "patient is a valueReference, appointment a valueIdentifier, appointmentNote a valueString, once each"
    if isinstance(patient, dict):
        reference = patient.get("reference")
        patient = reference.removeprefix("Patient/") if isinstance(reference, str) and reference.startswith("Patient/") else None
    if isinstance(proposed, dict):
        proposed = proposed.get("value")
    if not isinstance(patient, str) or not _ID.fullmatch(patient):
        return "patient is required: a reference to a Patient"
    if not isinstance(proposed, str) or not proposed:
        return "appointment is required: the identifier of a proposed appointment"
    if note is not None and not isinstance(note, str):
        return "appointmentNote is a string"
    return proposed, patient, note


@post(f"{BASE_PATH}/Appointment/$book", status_code=200)
async def book(request: Request[Any, Any, Any]) -> ASGIApp:
    if (refused := await gate(request, "creates")) is not None:
        return refused
    state = twin(request)
    parameters = await _parameters(request)
    if parameters is None:
        return _bad("the body must be a Parameters resource")
    fields = _book_fields(parameters)
    if isinstance(fields, str):
        return _bad(fields)
    proposed, patient, note = fields
    try:
        booked = state.calendar.book(proposed, patient, comment=note)
    except KeyError:
        return outcome(404, "not-found", "no such proposed appointment")
    except Taken:
        return outcome(409, "conflict", "the appointment time is no longer available")
    if (failed := stored_then_failed(request)) is not None:
        return failed
    return answer(200, _bundle(request, [_appointment(booked)]))


# -- reads --------------------------------------------------------------------------------------------

@get(f"{BASE_PATH}/Appointment/{{appointment_id:str}}")
async def read_appointment(request: Request[Any, Any, Any]) -> ASGIApp:
    if (refused := await gate(request, "reads")) is not None:
        return refused
    state = twin(request)
    found = state.calendar.get(request.path_params["appointment_id"])
    if found is None:
        return outcome(404, "not-found", "no such appointment")
    return answer(200, _appointment(found))


_DATE = re.compile(r"(eq|ge|gt|le|lt)?(\d{4}-\d{2}-\d{2}(?:T[0-9:.]+(?:Z|[+-]\d{2}:\d{2}))?)")


def _date_test(value: str) -> Callable[[datetime], bool] | None:
    """A test of an appointment's start for one `date` parameter (a date: its whole UTC day)."""
    matched = _DATE.fullmatch(value)
    moment = _instant(matched.group(2)) if matched else None
    if matched is None or moment is None:
        return None
    prefix, whole_day = matched.group(1) or "eq", "T" not in matched.group(2)
    after = moment + timedelta(days=1) if whole_day else moment
    return {"eq": lambda t: moment <= t < after if whole_day else t == moment,
            "ge": lambda t: t >= moment, "gt": lambda t: t >= after if whole_day else t > moment,
            "le": lambda t: t < after if whole_day else t <= moment, "lt": lambda t: t < moment}[prefix]


@get(f"{BASE_PATH}/Appointment")
async def search_appointments(request: Request[Any, Any, Any]) -> ASGIApp:
    if (refused := await gate(request, "searches")) is not None:
        return refused
    state = twin(request)
    query = request.query_params
    patients = query.getall("patient", [])
    if len(patients) != 1 or not _ID.fullmatch(patients[0].removeprefix("Patient/")):
        return _bad("patient is required, once")
    unknown = set(query.keys()) - {"patient", "date", "_count"}
    if unknown:
        return _bad("supported parameters: patient, date")
    tests = [_date_test(v) for v in query.getall("date", [])]
    if any(t is None for t in tests):
        return _bad("date is [eq|ge|gt|le|lt]YYYY-MM-DD[Thh:mm:ss+zz:zz]")
    found = [a for a in state.calendar.find(patient=patients[0].removeprefix("Patient/"))
             if all(t(a.start) for t in tests if t is not None)]
    return answer(200, _bundle(request, [_appointment(a) for a in sorted(found, key=lambda a: a.start)]))


@get(f"{BASE_PATH}/Schedule/{{schedule_id:str}}")
async def read_schedule(request: Request[Any, Any, Any]) -> ASGIApp:
    """STU3 Schedule.Read: whose calendar, where."""
    if (refused := await gate(request, "reads")) is not None:
        return refused
    found = next((s for s in twin(request).calendar.schedules if s.id == request.path_params["schedule_id"]), None)
    if found is None:
        return outcome(404, "not-found", "no such schedule")
    return answer(200, {"resourceType": "Schedule", "id": found.id, "active": True,
                        "serviceType": _services(found),
                        "actor": [{"reference": f"Practitioner/{found.practitioner}"},
                                  {"reference": f"Location/{found.location}"}]})


@get(f"{BASE_PATH}/Slot/{{slot_id:str}}")
async def read_slot(request: Request[Any, Any, Any]) -> ASGIApp:
    if (refused := await gate(request, "reads")) is not None:
        return refused
    state = twin(request)
    slot = state.calendar.slot(request.path_params["slot_id"])
    if slot is None:
        return outcome(404, "not-found", "no such slot")
    return answer(200, {"resourceType": "Slot", "id": slot.id, "schedule": {"reference": f"Schedule/{slot.schedule.id}"},
                        "serviceType": _services(slot.schedule), "status": slot.status,
                        "start": utc(slot.start), "end": utc(slot.end)})


# -- Patient (STU3 and R4) ------------------------------------------------------------------------------

MRN_SYSTEM = MRN_SYSTEMS["epic"]
FHIR_ID_SYSTEM = "http://open.epic.com/FHIR/StructureDefinition/patient-fhir-id"
_PATIENT_PARAMS = {"_id", "identifier", "_count"}
# Epic matches people by these too; the twin does not
_DEMOGRAPHICS = {"address", "address-city", "address-postalcode", "address-state", "birthdate", "family", "gender",
                 "given", "legal-sex", "name", "own-name", "own-prefix", "partner-name", "partner-prefix", "telecom"}


# Epic's error codes (open.epic's FHIR error table): their displays
_ERRORS = {"4100": "The resource request contained an invalid parameter.",
           "4102": "The read resource request contained an invalid ID.",
           "4110": "No parameters are provided in the search request.",
           "4111": "Required search parameter missing from request.",
           "4112": "The resource request contained an invalid combination of parameters.",
           "4115": "Required search parameter has an invalid value."}


def _epic_error(status: int, code: str, epic_code: str, text: str | None = None) -> ASGIApp:
    """Epic's fatal issue, its text Epic's display unless the twin has more to say."""
    display = _ERRORS[epic_code]
    return outcome(status, code, text or display, "fatal", (ERROR_SYSTEM, epic_code, display))


def _identifiers(p: TwinPatient) -> tuple[tuple[str, str, str], ...]:
    """(system, ID type, value) of each identifier Epic shows for the patient."""
    return ((MRN_SYSTEM, "MRN", p.mrn), (FHIR_ID_SYSTEM, "FHIR STU3", p.id))


def _patient(p: TwinPatient) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Patient", "id": p.id,
        "identifier": [{"use": "usual", "type": {"text": kind}, "system": system, "value": value}
                       for system, kind, value in _identifiers(p)],
        "active": True,
        "name": [{"use": "official", "text": " ".join((*p.given, p.family)), "family": p.family,
                  "given": list(p.given)}],
        "gender": p.gender, "birthDate": p.birthDate,
    }
    if p.phone:
        body["telecom"] = [{"system": "phone", "value": p.phone, "use": "home"}]
    return body


def _patient_base(request: Request[Any, Any, Any]) -> str:
    return R4_PATH if request.url.path.startswith(R4_PATH + "/") else BASE_PATH


def _identifier_ok(identifier: str) -> bool:
    """`<system>|<value>` or `<ID type>|<value>`, one of them (no bare value, no list)."""
    kind, bar, value = identifier.partition("|")
    return bool(kind and bar and value) and "," not in identifier


def _patient_query(request: Request[Any, Any, Any]) -> tuple[str | None, str | None] | ASGIApp:
    """The search's `_id` and `identifier` (system or ID type, value), or Epic's refusal."""
    query = request.query_params
    names = set(query.keys())
    if not names:
        return _epic_error(400, "required", "4110")
    if names & _DEMOGRAPHICS:
        return _epic_error(400, "not-supported", "4100", "this server searches patients by _id or identifier only")
    if names - _PATIENT_PARAMS:
        return _epic_error(400, "not-supported", "4100")
    if any(len(query.getall(n)) > 1 for n in names):
        return _epic_error(400, "invalid", "4112")
    patient_id, identifier = query.get("_id"), query.get("identifier")
    if not patient_id and not identifier:
        return _epic_error(400, "required", "4111")
    if identifier is not None and not _identifier_ok(identifier):
        return _epic_error(400, "value", "4115", "identifier takes <system>|<value> or <ID type>|<value>")
    return patient_id, identifier


def _patient_matches(request: Request[Any, Any, Any], patient_id: str | None, identifier: str | None
                     ) -> list[TwinPatient]:
    patients = twin(request).patients
    if patient_id:
        found = [p for p in (patients.get(patient_id),) if p is not None]
    else:
        found = patients.all()
    if identifier is None:
        return found
    kind, _, value = identifier.partition("|")
    return [p for p in found if any(kind in (system, id_type) and value == held
                                    for system, id_type, held in _identifiers(p))]


_NO_RESULTS = {"resourceType": "OperationOutcome", "issue": [{
    "severity": "warning", "code": "processing",
    "details": {"coding": [{"system": ERROR_SYSTEM, "code": "4101", "display": "Resource request returns no results."}],
                "text": "Resource request returns no results."}}]}


@get([f"{BASE_PATH}/Patient", f"{R4_PATH}/Patient"])
async def search_patients(request: Request[Any, Any, Any]) -> ASGIApp:
    if (refused := await gate(request, "searches", "patient_reads")) is not None:
        return refused
    asked = _patient_query(request)
    if not isinstance(asked, tuple):
        return asked
    found = [_patient(p) for p in _patient_matches(request, *asked)]
    return answer(200, _bundle(request, found, None if found else _NO_RESULTS, _patient_base(request)))


@get([f"{BASE_PATH}/Patient/{{patient_id:str}}", f"{R4_PATH}/Patient/{{patient_id:str}}"])
async def read_patient(request: Request[Any, Any, Any]) -> ASGIApp:
    if (refused := await gate(request, "reads", "patient_reads")) is not None:
        return refused
    found = twin(request).patients.get(request.path_params["patient_id"])
    if found is None:
        return _epic_error(404, "not-found", "4102")
    return answer(200, _patient(found))


def route_handlers() -> list[Any]:
    return [find, book, read_appointment, search_appointments, read_slot, read_schedule, search_patients, read_patient]


# -- HL7 v2 over MLLP ---------------------------------------------------------------------------------

_START, _END = b"\x0b", b"\x1c\r"
_MAX_MESSAGE = 1_048_576
_IDLE_SECONDS = 60.0
_VERSIONS = ("2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2")
_SAFE = re.compile(r"[A-Za-z0-9 ._-]{1,20}")
_CONTROL = re.compile(r"[A-Za-z0-9._-]{1,20}")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in version.split("."))


def _ack(msh: dict[str, str], code: str, error: tuple[str, str] | None) -> bytes:
    """An ACK in the standard delimiters and in the message's version (2.5 when it names none we
    know): MSH-9 `ACK^<trigger>` (`^ACK` as its structure from 2.3.1), MSA-2 the message's MSH-10;
    for AE and AR, MSA-3 (before 2.7) and from 2.5 an ERR (ERR-3 from table 0357, ERR-4 E or F)."""
    version = msh.get("version") if msh.get("version") in _VERSIONS else "2.5"
    v = _version_tuple(version)
    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%d%H%M%S") + "+0000"
    trigger = msh.get("trigger", "")
    fields = ["MSH", "^~\\&", "EPIC", "EPICTWIN", msh.get("sending", ""), msh.get("facility", ""),
              stamp if v >= (2, 2) else f"{stamp}^S", "",
              f"ACK^{trigger}^ACK" if v >= (2, 3, 1) else f"ACK^{trigger}",
              f"E{now:%Y%m%d%H%M%S%f}", "P", version]
    segments = ["|".join(fields)]  # MSH-1 is the separator itself: fields[n] is MSH-n
    msa = ["MSA", code, msh.get("control", "") or '""']
    if error is not None and v < (2, 7):
        msa.append(error[1][:80])
    segments.append("|".join(msa))
    if error is not None and v >= (2, 5):
        segments.append("|".join(["ERR", "", "", f"{error[0]}^{error[1]}^HL70357", "F" if code == "AR" else "E"]))
    return ("\r".join(segments) + "\r").encode("ascii")


def _header(raw: str) -> dict[str, str]:
    """MSH fields the ACK answers, split by hand so even an unparsable message gets its control id back."""
    line = raw.split("\r", 1)[0]
    if not line.startswith("MSH") or len(line) < 8:
        return {}
    sep = line[3]
    fields = ["MSH", sep, *line.split(sep)[1:]]

    def at(n: int, pattern: re.Pattern[str] = _SAFE) -> str:
        value = fields[n].split(line[4])[0] if n < len(fields) else ""
        return value if pattern.fullmatch(value) else ""

    kind = fields[9].split(line[4]) if len(fields) > 9 else []
    return {"sending": at(3), "facility": at(4), "control": at(10, _CONTROL), "version": at(12),
            "type": kind[0] if kind else "", "trigger": kind[1] if len(kind) > 1 and _SAFE.fullmatch(kind[1]) else ""}


def _field(message: hl7.Message, segment: str, n: int, component: int = 1) -> str:
    """A field's component as plain text (python-hl7 undoes the escapes), empty when absent."""
    try:
        value = message.extract_field(segment, 1, n, 1, component)
    except (KeyError, IndexError):
        return ""
    return str(value) if value else ""


def _handle(state: TwinState, raw: bytes) -> bytes:
    state.count("mllp_messages")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _ack({}, "AR", ("102", "the message is not text"))
    header = _header(text.replace("\n", "\r"))
    if not header or not header["control"]:
        return _ack(header, "AR", ("101", "no MSH segment with a control id (MSH-10)"))
    try:
        message = hl7.parse(text)
    except Exception:  # noqa: BLE001 - python-hl7 raises several kinds for unreadable messages
        return _ack(header, "AR", ("102", "the message cannot be parsed"))
    if (header["type"], header["trigger"]) == ("SRM", "S04"):
        where, fields = "ARQ", (2, 6)
    elif (header["type"], header["trigger"]) == ("SIU", "S15"):
        where, fields = "SCH", (2, 6)
    else:
        return _ack(header, "AR", ("200", "only SRM S04 and SIU S15 are taken here"))
    appointment_id = _field(message, where, fields[0])
    if not appointment_id:
        return _ack(header, "AR", ("101", f"{where}-{fields[0]} (the filler appointment id) is required"))
    found = state.calendar.get(appointment_id)
    if found is None:
        return _ack(header, "AE", ("204", "unknown appointment"))
    patient = _field(message, "PID", 3)
    if patient and patient != found.patient:
        return _ack(header, "AE", ("204", "PID-3 is not the appointment's patient"))
    state.count("cancels")
    state.calendar.cancel(appointment_id, _field(message, where, fields[1]) or None)
    return _ack(header, "AA", None)


async def _serve(state: TwinState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One connection: framed messages in, one ACK out for each; a frame over the bound closes it."""
    try:
        while True:
            try:
                raw = await asyncio.wait_for(reader.readuntil(_END), _IDLE_SECONDS)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            start = raw.find(_START)
            if start < 0:
                continue  # bytes outside a frame are no message
            writer.write(_START + _handle(state, raw[start + 1:-2]) + _END)
            await writer.drain()
    finally:
        writer.close()


def on_startup(state: TwinState) -> list[Callable[[], Any]]:
    async def start() -> None:
        if state.config.mllp_port is None:
            return
        server = await asyncio.start_server(lambda r, w: _serve(state, r, w), "127.0.0.1", state.config.mllp_port,
                                            limit=_MAX_MESSAGE)
        state.mllp_server = server
        state.mllp_port = server.sockets[0].getsockname()[1]
        print(f"  epic EHR twin: its HL7 v2 cancel interface (MLLP) on 127.0.0.1:{state.mllp_port}", flush=True)

    return [start]


def on_shutdown(state: TwinState) -> list[Callable[[], Any]]:
    async def stop() -> None:
        server = state.mllp_server
        if server is not None:
            server.close()
            await server.wait_closed()
            state.mllp_server = None

    return [stop]
