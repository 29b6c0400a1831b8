"""Health Cloud's callouts against EHRs that are not kind: a plain FHIR server that enforces nothing
beyond the spec (the FHIR twin's permissive mode: it books a taken slot and leaves it free, and checks
no reference), an Epic whose patient has several appointments at one time, an EHR that answers slowly,
and a credential that asks for what it did not book. Everything over real HTTP with a real Redis; every
answer Health Cloud reads is checked with the suite's validator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest

from gateway.settings import EhrSettings
from gateway.twins.config import default_schedules
from tests.conftest import serve_gateway
from tests.fhir_server import actors, fresh_day, search, seed_patient, seed_schedule, seed_slots
from tests.fhir_validate import validate
from tests.test_healthcloud_ehrs import (CLIENT, DIALECTS, JSON, SECRET, Twin, _DIALECT, _create, _found, _patient,
                                         _search, _slots, fleet_settings, start_twins)


@pytest.fixture
def loose() -> Iterator[dict[str, Twin]]:
    """The three twins, the FHIR one permissive and without conditional create, as plain servers are."""
    with ExitStack() as stack:
        yield start_twins(stack, permissive=True, conditional_create=False)


@asynccontextmanager
async def _gateway(redis_url: str, prefix: str, login_url: str, twins: dict[str, Twin], tmp: Any,
                   **healthcloud: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = fleet_settings(redis_url, prefix, login_url, twins, tmp)
    hc = msgspec.structs.replace(settings.file.healthcloud, **healthcloud)
    settings = msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, healthcloud=hc))
    async with serve_gateway(settings) as client:
        client.systems = {src.adapter: src.source_system for src in settings.sources.values()  # type: ignore[attr-defined]
                          if src.ehr is not None}
        _DIALECT.update({system: dialect for dialect, system in client.systems.items()})  # type: ignore[attr-defined]
        yield client


@pytest.fixture
async def hc(redis_url, prefix, sandbox, loose, tmp_path) -> AsyncIterator[httpx.AsyncClient]:
    async with _gateway(redis_url, prefix, sandbox.url, loose, tmp_path) as client:
        yield client


def _live(twin: Twin, slot: str) -> list[dict[str, Any]]:
    return [a for a in twin.appointments() if a["slot"] == slot and a["status"] == "booked"]


async def _book(hc: httpx.AsyncClient, system: str, slot: str, salesforce_id: str, **changes: Any) -> httpx.Response:
    doctor = default_schedules(_DIALECT[system])[0].practitioner  # type: ignore[arg-type]
    return await hc.post(f"/iam/Appointment/{system}", json=_create(system, slot, doctor, salesforce_id, **changes),
                         headers=JSON)


# -- 1. a slot booked once, where the EHR would book it twice ------------------------------------------

async def test_two_service_appointments_never_share_a_slot_of_a_permissive_fhir_server(hc, loose):
    system = hc.systems["fhir"]
    slot = _slots(await _found(hc, _search(hc.systems, ("fhir",))))[0]["id"]
    first = await _book(hc, system, slot, "08pxx00000000K1AAA")
    assert first.status_code == 200 and first.json()["status"] == "booked", first.text
    # the server itself would have taken it: it left the slot free
    assert loose["fhir"].control("GET", "/twin/appointments")["appointments"][0]["slot"] == slot
    second = await _book(hc, system, slot, "08pxx00000000K2AAA", patient=_patient(system, 1))
    answer = validate(second.json(), "Appointment")
    assert second.status_code == 200 and answer["status"] == "proposed" and "not free" in answer["comment"]
    assert len(_live(loose["fhir"], slot)) == 1
    # what Health Cloud asks next says the same: the slot is busy, and Find does not offer it
    status = await hc.get(f"/iam/Slot/{system}/{slot}", headers=JSON)
    assert validate(status.json(), "Slot")["status"] == "busy"
    assert slot not in {s["id"] for s in _slots(await _found(hc, _search(hc.systems, ("fhir",))))}


async def test_two_creates_for_one_slot_at_once_book_it_once(hc, loose):
    system = hc.systems["fhir"]
    slot = _slots(await _found(hc, _search(hc.systems, ("fhir",))))[1]["id"]
    loose["fhir"].faults(latency_ms=200)  # both creates are in flight together
    answers = await asyncio.gather(*(_book(hc, system, slot, f"08pxx00000000L{n}AAA", patient=_patient(system, n))
                                     for n in range(3)))
    statuses = sorted(a.json()["status"] for a in answers)
    assert statuses == ["booked", "proposed", "proposed"], [a.text for a in answers]
    assert len(_live(loose["fhir"], slot)) == 1


async def test_a_cancel_frees_the_slot_for_the_next_booking(hc, loose):
    system = hc.systems["fhir"]
    slot = _slots(await _found(hc, _search(hc.systems, ("fhir",))))[2]["id"]
    booked = (await _book(hc, system, slot, "08pxx00000000M1AAA")).json()
    cancel = {"resourceType": "Appointment", "id": booked["id"], "status": "cancelled"}
    assert (await hc.post(f"/iam/Appointment/{system}/{booked['id']}", json=cancel, headers=JSON)).status_code == 200
    assert slot in {s["id"] for s in _slots(await _found(hc, _search(hc.systems, ("fhir",))))}
    again = await _book(hc, system, slot, "08pxx00000000M2AAA", patient=_patient(system, 1))
    assert again.json()["status"] == "booked" and len(_live(loose["fhir"], slot)) == 1


# -- 2. a patient the EHR does not have -------------------------------------------------------------------

@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_patient_the_ehr_does_not_have_is_404_and_nothing_is_booked(hc, loose, dialect):
    system = hc.systems[dialect]
    slot = _slots(await _found(hc, _search(hc.systems, (dialect,))))[0]["id"]
    creates = loose[dialect].counters()["creates"]
    answer = await _book(hc, system, slot, "08pxx00000000N1AAA", patient="pt-unknown")
    assert answer.status_code == 404 and "pt-unknown" not in answer.text
    assert validate(answer.json(), "OperationOutcome")["issue"][0]["code"] == "not-found"
    reads = loose[dialect].counters()["patient_reads"]
    assert (await _book(hc, system, slot, "08pxx00000000N1AAA", patient="pt-unknown")).status_code == 404
    assert loose[dialect].counters()["patient_reads"] == reads  # remembered: not read again
    assert loose[dialect].counters()["creates"] == creates and loose[dialect].appointments() == []


# -- 3. read and cancel answered as the create was --------------------------------------------------------

@pytest.mark.parametrize("dialect", DIALECTS)
async def test_read_and_cancel_answer_the_appointment_the_create_answered(hc, loose, dialect):
    system = hc.systems[dialect]
    slot = _slots(await _found(hc, _search(hc.systems, (dialect,))))[0]["id"]
    kind = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0276", "code": "ROUTINE"}]}
    created = validate((await _book(hc, system, slot, "08pxx00000000P1AAA", appointmentType=kind)).json(),
                       "Appointment")
    assert created["status"] == "booked"
    read = validate((await hc.get(f"/iam/Appointment/{system}/{created['id']}", headers=JSON)).json(), "Appointment")
    shaped = ("identifier", "serviceType", "appointmentType", "slot", "participant", "start", "end")
    assert {k: read.get(k) for k in shaped} == {k: created.get(k) for k in shaped}
    assert read["appointmentType"] == kind and read["serviceType"] == [{"coding": [{"code": "x"}]}]
    cancel = {"resourceType": "Appointment", "id": created["id"], "status": "cancelled",
              "cancelationReason": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                                          "appointment-cancellation-reason", "code": "pat-mv"}]}}
    done = validate((await hc.post(f"/iam/Appointment/{system}/{created['id']}", json=cancel,
                                   headers=JSON)).json(), "Appointment")
    assert done["status"] == "cancelled" and {k: done.get(k) for k in shaped} == {k: created.get(k) for k in shaped}
    assert done["cancelationReason"] == cancel["cancelationReason"]
    again = validate((await hc.get(f"/iam/Appointment/{system}/{created['id']}", headers=JSON)).json(), "Appointment")
    assert again["status"] == "cancelled" and again["appointmentType"] == kind


def _token(twin: Twin) -> str:
    r = httpx.post(f"{twin.server.url}/oauth2/token", auth=(CLIENT, SECRET), data={"grant_type": "client_credentials"})
    return r.json()["access_token"]


# -- 6. Epic: the look-up never adopts another appointment --------------------------------------------------

async def test_epic_a_lost_create_is_found_on_its_own_slot_not_the_patients_other_one(hc, loose):
    system = hc.systems["epic"]
    bundle = await _found(hc, _search(hc.systems, ("epic",)).replace(
        f"Practitioner._id={system}|{default_schedules('epic')[0].practitioner}",
        f"Practitioner._id={system}|{default_schedules('epic')[0].practitioner},"
        f"{system}|{default_schedules('epic')[1].practitioner}"))
    slots = _slots(bundle)
    start = slots[0]["start"]
    one, two = [s for s in slots if s["start"] == start][:2]  # one time, two schedules
    first = await _book(hc, system, one["id"], "08pxx00000000R1AAA")
    assert first.json()["status"] == "booked"
    loose["epic"].faults(fail_after_store=1, after_store="500")  # stored on `two`, answered 500
    # a create that names only the patient: nothing in it tells the two schedules apart
    body = _create(system, two["id"], "-", "08pxx00000000R2AAA")
    body["participant"] = body["participant"][:1]
    second = await hc.post(f"/iam/Appointment/{system}", headers=JSON, json=body)
    answer = validate(second.json(), "Appointment")
    stored = {a["slot"]: a["id"] for a in loose["epic"].appointments()}
    assert answer["status"] == "booked" and answer["id"] == stored[two["id"]] != first.json()["id"]


async def test_epic_a_slot_another_patient_holds_is_not_answered_with_this_patients_other_appointment(hc, loose):
    system = hc.systems["epic"]
    doctors = [s.practitioner for s in default_schedules("epic")[:2]]
    bundle = await _found(hc, _search(hc.systems, ("epic",)).replace(
        f"Practitioner._id={system}|{doctors[0]}", f"Practitioner._id={system}|{doctors[0]},{system}|{doctors[1]}"))
    slots = _slots(bundle)
    one, two = [s for s in slots if s["start"] == slots[0]["start"]][:2]
    mine = await _book(hc, system, one["id"], "08pxx00000000S1AAA")  # this patient, on the first schedule
    other = await hc.post(f"/iam/Appointment/{system}", headers=JSON,  # another patient holds the second
                          json=_create(system, two["id"], doctors[1], "08pxx00000000S2AAA", patient=_patient(system, 1)))
    assert mine.json()["status"] == other.json()["status"] == "booked"
    body = _create(system, two["id"], "-", "08pxx00000000S3AAA")  # the patient only, as above
    body["participant"] = body["participant"][:1]
    taken = await hc.post(f"/iam/Appointment/{system}", headers=JSON, json=body)
    answer = validate(taken.json(), "Appointment")
    assert answer["status"] == "proposed" and "id" not in answer and len(loose["epic"].appointments()) == 2


# -- 7. Health Cloud's credential acts on what the gateway booked ---------------------------------------------

def _direct(twin: Twin, dialect: str) -> str:
    """An appointment booked in the FHIR twin directly, not through the gateway: its id."""
    token = {"Authorization": "Bearer " + _token(twin)}
    slot = httpx.get(f"{twin.server.url}/fhir/Slot", params={"status": "free"}, headers=token).json()["entry"][5]
    made = httpx.post(f"{twin.server.url}/fhir/Appointment", headers=token, json={
        "resourceType": "Appointment", "status": "booked", "slot": [{"reference": f"Slot/{slot['resource']['id']}"}],
        "start": slot["resource"]["start"], "end": slot["resource"]["end"],
        "participant": [{"actor": {"reference": f"Patient/{default_patient(dialect)}"}, "status": "accepted"}]})
    assert made.status_code == 201, made.text
    return made.json()["id"]


def default_patient(dialect: str) -> str:
    from gateway.twins.config import default_patients
    return default_patients(dialect)[0].id  # type: ignore[arg-type]


async def test_an_appointment_the_gateway_did_not_book_is_404_to_health_cloud(hc, loose):
    system, twin = hc.systems["fhir"], loose["fhir"]
    outside = _direct(twin, "fhir")
    calls = twin.counters()["api_calls"]
    for path in (f"/iam/Appointment/{system}/{outside}", f"/iam/Appointment/{outside}"):
        found = await hc.get(path, headers=JSON)
        assert found.status_code == 404 and validate(found.json(), "OperationOutcome")
    cancel = {"resourceType": "Appointment", "id": outside, "status": "cancelled"}
    refused = await hc.post(f"/iam/Appointment/{system}/{outside}", json=cancel, headers=JSON)
    assert refused.status_code == 404
    assert twin.counters()["api_calls"] == calls  # no EHR was asked: nothing to enumerate
    assert [a["status"] for a in twin.appointments()] == ["booked"]


async def test_scope_all_widens_it_for_an_org_that_syncs_appointments_another_way(redis_url, prefix, sandbox, loose,
                                                                                 tmp_path):
    outside = _direct(loose["fhir"], "fhir")
    async with _gateway(redis_url, prefix, sandbox.url, loose, tmp_path, scope="all") as hc:
        system = hc.systems["fhir"]
        read = await hc.get(f"/iam/Appointment/{system}/{outside}", headers=JSON)
        assert read.status_code == 200 and validate(read.json(), "Appointment")["id"] == outside


# -- 10. in doubt stays in doubt -----------------------------------------------------------------------------

async def test_a_failed_send_stays_in_doubt_and_a_take_over_whose_look_fails_sends_nothing(hc, loose):
    system, twin = hc.systems["fhir"], loose["fhir"]
    slot = _slots(await _found(hc, _search(hc.systems, ("fhir",))))[0]["id"]
    twin.faults(create_fail_ratio=1.0, after_store_share=0.0, fail_status=500, fault_seed=7)
    first = await _book(hc, system, slot, "08pxx00000000T1AAA")
    assert first.json()["status"] == "proposed" and twin.appointments() == []  # refused before storing
    calls = twin.counters()["api_calls"]
    # the next create looks first (the record stayed in doubt); its look fails: nothing else is sent
    twin.faults(create_fail_ratio=0.0, fail_before=1, fail_status=500)
    second = await _book(hc, system, slot, "08pxx00000000T1AAA")
    assert second.json()["status"] == "proposed" and twin.counters()["api_calls"] == calls + 1
    third = await _book(hc, system, slot, "08pxx00000000T1AAA")  # the look succeeds, finds nothing: booked
    assert third.json()["status"] == "booked" and len(twin.appointments()) == 1


# -- 11. a slow EHR answers within Health Cloud's callout timeout ---------------------------------------------

async def test_a_slow_ehr_is_answered_within_the_callout_deadline(redis_url, prefix, sandbox, loose, tmp_path):
    async with _gateway(redis_url, prefix, sandbox.url, loose, tmp_path, call_timeout_seconds=1.0) as hc:
        system, twin = hc.systems["cerner"], loose["cerner"]
        slot = _slots(await _found(hc, _search(hc.systems, ("cerner",))))[0]["id"]
        twin.faults(latency_ms=6000)
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, create = await asyncio.gather(hc.get(f"/iam/Slot/{system}/{slot}", headers=JSON),
                                              _book(hc, system, slot, "08pxx00000000U1AAA"))
        assert loop.time() - started < 4.5  # the 1 s deadline (and Redis), never the EHR's 6 s
        assert status.status_code == 503 and validate(status.json(), "OperationOutcome")
        answer = validate(create.json(), "Appointment")
        assert create.status_code == 200 and answer["status"] == "proposed" and "in time" in answer["comment"]


# -- the same against a FHIR server the project did not write -------------------------------------------------

async def test_against_an_independent_fhir_server_a_slot_is_booked_once_read_and_freed(
        redis_url, prefix, sandbox, loose, tmp_path, fhir_server):
    base = fhir_server.url
    schedule = seed_schedule(base)
    doctor, location = actors(schedule)
    day = fresh_day()
    (slot,) = seed_slots(base, schedule, day, ["09:00"])
    one, two = seed_patient(base), seed_patient(base)
    settings = fleet_settings(redis_url, prefix, sandbox.url, loose, tmp_path)
    sources = {name: msgspec.structs.replace(src, ehr=EhrSettings(base_url=base, timeout_seconds=5))
               if src.adapter == "fhir" else src for name, src in settings.file.sources.items()}
    credentials = {name: c for name, c in settings.ehr_credentials.items() if sources[name].adapter != "fhir"}
    settings = msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, sources=sources),
                                       ehr_credentials=credentials)
    async with serve_gateway(settings) as hc:
        system = next(src.source_system for src in sources.values() if src.adapter == "fhir")
        form = (f"schedule:Schedule.actor:Practitioner._id={system}|{doctor}&start=ge{day}&start=le{day}"
                "&status=free&_include=Slot:schedule&_sort=start")
        assert [s["id"] for s in _slots(await _found(hc, form))] == [slot["id"]]
        create = lambda sa, patient: hc.post(f"/iam/Appointment/{system}", headers=JSON,  # noqa: E731
                                             json=_create(system, slot["id"], doctor, sa, patient=patient))
        first = validate((await create("08pxx00000000V1AAA", one)).json(), "Appointment")
        second = validate((await create("08pxx00000000V2AAA", two)).json(), "Appointment")
        assert (first["status"], second["status"]) == ("booked", "proposed")
        held = [a for a in search(base, "Appointment", slot=f"Slot/{slot['id']}") if a["status"] == "booked"]
        assert [a["id"] for a in held] == [first["id"]]
        # what the server stored names the slot's Schedule's location, though the create did not
        assert f"Location/{location}" in {p["actor"]["reference"] for p in held[0]["participant"]}
        # this server lets Slots be updated: the gateway marked it busy, so any client of it sees it taken
        assert search(base, "Slot", _id=slot["id"])[0]["status"] == "busy"
        assert (await _found(hc, form)).get("entry") is None
        read = validate((await hc.get(f"/iam/Appointment/{system}/{first['id']}", headers=JSON)).json(), "Appointment")
        assert (read["identifier"], read["participant"]) == (first["identifier"], first["participant"])
        unknown = await create("08pxx00000000V3AAA", "pat-nobody-here")
        assert unknown.status_code == 404
        cancel = {"resourceType": "Appointment", "id": first["id"], "status": "cancelled"}
        cancelled = await hc.post(f"/iam/Appointment/{system}/{first['id']}", json=cancel, headers=JSON)
        assert cancelled.json()["status"] == "cancelled"
        assert search(base, "Slot", _id=slot["id"])[0]["status"] == "free"  # freed: the gateway had marked it
        again = validate((await create("08pxx00000000V2AAA", two)).json(), "Appointment")
        assert again["status"] == "booked"


async def test_a_bare_id_two_ehrs_booked_asks_for_the_source_system(hc, loose):
    made = {}
    for dialect in ("cerner", "fhir"):
        system = hc.systems[dialect]
        slot = _slots(await _found(hc, _search(hc.systems, (dialect,))))[0]["id"]
        made[dialect] = (await _book(hc, system, slot, f"08pxx00000000W{dialect[0].upper()}AAA")).json()["id"]
    assert made["cerner"] == made["fhir"]  # the twins number their appointments alike
    both = await hc.get(f"/iam/Appointment/{made['cerner']}", headers=JSON)
    assert both.status_code == 400
    text = validate(both.json(), "OperationOutcome")["issue"][0]["details"]["text"]
    assert text.startswith("several EHRs have an appointment of this id: name its source system")
