"""Every kind of FHIR body the gateway answers, validated as FHIR R4 by the suite's own validator
(`tests/fhir_validate.py`: fhir.resources' models and the required bindings; the gateway's code never
imports it): the Appointment of a booking, a replay, a change and a conditional create; the
searchset, the batch-response, the CapabilityStatement and the OperationDefinition; and an
OperationOutcome for every status the gateway answers with one, from its routes, from Litestar's
own refusals and from the HTTP protocol's. Each over real HTTP (raw sockets where a client could not
send the request), against the sandbox and a real Redis."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from gateway.settings import LimitSettings
from tests.conftest import VIDEO_VISIT, auth, corpus, make_settings, serve_gateway
from tests.fhir_validate import validate
from tests.test_admin import state
from tests.test_code_rules import epic_book

LIMITS = LimitSettings(header_timeout_seconds=1.0, body_timeout_seconds=1.0, max_header_bytes=4096,
                       max_body_bytes=262_144, keep_alive_seconds=5)
SLOTS = "/fhir/cerner/Slot?start=ge2026-12-01T09:00:00Z&start=le2026-12-01T10:00:00Z&actor=Practitioner/593923"
CERNER_SERVICE_TYPES = "https://fhir.cerner.com/ec2458f2-1e24-41c8-b71b-0e701af7583d/codeSet/14249"


def appointment(ident: str, minute: int = 0, **changes: object) -> dict:
    data = msgspec.json.decode(corpus(VIDEO_VISIT))
    data.pop("id")
    data.pop("cancelationReason")
    data.update(status="booked", identifier=[{"system": "urn:oid:1.2.3", "value": ident}],
                start=f"2026-12-01T{9 + minute // 60:02d}:{minute % 60:02d}:00Z",
                end=f"2026-12-01T{9 + (minute + 15) // 60:02d}:{(minute + 15) % 60:02d}:00Z")
    data.update(changes)
    return data


def body(data: dict) -> bytes:
    return msgspec.json.encode(data)


@pytest.fixture
async def gw(redis_url, prefix, sandbox):
    """Small server limits (so 408, 413 and 431 are cheap to reach), a rate limit on the fhir source
    and the durable queue on epic's."""
    settings = make_settings(redis_url, prefix, sandbox.url, limits=LIMITS)
    sources = dict(settings.file.sources)
    sources["fhir"] = msgspec.structs.replace(sources["fhir"], rate_limit_per_minute=2)
    sources["epic"] = msgspec.structs.replace(sources["epic"], delivery="queue")
    settings = msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, sources=sources))
    async with serve_gateway(settings) as client:
        yield client


def fhir_answer(r, status: int, resource_type: str) -> dict:
    """The answer is `status`, labelled FHIR JSON, with a request id, and a valid R4 `resource_type`."""
    assert r.status_code == status, (status, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/fhir+json"), r.headers
    assert r.headers.get("x-request-id"), r.headers
    return validate(r.content, resource_type)


async def test_every_resource_the_gateway_answers_is_valid_r4(gw, sandbox):
    booked = await gw.post("/fhir/cerner/Appointment", content=body(appointment("c-1")), headers=auth())
    sf_id = fhir_answer(booked, 201, "Appointment")["id"]
    again = await gw.post("/fhir/cerner/Appointment", content=body(appointment("c-1")), headers=auth())
    assert fhir_answer(again, 201, "Appointment")["id"] == sf_id and again.headers["idempotent-replayed"] == "true"
    moved = appointment("c-1", 20, id=sf_id)
    fhir_answer(await gw.put(f"/fhir/cerner/Appointment/{sf_id}", content=body(moved), headers=auth()), 200, "Appointment")
    exists = await gw.post("/fhir/cerner/Appointment", content=body(appointment("c-1", 40)),
                           headers=auth(**{"If-None-Exist": "identifier=urn:oid:1.2.3|c-1"}))
    assert fhir_answer(exists, 200, "Appointment")["id"] == sf_id
    cancelled = await gw.put("/fhir/cerner/Appointment?identifier=urn:oid:1.2.3|c-1",
                             content=body(appointment("c-1", 20, status="cancelled")), headers=auth())
    assert fhir_answer(cancelled, 200, "Appointment")["status"] == "cancelled"

    searchset = fhir_answer(await gw.get(SLOTS + "&_count=2", headers=auth()), 200, "Bundle")
    assert searchset["type"] == "searchset" and len(searchset["entry"]) == 2
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": appointment("c-2", 30), "request": {"method": "POST", "url": "Appointment"}},
        {"resource": appointment("c-3", 45, serviceType=[{"coding": [{"system": CERNER_SERVICE_TYPES, "code": "?"}]}]),
         "request": {"method": "POST", "url": "Appointment"}},
        {"request": {"method": "GET", "url": f"Appointment/{sf_id}"}},
    ]}
    response = fhir_answer(await gw.post("/fhir/cerner", content=body(batch), headers=auth()), 200, "Bundle")
    assert [e["response"]["status"][:3] for e in response["entry"]] == ["201", "422", "405"]
    assert fhir_answer(await gw.get("/fhir/cerner/metadata"), 200, "CapabilityStatement")["fhirVersion"] == "4.0.1"
    translate = fhir_answer(await gw.get("/fhir/cerner/OperationDefinition/appointment-translate"), 200,
                            "OperationDefinition")
    assert translate["code"] == "translate"


