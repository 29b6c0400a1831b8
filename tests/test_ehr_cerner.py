"""The Cerner (Oracle Health Millennium R4) dialect: its twin's rules, sent raw, and the client against
the twin over real HTTP with its token in real Redis, through the happy path and the failure matrix."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aredis

from gateway.canonical import Coding
from gateway.edges.server import ThreadedServer
from gateway.ehr import client_class
from gateway.ehr.cerner import CernerClient
from gateway.ehr.model import BookRequest, SlotQuery
from gateway.ehr_twins import TwinConfig, create_ehr_twin
from gateway.ehr_twins.cerner import BASE_PATH, SERVICE_SYSTEM
from gateway.errors import EhrFailed, EhrRefused, NotFound, Unavailable, Unprocessable
from gateway.outbound.calls import CallRecord
from gateway.outbound.http import HttpClient
from gateway.settings import EhrCredentials, EhrSettings
from tests.conftest import ROOT, free_port
from tests.fhir_validate import validate

TWIN_CLIENT, TWIN_SECRET, CONTROL = "gateway-system-account", "cerner-twin-secret-81c2", "cerner-twin-control"
DAY = "2030-01-07"  # the twin's first calendar day
SERVICE = Coding(system=SERVICE_SYSTEM, code="2572307911")
PRACTITIONERS = {"593923", "1912007"}  # the default schedules' practitioners, at location 32216049
SLOT = "4817572-203001071000"  # Practitioner 593923, 10:00 on DAY
PATIENT = "12724066"


@contextmanager
def serve_twin(**config: Any) -> Iterator[ThreadedServer]:
    settings = {"client_id": TWIN_CLIENT, "client_secret": TWIN_SECRET, "start_date": DAY, **config}
    with ThreadedServer(create_ehr_twin(TwinConfig(dialect="cerner", control_key=CONTROL, **settings))) as server:
        yield server


@pytest.fixture
def twin() -> Iterator[ThreadedServer]:
    with serve_twin() as server:
        yield server


def control(twin: ThreadedServer, method: str, path: str, body: Any = None) -> Any:
    r = httpx.request(method, twin.url + path, json=body, headers={"Authorization": f"Bearer {CONTROL}"})
    assert r.status_code == 200, r.text
    return r.json()


def counters(twin: ThreadedServer) -> dict[str, int]:
    return control(twin, "GET", "/twin/counters")


def stored(twin: ThreadedServer) -> list[dict[str, Any]]:
    return control(twin, "GET", "/twin/appointments")["appointments"]


def settings_for(twin: ThreadedServer, **overrides: Any) -> EhrSettings:
    return EhrSettings(base_url=twin.url + BASE_PATH, token_url=twin.url + "/oauth2/token", client_id=TWIN_CLIENT,
                       **overrides)


@asynccontextmanager
async def cerner(twin: ThreadedServer, redis_url: str, prefix: str, *, secret: str | None = TWIN_SECRET,
                 key_pem: str | None = None, **overrides: Any) -> AsyncIterator[CernerClient]:
    settings = settings_for(twin, **overrides)
    http, client = HttpClient(settings), aredis.Redis.from_url(redis_url)
    try:
        yield CernerClient("cerner", settings, EhrCredentials(client_secret=None if key_pem else secret,
                                                               private_key_pem=key_pem), http, client, prefix)
    finally:
        await http.aclose()
        await client.aclose()


def query(**changes: Any) -> SlotQuery:
    return SlotQuery(**{"start": f"{DAY}T00:00:00Z", "end": "2030-01-08T00:00:00Z", "service_types": (SERVICE,),
                        **changes})


def booking(slot: str = SLOT, **changes: Any) -> BookRequest:
    return BookRequest(slot=slot, patient=PATIENT, **changes)


def token(twin: ThreadedServer) -> str:
    r = httpx.post(twin.url + "/oauth2/token", data={"grant_type": "client_credentials", "scope": "system/Slot.read"},
                   auth=(TWIN_CLIENT, TWIN_SECRET))
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def raw(twin: ThreadedServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """A request as a client that does not follow the rules would send it."""
    headers = {"Authorization": f"Bearer {token(twin)}", "Accept": "application/fhir+json", **kwargs.pop("headers", {})}
    return httpx.request(method, twin.url + BASE_PATH + path, headers=headers, **kwargs)


def refused(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = validate(r.content, "OperationOutcome")
    return body["issue"][0]["code"]


# -- the happy path ------------------------------------------------------------------------------------

async def test_slot_search_follows_pages_and_reads_the_included_schedules(twin, redis_url, prefix):
    async with cerner(twin, redis_url, prefix) as client:
        slots = await client.find_slots(query(), CallRecord())
    # two schedules, 09:00 to 17:00 every 30 minutes: 32 slots, on two pages of 20
    assert len(slots) == 32 and counters(twin)["searches"] == 2
    assert [s.start for s in slots] == sorted(s.start for s in slots)
    assert {s.practitioner for s in slots} == PRACTITIONERS and {s.location for s in slots} == {"32216049"}
    assert all(s.status == "free" and s.service_types == (SERVICE,) for s in slots)
    first = next(s for s in slots if s.id == SLOT)
    assert (first.start, first.end, first.practitioner, first.schedule) == (
        "2030-01-07T10:00:00Z", "2030-01-07T10:30:00Z", "593923", "4817572")


async def test_slot_search_by_practitioner_and_location_asks_cerner_for_them(twin, redis_url, prefix):
    async with cerner(twin, redis_url, prefix) as client:
        one = await client.find_slots(query(practitioners=("1912007",), locations=("32216049",)), CallRecord())
        elsewhere = await client.find_slots(query(locations=("999",)), CallRecord())
    assert len(one) == 16 and {s.practitioner for s in one} == {"1912007"}
    assert elsewhere == []


async def test_the_twins_slot_bundle_is_r4_with_an_absolute_next_link_and_included_schedules(twin):
    params = [("service-type", f"{SERVICE_SYSTEM}|2572307911"), ("start", f"ge{DAY}T09:00:00Z"),
              ("start", f"lt{DAY}T12:00:00Z"), ("_include", "Slot:schedule"), ("_count", "5")]
    bundle = validate(raw(twin, "GET", "/Slot", params=params).content, "Bundle")
    modes = [e["search"]["mode"] for e in bundle["entry"]]
    assert modes == ["match"] * 5 + ["include"] * 2
    schedule = bundle["entry"][-1]["resource"]
    assert {a["reference"].split("/")[0] for a in schedule["actor"]} == {"Practitioner", "Location"}
    (next_url,) = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
    assert next_url.startswith(twin.url + BASE_PATH + "/Slot?")
    page_two = validate(httpx.get(next_url, headers={"Authorization": f"Bearer {token(twin)}"}).content, "Bundle")
    first_page = [e["resource"] for e in bundle["entry"][:5]]
    second = page_two["entry"][0]["resource"]
    assert second["id"] not in {s["id"] for s in first_page} and second["start"] >= first_page[-1]["start"]


async def test_a_search_without_a_service_type_is_refused_before_anything_is_sent(twin, redis_url, prefix):
    async with cerner(twin, redis_url, prefix) as client:
        with pytest.raises(Unprocessable):
            await client.find_slots(query(service_types=()), CallRecord())
    assert counters(twin)["api_calls"] == 0 and counters(twin)["token_grants"] == 0


async def test_pages_followed_are_bounded(twin, redis_url, prefix):
    async with cerner(twin, redis_url, prefix) as client:
        client.page_cap = 1
        slots = await client.find_slots(query(), CallRecord())
    assert len(slots) == 20 and counters(twin)["searches"] == 1  # the earliest 20: the second page never asked


async def test_book_read_cancel_and_cancel_again(twin, redis_url, prefix):
    async with cerner(twin, redis_url, prefix) as client:
        record = CallRecord()
        booked = await client.book(booking(comment="prefers mornings"), record)
        assert record.status == 201 and not record.in_doubt
        assert (booked.status, booked.slot, booked.patient, booked.version) == ("booked", SLOT, PATIENT, "0")
        assert (booked.practitioner, booked.location, booked.start) == ("593923", "32216049", "2030-01-07T10:00:00Z")
        (kept,) = stored(twin)
        assert (kept["id"], kept["patient"], kept["comment"], kept["identifiers"]) == (booked.id, PATIENT,
                                                                                       "prefers mornings", [])
        assert (await client.read_slot(SLOT, CallRecord())).status == "busy"
        assert await client.read(booked.id, CallRecord()) == booked

        cancelled = await client.cancel(booked.id, "pat-mv", CallRecord())
        assert (cancelled.id, cancelled.status, cancelled.version) == (booked.id, "cancelled", "1")
        assert stored(twin)[0]["cancelReason"].endswith("appointment-cancellation-reason|pat-mv")
        assert (await client.read_slot(SLOT, CallRecord())).status == "free"  # the slot is free again
        patches = counters(twin)["cancels"]
        again = await client.cancel(booked.id, "pat-mv", CallRecord())
        assert again.status == "cancelled" and again.version == "1"
        assert counters(twin)["cancels"] == patches  # answered from the read: no PATCH sent


async def test_the_twins_appointment_is_r4_and_carries_its_version(twin, redis_url, prefix):
    async with cerner(twin, redis_url, prefix) as client:
        booked = await client.book(booking(), CallRecord())
        await client.cancel(booked.id, None, CallRecord())
    r = raw(twin, "GET", f"/Appointment/{booked.id}")
    body = validate(r.content, "Appointment")
    assert r.headers["etag"] == 'W/"1"' and body["meta"]["versionId"] == "1" and body["status"] == "cancelled"
    assert {p["actor"]["reference"] for p in body["participant"]} == {
        f"Patient/{PATIENT}", "Practitioner/593923", "Location/32216049"}
    slot = validate(raw(twin, "GET", f"/Slot/{SLOT}").content, "Slot")
    assert slot["status"] == "free" and slot["schedule"]["reference"] == "Schedule/4817572"


async def test_unknown_slot_and_appointment_are_not_found(twin, redis_url, prefix):
    async with cerner(twin, redis_url, prefix) as client:
        with pytest.raises(NotFound):
            await client.read_slot("4817572-203001070915", CallRecord())  # off the 30-minute grid
        with pytest.raises(NotFound):
            await client.read("404404", CallRecord())
        assert await client.find_booked(booking(), CallRecord()) is None


# -- the twin refuses what Cerner refuses --------------------------------------------------------------

GOOD_SEARCH = [("service-type", f"{SERVICE_SYSTEM}|2572307911"), ("start", f"ge{DAY}"), ("start", "lt2030-01-08")]


@pytest.mark.parametrize("params", [
    pytest.param([*GOOD_SEARCH, ("service-type", f"{SERVICE_SYSTEM}|1")], id="service-type twice"),
    pytest.param(GOOD_SEARCH[:2], id="no lt"),
    pytest.param([GOOD_SEARCH[0], ("start", f"ge{DAY}"), ("start", f"ge{DAY}")], id="two ge"),
    pytest.param(GOOD_SEARCH[1:], id="no service-type"),
    pytest.param([*GOOD_SEARCH, ("status", "free")], id="unsupported parameter"),
    pytest.param([*GOOD_SEARCH, ("schedule.actor", "Practitioner/1"), ("schedule.actor", "Practitioner/2")],
                 id="schedule.actor twice"),
    pytest.param([*GOOD_SEARCH, ("-location", "Location/1"), ("-location", "Location/2")], id="-location twice"),
    pytest.param([("service-type", "2572307911"), *GOOD_SEARCH[1:]], id="a code without its system"),
    pytest.param([GOOD_SEARCH[0], ("start", "ge2030-01-07T09:00:00"), GOOD_SEARCH[2]], id="a time without offset"),
])
def test_the_twin_refuses_a_mis_shaped_slot_search(twin, params):
    assert refused(raw(twin, "GET", "/Slot", params=params), 400) == "invalid"
    assert raw(twin, "GET", "/Slot", params=GOOD_SEARCH).status_code == 200  # the same, shaped right


CREATE: dict[str, Any] = {"resourceType": "Appointment", "status": "booked", "slot": [{"reference": f"Slot/{SLOT}"}],
                          "participant": [{"actor": {"reference": f"Patient/{PATIENT}"}, "status": "accepted"}]}


@pytest.mark.parametrize("body", [
    pytest.param({**CREATE, "identifier": [{"system": "urn:salesforce", "value": "08pX"}]}, id="identifier"),
    pytest.param({**CREATE, "participant": [{**CREATE["participant"][0], "type": [{"text": "patient"}]}]},
                 id="participant.type"),
    pytest.param({**CREATE, "participant": [*CREATE["participant"],
                                            {"actor": {"reference": "Practitioner/593923"}, "status": "accepted"}]},
                 id="two participants"),
    pytest.param({**CREATE, "participant": [{**CREATE["participant"][0], "status": "needs-action"}]},
                 id="participant not accepted"),
    pytest.param({**CREATE, "slot": [{"reference": f"Slot/{SLOT}"}, {"reference": "Slot/4817572-203001071030"}]},
                 id="two slots"),
    pytest.param({**CREATE, "status": "proposed"}, id="proposed"),
    pytest.param({**CREATE, "participant": [{"actor": {"reference": "Practitioner/593923"}, "status": "accepted"}]},
                 id="no patient"),
])
def test_the_twin_refuses_a_create_cerner_does_not_document(twin, body):
    assert refused(raw(twin, "POST", "/Appointment", json=body, headers={"Content-Type": "application/fhir+json"}),
                   422)
    assert stored(twin) == []


def test_the_twins_create_answers_201_with_an_empty_body(twin):
    r = raw(twin, "POST", "/Appointment", json=CREATE, headers={"Content-Type": "application/fhir+json"})
    assert (r.status_code, r.content, r.headers["etag"]) == (201, b"", 'W/"0"')
    assert r.headers["location"] == f"{twin.url}{BASE_PATH}/Appointment/{stored(twin)[0]['id']}"
    unreadable = raw(twin, "POST", "/Appointment", content=b"{", headers={"Content-Type": "application/fhir+json"})
    assert refused(unreadable, 400) == "structure"


def test_the_twins_patch_needs_if_match_and_the_current_version(twin):
    r = raw(twin, "POST", "/Appointment", json=CREATE, headers={"Content-Type": "application/fhir+json"})
    path = "/Appointment/" + r.headers["location"].rsplit("/", 1)[1]
    cancel = [{"op": "replace", "path": "/status", "value": "cancelled"}]
    patch = {"Content-Type": "application/json-patch+json"}
    assert refused(raw(twin, "PATCH", path, json=cancel, headers=patch), 412) == "conflict"  # Cerner: 412
    assert refused(raw(twin, "PATCH", path, json=cancel, headers={**patch, "If-Match": 'W/"7"'}), 409) == "conflict"
    assert refused(raw(twin, "PATCH", path, json=cancel, headers={"If-Match": 'W/"0"',
                                                                   "Content-Type": "application/json"}), 415)
    other = [{"op": "replace", "path": "/start", "value": "2030-01-07T11:00:00Z"}]
    assert refused(raw(twin, "PATCH", path, json=other, headers={**patch, "If-Match": 'W/"0"'}), 422)
    assert stored(twin)[0]["status"] == "booked"  # none of them changed it
    done = raw(twin, "PATCH", path, json=cancel, headers={**patch, "If-Match": 'W/"0"'})
    assert (done.status_code, done.content, done.headers["etag"]) == (200, b"", 'W/"1"')


def test_the_twins_appointment_search_takes_one_of_patient_practitioner_location(twin):
    raw(twin, "POST", "/Appointment", json=CREATE, headers={"Content-Type": "application/fhir+json"})
    dates = [("date", f"ge{DAY}T00:00:00Z"), ("date", "lt2030-01-08T00:00:00Z")]
    both = raw(twin, "GET", "/Appointment", params=[("patient", PATIENT), ("location", "32216049"), *dates])
    assert refused(both, 400) == "invalid"
    assert refused(raw(twin, "GET", "/Appointment", params=[("patient", PATIENT)]), 400) == "invalid"  # no date
    for name, value in (("patient", PATIENT), ("practitioner", "593923"), ("location", "Location/32216049")):
        bundle = validate(raw(twin, "GET", "/Appointment", params=[(name, value), *dates]).content, "Bundle")
        assert [e["resource"]["slot"][0]["reference"] for e in bundle["entry"]] == [f"Slot/{SLOT}"]
    other = raw(twin, "GET", "/Appointment", params=[("practitioner", "1912007"), *dates])
    assert validate(other.content, "Bundle")["entry"] == []
