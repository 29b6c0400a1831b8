"""The plain FHIR R4 client (gateway/ehr/fhir.py) against an FHIR server the project did not write:
Medplum's FHIR router over its in-memory repository (tests/fhir_server.py starts it; one for the
session). The project's own twin (tests/test_ehr_fhir.py) knows what the client sends; this server
only knows FHIR, and enforces nothing beyond it: no slot occupancy, no reference checks, no
CapabilityStatement at /metadata, `_include` and chained parameters not served.

Each test seeds its own Practitioners, Locations, Schedules and Slots on a day of its own, and asserts
what a user of the client gets: the slots found, the booking made, read, found again and cancelled,
checked against what the server holds. Where a call's outcome is wrong, the assertion's message lists
the requests the server answered during it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio as aredis

from gateway.canonical import Coding, Person
from gateway.ehr.fhir import FhirClient
from gateway.ehr.model import BookRequest, EhrSlot, SlotQuery
from gateway.errors import EhrRefused, NotFound
from gateway.outbound.calls import CallRecord
from gateway.outbound.http import HttpClient
from gateway.settings import EhrSettings
from tests.fhir_server import (
    MRN, SERVICE_TYPES, FhirServer, actors, at, client, fresh_day, fresh_id, search, seed_patient, seed_schedule,
    seed_slots,
)

SF = "urn:ehr-gateway:salesforce:appointment"  # the identifier system the bookings carry
CHECKUP = Coding(system=SERVICE_TYPES, code="124")  # the service type most slots offer
DENTAL = Coding(system=SERVICE_TYPES, code="57")


# -- the client, and a calendar of its own for each test -------------------------------------------------

@pytest.fixture
async def ehr(fhir_server: FhirServer, redis_url: str, prefix: str) -> AsyncIterator[FhirClient]:
    """The client as a source configures it, against the server (which takes no token)."""
    settings = EhrSettings(base_url=fhir_server.url, timeout_seconds=10)
    http = HttpClient(settings)
    store = aredis.Redis.from_url(redis_url)
    try:
        yield FhirClient("fhirtest", settings, None, http, store, prefix)
    finally:
        await http.aclose()
        await store.aclose()


class Calendar:
    """Two schedules on a day of their own, 30-minute slots (UTC):

    A (practitioner, location): 08:30, 09:00, 09:30, 10:00 (checkup), 10:30 busy (checkup), 11:00 (dental),
                                12:00 (checkup)
    B (another practitioner at another location): 09:00, 09:30 (checkup)

    The morning window [09:00, 12:00) holds A's 09:00, 09:30, 10:00 and 11:00 and B's two free slots.
    """

    def __init__(self, base: str) -> None:
        self.base, self.day = base, fresh_day()
        self.a, self.b = seed_schedule(base), seed_schedule(base)
        self.a_practitioner, self.a_location = actors(self.a)
        self.b_practitioner, self.b_location = actors(self.b)
        self.early, self.nine, self.half_nine, self.ten = seed_slots(base, self.a, self.day,
                                                                     ["08:30", "09:00", "09:30", "10:00"])
        (self.busy,) = seed_slots(base, self.a, self.day, ["10:30"], status="busy")
        (self.dental,) = seed_slots(base, self.a, self.day, ["11:00"], service="57")
        (self.noon,) = seed_slots(base, self.a, self.day, ["12:00"])
        self.b_nine, self.b_half_nine = seed_slots(base, self.b, self.day, ["09:00", "09:30"])
        self.patient = seed_patient(base)

    def window(self, start: str = "09:00", end: str = "12:00", **filters: Any) -> SlotQuery:
        return SlotQuery(start=at(self.day, start), end=at(self.day, end), **filters)

    @property
    def a_morning(self) -> set[str]:
        return {s["id"] for s in (self.nine, self.half_nine, self.ten, self.dental)}

    @property
    def b_morning(self) -> set[str]:
        return {s["id"] for s in (self.b_nine, self.b_half_nine)}


@pytest.fixture
def calendar(fhir_server: FhirServer) -> Calendar:
    return Calendar(fhir_server.url)


def said(server: FhirServer, since: int) -> str:
    """The requests the server answered since the `since`-th, for an assertion's message."""
    return "the server answered:\n  " + "\n  ".join(server.requests(since))


def ids(slots: list[EhrSlot]) -> set[str]:
    return {s.id for s in slots}


