"""Epic: the client (gateway/ehr/epic.py) against Epic's twin (gateway/twins/epic.py) over real
HTTP and real MLLP, its token in the real Redis: $find, Slot.Read, $book, reads and searches, the cancel
through the HL7 v2 interface, the twin's refusals of mis-shaped requests and messages (its ACKs read
strictly), and the client's failure matrix."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aredis

from gateway.canonical import Coding
from gateway.edges.server import ThreadedServer
from gateway.ehr import client_class
from gateway.ehr.epic import EpicClient
from gateway.ehr.model import BookRequest, SlotQuery
from gateway.twins import TwinConfig, create_ehr_twin
from gateway.twins.config import default_schedules, key_pair
from gateway.errors import EhrFailed, EhrRefused, NotFound, Unavailable
from gateway.outbound.calls import CallRecord
from gateway.outbound.http import HttpClient, Lost, NeverSent
from gateway.outbound.mllp import MllpClient
from gateway.settings import EhrCredentials, EhrSettings
from tests.conftest import ROOT, free_port
from tests.hl7_strict import read as read_ack

CONTROL = "test-epic-twin-control"
CLIENT = "epic-backend-client"
BASE = "/api/FHIR/STU3"
OID = "urn:oid:1.2.840.114350.1.13.861.1.7.3.808267.11"
SERVICE = Coding(system=OID, code="40111223")
DAY = (date.today() + timedelta(days=2)).isoformat()
PATIENT = "eq7IBvJQy2Y5wZqgZ3bRz6A3"
SCHEDULES = default_schedules("epic")
DOCTOR, PLACE = SCHEDULES[0].practitioner, SCHEDULES[0].location


PRIVATE, PUBLIC = key_pair()


@dataclass
class Twin:
    server: ThreadedServer

    @property
    def state(self) -> Any:
        return self.server.app.state.twin

    @property
    def base(self) -> str:
        return self.server.url + BASE

    @property
    def mllp(self) -> str:
        return f"127.0.0.1:{self.state.mllp_port}"

    def faults(self, **changes: object) -> None:
        r = httpx.post(self.server.url + "/twin/faults", json=changes, headers={"Authorization": f"Bearer {CONTROL}"})
        assert r.status_code == 200, r.text

    def counters(self) -> dict[str, int]:
        return httpx.get(self.server.url + "/twin/counters", headers={"Authorization": f"Bearer {CONTROL}"}).json()

    def appointments(self) -> list[dict[str, Any]]:
        r = httpx.get(self.server.url + "/twin/appointments", headers={"Authorization": f"Bearer {CONTROL}"})
        return r.json()["appointments"]


@pytest.fixture
def twin() -> Iterator[Twin]:
    config = TwinConfig(dialect="epic", control_key=CONTROL, client_id=CLIENT, public_key_pem=PUBLIC,
                        start_date=date.today().isoformat(), mllp_port=0)
    with ThreadedServer(create_ehr_twin(config)) as server:
        yield Twin(server)


def _settings(twin: Twin, **changes: Any) -> EhrSettings:
    return EhrSettings(**{"base_url": twin.base, "token_url": twin.server.url + "/oauth2/token", "client_id": CLIENT,
                          "scopes": "system/Appointment.read system/Appointment.write system/Slot.read",
                          "mllp_out": twin.mllp, "timeout_seconds": 3.0, "connect_timeout_seconds": 1.0, **changes})


@asynccontextmanager
async def epic_client(twin: Twin, redis_url: str, prefix: str, *, key: str = PRIVATE,
                      **changes: Any) -> AsyncIterator[EpicClient]:
    settings = _settings(twin, **changes)
    http = HttpClient(settings)
    client = aredis.Redis.from_url(redis_url)
    try:
        yield EpicClient("epic", settings, EhrCredentials(private_key_pem=key), http, client, prefix)
    finally:
        await http.aclose()
        await client.aclose()


@pytest.fixture
async def epic(twin: Twin, redis_url: str, prefix: str) -> AsyncIterator[EpicClient]:
    async with epic_client(twin, redis_url, prefix) as client:
        yield client


def _query(**changes: Any) -> SlotQuery:
    return SlotQuery(**{"start": f"{DAY}T09:00:00Z", "end": f"{DAY}T11:00:00Z", "practitioners": (DOCTOR,),
                        "service_types": (SERVICE,), **changes})


async def _first_slot(epic: EpicClient) -> Any:
    slots = await epic.find_slots(_query(), CallRecord())
    assert slots
    return slots[0]


def _booking(slot: Any, **changes: Any) -> BookRequest:
    return BookRequest(**{"slot": slot.id, "patient": PATIENT, "practitioner": slot.practitioner,
                          "start": slot.start, "end": slot.end, "comment": "follow-up", **changes})


async def _mllp(address: str, payload: bytes, *, framed: bool = True) -> bytes:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"\x0b" + payload + b"\x1c\r" if framed else payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 3)
    finally:
        writer.close()


def _srm(appointment_id: str, control: str = "MSG0001", version: str = "2.5.1", patient: str | None = None) -> bytes:
    kind = "SRM^S04^SRM_S01" if version >= "2.3.1" else "SRM^S04"
    segments = [f"MSH|^~\\&|SENDER|FACILITY|EPIC|EPIC|20260101120000||{kind}|{control}|P|{version}",
                f"ARQ|P1^SENDER|{appointment_id}^EPIC||||PAT-REQ"]
    if patient:
        segments.append(f"PID|1||{patient}")
    segments.append("RGS|1|D")
    return ("\r".join(segments) + "\r").encode()


# -- the happy path -----------------------------------------------------------------------------------------

async def test_find_read_slot_book_read_cancel_and_again(twin: Twin, epic: EpicClient):
    record = CallRecord()
    slots = await epic.find_slots(_query(), record)
    # 09:00 to 11:00, one practitioner, 30-minute grid: four proposed appointments, by start
    assert [s.start for s in slots] == [f"{DAY}T{h}Z" for h in ("09:00:00", "09:30:00", "10:00:00", "10:30:00")]
    assert {(s.practitioner, s.location, s.status) for s in slots} == {(DOCTOR, PLACE, "free")}
    assert slots[0].service_types == (SERVICE,) and record.matches == 4
    slot = slots[0]
    assert (await epic.read_slot(slot.id, CallRecord())).status == "free"

    booked = await epic.book(_booking(slot), CallRecord())
    assert (booked.status, booked.patient, booked.practitioner, booked.location) == ("booked", PATIENT, DOCTOR, PLACE)
    assert (booked.start, booked.end) == (slot.start, slot.end)
    assert (await epic.read_slot(slot.id, CallRecord())).status == "busy"
    assert slot.id not in {s.id for s in await epic.find_slots(_query(), CallRecord())}
    assert (await epic.read(booked.id, CallRecord())) == booked
    stored = twin.appointments()
    assert [(a["patient"], a["comment"], a["status"]) for a in stored] == [(PATIENT, "follow-up", "booked")]

    cancelled = await epic.cancel(booked.id, "pat-mv", CallRecord())
    assert (cancelled.id, cancelled.status) == (booked.id, "cancelled")
    assert twin.appointments()[0]["cancelReason"] == "pat-mv"
    assert twin.counters()["mllp_messages"] == 1
    again = await epic.cancel(booked.id, "pat-mv", CallRecord())
    assert again.status == "cancelled" and twin.counters()["mllp_messages"] == 1  # read, nothing sent
    assert (await epic.read_slot(slot.id, CallRecord())).status == "free"
    assert slot.id in {s.id for s in await epic.find_slots(_query(), CallRecord())}


async def test_client_class_names_epic():
    assert client_class("epic") is EpicClient


async def test_find_narrows_by_location_and_service(epic: EpicClient):
    everyone = await epic.find_slots(_query(practitioners=()), CallRecord())
    assert {s.practitioner for s in everyone} == {s.practitioner for s in SCHEDULES} and len(everyone) == 8
    other = Coding(system=OID, code="99999999")
    assert await epic.find_slots(_query(practitioners=(), service_types=(other,)), CallRecord()) == []
    assert await epic.find_slots(_query(practitioners=(), locations=("nowhere",)), CallRecord()) == []


async def test_a_taken_slot_is_refused_and_an_unknown_one_not_found(epic: EpicClient):
    slot = await _first_slot(epic)
    await epic.book(_booking(slot), CallRecord())
    with pytest.raises(EhrRefused) as refused:
        await epic.book(_booking(slot, patient="other-patient"), CallRecord())
    assert "conflict" in str(refused.value) and PATIENT not in str(refused.value)
    with pytest.raises(NotFound):
        await epic.book(BookRequest(slot="e-s1-190001010900", patient=PATIENT), CallRecord())
    with pytest.raises(NotFound):
        await epic.read("404404", CallRecord())
    with pytest.raises(NotFound):
        await epic.read_slot("e-s9-190001010900", CallRecord())


async def test_the_twin_takes_argonaut_names_for_book(twin: Twin, epic: EpicClient):
    slot = await _first_slot(epic)
    token = await epic.tokens.token()  # type: ignore[union-attr]
    body = {"resourceType": "Parameters", "parameter": [{"name": "appt-id", "valueString": slot.id},
                                                        {"name": "patient-id", "valueId": PATIENT},
                                                        {"name": "comment", "valueString": "argonaut"}]}
    r = httpx.post(twin.base + "/Appointment/$book", json=body, headers={"Authorization": f"Bearer {token.access_token}"})
    assert r.status_code == 200
    (entry,) = r.json()["entry"]
    assert entry["resource"]["status"] == "booked" and twin.appointments()[0]["comment"] == "argonaut"


# -- the twin refuses what Epic would ---------------------------------------------------------------------

async def _raw(twin: Twin, epic: EpicClient, path: str, body: Any = None, method: str = "POST",
               **params: str) -> httpx.Response:
    token = await epic.tokens.token()  # type: ignore[union-attr]
    return httpx.request(method, twin.base + path, json=body, params=params,
                         headers={"Authorization": f"Bearer {token.access_token}"})


@pytest.mark.parametrize("parameters", [
    [],  # no times
    [{"name": "startTime", "valueDateTime": f"{DAY}T09:00:00Z"}],  # no end
    [{"name": "startTime", "valueString": f"{DAY}T09:00:00Z"}, {"name": "endTime", "valueDateTime": f"{DAY}T10:00:00Z"}],
    [{"name": "startTime", "valueDateTime": f"{DAY}T11:00:00Z"}, {"name": "endTime", "valueDateTime": f"{DAY}T10:00:00Z"}],
    [{"name": "startTime", "valueDateTime": f"{DAY}T09:00:00"}, {"name": "endTime", "valueDateTime": f"{DAY}T10:00:00Z"}],
    [{"name": "startTime", "valueDateTime": f"{DAY}T09:00:00Z"}, {"name": "endTime", "valueDateTime": f"{DAY}T10:00:00Z"},
     {"name": "provider", "valueString": DOCTOR}],  # provider is a Reference
    [{"name": "startTime", "valueDateTime": f"{DAY}T09:00:00Z"}, {"name": "endTime", "valueDateTime": f"{DAY}T10:00:00Z"},
     {"name": "service-type", "valueCoding": {"system": OID, "code": "40111223"}}],
])
async def test_find_without_valid_times_or_typed_values_is_400(twin: Twin, epic: EpicClient, parameters):
    r = await _raw(twin, epic, "/Appointment/$find", {"resourceType": "Parameters", "parameter": parameters})
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"


async def test_find_answers_proposed_appointments_and_an_information_outcome(twin: Twin, epic: EpicClient):
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "startTime", "valueDateTime": f"{DAY}T09:00:00Z"}, {"name": "endTime", "valueDateTime": f"{DAY}T09:30:00Z"},
        {"name": "location", "valueReference": {"reference": f"Location/{PLACE}"}}]}
    r = await _raw(twin, epic, "/Appointment/$find", body)
    assert r.status_code == 200
    bundle = r.json()
    assert (bundle["resourceType"], bundle["type"]) == ("Bundle", "searchset")
    modes = [(e["resource"]["resourceType"], e["search"]["mode"]) for e in bundle["entry"]]
    assert modes == [("Appointment", "match"), ("Appointment", "match"), ("OperationOutcome", "outcome")]
    assert bundle["entry"][-1]["resource"]["issue"][0]["severity"] == "information"
    first = bundle["entry"][0]["resource"]
    assert first["status"] == "proposed" and first["start"] == f"{DAY}T09:00:00Z"
    assert {p["actor"]["reference"].split("/")[0] for p in first["participant"]} == {"Practitioner", "Location"}


@pytest.mark.parametrize("parameters", [
    [{"name": "appointment", "valueIdentifier": {"value": "X"}}],  # no patient
    [{"name": "patient", "valueReference": {"reference": f"Patient/{PATIENT}"}}],  # no appointment
    [{"name": "patient", "valueString": PATIENT}, {"name": "appointment", "valueIdentifier": {"value": "X"}}],
    [{"name": "patient", "valueReference": {"reference": f"Practitioner/{DOCTOR}"}},
     {"name": "appointment", "valueIdentifier": {"value": "X"}}],
    [{"name": "patient", "valueReference": {"reference": f"Patient/{PATIENT}"}},
     {"name": "appointment", "valueString": "X"}],
])
async def test_book_without_patient_or_appointment_is_400_and_books_nothing(twin: Twin, epic: EpicClient, parameters):
    slot = await _first_slot(epic)
    parameters = [{**p, "valueIdentifier": {"value": slot.id}} if p.get("valueIdentifier") else p for p in parameters]
    r = await _raw(twin, epic, "/Appointment/$book", {"resourceType": "Parameters", "parameter": parameters})
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    assert twin.appointments() == []


async def test_book_of_something_else_than_parameters_is_400(twin: Twin, epic: EpicClient):
    r = await _raw(twin, epic, "/Appointment/$book", {"resourceType": "Appointment", "status": "booked"})
    assert r.status_code == 400


async def test_appointment_search_needs_a_patient_and_filters_by_date(twin: Twin, epic: EpicClient):
    assert (await _raw(twin, epic, "/Appointment", method="GET", date=f"ge{DAY}")).status_code == 400
    assert (await _raw(twin, epic, "/Appointment", method="GET", patient=PATIENT, date="soon")).status_code == 400
    booked = await epic.book(_booking(await _first_slot(epic)), CallRecord())
    same_day = await _raw(twin, epic, "/Appointment", method="GET", patient=PATIENT, date=DAY)
    assert [e["resource"]["id"] for e in same_day.json()["entry"]] == [booked.id]
    later = await _raw(twin, epic, "/Appointment", method="GET", patient=PATIENT, date=f"gt{DAY}")
    assert later.json()["entry"] == []


async def test_the_api_needs_a_token(twin: Twin):
    r = httpx.post(twin.base + "/Appointment/$find", json={"resourceType": "Parameters", "parameter": []})
    assert r.status_code == 401 and twin.counters()["refused_auth"] == 1


# -- MLLP: the twin's ACKs, read strictly -------------------------------------------------------------------

@pytest.mark.parametrize("version", ["2.2", "2.3", "2.4", "2.5.1", "2.6", "2.7", "2.8"])
async def test_srm_s04_cancels_and_is_acknowledged_aa_in_its_version(twin: Twin, epic: EpicClient, version):
    booked = await epic.book(_booking(await _first_slot(epic)), CallRecord())
    raw = await _mllp(twin.mllp, _srm(booked.id, "C-17", version, PATIENT))
    ack = read_ack(raw)
    assert (ack.code, ack.control_id, ack.version) == ("AA", "C-17", version)
    assert ack.message_type.split("^")[:2] == ["ACK", "S04"]
    assert twin.appointments()[0]["status"] == "cancelled"
    again = read_ack(await _mllp(twin.mllp, _srm(booked.id, "C-18", version)))
    assert (again.code, again.control_id) == ("AA", "C-18")  # already cancelled: still AA
    assert twin.counters()["mllp_messages"] == 2


async def test_siu_s15_cancels_with_its_reason(twin: Twin, epic: EpicClient):
    booked = await epic.book(_booking(await _first_slot(epic)), CallRecord())
    message = ("MSH|^~\\&|SENDER|FAC|EPIC|EPIC|20260101120000||SIU^S15^SIU_S12|N-1|P|2.5\r"
               f"SCH|P9^SENDER|{booked.id}^EPIC||||NOSHOW^No show\r").encode()
    ack = read_ack(await _mllp(twin.mllp, message))
    assert (ack.code, ack.control_id) == ("AA", "N-1")
    assert (twin.appointments()[0]["status"], twin.appointments()[0]["cancelReason"]) == ("cancelled", "NOSHOW")


async def test_an_unknown_appointment_or_another_patient_is_ae(twin: Twin, epic: EpicClient):
    ack = read_ack(await _mllp(twin.mllp, _srm("999999", "U-1")))
    assert (ack.code, ack.control_id) == ("AE", "U-1") and "204" in ack.err[0]
    booked = await epic.book(_booking(await _first_slot(epic)), CallRecord())
    ack = read_ack(await _mllp(twin.mllp, _srm(booked.id, "U-2", patient="someone-else")))
    assert ack.code == "AE" and twin.appointments()[0]["status"] == "booked"


@pytest.mark.parametrize("payload", [
    b"this is no HL7 message at all",
    b"\xff\xfe\x00garbage",
    b"MSH|^~\\&|S|F|EPIC|EPIC|20260101||ADT^A01^ADT_A01|G-3|P|2.5.1\rEVN|A01\r",  # another message type
    b"MSH|^~\\&|S|F|EPIC|EPIC|20260101||SRM^S04^SRM_S01|G-4|P|2.5.1\rRGS|1|D\r",  # no ARQ
])
async def test_what_cannot_be_read_is_ar(twin: Twin, payload):
    ack = read_ack(await _mllp(twin.mllp, payload))
    assert ack.code == "AR"
    assert ack.control_id == (payload.split(b"|")[9].decode() if payload.startswith(b"MSH") else '""')
    assert twin.counters()["mllp_messages"] == 1 and twin.counters()["cancels"] == 0


# -- the client's failure matrix ----------------------------------------------------------------------------

async def test_a_wrong_key_is_refused_at_the_token_endpoint(twin: Twin, redis_url: str, prefix: str):
    other, _ = key_pair()
    async with epic_client(twin, redis_url, prefix, key=other) as client:
        with pytest.raises(Unavailable) as refused:
            await client.find_slots(_query(), CallRecord())
    assert "invalid_client" in str(refused.value)
    assert twin.counters()["token_grants"] == 0 and twin.counters()["api_calls"] == 0


async def test_two_clients_share_one_grant(twin: Twin, redis_url: str, prefix: str):
    async with epic_client(twin, redis_url, prefix) as one, epic_client(twin, redis_url, prefix) as two:
        await one.find_slots(_query(), CallRecord())
        await two.find_slots(_query(), CallRecord())
    assert twin.counters()["token_grants"] == 1


async def test_an_expired_token_is_renewed_once(twin: Twin, epic: EpicClient):
    await epic.find_slots(_query(), CallRecord())
    twin.faults(expire_tokens=True)
    record = CallRecord()
    assert await epic.find_slots(_query(), record)
    assert record.retried_auth and twin.counters()["token_grants"] == 2


async def test_an_expired_token_on_book_is_not_resent_but_renewed(twin: Twin, epic: EpicClient):
    slot = await _first_slot(epic)
    twin.faults(expire_tokens=True)
    record = CallRecord()
    with pytest.raises(Unavailable):
        await epic.book(_booking(slot), record)
    assert record.reauthenticated and twin.appointments() == []
    assert (await epic.book(_booking(slot), CallRecord())).status == "booked"
    assert twin.counters()["token_grants"] == 2


@pytest.mark.parametrize("status", [429, 503])
async def test_throttled_or_unavailable_before_acting(twin: Twin, epic: EpicClient, status):
    slot = await _first_slot(epic)
    twin.faults(fail_before=1, fail_status=status)
    with pytest.raises(Unavailable) as failed:
        await epic.book(_booking(slot), CallRecord())
    assert f"HTTP {status}" in str(failed.value) and twin.appointments() == []


async def test_a_500_is_a_failure(twin: Twin, epic: EpicClient):
    twin.faults(fail_before=1, fail_status=500)
    with pytest.raises(EhrFailed) as failed:
        await epic.find_slots(_query(), CallRecord())
    assert "HTTP 500" in str(failed.value)


async def test_a_drop_after_the_booking_is_lost_then_found(twin: Twin, epic: EpicClient):
    slot = await _first_slot(epic)
    request = _booking(slot)
    assert await epic.find_booked(request, CallRecord()) is None
    twin.faults(fail_after_store=1, after_store="drop")
    record = CallRecord()
    with pytest.raises(EhrFailed) as lost:
        await epic.book(request, record)
    assert record.in_doubt and "may or may not" in str(lost.value)
    found = await epic.find_booked(request, CallRecord())
    assert found is not None and found.id == twin.appointments()[0]["id"] and found.status == "booked"
    # the same look-up without start or practitioner reads them from the slot
    bare = await epic.find_booked(BookRequest(slot=slot.id, patient=PATIENT), CallRecord())
    assert bare is not None and bare.id == found.id
    assert await epic.find_booked(_booking(slot, patient="other-patient"), CallRecord()) is None


@pytest.mark.parametrize("body", [b"<html>proxy error</html>", b'{"resourceType": "Patient", "id": "1"}'])
async def test_an_answer_that_is_no_fhir_is_a_failure(body: bytes, redis_url: str, prefix: str):
    """A real server on a real port answering 200 with what no Epic answers (a proxy's page, another resource)."""
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(respond, "127.0.0.1", 0)
    settings = EhrSettings(base_url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}{BASE}")
    http, client = HttpClient(settings), aredis.Redis.from_url(redis_url)
    try:
        epic = EpicClient("epic", settings, None, http, client, prefix)
        for call in (epic.find_slots(_query(), CallRecord()), epic.read("1", CallRecord()),
                     epic.read_slot("e-s1-1", CallRecord()), epic.book(BookRequest(slot="x", patient=PATIENT), CallRecord())):
            with pytest.raises(EhrFailed) as failed:
                await call
            assert PATIENT not in str(failed.value)
    finally:
        server.close()
        await http.aclose()
        await client.aclose()


# -- the cancel's failure matrix ----------------------------------------------------------------------------

async def test_cancel_without_mllp_out_sends_nothing(twin: Twin, redis_url: str, prefix: str):
    async with epic_client(twin, redis_url, prefix, mllp_out=None) as client:
        with pytest.raises(EhrFailed) as failed:
            await client.cancel("10000001", None, CallRecord())
    assert "mllp_out" in str(failed.value) and twin.counters()["api_calls"] == 0


async def test_cancel_to_a_listener_that_is_down_sent_nothing(twin: Twin, redis_url: str, prefix: str):
    async with epic_client(twin, redis_url, prefix, mllp_out=f"127.0.0.1:{free_port()}") as client:
        booked = await client.book(_booking(await _first_slot(client)), CallRecord())
        record = CallRecord()
        with pytest.raises(Unavailable) as down:
            await client.cancel(booked.id, None, record)
    assert "nothing was sent" in str(down.value) and not record.in_doubt
    assert twin.appointments()[0]["status"] == "booked"


async def test_cancel_to_a_listener_that_never_answers_is_in_doubt(twin: Twin, redis_url: str, prefix: str):
    received: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\x1c\r"))
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with epic_client(twin, redis_url, prefix, mllp_out=f"127.0.0.1:{port}", timeout_seconds=0.5) as client:
            booked = await client.book(_booking(await _first_slot(client)), CallRecord())
            record = CallRecord()
            with pytest.raises(EhrFailed) as doubt:
                await client.cancel(booked.id, None, record)
    finally:
        server.close()
    assert record.in_doubt and "may or may not" in str(doubt.value)
    assert len(received) == 1 and received[0].startswith(b"\x0bMSH|")
    assert PATIENT not in str(doubt.value)


async def test_cancel_sends_srm_s04_with_the_patient_and_reads_the_ack(twin: Twin, redis_url: str, prefix: str):
    """What the client sends, read back by a listener of the test's own that answers each kind of ACK."""
    answers = iter([b"AE", b"AR", b"AA", b"AA"])
    received: list[bytes] = []

    async def listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        message = (await reader.readuntil(b"\x1c\r"))[1:-2]
        received.append(message)
        code = next(answers)
        # the first AA acknowledges another message: no proof this one was taken
        control = message.split(b"\r")[0].split(b"|")[9] if len(received) != 3 else b"someone-elses"
        writer.write(b"\x0bMSH|^~\\&|EPIC|EPIC|GW|GW|20260101120000||ACK^S04^ACK|A1|P|2.5.1\rMSA|" + code + b"|"
                     + control + b"|refused for " + PATIENT.encode() + b"\r\x1c\r")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(listener, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with epic_client(twin, redis_url, prefix, mllp_out=f"127.0.0.1:{port}") as client:
            booked = await client.book(_booking(await _first_slot(client)), CallRecord())
            with pytest.raises(EhrRefused) as refused:
                await client.cancel(booked.id, "pat-mv", CallRecord())
            with pytest.raises(EhrFailed) as rejected:
                await client.cancel(booked.id, "pat-mv", CallRecord())
            record = CallRecord()
            with pytest.raises(EhrFailed) as other:
                await client.cancel(booked.id, "pat-mv", record)
            # an AA for it, yet the appointment still booked (this listener cancels nothing): not done
            with pytest.raises(EhrFailed) as unapplied:
                await client.cancel(booked.id, "pat-mv", CallRecord())
    finally:
        server.close()
    assert PATIENT not in str(refused.value) and PATIENT not in str(rejected.value)
    assert "AR" in str(rejected.value) and "another message" in str(other.value) and record.in_doubt
    assert "acknowledged the cancel but the appointment is booked" in str(unapplied.value)
    segments = {s.split(b"|")[0]: s.split(b"|") for s in received[0].split(b"\r") if s}
    assert segments[b"MSH"][8] == b"SRM^S04^SRM_S01" and segments[b"MSH"][11] == b"2.5.1"
    assert segments[b"ARQ"][2] == booked.id.encode() + b"^EPIC" and segments[b"ARQ"][6] == b"pat-mv"
    assert segments[b"PID"][3] == PATIENT.encode() and b"RGS" in segments


async def test_the_mllp_sender_loses_a_closed_or_oversized_answer():
    """After the write, a close without an answer or an answer over the bound is Lost, never NeverSent."""
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\x1c\r")
        writer.close()

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\x1c\r")
        writer.write(b"\x0b" + b"MSA|AA|" * 20_000 + b"\x1c\r")
        await writer.drain()
        writer.close()

    for handler, kind in ((close_at_once, "connection-lost"), (flood, "too-large")):
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        client = MllpClient(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", connect_timeout=1, timeout=2,
                            max_answer_bytes=65_536)
        try:
            with pytest.raises(Lost) as lost:
                await client.exchange(b"MSH|^~\\&|x\r")
            assert lost.value.kind == kind
        finally:
            server.close()
    with pytest.raises(NeverSent):
        await MllpClient(f"127.0.0.1:{free_port()}", connect_timeout=1, timeout=1).exchange(b"MSH|^~\\&|x\r")


async def test_a_5xx_after_the_booking_was_stored_is_a_failure_the_look_up_repairs(twin: Twin, epic: EpicClient):
    slot = await _first_slot(epic)
    twin.faults(fail_after_store=1, after_store="500")
    with pytest.raises(EhrFailed):
        await epic.book(_booking(slot), CallRecord())
    found = await epic.find_booked(_booking(slot), CallRecord())
    assert found is not None and found.id == twin.appointments()[0]["id"]


async def test_cancel_of_an_unknown_appointment_is_not_found(epic: EpicClient, twin: Twin):
    with pytest.raises(NotFound):
        await epic.cancel("31313131", None, CallRecord())
    assert twin.counters()["mllp_messages"] == 0  # the read found nothing: nothing sent


# -- the twin alone, as `ehr-gateway ehr-sandbox --dialect epic` runs it ----------------------------------

def test_ehr_sandbox_starts_and_prints_its_mllp_port(tmp_path):
    port = free_port()
    key_file = tmp_path / "public.pem"
    key_file.write_text(PUBLIC)
    env = {**os.environ, "EHR_SANDBOX_PUBLIC_KEY_FILE": str(key_file), "EHR_SANDBOX_CONTROL_KEY": CONTROL}
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "ehr-sandbox", "--dialect", "epic",
                                "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(4)]
        mllp = next(line for line in lines if "MLLP" in line).strip().rsplit(" ", 1)[-1]
        message = _srm("1", "S-1")
        ack = read_ack(asyncio.run(_mllp(mllp, message)))
        assert (ack.code, ack.control_id) == ("AE", "S-1")
        r = httpx.get(f"http://127.0.0.1:{port}/twin/counters", headers={"Authorization": f"Bearer {CONTROL}"})
        assert msgspec.json.decode(r.content)["mllp_messages"] == 1
    finally:
        process.terminate()
        process.wait(10)
