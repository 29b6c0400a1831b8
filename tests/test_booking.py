"""The booking path end to end: gateway app -> real Redis -> Health Cloud sandbox over real HTTP."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from gateway.booking.fhir import SALESFORCE_ERROR_SYSTEM, SALESFORCE_ID_SYSTEM
from tests.conftest import VIDEO_VISIT, auth, corpus, visit_records

PATIENT_ID = "12724066"


def state(sandbox):
    return sandbox.app.state.sandbox


def booking_variant(minute: int) -> bytes:
    """The corpus's Cerner appointment at another time: a different booking."""
    data = msgspec.json.decode(corpus(VIDEO_VISIT))
    data["start"] = f"2026-12-01T13:{minute:02d}:00Z"
    data["end"] = f"2026-12-01T14:{minute:02d}:00Z"
    return msgspec.json.encode(data)


async def test_books_the_cerner_appointment(gateway, sandbox):
    r = await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth(**{"Idempotency-Key": "k-1"}))
    assert r.status_code == 201, r.text
    body = r.json()
    stored = state(sandbox).appointments()
    assert len(stored) == 1
    assert body["resourceType"] == "Appointment" and body["status"] == "booked"
    assert body["id"] == stored[0].id
    assert r.headers["location"] == f"{gateway.base_url}/fhir/cerner/Appointment/{stored[0].id}"
    assert r.headers["content-type"].startswith("application/fhir+json")
    assert {"system": SALESFORCE_ID_SYSTEM, "value": stored[0].id} in body["identifier"]
    sent = stored[0].request
    assert sent["sourceSystem"] == "cerner"
    assert sent["workTypeId"] == "08qxx0000000002AAA"
    assert sent["serviceTypes"] == ["2572307911"] and sent["serviceCategories"] == ["DIAGNOSTIC"]
    assert sent["startDate"] == "2020-07-10T13:00:00.000Z" and sent["endDate"] == "2020-07-10T13:15:00.000Z"
    people = visit_records(sandbox)  # the org's records of Patient/12724066, Practitioner/593923, Location/21304876
    assert sent["slots"] == [{"id": "21265426-633867-6828001-60", "reference": people["Practitioner"]}]
    assert {p["reference"] for p in sent["participants"]} == set(people.values())
    assert sent["timeZone"] == "America/Chicago"


async def test_retry_is_replayed_byte_for_byte(gateway, sandbox):
    headers = auth(**{"Idempotency-Key": '"retry-1"'})
    first = await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=headers)
    again = await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth(**{"Idempotency-Key": "retry-1"}))
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.headers["location"] == first.headers["location"]
    assert len(state(sandbox).appointments()) == 1


async def test_a_retry_written_differently_gets_the_first_answer_byte_for_byte(gateway, sandbox, redis_url, prefix):
    """A booked record keeps only Salesforce's id; the replay's body is rebuilt from the retry's own
    booking, which has the same fingerprint, so the same canonical form: the bytes cannot drift even
    when the EHR re-serialises its JSON (other key order, other spacing)."""
    import json

    import redis.asyncio as aredis

    headers = auth(**{"Idempotency-Key": "respelt-1"})
    first = await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=headers)
    respelt = json.dumps(dict(reversed(list(json.loads(corpus(VIDEO_VISIT)).items()))), indent=3).encode()
    again = await gateway.post("/fhir/cerner/Appointment", content=respelt, headers=headers)
    assert first.status_code == again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content and again.headers["location"] == first.headers["location"]
    client = aredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:idem:*", count=1000)]
        records = [await client.hgetall(k) for k in keys]
        mine = [r for r in records if r.get(b"a") == b"\x04" + first.json()["id"].encode()]
        assert len(mine) == 1  # the record holds Salesforce's id, and nothing of the patient's
        assert PATIENT_ID.encode() not in b"".join(mine[0].values())
    finally:
        await client.aclose()
    assert len(state(sandbox).appointments()) == 1