def request(calendar: Calendar, slot: dict[str, Any], *, sf_id: str | None = None, patient: str | None = None,
            **more: Any) -> BookRequest:
    """A booking of `slot` for the calendar's patient, named by `sf_id` (Salesforce's id) if given."""
    return BookRequest(slot=slot["id"], patient=patient or calendar.patient, service_types=(CHECKUP,),
                       identifiers=((SF, sf_id),) if sf_id else (), **more)


def stored(server: FhirServer, appointment_id: str) -> dict[str, Any]:
    """The Appointment as the server holds it."""
    r = client().get(f"{server.url}/Appointment/{appointment_id}")
    assert r.status_code == 200, r.text
    return r.json()


def with_identifier(server: FhirServer, sf_id: str) -> list[dict[str, Any]]:
    return search(server.url, "Appointment", identifier=f"{SF}|{sf_id}")


# -- the server itself: the premises of the tests below ---------------------------------------------------

def test_the_server_is_plain_fhir_over_http(fhir_server: FhirServer):
    base, sf_id = fhir_server.url, fresh_id("08p")
    # a reference to nothing is taken (Patient/nobody, no Slot): this server checks no references
    body = {"resourceType": "Appointment", "status": "booked", "identifier": [{"system": SF, "value": sf_id}],
            "participant": [{"actor": {"reference": "Patient/nobody"}, "status": "accepted"}]}
    only_once = {"If-None-Exist": f"identifier={SF}|{sf_id}"}
    created = client().post(f"{base}/Appointment", json=body, headers=only_once)
    assert created.status_code == 201 and created.headers["content-type"] == "application/fhir+json"
    made = created.json()
    version = made["meta"]["versionId"]
    assert created.headers["etag"] == f'W/"{version}"'
    assert created.headers["location"] == f"{base}/Appointment/{made['id']}/_history/{version}"
    again = client().post(f"{base}/Appointment", json=body, headers=only_once)
    assert again.status_code == 200 and again.json()["id"] == made["id"]  # conditional create is served
    assert [a["id"] for a in with_identifier(fhir_server, sf_id)] == [made["id"]]

    stale = client().put(f"{base}/Appointment/{made['id']}", json={**made, "status": "cancelled"},
                      headers={"If-Match": 'W/"not-the-version"'})
    assert stale.status_code == 412 and stale.json()["resourceType"] == "OperationOutcome"
    missing = client().get(f"{base}/Slot/{fresh_id('slot')}")
    assert missing.status_code == 404 and missing.json()["resourceType"] == "OperationOutcome"
    garbled = client().post(f"{base}/Appointment", content=b"{not json",
                            headers={"Content-Type": "application/fhir+json"})
    assert garbled.status_code == 400 and garbled.json()["resourceType"] == "OperationOutcome"
    # no CapabilityStatement: /metadata is searched as a resource type nobody stored (an empty Bundle),
    # so whether conditional create is served cannot be read there
    metadata = client().get(f"{base}/metadata")
    assert metadata.status_code == 200 and metadata.json()["resourceType"] == "Bundle"


# -- finding slots -----------------------------------------------------------------------------------------

async def test_find_slots_in_a_window_names_each_slots_schedule_practitioner_and_location(fhir_server, ehr,
                                                                                           calendar):
    found = await ehr.find_slots(calendar.window(), CallRecord())
    # free only (not 10:30), from the window's start, and not at its end (12:00) or before it (08:30)
    assert ids(found) == calendar.a_morning | calendar.b_morning and len(found) == 6
    by_id = {s.id: s for s in found}
    nine = by_id[calendar.nine["id"]]
    assert (nine.start, nine.end, nine.status) == (at(calendar.day, "09:00"), at(calendar.day, "09:30"), "free")
    assert nine.service_types == (CHECKUP,) and by_id[calendar.dental["id"]].service_types == (DENTAL,)
    for slot_id in calendar.a_morning:
        assert (by_id[slot_id].schedule, by_id[slot_id].practitioner, by_id[slot_id].location) == \
            (calendar.a["id"], calendar.a_practitioner, calendar.a_location)
    for slot_id in calendar.b_morning:
        assert (by_id[slot_id].schedule, by_id[slot_id].practitioner, by_id[slot_id].location) == \
            (calendar.b["id"], calendar.b_practitioner, calendar.b_location)


async def test_find_slots_over_a_day_given_as_dates(ehr, calendar):
    day = SlotQuery(start=calendar.day.isoformat(), end=(calendar.day + timedelta(days=1)).isoformat())
    found = await ehr.find_slots(day, CallRecord())
    assert ids(found) == calendar.a_morning | calendar.b_morning | {calendar.early["id"], calendar.noon["id"]}


