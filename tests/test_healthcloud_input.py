"""Health Cloud's callouts refuse what no EHR may be sent and what the gateway cannot read, each with a
400 OperationOutcome the suite's validator accepts: an id outside the EHR's id grammar (in the path or
in the body), a search date outside what Salesforce holds (or what Python's datetime can), a body
nested too deep, a body naming a key twice. Over real HTTP, with the Cerner, Epic and FHIR twins
behind the gateway, each twin's app wrapped so that the test hears every request that reached it:
a refused id reached no EHR at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis.asyncio as aredis

from gateway.ehr.cerner import CernerClient
from gateway.ehr.epic import EpicClient
from gateway.ehr.fhir import FhirClient
from gateway.errors import InvalidRequest, NotFound
from gateway.outbound.calls import CallRecord
from gateway.outbound.http import HttpClient
from gateway.settings import EhrCredentials
from gateway.twins.config import default_patients, default_schedules
from tests.conftest import serve_gateway
from tests.fhir_validate import validate
from tests.test_healthcloud_ehrs import (DIALECTS, FORM, HC, JSON, PRIVATE, SECRET, SERVICE, Twin, _create, _found,
                                         _search, _slots, fleet_settings, start_twins)

READ = {"Authorization": HC}
PATIENT = {d: default_patients(d)[0].id for d in DIALECTS}  # a patient each twin has
CANCEL = {"resourceType": "Appointment", "status": "cancelled"}
# the EHR's own ids, which the grammar must let through: Cerner's slot id (corpus), Epic's proposed
# appointment id from its $book example (66 characters: longer than R4's 64)
CERNER_SLOT = "24477854-21304876-62852027-0"
EPIC_PROPOSED = "ezu6MfS.FpOXrHAn1eJHczv4LlH.fMIwtdkA8rsm-Yfu96eUh91EBd0UN9BZx7kbB3"
# ids in the path, percent-encoded as the caller sends them: a query, a query after an id, a fragment,
# a space, a percent sign; and dot segments, which the gateway's HTTP server refuses before any route
BAD_PATH_IDS = ("%3Fpatient%3D12724066", "x%3Fa%3D1", "x%23y", "x%20y", "%25")
DOT_SEGMENTS = ("%2E%2E", "%2E")


class Ears:
    """An EHR twin's app, hearing every HTTP request that reaches it (method, raw path, query) but
    the test's own calls to the twin's control endpoints."""

    def __init__(self, app: Any) -> None:
        self.app, self.requests = app, []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/twin/"):
            self.requests.append((scope["method"], scope["raw_path"].decode("latin-1"),
                                  scope["query_string"].decode("latin-1")))
        await self.app(scope, receive, send)


@dataclass
class HeardTwin(Twin):
    ears: Ears = field(default=None)  # type: ignore[assignment]


@pytest.fixture
def twins() -> Iterator[dict[str, HeardTwin]]:
    with ExitStack() as stack:
        yield start_twins(stack, wrap=Ears, make=HeardTwin)  # type: ignore[arg-type,misc]


@pytest.fixture
async def hc(redis_url, prefix, sandbox, twins, tmp_path):
    settings = fleet_settings(redis_url, prefix, sandbox.url, twins, tmp_path)
    async with serve_gateway(settings) as client:
        client.systems = {src.adapter: src.source_system for src in settings.sources.values()  # type: ignore[attr-defined]
                          if src.ehr is not None}
        yield client


def _forget(twins: dict[str, HeardTwin]) -> dict[str, dict[str, int]]:
    """Every twin's hearing emptied; their counters now."""
    for twin in twins.values():
        twin.ears.requests.clear()
    return {d: twin.counters() for d, twin in twins.items()}


def _reached_no_ehr(twins: dict[str, HeardTwin], counters: dict[str, dict[str, int]], what: str) -> None:
    """Since `_forget`: no twin heard any request but a token grant (none a patient read or search),
    took no MLLP message, and counted no API call."""
    heard = {d: [r for r in twin.ears.requests if r[:2] != ("POST", "/oauth2/token")] for d, twin in twins.items()}
    patients = [r for found in heard.values() for r in found if "patient" in (r[1] + "?" + r[2]).lower()]
    assert not patients, f"{what}: a patient read or search reached an EHR: {patients}"
    assert heard == {d: [] for d in twins}, f"{what}: the EHRs heard {heard}"
    assert {d: twin.counters() for d, twin in twins.items()} == counters, what


