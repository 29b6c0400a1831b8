"""The plain FHIR R4 dialect: its twin (gateway/twins/fhir.py) and its client (gateway/ehr/fhir.py),
over real HTTP to the twin on a real port, the token shared in the real Redis.

The twin's own rules are checked with raw HTTP (what a mis-shaped client would send is refused), and
every body type it answers is checked as R4 by the suite's validator."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aredis
from litestar import Litestar, MediaType, Request, Response
from litestar import get as route

from gateway.canonical import Coding
from gateway.edges.server import ThreadedServer
from gateway.ehr import client_class
from gateway.ehr.fhir import MAX_PAGES, FhirClient
from gateway.ehr.model import BookRequest, SlotQuery
from gateway.twins import TwinConfig, create_ehr_twin
from gateway.errors import EhrFailed, EhrRefused, InvalidRequest, NotFound, Unavailable
from gateway.outbound.calls import CallRecord
from gateway.outbound.http import HttpClient
from gateway.settings import EhrCredentials, EhrSettings
from tests.conftest import free_port
from tests.fhir_validate import validate

CONTROL, SECRET = "fhir-twin-control", "fhir-twin-secret-8c1d"
DAY = "2030-01-07"  # the twin's first day (a Monday); it has two, 09:00 to 17:00 UTC, 30-minute slots
SERVICE = Coding(system="http://terminology.hl7.org/CodeSystem/service-type", code="124")
SF = "urn:ehr-gateway:salesforce:appointment"  # the identifier system the bookings carry
PATIENT = "pat1"  # one of the twin's patients: it refuses a reference to any other


# -- the twin and the client ----------------------------------------------------------------------------

@contextmanager
def serve_twin(**config: Any) -> Iterator[ThreadedServer]:
    twin = TwinConfig(dialect="fhir", control_key=CONTROL, client_secret=SECRET, start_date=DAY, days=2, **config)
    with ThreadedServer(create_ehr_twin(twin)) as server:
        yield server


@pytest.fixture
def twin() -> Iterator[ThreadedServer]:
    with serve_twin() as server:
        yield server


@asynccontextmanager
async def ehr_client(server: ThreadedServer, redis_url: str, prefix: str, secret: str = SECRET,
                     ) -> AsyncIterator[FhirClient]:
    settings = EhrSettings(base_url=f"{server.url}/fhir", token_url=f"{server.url}/oauth2/token",
                           client_id="ehr-twin-client", timeout_seconds=5)
    http = HttpClient(settings)
    store = aredis.Redis.from_url(redis_url)
    try:
        yield FhirClient("fhirtest", settings, EhrCredentials(client_secret=secret), http, store, prefix)
    finally:
        await http.aclose()
        await store.aclose()


@pytest.fixture
async def ehr(twin: ThreadedServer, redis_url: str, prefix: str) -> AsyncIterator[FhirClient]:
    async with ehr_client(twin, redis_url, prefix) as client:
        yield client


def control(server: ThreadedServer, method: str, path: str, **body: Any) -> Any:
    r = httpx.request(method, f"{server.url}/twin/{path}", headers={"Authorization": f"Bearer {CONTROL}"},
                      json=body if method == "POST" else None)
    assert r.status_code == 200, r.text
    return r.json()


def booked(server: ThreadedServer) -> list[dict[str, Any]]:
    return control(server, "GET", "appointments")["appointments"]


def counters(server: ThreadedServer) -> dict[str, int]:
    return control(server, "GET", "counters")


def faults(server: ThreadedServer, **changes: Any) -> None:
    control(server, "POST", "faults", **changes)


def token(server: ThreadedServer) -> dict[str, str]:
    r = httpx.post(f"{server.url}/oauth2/token", data={"grant_type": "client_credentials"},
                   auth=("ehr-twin-client", SECRET))
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def request(slot: str = "s1-203001070900", *, patient: str = PATIENT, sf_id: str | None = "08pXX0000001",
            **more: Any) -> BookRequest:
    return BookRequest(slot=slot, patient=patient, identifiers=((SF, sf_id),) if sf_id else (),
                       service_types=(SERVICE,), **more)


def appointment(slot: dict[str, Any], *, sf_id: str = "raw-1", patient: str = PATIENT, **changes: Any
                ) -> dict[str, Any]:
    """A full booked Appointment on `slot` (a Slot resource), as raw requests send it."""
    body = {"resourceType": "Appointment", "status": "booked", "identifier": [{"system": SF, "value": sf_id}],
            "start": slot["start"], "end": slot["end"], "slot": [{"reference": f"Slot/{slot['id']}"}],
            "participant": [{"actor": {"reference": f"Patient/{patient}"}, "status": "accepted"}]}
    return {**body, **changes}


def free_slots(server: ThreadedServer, headers: dict[str, str], count: int = 3) -> list[dict[str, Any]]:
    r = httpx.get(f"{server.url}/fhir/Slot", params={"status": "free", "_count": str(count)}, headers=headers)
    return [e["resource"] for e in r.json()["entry"]]


# -- metadata -------------------------------------------------------------------------------------------

def _conditional(capability: dict[str, Any]) -> bool:
    (rest,) = capability["rest"]
    (found,) = [r for r in rest["resource"] if r["type"] == "Appointment"]
    return found["conditionalCreate"]


async def test_metadata_is_public_r4_and_says_whether_conditional_create_is_served(twin, redis_url, prefix):
    r = httpx.get(f"{twin.url}/fhir/metadata")  # no token: the capabilities interaction is public
    assert counters(twin)["api_calls"] == 0  # and passes no gate
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    capability = validate(r.content, "CapabilityStatement")
    assert capability["fhirVersion"] == "4.0.1" and capability["kind"] == "instance"
    kinds = {res["type"]: {i["code"] for i in res["interaction"]} for res in capability["rest"][0]["resource"]}
    assert kinds == {"Slot": {"read", "search-type"}, "Schedule": {"read", "search-type"},
                     "Appointment": {"create", "read", "update", "search-type"}, "Patient": {"read", "search-type"}}
    assert _conditional(capability) is True
    async with ehr_client(twin, redis_url, prefix) as client:
        assert await client.conditional_create(CallRecord()) is True
        await client.conditional_create(CallRecord())
    assert counters(twin)["reads"] == 2  # this test's read, then the client's: once for both questions
    with serve_twin(conditional_create=False) as plain:
        assert _conditional(validate(httpx.get(f"{plain.url}/fhir/metadata").content)) is False


# -- slots ----------------------------------------------------------------------------------------------

async def test_find_slots_follows_next_pages_and_names_each_slots_practitioner_and_location(twin, ehr):
    found = await ehr.find_slots(SlotQuery(start=DAY, end="2030-01-09", service_types=(SERVICE,)), CallRecord())
    # 2 days x 16 slots x 2 schedules: 64, over two pages of the client's 50
    assert len(found) == 64 and len({s.id for s in found}) == 64
    assert counters(twin)["searches"] == 2 and counters(twin)["reads"] == 0  # schedules came included
    assert [s.start for s in found] == sorted(s.start for s in found)
    assert found[0].start == "2030-01-07T09:00:00Z" and found[0].end == "2030-01-07T09:30:00Z"
    by_schedule = {s.schedule: (s.practitioner, s.location) for s in found}
    assert by_schedule == {"s1": ("example", "1"), "s2": ("f001", "2")}
    assert all(s.status == "free" and s.service_types == (SERVICE,) for s in found)


async def test_find_slots_by_practitioner_or_location_and_service_and_time(ehr):
    record = CallRecord()
    mine = await ehr.find_slots(SlotQuery(start="2030-01-07T14:00:00+02:00", end="2030-01-07T13:00:00Z",
                                          practitioners=("example",)), record)  # an offset: 12:00 UTC
    assert [(s.id, s.practitioner) for s in mine] == [("s1-203001071200", "example"), ("s1-203001071230", "example")]
    either = await ehr.find_slots(SlotQuery(start="2030-01-07T12:00:00Z", end="2030-01-07T12:30:00Z",
                                            practitioners=("example", "f001")), record)
    assert {s.schedule for s in either} == {"s1", "s2"}
    # practitioner AND location: a practitioner at a location not theirs has no slots
    assert await ehr.find_slots(SlotQuery(start=DAY, end="2030-01-08", practitioners=("example",),
                                          locations=("2",)), record) == []
    other = Coding(system="http://terminology.hl7.org/CodeSystem/service-type", code="57")
    assert await ehr.find_slots(SlotQuery(start=DAY, end="2030-01-08", service_types=(other,)), record) == []


async def test_slot_search_bundles_are_r4_with_absolute_links_and_included_schedules(twin):
    auth = token(twin)
    params = [("start", "ge2030-01-07T09:00:00Z"), ("start", "le2030-01-07T10:00:00Z"), ("status", "free"),
              ("service-type", "http://terminology.hl7.org/CodeSystem/service-type|124"),
              ("_include", "Slot:schedule"), ("_count", "4")]
    r = httpx.get(f"{twin.url}/fhir/Slot", params=params, headers=auth)
    bundle = validate(r.content, "Bundle")
    assert bundle["type"] == "searchset" and bundle["total"] == 6  # 09:00, 09:30, 10:00 (le) x 2 schedules
    modes = [(e["resource"]["resourceType"], e["search"]["mode"]) for e in bundle["entry"]]
    assert modes == [("Slot", "match")] * 4 + [("Schedule", "include")] * 2
    schedule = next(e["resource"] for e in bundle["entry"] if e["resource"]["id"] == "s1")
    assert validate(schedule, "Schedule")["actor"] == [{"reference": "Practitioner/example"},
                                                       {"reference": "Location/1"}]
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    assert links["next"].startswith(f"{twin.url}/fhir/Slot?")
    rest = validate(httpx.get(links["next"], headers=auth).content, "Bundle")
    assert len(rest["entry"]) == 2 + 2 and "next" not in {link["relation"] for link in rest["link"]}


async def test_slot_search_parameters_follow_fhirs_rules(twin):
    auth, url = token(twin), f"{twin.url}/fhir/Slot"
    window = [("start", "ge2030-01-07T09:00:00Z"), ("start", "lt2030-01-07T09:30:00Z")]
    # an unknown parameter is ignored (and not in the self link)...
    lenient = httpx.get(url, params=[*window, ("colour", "blue")], headers=auth)
    assert lenient.status_code == 200 and lenient.json()["total"] == 2
    assert "colour" not in lenient.json()["link"][0]["url"]
    # ...unless the client asks for strict handling
    strict = httpx.get(url, params=[*window, ("colour", "blue")], headers={**auth, "Prefer": "handling=strict"})
    assert strict.status_code == 400
    assert validate(strict.content, "OperationOutcome")["issue"][0]["code"] == "not-supported"
    # commas: OR; a repeated parameter: AND
    either = httpx.get(url, params=[*window, ("schedule.actor", "Practitioner/example,Practitioner/f001")],
                       headers=auth)
    assert either.json()["total"] == 2
    both = httpx.get(url, params=[*window, ("schedule.actor", "Practitioner/example"),
                                  ("schedule.actor", "Location/2")], headers=auth)
    assert both.json()["total"] == 0
    bare_code = httpx.get(url, params=[*window, ("service-type", "124")], headers=auth)
    assert bare_code.json()["total"] == 2
    bad = httpx.get(url, params=[("start", "geyesterday")], headers=auth)
    assert bad.status_code == 400 and validate(bad.content, "OperationOutcome")
    assert httpx.get(url, params=window).status_code == 401  # every API call needs the token


async def test_read_slot_any_status_and_unknown_is_not_found(twin, ehr):
    slot = await ehr.read_slot("s2-203001071000", CallRecord())
    assert (slot.status, slot.practitioner, slot.location, slot.start) == ("free", "f001", "2", "2030-01-07T10:00:00Z")
    await ehr.book(request("s2-203001071000"), CallRecord())
    assert (await ehr.read_slot("s2-203001071000", CallRecord())).status == "busy"
    raw = httpx.get(f"{twin.url}/fhir/Slot/s2-203001071000", headers=token(twin))
    assert validate(raw.content, "Slot")["status"] == "busy"
    with pytest.raises(NotFound):
        await ehr.read_slot("s2-203001071005", CallRecord())  # off the grid
    missing = httpx.get(f"{twin.url}/fhir/Slot/nope", headers=token(twin))
    assert missing.status_code == 404 and validate(missing.content, "OperationOutcome")
    schedule = httpx.get(f"{twin.url}/fhir/Schedule/s2", headers=token(twin))
    assert validate(schedule.content, "Schedule")["actor"][0] == {"reference": "Practitioner/f001"}
    assert httpx.get(f"{twin.url}/fhir/Schedule/s9", headers=token(twin)).status_code == 404


# -- booking, reading, cancelling -----------------------------------------------------------------------

async def test_book_read_cancel_and_a_conditional_resend_books_nothing_new(twin, ehr):
    wanted = request("s1-203001071400", practitioner="example", location="1", comment="bring the referral",
                     appointment_types=(Coding(system="http://terminology.hl7.org/CodeSystem/v2-0276",
                                               code="ROUTINE"),))
    made = await ehr.book(wanted, CallRecord())
    assert (made.status, made.slot, made.patient, made.practitioner, made.location) == \
        ("booked", "s1-203001071400", PATIENT, "example", "1")
    assert (made.start, made.end, made.version) == ("2030-01-07T14:00:00Z", "2030-01-07T14:30:00Z", "1")
    assert made.identifiers == ((SF, "08pXX0000001"),) and made.service_types == (SERVICE,)
    (stored,) = booked(twin)
    assert (stored["id"], stored["patient"], stored["comment"]) == (made.id, PATIENT, "bring the referral")

    again = await ehr.book(wanted, CallRecord())  # the same identifier, found on its slot: nothing sent
    assert again.id == made.id and len(booked(twin)) == 1 and counters(twin)["creates"] == 1

    raw = httpx.get(f"{twin.url}/fhir/Appointment/{made.id}", headers=token(twin))
    assert raw.headers["etag"] == 'W/"1"'
    body = validate(raw.content, "Appointment")
    assert body["meta"]["lastUpdated"].startswith("20") and body["meta"]["versionId"] == "1"
    assert body["appointmentType"]["coding"][0]["code"] == "ROUTINE"
    assert (await ehr.read(made.id, CallRecord())) == made

    cancelled = await ehr.cancel(made.id, "pat", CallRecord())
    assert (cancelled.id, cancelled.status, cancelled.version) == (made.id, "cancelled", "2")
    assert booked(twin)[0]["status"] == "cancelled" and booked(twin)[0]["cancelReason"] == "pat"
    after = validate(httpx.get(f"{twin.url}/fhir/Appointment/{made.id}", headers=token(twin)).content, "Appointment")
    assert after["cancelationReason"]["coding"][0]["code"] == "pat"
    assert (await ehr.read_slot("s1-203001071400", CallRecord())).status == "free"  # the slot is free again

    calls = counters(twin)["api_calls"]
    again = await ehr.cancel(made.id, "pat", CallRecord())  # already cancelled: read, nothing sent
    assert again.status == "cancelled" and again.version == "2"
    assert counters(twin)["api_calls"] == calls + 1 and counters(twin)["cancels"] == 1


async def test_a_reason_that_is_no_r4_code_goes_as_other_with_its_text(twin, ehr):
    made = await ehr.book(request("s1-203001071500"), CallRecord())
    await ehr.cancel(made.id, "the clinic closed for the day", CallRecord())
    body = validate(httpx.get(f"{twin.url}/fhir/Appointment/{made.id}", headers=token(twin)).content)
    assert body["cancelationReason"] == {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                                                "appointment-cancellation-reason", "code": "other"}],
                                         "text": "the clinic closed for the day"}


async def test_a_booking_without_start_and_end_takes_them_from_the_slot(twin, ehr):
    made = await ehr.book(request("s2-203001081630", sf_id=None), CallRecord())
    assert (made.start, made.end, made.practitioner) == ("2030-01-08T16:30:00Z", "2030-01-08T17:00:00Z", "f001")


async def test_a_taken_slot_is_refused_without_patient_data(twin, ehr):
    await ehr.book(request("s1-203001071000"), CallRecord())
    record = CallRecord()
    with pytest.raises(EhrRefused) as refused:
        await ehr.book(request("s1-203001071000", patient="pat-9999", sf_id="08pXX0000002"), record)
    # seen taken before anything is sent (a plain FHIR server would book it again)
    assert refused.value.issues[0].details_code == "SLOT_TAKEN" and record.error_code == "SLOT_TAKEN"
    assert "pat-9999" not in str(refused.value)
    assert counters(twin)["creates"] == 1 and len(booked(twin)) == 1


async def test_an_identifier_already_booked_on_another_slot_is_refused(twin, ehr):
    auth = token(twin)
    first, second, _ = free_slots(twin, auth)
    assert httpx.post(f"{twin.url}/fhir/Appointment", json=appointment(first, sf_id="08pXX0000005"),
                      headers=auth).status_code == 201
    with pytest.raises(EhrRefused) as refused:  # the conditional create answers the first: not what was asked
        await ehr.book(request(second["id"], sf_id="08pXX0000005"), CallRecord())
    assert refused.value.issues[0].details_code == "IDENTIFIER_ON_ANOTHER_SLOT" and len(booked(twin)) == 1


async def test_ids_that_are_no_fhir_ids_are_never_sent(twin, ehr):
    calls = counters(twin)["api_calls"]
    for odd in ("../metadata", "s1-203001070900?_format=xml", "a/b", "", ".."):
        with pytest.raises(InvalidRequest):  # 400, as at Health Cloud's edge
            await ehr.read_slot(odd, CallRecord())
        with pytest.raises(InvalidRequest):
            await ehr.cancel(odd, None, CallRecord())
    assert counters(twin)["api_calls"] == calls


@pytest.mark.parametrize("change", [{"start": "2030-01-07T10:30:00Z", "end": "2030-01-07T11:00:00Z"},
                                    {"practitioner": "f001"}])
async def test_a_booking_that_does_not_fit_its_slot_is_refused(twin, ehr, change):
    wanted = request("s1-203001071000", start="2030-01-07T10:00:00Z", end="2030-01-07T10:30:00Z")
    with pytest.raises(EhrRefused) as refused:
        await ehr.book(msgspec.structs.replace(wanted, **change), CallRecord())
    assert refused.value.issues[0].details_code == "HTTP_422" and booked(twin) == []


async def test_cancel_of_an_unknown_appointment_is_not_found(ehr):
    with pytest.raises(NotFound):
        await ehr.cancel("99999999", None, CallRecord())
    with pytest.raises(NotFound):
        await ehr.read("99999999", CallRecord())


async def test_two_cancels_at_once_one_meets_a_stale_version_and_reads_again(twin, redis_url, prefix):
    async with ehr_client(twin, redis_url, prefix) as one, ehr_client(twin, redis_url, prefix) as two:
        made = await one.book(request("s1-203001071100"), CallRecord())
        faults(twin, latency_ms=150)  # both reads are answered before either update arrives
        calls = counters(twin)["api_calls"]
        first, second = await asyncio.gather(one.cancel(made.id, "pat", CallRecord()),
                                             two.cancel(made.id, "prov", CallRecord()))
    assert first.status == second.status == "cancelled" and first.version == second.version == "2"
    # two reads, two updates (one refused: 412), one read again that finds it cancelled, and the
    # cancel that was applied asks whether its slot is held by another booking
    assert counters(twin)["api_calls"] == calls + 6 and counters(twin)["cancels"] == 1


async def test_find_booked_by_patient_slot_and_time_when_the_booking_has_no_identifier(twin, ehr):
    made = await ehr.book(request("s2-203001071300", sf_id=None), CallRecord())
    record = CallRecord()
    assert await ehr.find_booked(request("s2-203001071300", sf_id=None), record) == made
    assert record.matches == 1
    assert await ehr.find_booked(request("s2-203001071330", sf_id=None), CallRecord()) is None
    assert await ehr.find_booked(request("s2-203001071300", sf_id=None, patient="pat-other"), CallRecord()) is None
    search = httpx.get(f"{twin.url}/fhir/Appointment", params={"patient": f"Patient/{PATIENT}"}, headers=token(twin))
    assert validate(search.content, "Bundle")["total"] == 1


# -- the twin's rules (raw HTTP) ------------------------------------------------------------------------

def test_update_rules_id_version_and_only_a_cancel(twin):
    auth = token(twin)
    (slot, *_) = free_slots(twin, auth)
    made = httpx.post(f"{twin.url}/fhir/Appointment", json=appointment(slot), headers=auth)
    assert made.status_code == 201 and made.headers["etag"] == 'W/"1"'
    assert made.headers["location"] == f"{twin.url}/fhir/Appointment/{made.json()['id']}/_history/1"
    body = validate(made.content, "Appointment")
    url = f"{twin.url}/fhir/Appointment/{body['id']}"
    reason = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason",
                          "code": "pat"}]}

    def put(changed: dict[str, Any], **headers: str) -> httpx.Response:
        r = httpx.put(url, json=changed, headers={**auth, **headers})
        validate(r.content)
        return r

    assert put({**body, "id": "10000999", "status": "cancelled", "cancelationReason": reason}).status_code == 400
    assert put({**body, "status": "cancelled", "cancelationReason": reason}, **{"If-Match": 'W/"7"'}).status_code == 412
    moved = put({**body, "start": "2030-01-07T09:30:00Z", "end": "2030-01-07T10:00:00Z"})
    assert moved.status_code == 422 and "start" in moved.json()["issue"][0]["details"]["text"]
    assert put({**body, "status": "noshow"}).status_code == 422
    assert put({**body, "status": "cancelled"}).status_code == 422  # no cancelationReason
    assert booked(twin)[0]["status"] == "booked" and booked(twin)[0]["version"] == 0
    done = put({**body, "status": "cancelled", "cancelationReason": reason}, **{"If-Match": 'W/"1"'})
    assert done.status_code == 200 and done.headers["etag"] == 'W/"2"' and done.json()["meta"]["versionId"] == "2"
    assert httpx.put(f"{twin.url}/fhir/Appointment/123", json={**body, "id": "123"}, headers=auth).status_code == 404


def test_conditional_create_with_several_matches_is_412(twin):
    auth = token(twin)
    first, second, third = free_slots(twin, auth)
    for slot in (first, second):  # a plain create does not look: two appointments carry the identifier
        made = httpx.post(f"{twin.url}/fhir/Appointment", json=appointment(slot, sf_id="dup"), headers=auth)
        assert made.status_code == 201
    r = httpx.post(f"{twin.url}/fhir/Appointment", json=appointment(third, sf_id="dup"),
                   headers={**auth, "If-None-Exist": f"identifier={SF}|dup"})
    assert r.status_code == 412 and validate(r.content, "OperationOutcome")
    assert len(booked(twin)) == 2
    taken = httpx.post(f"{twin.url}/fhir/Appointment", json=appointment(first, sf_id="other"), headers=auth)
    assert taken.status_code == 409 and validate(taken.content, "OperationOutcome")["issue"][0]["code"] == "conflict"
    listed = httpx.get(f"{twin.url}/fhir/Appointment", params={"identifier": f"{SF}|dup"}, headers=auth)
    assert validate(listed.content, "Bundle")["total"] == 2
    odd = httpx.post(f"{twin.url}/fhir/Appointment", json=appointment(third),
                     headers={**auth, "If-None-Exist": "patient=x"})
    assert odd.status_code == 400


@pytest.mark.parametrize(("change", "status"), [
    ({"status": "proposed"}, 422),
    ({"slot": []}, 422),
    ({"participant": [{"actor": {"reference": "Practitioner/example"}, "status": "accepted"}]}, 422),
    ({"participant": [{"actor": {"reference": f"Patient/{PATIENT}"}}]}, 400),  # participant.status is 1..1
    ({"end": "2030-01-07T10:30:00Z"}, 422),
    ({"start": None}, 400),
    ({"resourceType": "Patient"}, 400),
    ({"slot": [{"reference": "Slot/s1-203001070905"}]}, 422),
])
def test_a_create_the_server_would_not_take_is_refused(twin, change, status):
    auth = token(twin)
    (slot, *_) = free_slots(twin, auth)
    body = {k: v for k, v in {**appointment(slot), **change}.items() if v is not None}
    r = httpx.post(f"{twin.url}/fhir/Appointment", json=body, headers=auth)
    assert r.status_code == status and validate(r.content, "OperationOutcome")
    assert booked(twin) == []


def test_a_body_that_is_no_json_media_type_is_415(twin):
    auth = token(twin)
    (slot, *_) = free_slots(twin, auth)
    r = httpx.post(f"{twin.url}/fhir/Appointment", content=json.dumps(appointment(slot)),
                   headers={**auth, "Content-Type": "text/plain"})
    assert r.status_code == 415 and validate(r.content, "OperationOutcome") and booked(twin) == []


def test_another_practitioner_than_the_slots_is_refused(twin):
    auth = token(twin)
    (slot, *_) = free_slots(twin, auth)  # s1: Practitioner/example
    body = appointment(slot)
    body["participant"].append({"actor": {"reference": "Practitioner/f001"}, "status": "accepted"})
    r = httpx.post(f"{twin.url}/fhir/Appointment", json=body, headers=auth)
    assert r.status_code == 422 and booked(twin) == []


# -- without conditional create ---------------------------------------------------------------------------

async def test_without_conditional_create_a_lost_booking_is_found_and_a_refused_token_not_resent(redis_url, prefix):
    with serve_twin(conditional_create=False) as plain:
        async with ehr_client(plain, redis_url, prefix) as client:
            made = await client.book(request("s1-203001070900"), CallRecord())
            assert made.status == "booked"
            # a second send of the same booking: this server has no conditional create, but the
            # appointment on the slot carries the booking's identifier, and nothing is sent
            again = await client.book(request("s1-203001070900"), CallRecord())
            assert again.id == made.id and counters(plain)["creates"] == 1
            with pytest.raises(EhrRefused):  # another booking's identifier: the slot is taken
                await client.book(request("s1-203001070900", sf_id="08pXX0000009"), CallRecord())

            faults(plain, fail_after_store=1, after_store="drop")
            record = CallRecord()
            with pytest.raises(EhrFailed, match="did not arrive"):
                await client.book(request("s1-203001070930", sf_id="08pXX0000002"), record)
            assert record.in_doubt and len(booked(plain)) == 2
            found = await client.find_booked(request("s1-203001070930", sf_id="08pXX0000002"), CallRecord())
            assert found is not None and found.slot == "s1-203001070930"

            faults(plain, expire_tokens_at_create=True)  # the slot's reads pass; the create meets a 401
            creates, record = counters(plain)["creates"], CallRecord()
            timed = request("s1-203001071000", sf_id="08pXX0000003", start="2030-01-07T10:00:00Z",
                            end="2030-01-07T10:30:00Z")
            with pytest.raises(Unavailable):
                await client.book(timed, record)
            assert record.reauthenticated and counters(plain)["creates"] == creates  # refused at the door, not resent
            assert len(booked(plain)) == 2
            again = await client.book(timed, CallRecord())  # with the token renewed after the refusal
            assert again.status == "booked" and len(booked(plain)) == 3


# -- a server that answers no body ------------------------------------------------------------------------

async def test_a_server_that_answers_no_body_is_read_by_its_location(redis_url, prefix):
    with serve_twin(return_minimal=True) as minimal:
        async with ehr_client(minimal, redis_url, prefix) as client:
            reads = counters(minimal)["reads"]
            timed = request("s2-203001070900", start="2030-01-07T09:00:00Z", end="2030-01-07T09:30:00Z")
            made = await client.book(timed, CallRecord())
            assert (made.status, made.slot, made.patient, made.version) == ("booked", "s2-203001070900", PATIENT, "1")
            again = await client.book(timed, CallRecord())  # the conditional match: 200, no body
            assert again == made and len(booked(minimal)) == 1
            cancelled = await client.cancel(made.id, None, CallRecord())
            assert (cancelled.status, cancelled.version) == ("cancelled", "2")
            # the slot and its schedule before each create; metadata; a read after the create; one
            # before and after the update
            assert counters(minimal)["reads"] == reads + 2 * 2 + 1 + 1 + 2
        raw = httpx.post(f"{minimal.url}/fhir/Appointment", headers=token(minimal),
                         json=appointment(free_slots(minimal, token(minimal))[0]))
        assert raw.status_code == 201 and raw.content == b"" and raw.headers["etag"] == 'W/"1"'
    with serve_twin() as twin:  # a client may ask for no body too
        raw = httpx.post(f"{twin.url}/fhir/Appointment", json=appointment(free_slots(twin, token(twin))[0]),
                         headers={**token(twin), "Prefer": "return=minimal"})
        assert raw.status_code == 201 and raw.content == b"" and "/fhir/Appointment/" in raw.headers["location"]


# -- answers that are no FHIR (a proxy, a broken server): a small server of its own -------------------------

def _garbage_app(pages: list[int]) -> Any:
    @route("/fhir/metadata", media_type=MediaType.HTML)
    async def metadata() -> str:
        return "<html>maintenance</html>"

    @route("/fhir/Appointment")
    async def appointments(request: Request[Any, Any, Any]) -> Response[bytes]:
        if "slot" in request.query_params and "patient" not in request.query_params:  # who holds the slots: none
            return Response(b'{"resourceType":"Bundle","type":"searchset"}', media_type="application/fhir+json")
        # an id that is no string
        return Response(b'{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Appointment","id":7}}]}',
                        media_type="application/fhir+json")

    @route("/fhir/Schedule")
    async def schedules() -> Response[dict[str, Any]]:
        return Response({"resourceType": "Bundle", "type": "searchset",
                         "entry": [{"resource": {"resourceType": "Schedule", "id": "s2",
                                                 "actor": [{"reference": "Location/l"}, {"reference": "Practitioner/q"}]}},
                                   {"resource": {"resourceType": "Schedule", "id": "s3",  # not the one asked for
                                                 "actor": [{"reference": "Practitioner/z"}]}}]},
                        media_type="application/fhir+json")

    @route("/fhir/Slot")
    async def slots(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        if "service-type" in request.query_params:  # a server whose next link leads back to itself
            pages.append(1)
            again = f"{request.base_url}fhir/Slot?{request.url.query}"
            page = {"resourceType": "Bundle", "type": "searchset", "link": [{"relation": "next", "url": again}],
                    "entry": [{"resource": {"resourceType": "Slot", "id": "x1", "status": "free",
                                            "schedule": {"reference": "Schedule/s"}, "start": "2030-01-07T09:00:00Z",
                                            "end": "2030-01-07T09:30:00Z"}, "search": {"mode": "match"}},
                              {"resource": {"resourceType": "Schedule", "id": "s",
                                            "actor": [{"reference": "Practitioner/p"}]},
                               "search": {"mode": "include"}},
                              # its schedule not included: read
                              {"resource": {"resourceType": "Slot", "id": "x2", "status": "free",
                                            "schedule": {"reference": "Schedule/s2"}, "start": "2030-01-07T09:00:00Z",
                                            "end": "2030-01-07T09:30:00Z"}, "search": {"mode": "match"}},
                              # what a server that ignores a parameter lets through: left out
                              {"resource": {"resourceType": "Slot", "id": "x3", "status": "busy",
                                            "schedule": {"reference": "Schedule/s"}, "start": "2030-01-07T09:30:00Z",
                                            "end": "2030-01-07T10:00:00Z"}, "search": {"mode": "match"}},
                              {"resource": {"resourceType": "Slot", "id": "x4", "status": "free",
                                            "schedule": {"reference": "Schedule/s"}, "start": "2031-01-07T09:30:00Z",
                                            "end": "2031-01-07T10:00:00Z"}, "search": {"mode": "match"}}]}
            return Response(page, media_type="application/fhir+json")
        if "schedule" in request.query_params:  # the schedules' slots, one of another schedule let through
            page = {"resourceType": "Bundle", "type": "searchset",
                    "entry": [{"resource": {"resourceType": "Slot", "id": "y1", "status": "free",
                                            "schedule": {"reference": "Schedule/s2"}, "start": "2030-01-07T09:00:00Z",
                                            "end": "2030-01-07T09:30:00Z"}, "search": {"mode": "match"}},
                              {"resource": {"resourceType": "Slot", "id": "y2", "status": "free",
                                            "schedule": {"reference": "Schedule/s3"}, "start": "2030-01-07T09:00:00Z",
                                            "end": "2030-01-07T09:30:00Z"}, "search": {"mode": "match"}}]}
            return Response(page, media_type="application/fhir+json")
        elsewhere = "http://127.0.0.1:9/fhir/Slot?_offset=1"  # a next link off the EHR's base
        page = {"resourceType": "Bundle", "type": "searchset", "link": [{"relation": "next", "url": elsewhere}],
                "entry": [{"resource": {"resourceType": "OperationOutcome", "issue": []},
                           "search": {"mode": "outcome"}}]}
        return Response(page, media_type="application/fhir+json")

    @route("/fhir/Schedule/{schedule_id:str}")
    async def schedule() -> Response[dict[str, Any]]:
        return Response({"resourceType": "Schedule", "id": "s2", "actor": [{"reference": "Location/l"},
                                                                           {"reference": "Practitioner/q"}]},
                        media_type="application/fhir+json")

    @route("/fhir/Slot/{slot_id:str}", media_type=MediaType.HTML)
    async def slot() -> Response[str]:
        return Response("<html>bad gateway</html>", status_code=502, media_type=MediaType.HTML)

    @route("/fhir/Appointment/{appointment_id:str}")
    async def appointment_read() -> Response[bytes]:
        return Response(b'{"resourceType":"Appointment","id":"1","status":', media_type="application/fhir+json")

    return Litestar([metadata, appointments, schedules, slots, schedule, slot, appointment_read], openapi_config=None,
                    logging_config=None)


async def test_answers_that_are_no_fhir_are_failures(redis_url, prefix):
    pages: list[int] = []
    with ThreadedServer(_garbage_app(pages)) as broken:
        settings = EhrSettings(base_url=f"{broken.url}/fhir", timeout_seconds=5)  # no token: a server behind mTLS
        http, store = HttpClient(settings), aredis.Redis.from_url(redis_url)
        client = FhirClient("fhirtest", settings, None, http, store, prefix)
        try:
            record = CallRecord()
            with pytest.raises(EhrFailed, match="cannot be read"):
                await client.conditional_create(record)
            assert record.error_code == "UNREADABLE"
            with pytest.raises(EhrFailed, match="not on its FHIR base"):  # the token never goes elsewhere
                await client.find_slots(SlotQuery(start=DAY, end="2030-01-08"), CallRecord())
            looped = await client.find_slots(SlotQuery(start=DAY, end="2030-01-08", service_types=(SERVICE,)),
                                             CallRecord())
            assert len(pages) == MAX_PAGES  # followed no further
            # a slot seen twice is one slot; a busy one, and one outside the window, are left out
            assert [(s.id, s.practitioner, s.location) for s in looped] == [("x1", "p", None), ("x2", "q", "l")]
            bare = await client.find_slots(SlotQuery(start=DAY, end="2030-01-08", practitioners=("q",)), CallRecord())
            assert [(s.id, s.schedule, s.practitioner, s.location) for s in bare] == [("y1", "s2", "q", "l")]
            with pytest.raises(EhrFailed, match="HTTP 502"):
                await client.read_slot("s1-203001070900", CallRecord())
            with pytest.raises(EhrFailed, match="cannot be read"):
                await client.read("1", CallRecord())  # cut short
            with pytest.raises(EhrFailed, match="cannot be read"):
                await client.find_booked(request(), CallRecord())
        finally:
            await http.aclose()
            await store.aclose()


# -- the failure matrix (conditional create served) -------------------------------------------------------

async def test_refused_credentials_are_unavailable_and_nothing_is_sent(twin, redis_url, prefix):
    async with ehr_client(twin, redis_url, prefix, secret="not-the-secret") as client:
        with pytest.raises(Unavailable, match="invalid_client"):
            await client.find_slots(SlotQuery(start=DAY, end="2030-01-08"), CallRecord())
        with pytest.raises(Unavailable):
            await client.book(request(), CallRecord())
    assert counters(twin)["api_calls"] == 0 and booked(twin) == []


async def test_an_expired_token_is_renewed_once_and_the_conditional_booking_resent(twin, ehr):
    await ehr.find_slots(SlotQuery(start=DAY, end="2030-01-07T10:00:00Z"), CallRecord())
    assert await ehr.conditional_create(CallRecord())
    grants, calls = counters(twin)["token_grants"], counters(twin)["api_calls"]
    faults(twin, expire_tokens_at_create=True)
    record = CallRecord()
    timed = request("s1-203001071600", start="2030-01-07T16:00:00Z", end="2030-01-07T16:30:00Z")
    made = await ehr.book(timed, record)  # the slot's reads pass; the create is the call the old token meets
    assert made.status == "booked" and record.retried_auth and not record.reauthenticated
    assert counters(twin)["token_grants"] == grants + 1 and counters(twin)["refused_auth"] == 1
    # the slot, its schedule, who holds it; the create refused at the door, and resent
    assert counters(twin)["api_calls"] == calls + 3 + 2 and counters(twin)["creates"] == 1
    assert len(booked(twin)) == 1


FAILING = [(429, Unavailable), (503, Unavailable), (500, EhrFailed), (502, EhrFailed)]
NINE = request("s1-203001070900", start="2030-01-07T09:00:00Z", end="2030-01-07T09:30:00Z")  # no slot read first


@pytest.mark.parametrize(("status", "error"), FAILING)
async def test_a_failure_before_anything_is_done_books_nothing(twin, ehr, status, error):
    assert await ehr.conditional_create(CallRecord())  # metadata passes no gate: the create is the first call
    faults(twin, fail_before=1, fail_status=status)
    record = CallRecord()
    with pytest.raises(error) as raised:
        await ehr.book(NINE, record)
    assert record.status == status and not record.in_doubt and booked(twin) == []
    assert counters(twin)["creates"] == 0  # answered at the door
    if error is Unavailable:
        assert raised.value.retry_after == ehr.retry_after()
    assert (await ehr.book(NINE, CallRecord())).status == "booked"  # the fault was spent


@pytest.mark.parametrize(("status", "error"), FAILING)
async def test_a_failure_of_a_cancel_or_a_search_changes_nothing(twin, ehr, status, error):
    made = await ehr.book(NINE, CallRecord())
    faults(twin, fail_before=1, fail_status=status)
    with pytest.raises(error):
        await ehr.cancel(made.id, "pat", CallRecord())  # its read fails: no update is sent
    assert booked(twin)[0]["status"] == "booked" and counters(twin)["cancels"] == 0
    faults(twin, fail_before=1, fail_status=status)
    with pytest.raises(error):
        await ehr.find_slots(SlotQuery(start=DAY, end="2030-01-08"), CallRecord())
    assert (await ehr.cancel(made.id, "pat", CallRecord())).status == "cancelled"


async def test_a_dropped_answer_after_the_store_is_lost_then_found_and_a_resend_books_nothing_new(twin, ehr):
    faults(twin, fail_after_store=1, after_store="drop")
    record = CallRecord()
    with pytest.raises(EhrFailed, match="may or may not have been applied"):
        await ehr.book(request("s2-203001071500"), record)
    assert record.in_doubt and len(booked(twin)) == 1
    look = CallRecord()
    found = await ehr.find_booked(request("s2-203001071500"), look)
    assert found is not None and found.id == booked(twin)[0]["id"] and look.matches == 1
    again = await ehr.book(request("s2-203001071500"), CallRecord())
    assert again.id == found.id and len(booked(twin)) == 1


async def test_a_5xx_after_the_store_is_a_failure_and_the_booking_is_found(twin, ehr):
    faults(twin, fail_after_store=1, after_store="504")
    with pytest.raises(EhrFailed, match="HTTP 504"):
        await ehr.book(request("s2-203001071600"), CallRecord())
    found = await ehr.find_booked(request("s2-203001071600"), CallRecord())
    assert found is not None and found.id == booked(twin)[0]["id"]
    assert await ehr.find_booked(request("s2-203001071630", sf_id="08pXX0000009"), CallRecord()) is None


async def test_two_clients_share_one_token_grant(twin, redis_url, prefix):
    async with ehr_client(twin, redis_url, prefix) as one, ehr_client(twin, redis_url, prefix) as two:
        query = SlotQuery(start=DAY, end="2030-01-07T10:00:00Z")
        await asyncio.gather(one.find_slots(query, CallRecord()), two.find_slots(query, CallRecord()))
        await one.read_slot("s1-203001070900", CallRecord())
    assert counters(twin)["token_grants"] == 1


def test_the_dialect_is_found_by_name():
    assert client_class("fhir") is FhirClient and FhirClient.dialect == "fhir"


def test_ehr_sandbox_serves_the_fhir_twin():
    port = free_port()
    env = {**os.environ, "EHR_SANDBOX_CONTROL_KEY": CONTROL, "EHR_SANDBOX_CLIENT_SECRET": SECRET}
    script = os.path.join(os.path.dirname(sys.executable), "ehr-gateway")
    process = subprocess.Popen([script, "ehr-sandbox", "--dialect", "fhir", "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, answered = time.monotonic() + 20, None
        while time.monotonic() < deadline and answered is None:
            try:
                answered = httpx.get(f"http://127.0.0.1:{port}/fhir/metadata")
            except httpx.TransportError:
                time.sleep(0.2)
        assert answered is not None and answered.status_code == 200
        capability = validate(answered.content, "CapabilityStatement")
        assert capability["implementation"]["url"] == f"http://127.0.0.1:{port}/fhir"
        assert httpx.get(f"http://127.0.0.1:{port}/fhir/Slot").status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=10)