async def test_find_slots_of_a_practitioner(fhir_server, ehr, calendar):
    mark = len(fhir_server.requests())
    mine = await ehr.find_slots(calendar.window(practitioners=(calendar.a_practitioner,)), CallRecord())
    assert ids(mine) == calendar.a_morning, said(fhir_server, mark)
    assert {s.practitioner for s in mine} == {calendar.a_practitioner}
    either = await ehr.find_slots(calendar.window(practitioners=(calendar.a_practitioner, calendar.b_practitioner)),
                                  CallRecord())
    assert ids(either) == calendar.a_morning | calendar.b_morning
    assert await ehr.find_slots(calendar.window(practitioners=(fresh_id("prac"),)), CallRecord()) == []


async def test_find_slots_at_a_location(fhir_server, ehr, calendar):
    mark = len(fhir_server.requests())
    there = await ehr.find_slots(calendar.window(locations=(calendar.b_location,)), CallRecord())
    assert ids(there) == calendar.b_morning, said(fhir_server, mark)
    assert {(s.practitioner, s.location) for s in there} == {(calendar.b_practitioner, calendar.b_location)}
    # practitioner AND location: A's practitioner does not work at B's location
    assert await ehr.find_slots(calendar.window(practitioners=(calendar.a_practitioner,),
                                                locations=(calendar.b_location,)), CallRecord()) == []
    both = await ehr.find_slots(calendar.window(practitioners=(calendar.a_practitioner,),
                                                locations=(calendar.a_location,)), CallRecord())
    assert ids(both) == calendar.a_morning, said(fhir_server, mark)


async def test_find_slots_offering_a_service(fhir_server, ehr, calendar):
    mark = len(fhir_server.requests())
    dental = await ehr.find_slots(calendar.window(service_types=(DENTAL,)), CallRecord())
    assert ids(dental) == {calendar.dental["id"]}, said(fhir_server, mark)
    assert dental[0].service_types == (DENTAL,) and dental[0].practitioner == calendar.a_practitioner
    checkup = await ehr.find_slots(calendar.window(service_types=(CHECKUP,)), CallRecord())
    assert ids(checkup) == (calendar.a_morning | calendar.b_morning) - {calendar.dental["id"]}
    either = await ehr.find_slots(calendar.window(service_types=(CHECKUP, DENTAL)), CallRecord())
    assert ids(either) == calendar.a_morning | calendar.b_morning
    other = Coding(system=SERVICE_TYPES, code="165")
    assert await ehr.find_slots(calendar.window(service_types=(other,)), CallRecord()) == []


async def test_find_slots_where_none_is_free(ehr, calendar):
    assert await ehr.find_slots(calendar.window("10:30", "11:00"), CallRecord()) == []  # only the busy one
    empty = fresh_day()  # a day nothing was seeded on
    assert await ehr.find_slots(SlotQuery(start=at(empty, "00:00"), end=at(empty, "23:59")), CallRecord()) == []


# -- reading a slot ----------------------------------------------------------------------------------------

async def test_read_slot_of_any_status_with_its_practitioner_and_location(ehr, calendar):
    slot = await ehr.read_slot(calendar.busy["id"], CallRecord())
    assert (slot.id, slot.status, slot.start, slot.end) == \
        (calendar.busy["id"], "busy", at(calendar.day, "10:30"), at(calendar.day, "11:00"))
    assert (slot.schedule, slot.practitioner, slot.location) == \
        (calendar.a["id"], calendar.a_practitioner, calendar.a_location)
    assert slot.service_types == (CHECKUP,)
    other = await ehr.read_slot(calendar.b_nine["id"], CallRecord())
    assert (other.status, other.practitioner, other.location) == ("free", calendar.b_practitioner, calendar.b_location)
    with pytest.raises(NotFound):
        await ehr.read_slot(fresh_id("slot"), CallRecord())


# -- booking, reading, finding, cancelling -------------------------------------------------------------------