async def test_every_refusal_is_a_valid_operation_outcome(gw, sandbox):
    """One request per status the gateway's FHIR routes answer with an OperationOutcome."""
    book = "/fhir/cerner/Appointment"
    seen: dict[int, dict] = {}

    def outcome(r, status: int) -> None:
        seen[status] = fhir_answer(r, status, "OperationOutcome")

    outcome(await gw.post(book, content=b"{", headers=auth()), 400)
    outcome(await gw.post(book, content=body(appointment("r-1")), headers={"Content-Type": "application/fhir+json"}), 401)
    another_sources_key = {**auth(), "Authorization": auth("epic")["Authorization"]}
    outcome(await gw.post(book, content=body(appointment("r-1")), headers=another_sources_key), 403)
    outcome(await gw.post("/fhir/nowhere/Appointment", content=body(appointment("r-1")), headers=auth()), 404)
    outcome(await gw.get("/fhir/cerner/Nothing"), 404)
    outcome(await gw.delete(f"{book}/08pHs0000000001IAA", headers=auth()), 405)
    outcome(await gw.get("/fhir/cerner/metadata", headers={"Accept": "application/fhir+xml"}), 406)
    outcome(await gw.post(book, content=b"{" + b" " * 300_000 + b"}", headers=auth()), 413)
    outcome(await gw.post(book, content=body(appointment("r-1")), headers=auth(**{"Content-Type": "text/plain"})), 415)
    unmapped = appointment("r-2", serviceType=[{"coding": [{"system": CERNER_SERVICE_TYPES, "code": "?"}]}])
    outcome(await gw.post(book, content=body(unmapped), headers=auth()), 422)

    booked = await gw.post(book, content=body(appointment("r-3")), headers=auth())
    sf_id = booked.json()["id"]
    moved = appointment("r-3", 30, id=sf_id)
    stale = await gw.put(f"{book}/{sf_id}", content=body(moved), headers=auth(**{"If-Match": 'W/"7"'}))
    outcome(stale, 412)

    for _ in range(2):  # the fhir source's allowance: two a minute
        await gw.post("/fhir/fhir/Appointment/$translate", content=b"{", headers=auth("fhir"))
    outcome(await gw.post("/fhir/fhir/Appointment/$translate", content=b"{", headers=auth("fhir")), 429)

    faults = state(sandbox).faults
    faults.set(server_error=1, server_error_status=500)
    outcome(await gw.post(book, content=body(appointment("r-4", 45)), headers=auth()), 502)
    faults.set(request_limit_exceeded=1)
    outcome(await gw.post(book, content=body(appointment("r-5", 50)), headers=auth()), 503)
    faults.set(request_limit_exceeded=1)  # epic's bookings go to the durable queue instead
    queued = await gw.post("/fhir/epic/Appointment/$book", content=epic_book(), headers=auth("epic"))
    outcome(queued, 202)
    assert seen[202]["issue"][0]["severity"] == "information"

    faults.set(latency_ms=2500)  # the attempt that claims the key holds it while Salesforce is slow
    try:
        first = asyncio.create_task(gw.post(book, content=body(appointment("r-7", 55)), headers=auth()))
        await asyncio.sleep(0.2)
        second = asyncio.create_task(gw.post(book, content=body(appointment("r-7", 55)), headers=auth()))
        answers = sorted(await asyncio.gather(first, second), key=lambda r: r.status_code)
    finally:
        faults.set(latency_ms=0)
    assert [r.status_code for r in answers] == [201, 409]  # whichever claimed first books; the other waits
    outcome(answers[1], 409)

    assert sorted(seen) == [202, 400, 401, 403, 404, 405, 406, 409, 412, 413, 415, 422, 429, 502, 503]
    for status in (400, 404, 422):
        assert all(i["severity"] == "error" for i in seen[status]["issue"])


async def _raw(port: int, request: bytes, *, wait: float = 5) -> tuple[int, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = b""
        while block := await asyncio.wait_for(reader.read(65536), timeout=wait):
            answer += block
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/fhir+json" in head.lower(), head
    return status, validate(payload, "OperationOutcome")


async def test_the_http_protocols_refusals_are_valid_operation_outcomes(gw):
    port = gw.base_url.port
    status, _ = await _raw(port, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400
    head = (f"POST /fhir/cerner/Appointment HTTP/1.1\r\nHost: x\r\nAuthorization: {auth()['Authorization']}\r\n"
            "Content-Type: application/fhir+json\r\nContent-Length: 10\r\n\r\n{").encode()
    status, _ = await _raw(port, head)  # the body stops arriving
    assert status == 408
    status, _ = await _raw(port, b"GET /fhir/cerner/metadata HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
    assert status == 431
    status, outcome = await _raw(port, b"GET /fhir//cerner/metadata HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400 and outcome["issue"][0]["severity"] == "error"