def _refused(response: httpx.Response, what: str, *, expression: str | None = None,
             location: str | None = None, quoted: str | None = None) -> dict[str, Any]:
    """A 400 whose OperationOutcome is valid R4, names `expression` or `location`, and never repeats
    `quoted` (the value refused)."""
    assert response.status_code == 400, (what, response.status_code, response.text[:300])
    outcome = validate(response.json(), "OperationOutcome")
    issue = outcome["issue"][0]
    if expression is not None:
        assert issue.get("expression") == [expression], (what, issue)
    if location is not None:
        assert issue.get("location") == [location], (what, issue)
    if quoted is not None:
        assert quoted not in response.text, (what, response.text)
    return issue


# -- ids in the path ---------------------------------------------------------------------------------------

def _path_call(hc: httpx.AsyncClient, op: str, system: str | None, raw_id: str):
    where = f"{system}/{raw_id}" if system else raw_id
    if op == "slot":
        return hc.get(f"/iam/Slot/{where}", headers=READ)
    if op == "read":
        return hc.get(f"/iam/Appointment/{where}", headers=READ)
    return hc.post(f"/iam/Appointment/{where}", json=CANCEL, headers=JSON)


@pytest.mark.parametrize("dialect", [*DIALECTS, None])  # None: the bare id, which every EHR would be asked
async def test_an_id_outside_the_grammar_in_the_path_is_400_and_reaches_no_ehr(hc, twins, dialect):
    """A slot read, an appointment read and a cancel (`POST …/Appointment/[{system}/]{id}`)."""
    system = hc.systems[dialect] if dialect else None
    for op in ("slot", "read", "cancel"):
        element = "Slot.id" if op == "slot" else "Appointment.id"
        for raw in BAD_PATH_IDS + DOT_SEGMENTS:
            counters = _forget(twins)
            response = await _path_call(hc, op, system, raw)
            _refused(response, f"{op} {system}/{raw}", expression=element if raw in BAD_PATH_IDS else None,
                     quoted="12724066")
            _reached_no_ehr(twins, counters, f"{op} {system}/{raw}")


async def test_the_grammar_is_the_ehrs_own(hc, twins):
    """Epic's ids run past R4's 64 characters (its $book example's proposed appointment: 66), so
    Epic's grammar is longer; Cerner's and a FHIR server's stay R4's. An id inside the grammar is asked
    (404 from a twin that has no such slot); one past it is refused before any EHR is."""
    cerner, epic, fhir = (hc.systems[d] for d in ("cerner", "epic", "fhir"))
    for system, slot_id, status in ((epic, EPIC_PROPOSED, 404), (cerner, CERNER_SLOT, 404),
                                    (cerner, "9" * 64, 404), (fhir, "f." + "9" * 62, 404),
                                    (cerner, EPIC_PROPOSED, 400), (fhir, "9" * 65, 400), (epic, "9" * 257, 400)):
        counters = _forget(twins)
        response = await hc.get(f"/iam/Slot/{system}/{slot_id}", headers=READ)
        assert response.status_code == status, (system, len(slot_id), response.text)
        validate(response.json(), "OperationOutcome")
        if status == 400:
            _reached_no_ehr(twins, counters, f"{system} {len(slot_id)}")
        else:
            dialect = next(d for d, s in hc.systems.items() if s == system)
            assert [r[0] for r in twins[dialect].ears.requests if r[1] != "/oauth2/token"] == ["GET"]


async def test_a_bare_id_only_one_ehrs_grammar_admits_is_asked_of_that_ehr_alone(hc, twins):
    """A bare id (no source system) of 66 characters: only Epic's ids run that long, so Cerner and the
    FHIR server are not asked, and the slot no EHR has is 404, as any unknown slot is (not a 400 from
    the EHRs whose grammar it is outside)."""
    counters = _forget(twins)
    response = await hc.get(f"/iam/Slot/{EPIC_PROPOSED}", headers=READ)
    assert response.status_code == 404, response.text
    validate(response.json(), "OperationOutcome")
    assert [r[0] for r in twins["epic"].ears.requests if r[1] != "/oauth2/token"] == ["GET"]
    for dialect in ("cerner", "fhir"):
        assert twins[dialect].counters()["api_calls"] == counters[dialect]["api_calls"], dialect