async def test_book_with_an_identifier_then_read(fhir_server, ehr, calendar):
    sf_id = fresh_id("08p")
    wanted = request(calendar, calendar.ten, sf_id=sf_id, practitioner=calendar.a_practitioner,
                     location=calendar.a_location, comment="bring the referral")
    made = await ehr.book(wanted, CallRecord())  # no start or end given: the slot's
    assert (made.status, made.slot, made.patient, made.practitioner, made.location) == \
        ("booked", calendar.ten["id"], calendar.patient, calendar.a_practitioner, calendar.a_location)
    assert (made.start, made.end) == (calendar.ten["start"], calendar.ten["end"])
    assert made.identifiers == ((SF, sf_id),) and made.service_types == (CHECKUP,)

    held = stored(fhir_server, made.id)
    assert made.version == held["meta"]["versionId"]
    assert held["slot"] == [{"reference": f"Slot/{calendar.ten['id']}"}] and held["comment"] == "bring the referral"
    assert {p["actor"]["reference"] for p in held["participant"]} == \
        {f"Patient/{calendar.patient}", f"Practitioner/{calendar.a_practitioner}", f"Location/{calendar.a_location}"}
    assert [a["id"] for a in with_identifier(fhir_server, sf_id)] == [made.id]
    assert await ehr.read(made.id, CallRecord()) == made


async def test_book_without_an_identifier_then_read(fhir_server, ehr, calendar):
    timed = request(calendar, calendar.b_half_nine, start=calendar.b_half_nine["start"],
                    end=calendar.b_half_nine["end"])
    made = await ehr.book(timed, CallRecord())
    assert (made.status, made.slot, made.patient, made.identifiers) == \
        ("booked", calendar.b_half_nine["id"], calendar.patient, ())
    assert (made.start, made.end) == (calendar.b_half_nine["start"], calendar.b_half_nine["end"])
    assert "identifier" not in stored(fhir_server, made.id)
    assert await ehr.read(made.id, CallRecord()) == made
    with pytest.raises(NotFound):
        await ehr.read(fresh_id("appt"), CallRecord())


async def test_a_booked_slot_is_not_offered_nor_booked_again_until_cancelled(fhir_server, ehr, calendar):
    """The server keeps no occupancy (a Slot stays `free` when an Appointment names it): the client
    must not offer a booked slot, nor book it for someone else."""
    mark = len(fhir_server.requests())
    made = await ehr.book(request(calendar, calendar.half_nine, sf_id=fresh_id("08p")), CallRecord())
    offered = await ehr.find_slots(calendar.window(), CallRecord())
    free = (calendar.a_morning | calendar.b_morning) - {calendar.half_nine["id"]}
    assert ids(offered) == free, said(fhir_server, mark)
    assert (await ehr.read_slot(calendar.half_nine["id"], CallRecord())).status == "busy"
    other = seed_patient(fhir_server.url)
    mark = len(fhir_server.requests())
    try:
        second = await ehr.book(request(calendar, calendar.half_nine, sf_id=fresh_id("08p"), patient=other),
                                CallRecord())
        outcome = f"booked as {second.id}"
    except EhrRefused:
        outcome = "refused"
    sent = said(fhir_server, mark)
    live = [a["id"] for a in search(fhir_server.url, "Appointment", slot=f"Slot/{calendar.half_nine['id']}")
            if a["status"] == "booked"]
    assert (outcome, live) == ("refused", [made.id]), sent

    await ehr.cancel(made.id, "pat", CallRecord())
    assert (await ehr.read_slot(calendar.half_nine["id"], CallRecord())).status == "free"
    again = await ehr.find_slots(calendar.window(), CallRecord())
    assert ids(again) == calendar.a_morning | calendar.b_morning  # offered again


async def test_a_second_booking_with_the_same_identifier_gives_back_the_first(fhir_server, ehr, calendar):
    """The server serves If-None-Exist (see the first test), though its /metadata says nothing of it:
    a booking re-sent after its answer was lost must not book twice."""
    sf_id, mark = fresh_id("08p"), len(fhir_server.requests())
    made = await ehr.book(request(calendar, calendar.nine, sf_id=sf_id), CallRecord())
    try:
        again = await ehr.book(request(calendar, calendar.nine, sf_id=sf_id), CallRecord())
    except EhrRefused as refused:
        pytest.fail(f"the second booking was refused ({refused}); {said(fhir_server, mark)}")
    sent = said(fhir_server, mark)
    holding = [a["id"] for a in with_identifier(fhir_server, sf_id)]
    assert (again.id, holding) == (made.id, [made.id]), sent
    assert again == made


