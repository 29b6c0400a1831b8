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
from gateway.twins import TwinConfig, create_ehr_twin
from gateway.twins.cerner import BASE_PATH, SERVICE_SYSTEM
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
    return EhrSettings(**{"base_url": twin.url + BASE_PATH, "token_url": twin.url + "/oauth2/token",
                          "client_id": TWIN_CLIENT, **overrides})


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


def test_the_twins_search_by_id_finds_a_booked_slot_that_a_search_by_time_leaves_out(twin):
    raw(twin, "POST", "/Appointment", json=CREATE, headers={"Content-Type": "application/fhir+json"})
    by_id = validate(raw(twin, "GET", "/Slot", params={"_id": SLOT, "_include": "Slot:schedule"}).content, "Bundle")
    assert [(e["resource"]["id"], e["resource"].get("status")) for e in by_id["entry"]] == [
        (SLOT, "busy"), ("4817572", None)]
    by_time = validate(raw(twin, "GET", "/Slot", params=GOOD_SEARCH + [("_count", "100")]).content, "Bundle")
    ids = [e["resource"]["id"] for e in by_time["entry"]]
    assert len(ids) == 31 and SLOT not in ids


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


# -- the client's failure matrix ------------------------------------------------------------------------

async def test_refused_credentials_are_unavailable_and_nothing_is_sent(twin, redis_url, prefix):
    async with cerner(twin, redis_url, prefix, secret="not-the-secret") as client:
        with pytest.raises(Unavailable) as caught:
            await client.book(booking(), CallRecord())
    assert "invalid_client" in str(caught.value) and "not-the-secret" not in str(caught.value)
    assert counters(twin)["api_calls"] == 0 and stored(twin) == []


async def test_an_expired_token_is_renewed_once_for_a_search_and_for_a_booking(twin, redis_url, prefix):
    async with cerner(twin, redis_url, prefix) as client:
        await client.find_slots(query(end=f"{DAY}T10:00:00Z"), CallRecord())
        control(twin, "POST", "/twin/faults", {"expire_tokens": True})
        record = CallRecord()
        assert len(await client.find_slots(query(end=f"{DAY}T10:00:00Z"), record)) == 4
        assert record.retried_auth and counters(twin)["token_grants"] == 2
        control(twin, "POST", "/twin/faults", {"expire_tokens": True})
        record = CallRecord()
        booked = await client.book(booking(), record)
    # the create was refused at the door (401), so it went once more with the renewed token
    assert record.reauthenticated and counters(twin)["token_grants"] == 3 and counters(twin)["refused_auth"] == 2
    assert [a["id"] for a in stored(twin)] == [booked.id] and counters(twin)["creates"] == 1


@pytest.mark.parametrize("status", [429, 503])
async def test_throttled_or_unavailable_before_acting_is_unavailable_and_books_nothing(twin, redis_url, prefix,
                                                                                      status):
    async with cerner(twin, redis_url, prefix) as client:
        control(twin, "POST", "/twin/faults", {"fail_before": 1, "fail_status": status})
        with pytest.raises(Unavailable) as caught:
            await client.book(booking(), CallRecord())
        assert caught.value.retry_after == client.settings.unavailable_retry_after_seconds
        assert stored(twin) == []
        assert (await client.book(booking(), CallRecord())).status == "booked"  # the fault spent: it books
    assert len(stored(twin)) == 1


async def test_a_500_is_ehr_failed(twin, redis_url, prefix):
    async with cerner(twin, redis_url, prefix) as client:
        control(twin, "POST", "/twin/faults", {"fail_before": 1, "fail_status": 500})
        record = CallRecord()
        with pytest.raises(EhrFailed):
            await client.book(booking(), record)
    assert record.error_code == "HTTP_500" and stored(twin) == []


async def test_a_dropped_answer_after_the_booking_is_lost_then_found(twin, redis_url, prefix):
    async with cerner(twin, redis_url, prefix) as client:
        control(twin, "POST", "/twin/faults", {"fail_after_store": 1, "after_store": "drop"})
        record = CallRecord()
        with pytest.raises(EhrFailed) as caught:
            await client.book(booking(comment="Jane's first visit"), record)
        assert record.in_doubt and "may or may not" in str(caught.value)
        assert PATIENT not in str(caught.value) and "Jane" not in str(caught.value)
        (kept,) = stored(twin)  # the EHR stored it
        found = await client.find_booked(booking(), CallRecord())
        assert found is not None and (found.id, found.slot, found.status) == (kept["id"], SLOT, "booked")
        # the slot's time known to the caller: looked up without reading the slot
        reads = counters(twin)["reads"]
        by_time = await client.find_booked(booking(start="2030-01-07T10:00:00Z", end="2030-01-07T10:30:00Z"),
                                           CallRecord())
        assert by_time == found and counters(twin)["reads"] == reads
    assert counters(twin)["creates"] == 1  # found, never sent again