async def test_each_client_sends_an_id_as_one_path_segment(twins, redis_url, prefix):
    """Behind the edge's check, each EHR client holds a slot or appointment id to its EHR's grammar (400,
    nothing sent), refuses a dot segment, and percent-encodes every id it puts in a path (the patient
    read's: a query or a fragment in it stays part of the id, and the EHR answers 404)."""
    kinds = {"cerner": (CernerClient, EhrCredentials(client_secret=SECRET)),
             "epic": (EpicClient, EhrCredentials(private_key_pem=PRIVATE)),
             "fhir": (FhirClient, EhrCredentials(client_secret=SECRET))}
    for dialect, (kind, credentials) in kinds.items():
        twin, settings = twins[dialect], twins[dialect].ehr()
        http, store = HttpClient(settings), aredis.Redis.from_url(redis_url)
        client = kind(dialect, settings, credentials, http, store, f"{prefix}:{dialect}")
        try:
            calls = {"read_slot": lambda i: client.read_slot(i, CallRecord()),
                     "read": lambda i: client.read(i, CallRecord()),
                     "cancel": lambda i: client.cancel(i, None, CallRecord()),
                     "patient": lambda i: client.patient(i, None, CallRecord())}
            for name, call in calls.items():
                twin.ears.requests.clear()
                with pytest.raises(InvalidRequest):
                    await call("..")
                checked = name != "patient"  # the patient read is looked up by any id the EHR gave
                with pytest.raises(InvalidRequest if checked else NotFound):
                    await call("x?a=1#y")
                heard = [(m, p.rpartition("/")[2], q) for m, p, q in twin.ears.requests if p != "/oauth2/token"]
                assert heard == ([] if checked else [("GET", "x%3Fa%3D1%23y", "")]), (dialect, name, heard)
        finally:
            await http.aclose()
            await store.aclose()
    assert twins["epic"].counters()["mllp_messages"] == 0


# -- ids in the body ---------------------------------------------------------------------------------------

def _bad_creates(system: str, slot: str, doctor: str, patient: str) -> list[tuple[str, dict[str, Any]]]:
    """(the element refused, a create whose id there could steer the EHR's URL or query)."""
    def with_actor(index: int, reference: str) -> dict[str, Any]:
        body = _create(system, slot, doctor, "08pxx00000000N1AAA", patient)
        body["participant"][index]["actor"]["reference"] = reference
        return body

    def with_slot(reference: str) -> dict[str, Any]:
        return _create(system, slot, doctor, "08pxx00000000N1AAA", patient) | {"slot": [{"reference": reference}]}

    return [("Appointment.slot[0].reference", with_slot(f"Slot/{slot}?a=1")),
            ("Appointment.slot[0].reference", with_slot("Slot/?patient=12724066")),
            ("Appointment.slot[0].reference", with_slot(f"Slot/x/{slot}")),  # its last segment an id
            ("Appointment.slot[0].reference", with_slot("Slot/..")),
            ("Appointment.slot[0].reference", with_slot(f"{slot}#x")),
            ("Appointment.participant[0].actor.reference", with_actor(0, "Patient/12724066?_count=1")),
            ("Appointment.participant[0].actor.reference", with_actor(0, "Patient/x/../12724066")),
            ("Appointment.participant[1].actor.reference", with_actor(1, f"Practitioner/{doctor}&a=1")),
            ("Appointment.participant[1].actor.reference", with_actor(1, "Location/a b"))]


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_create_whose_slot_or_participant_id_is_outside_the_grammar_is_400_and_reaches_no_ehr(
        hc, twins, dialect):
    system = hc.systems[dialect]
    slot = _slots(await _found(hc, _search(hc.systems, (dialect,))))[0]["id"]
    doctor = default_schedules(dialect)[0].practitioner
    for element, body in _bad_creates(system, slot, doctor, PATIENT[dialect]):
        counters = _forget(twins)
        response = await hc.post(f"/iam/Appointment/{system}", json=body, headers=JSON)
        _refused(response, f"{element} {body}", expression=element, quoted="12724066")
        _reached_no_ehr(twins, counters, element)
    assert twins[dialect].appointments() == []
    # the same create with the ids as Find gave them books
    booked = await hc.post(f"/iam/Appointment/{system}", headers=JSON,
                           json=_create(system, slot, doctor, "08pxx00000000N1AAA", patient=PATIENT[dialect]))
    assert booked.status_code == 200 and booked.json()["status"] == "booked", booked.text