async def test_an_identifier_already_booked_on_another_slot_is_refused(fhir_server, ehr, calendar):
    sf_id, mark = fresh_id("08p"), len(fhir_server.requests())
    first = await ehr.book(request(calendar, calendar.nine, sf_id=sf_id), CallRecord())
    try:
        second = await ehr.book(request(calendar, calendar.half_nine, sf_id=sf_id), CallRecord())
        outcome = f"booked as {second.id}"
    except EhrRefused as refused:
        outcome = refused.issues[0].details_code or str(refused)
    sent = said(fhir_server, mark)
    holding = [a["id"] for a in with_identifier(fhir_server, sf_id)]
    assert (outcome, holding) == ("IDENTIFIER_ON_ANOTHER_SLOT", [first.id]), sent


async def test_cancel_then_cancel_again_sends_nothing(fhir_server, ehr, calendar):
    made = await ehr.book(request(calendar, calendar.half_nine, sf_id=fresh_id("08p")), CallRecord())
    cancelled = await ehr.cancel(made.id, "pat", CallRecord())
    assert (cancelled.id, cancelled.status, cancelled.slot, cancelled.patient) == \
        (made.id, "cancelled", made.slot, made.patient)
    held = stored(fhir_server, made.id)
    assert held["status"] == "cancelled" and cancelled.version == held["meta"]["versionId"] != made.version
    assert held["cancelationReason"]["coding"][0]["code"] == "pat"
    assert await ehr.read(made.id, CallRecord()) == cancelled

    mark = len(fhir_server.requests())
    again = await ehr.cancel(made.id, "pat", CallRecord())  # already cancelled: read, nothing sent
    assert again == cancelled
    assert [line.split()[0] for line in fhir_server.requests(mark)] == ["GET"], said(fhir_server, mark)
    with pytest.raises(NotFound):
        await ehr.cancel(fresh_id("appt"), None, CallRecord())


async def test_a_reason_that_is_no_r4_code_is_sent_as_other_with_its_text(fhir_server, ehr, calendar):
    made = await ehr.book(request(calendar, calendar.b_nine), CallRecord())
    await ehr.cancel(made.id, "the clinic closed for the day", CallRecord())
    assert stored(fhir_server, made.id)["cancelationReason"] == {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason",
                    "code": "other"}],
        "text": "the clinic closed for the day"}


async def test_find_booked_by_identifier(fhir_server, ehr, calendar):
    sf_id = fresh_id("08p")
    made = await ehr.book(request(calendar, calendar.ten, sf_id=sf_id), CallRecord())
    record = CallRecord()
    assert await ehr.find_booked(request(calendar, calendar.ten, sf_id=sf_id), record) == made
    assert record.matches == 1
    assert await ehr.find_booked(request(calendar, calendar.ten, sf_id=fresh_id("08p")), CallRecord()) is None
    await ehr.cancel(made.id, "pat", CallRecord())
    assert await ehr.find_booked(request(calendar, calendar.ten, sf_id=sf_id), CallRecord()) is None  # undone


async def test_find_booked_by_patient_and_slot_when_the_booking_has_no_identifier(fhir_server, ehr, calendar):
    made = await ehr.book(request(calendar, calendar.b_nine), CallRecord())
    mark = len(fhir_server.requests())
    record = CallRecord()
    assert await ehr.find_booked(request(calendar, calendar.b_nine), record) == made, said(fhir_server, mark)
    assert record.matches == 1
    other = seed_patient(fhir_server.url)
    assert await ehr.find_booked(request(calendar, calendar.b_nine, patient=other), CallRecord()) is None
    assert await ehr.find_booked(request(calendar, calendar.b_half_nine), CallRecord()) is None  # not booked
    timed = request(calendar, calendar.b_nine, start=calendar.b_nine["start"], end=calendar.b_nine["end"])
    assert await ehr.find_booked(timed, CallRecord()) == made  # the time given, not read from the slot


# -- the patient -------------------------------------------------------------------------------------------

async def test_the_patient_is_read_by_id_or_found_by_identifier(fhir_server, ehr):
    patient = seed_patient(fhir_server.url, family="Okafor", given="Ngozi")
    expected = Person(family="Okafor", given="Ngozi", birth_date="1980-02-29", gender="female", phone="+1 555 0100")
    assert await ehr.patient(patient, None, CallRecord()) == expected
    assert await ehr.patient(f"mrn-{patient}", MRN, CallRecord()) == expected
    with pytest.raises(NotFound):
        await ehr.patient(fresh_id("pat"), None, CallRecord())
    with pytest.raises(NotFound):
        await ehr.patient(f"mrn-{fresh_id('pat')}", MRN, CallRecord())