async def test_a_taken_slot_is_refused(twin, redis_url, prefix):
    async with cerner(twin, redis_url, prefix) as client:
        await client.book(booking(), CallRecord())
        record = CallRecord()
        with pytest.raises(EhrRefused) as caught:
            await client.book(BookRequest(slot=SLOT, patient="99887766"), record)
    assert caught.value.issues[0].details_code == "HTTP_422" and "business-rule" in str(caught.value)
    assert "99887766" not in str(caught.value) and "no longer available" not in str(caught.value)
    assert len(stored(twin)) == 1


async def test_a_stale_version_is_read_again_and_retried_once(twin, redis_url, prefix):
    async with cerner(twin, redis_url, prefix) as client:
        booked = await client.book(booking(), CallRecord())
        control(twin, "POST", "/twin/faults", {"stale_writes": 1})  # changed by someone between read and PATCH
        cancelled = await client.cancel(booked.id, None, CallRecord())
        assert (cancelled.status, cancelled.version) == ("cancelled", "2")
        assert counters(twin)["cancels"] == 2  # the PATCH answered 409, then the one on the new version
        # changed again on each try: after one retry it is the EHR's refusal
        other = await client.book(booking("4817573-203001071000"), CallRecord())
        control(twin, "POST", "/twin/faults", {"stale_writes": 2})
        with pytest.raises(EhrRefused) as caught:
            await client.cancel(other.id, None, CallRecord())
    assert caught.value.issues[0].details_code == "HTTP_409"
    assert [a["status"] for a in stored(twin)] == ["cancelled", "booked"]


async def test_an_answer_that_is_not_cerners_is_a_failure_not_a_refusal(twin, redis_url, prefix):
    """A 404 page from something in front of the EHR (not an OperationOutcome) says nothing of the slot."""
    async with cerner(twin, redis_url, prefix, base_url=twin.url + "/elsewhere") as client:
        with pytest.raises(EhrFailed):
            await client.read_slot(SLOT, CallRecord())


# -- tokens -----------------------------------------------------------------------------------------------

async def test_a_signed_assertion_authenticates_the_client(redis_url, prefix):
    from gateway.twins.config import key_pair

    private, public = key_pair()
    with serve_twin(client_secret=None, public_key_pem=public) as twin:
        async with cerner(twin, redis_url, prefix, key_pem=private) as client:
            slots = await client.find_slots(query(end=f"{DAY}T10:00:00Z"), CallRecord())
        assert len(slots) == 4 and counters(twin)["token_grants"] == 1
        # the twin checks the signature: another key is refused
        other, _ = key_pair()
        async with cerner(twin, redis_url, prefix + ":other", key_pem=other) as client:
            with pytest.raises(Unavailable):
                await client.find_slots(query(), CallRecord())


async def test_two_clients_on_one_redis_prefix_share_one_token(twin, redis_url, prefix):
    async with cerner(twin, redis_url, prefix) as first, cerner(twin, redis_url, prefix) as second:
        await first.find_slots(query(end=f"{DAY}T10:00:00Z"), CallRecord())
        await second.read_slot(SLOT, CallRecord())
        await second.find_slots(query(end=f"{DAY}T10:00:00Z"), CallRecord())
    assert counters(twin)["token_grants"] == 1 and counters(twin)["api_calls"] == 3


def test_the_dialect_names_its_client():
    assert client_class("cerner") is CernerClient and CernerClient.dialect == "cerner"


# -- the twin alone, as `ehr-gateway ehr-sandbox` serves it ------------------------------------------------

def test_ehr_sandbox_serves_the_cerner_twin(tmp_path: Path):
    port = free_port()
    env = {**os.environ, "EHR_SANDBOX_CLIENT_SECRET": TWIN_SECRET, "EHR_SANDBOX_CONTROL_KEY": CONTROL,
           "EHR_SANDBOX_CLIENT_ID": TWIN_CLIENT}
    out = (tmp_path / "sandbox.out").open("wb")
    exe = Path(sys.executable).with_name("ehr-gateway")
    proc = subprocess.Popen([str(exe), "ehr-sandbox", "--dialect", "cerner", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                grant = httpx.post(url + "/oauth2/token", data={"grant_type": "client_credentials"},
                                   auth=(TWIN_CLIENT, TWIN_SECRET))
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "sandbox.out").read_text()
                time.sleep(0.1)
        assert grant.status_code == 200
        today = time.strftime("%Y-%m-%d", time.gmtime())
        r = httpx.get(url + BASE_PATH + "/Slot", headers={"Authorization": f"Bearer {grant.json()['access_token']}"},
                      params=[("service-type", f"{SERVICE_SYSTEM}|2572307911"), ("start", f"ge{today}"),
                              ("start", f"lt{today}T23:59:59Z")])
        bundle = validate(r.content, "Bundle")
        assert r.status_code == 200 and len(bundle["entry"]) == 20  # a full first page (16 a day, 2 schedules)
        assert f"{url}{BASE_PATH}" in (tmp_path / "sandbox.out").read_text()
    finally:
        proc.terminate()
        proc.wait(10)
        out.close()