async def test_without_a_key_the_same_booking_is_recognised(gateway, sandbox):
    first = await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth())
    again = await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth())
    other = await gateway.post("/fhir/cerner/Appointment", content=booking_variant(30), headers=auth())
    assert (first.status_code, again.status_code, other.status_code) == (201, 201, 201)
    assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
    assert other.json()["id"] != first.json()["id"]
    assert len(state(sandbox).appointments()) == 2


async def test_key_identifier_derivation(gateway, sandbox):
    """Without a header the key comes from Appointment.identifier: same identifier, other content
    is a reused key."""
    data = msgspec.json.decode(corpus(VIDEO_VISIT))
    data["identifier"] = [{"system": "urn:oid:2.16.840.1.113883.3.13.6", "value": "A-1001"}]
    first = await gateway.post("/fhir/cerner/Appointment", content=msgspec.json.encode(data), headers=auth())
    data["end"] = "2020-07-10T13:30:00.000Z"
    second = await gateway.post("/fhir/cerner/Appointment", content=msgspec.json.encode(data), headers=auth())
    assert first.status_code == 201
    assert {"system": "urn:oid:2.16.840.1.113883.3.13.6", "value": "A-1001"} in first.json()["identifier"]
    assert second.status_code == 422 and second.json()["issue"][0]["code"] == "conflict"
    assert len(state(sandbox).appointments()) == 1


async def test_key_reused_with_another_booking_is_422(gateway, sandbox):
    h = auth(**{"Idempotency-Key": "same"})
    assert (await gateway.post("/fhir/cerner/Appointment", content=booking_variant(1), headers=h)).status_code == 201
    r = await gateway.post("/fhir/cerner/Appointment", content=booking_variant(2), headers=h)
    assert r.status_code == 422
    assert r.json()["issue"][0]["location"] == ["http.Idempotency-Key"]
    assert len(state(sandbox).appointments()) == 1


async def test_concurrent_duplicates_make_one_appointment(gateway, sandbox):
    state(sandbox).faults.set(latency_ms=300)
    h = auth(**{"Idempotency-Key": "burst"})
    answers = await asyncio.gather(*(gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=h) for _ in range(8)))
    statuses = sorted(a.status_code for a in answers)
    assert len(state(sandbox).appointments()) == 1
    assert statuses.count(201) >= 1 and statuses.count(409) >= 1 and set(statuses) <= {201, 409}
    for a in answers:
        if a.status_code == 409:
            assert int(a.headers["retry-after"]) >= 1
            assert a.json()["issue"][0]["code"] == "conflict"
    # once done, every retry is the one answer
    final = await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=h)
    assert final.status_code == 201 and final.json()["id"] == state(sandbox).appointments()[0].id


async def test_refusal_before_forwarding_is_not_stored(gateway, sandbox):
    h = auth(**{"Idempotency-Key": "fix-then-retry"})
    bad = msgspec.json.decode(corpus(VIDEO_VISIT))
    del bad["start"]
    r = await gateway.post("/fhir/cerner/Appointment", content=msgspec.json.encode(bad), headers=h)
    assert r.status_code == 422 and "Appointment.start" in r.json()["issue"][0]["expression"]
    fixed = await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=h)
    assert fixed.status_code == 201 and "idempotent-replayed" not in fixed.headers
    assert state(sandbox).counters().book_calls == 1


@pytest.mark.parametrize("sandbox_config", [{"require_channel_id": True}], indirect=True)
async def test_salesforce_refusal_is_final_and_replayed(gateway, sandbox):
    """This sandbox requires channelId (one Salesforce page says it is required); the source has
    none, so Salesforce refuses: 422 with its errorCode, stored as the final answer."""
    h = auth(**{"Idempotency-Key": "sf-refuses"})
    r = await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=h)
    assert r.status_code == 422
    issue = r.json()["issue"][0]
    assert issue["code"] == "processing"
    assert issue["details"]["coding"][0]["system"] == SALESFORCE_ERROR_SYSTEM
    assert issue["details"]["coding"][0]["code"] == "REQUIRED_FIELD_MISSING"
    assert PATIENT_ID not in r.text
    again = await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=h)
    assert again.status_code == 422 and again.content == r.content and again.headers["idempotent-replayed"] == "true"
    assert state(sandbox).counters().book_calls == 1 and state(sandbox).appointments() == []