async def test_a_cancels_body_id_outside_the_grammar_is_400_and_reaches_no_ehr(hc, twins):
    for dialect in DIALECTS:
        system = hc.systems[dialect]
        counters = _forget(twins)
        response = await hc.post(f"/iam/Appointment/{system}", json=CANCEL | {"id": "?patient=12724066"},
                                 headers=JSON)
        _refused(response, dialect, expression="Appointment.id", quoted="12724066")
        _reached_no_ehr(twins, counters, dialect)


async def test_a_finds_practitioner_or_location_id_outside_the_grammar_is_400_and_reaches_no_ehr(hc, twins):
    for dialect in DIALECTS:
        system = hc.systems[dialect]
        for name in ("schedule:Schedule.actor:Practitioner._id", "schedule:Schedule.actor:Location._id"):
            counters = _forget(twins)
            form = (f"{name}={system}|x%3Fpatient%3D12724066&start=ge2030-01-07&start=le2030-01-08"
                    f"&service-type={system}|{SERVICE[dialect]}")
            response = await hc.post("/iam/Slot/_search", content=form, headers=FORM)
            _refused(response, name, location=f"http.{name}", quoted="12724066")
            _reached_no_ehr(twins, counters, name)


# -- search dates ----------------------------------------------------------------------------------------

OUT_OF_RANGE = (
    "start=ge9999-12-01&start=le9999-12-31",  # the day after the last: past datetime's range
    "start=ge9999-12-30T00:00:00Z&start=le9999-12-31T23:59:59Z",
    "start=gt9999-12-31&start=le9999-12-31T23:59:59Z",
    "start=ge0001-01-01&start=le0001-01-31",
    "start=ge0001-01-01T00:00:00%2B01:00&start=le0001-01-02",  # in UTC, before the year 1
    "start=ge1699-12-31&start=le1700-01-02",  # Salesforce holds 1700-01-01T00:00:00Z to 4000-12-31T00:00:00Z
    "start=ge4000-12-30&start=le4000-12-31",
)


async def test_a_search_date_outside_what_salesforce_holds_is_400_on_start(hc, twins):
    for window in OUT_OF_RANGE:
        counters = _forget(twins)
        response = await hc.post("/iam/Slot/_search", content=window, headers=FORM)
        _refused(response, window, location="http.start")
        _reached_no_ehr(twins, counters, window)


async def test_a_search_at_the_edges_of_salesforces_dates_is_answered(hc):
    for window in ("start=ge1700-01-01&start=le1700-01-02", "start=ge4000-12-01&start=le4000-12-30",
                   "start=ge1700-01-01T00:00:00Z&start=lt1700-01-01T00:30:00Z"):
        bundle = await _found(hc, window)
        assert bundle["total"] == 0, window


# -- bodies the gateway cannot read, or reads two ways --------------------------------------------------------

JITTER = 8  # levels: how far msgspec's depth limit moves between two requests (seen: one)


def _nested(body: dict[str, Any], depth: int) -> bytes:
    """`body` with an element (one FHIR ignores here) holding arrays nested `depth` deep."""
    return json.dumps(body).encode()[:-1] + b', "extension": ' + b"[" * depth + b"]" * depth + b"}"


async def test_a_body_nested_too_deep_is_400_and_one_within_the_limit_books(hc, twins):
    """The limit is msgspec's depth guard (RecursionError), so it is found by asking: past it a 400
    (no 500), within it the create books. It moves by a frame or two with the stack the decode runs
    on, so the bodies either side of it keep a margin of `JITTER` levels."""
    system = hc.systems["fhir"]
    probe = {"resourceType": "Appointment", "status": "proposed"}  # no slot: 400 on Appointment.slot once read

    async def read_at(depth: int) -> bool:
        response = await hc.post(f"/iam/Appointment/{system}", content=_nested(probe, depth), headers=JSON)
        issue = _refused(response, f"depth {depth}")
        if issue.get("expression") == ["Appointment.slot"]:
            return True
        assert "too deep" in issue["details"]["text"], issue
        return False

    counters = _forget(twins)
    assert not await read_at(100_000)
    low, high = 1, 100_000  # read at low, refused at high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if await read_at(middle) else (low, middle)
    assert low >= 200, low  # FHIR resources nest a few levels: far inside the limit
    _reached_no_ehr(twins, counters, "the probes")

    slot = _slots(await _found(hc, _search(hc.systems, ("fhir",))))[0]["id"]
    body = _create(system, slot, default_schedules("fhir")[0].practitioner, "08pxx00000000D1AAA", patient=PATIENT["fhir"])
    counters = _forget(twins)
    deep = await hc.post(f"/iam/Appointment/{system}", content=_nested(body, high + JITTER), headers=JSON)
    assert "too deep" in _refused(deep, "just past the limit")["details"]["text"]
    _reached_no_ehr(twins, counters, "just past the limit")
    within = await hc.post(f"/iam/Appointment/{system}", content=_nested(body, low - JITTER), headers=JSON)
    assert within.status_code == 200 and within.json()["status"] == "booked", within.text[:300]
    assert len(twins["fhir"].appointments()) == 1


def _twice(body: dict[str, Any], key: str, last: Any) -> bytes:
    """`body` as JSON with `key` written a second time, last, holding `last`."""
    return json.dumps(body).encode()[:-1] + b", " + json.dumps(key).encode() + b": " + json.dumps(last).encode() + b"}"


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_create_naming_a_key_twice_is_400_and_books_nothing(hc, twins, dialect):
    system = hc.systems[dialect]
    slot = _slots(await _found(hc, _search(hc.systems, (dialect,))))[0]["id"]
    doctor = default_schedules(dialect)[0].practitioner
    body = _create(system, slot, doctor, "08pxx00000000P1AAA", patient=PATIENT[dialect])
    actor = json.dumps(body).replace(f'"Patient/{PATIENT[dialect]}"',
                                     f'"Patient/{PATIENT[dialect]}", "reference": "Patient/99887766"')
    for what, raw in (("status: cancelled, then proposed", _twice(body | {"status": "cancelled"}, "status", "proposed")),
                      ("slot twice", _twice(body, "slot", [{"reference": "Slot/other"}])),
                      ("a participant's reference twice", actor.encode())):
        counters = _forget(twins)
        response = await hc.post(f"/iam/Appointment/{system}", content=raw, headers=JSON)
        assert "twice" in _refused(response, what)["details"]["text"]
        _reached_no_ehr(twins, counters, what)
    assert twins[dialect].appointments() == []


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_cancel_naming_status_twice_is_400_and_cancels_nothing(hc, twins, dialect):
    system = hc.systems[dialect]
    slot = _slots(await _found(hc, _search(hc.systems, (dialect,))))[0]["id"]
    body = _create(system, slot, default_schedules(dialect)[0].practitioner, "08pxx00000000Q1AAA",
                   patient=PATIENT[dialect])
    booked = (await hc.post(f"/iam/Appointment/{system}", json=body, headers=JSON)).json()
    assert booked["status"] == "booked"
    twice = _twice({"resourceType": "Appointment", "id": booked["id"], "status": "booked"}, "status", "cancelled")
    for path in (f"/iam/Appointment/{system}/{booked['id']}", f"/iam/Appointment/{system}"):
        counters = _forget(twins)
        response = await hc.post(path, content=twice, headers=JSON)
        assert "twice" in _refused(response, path)["details"]["text"]
        _reached_no_ehr(twins, counters, path)
    assert [a["status"] for a in twins[dialect].appointments()] == ["booked"]


async def test_a_body_that_is_not_utf8_is_400(hc, twins):
    counters = _forget(twins)
    response = await hc.post(f"/iam/Appointment/{hc.systems['fhir']}", headers=JSON,
                             content=b'{"resourceType": "Appointment", "status": "cancelled", "comment": "\xff"}')
    _refused(response, "not UTF-8")
    _reached_no_ehr(twins, counters, "not UTF-8")
