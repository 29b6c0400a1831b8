"""FHIR batch Bundles at POST /fhir/{source}: each entry booked or changed on its own against the
sandbox over real HTTP, each with its own outcome, exactly once per entry."""

from __future__ import annotations

import msgspec

from tests.conftest import VIDEO_VISIT, auth, corpus
from tests.fhir_validate import validate


def state(sandbox):
    return sandbox.app.state.sandbox


# a code system the Cerner maps have: a code it lacks is refused (one with no map would be left out)
CERNER_SERVICE_TYPES = "https://fhir.cerner.com/ec2458f2-1e24-41c8-b71b-0e701af7583d/codeSet/14249"


def appointment(minute: int, ident: str) -> dict:
    data = msgspec.json.decode(corpus(VIDEO_VISIT))
    del data["id"]  # Cerner's own id: an update's body may carry only the appointment's
    data["start"], data["end"] = f"2026-12-01T13:{minute:02d}:00Z", f"2026-12-01T13:{minute + 15:02d}:00Z"
    data["identifier"] = [{"system": "urn:oid:1.2.3", "value": ident}]
    return data


def bundle(*entries: dict, kind: str = "batch") -> bytes:
    return msgspec.json.encode({"resourceType": "Bundle", "type": kind, "entry": list(entries)})


def post(resource: dict) -> dict:
    return {"resource": resource, "request": {"method": "POST", "url": "Appointment"}}


async def test_each_entry_gets_its_own_outcome_and_a_retry_books_nothing_twice(gateway, sandbox):
    body = bundle(post(appointment(0, "b-1")), post(appointment(30, "b-2")),
                  {"resource": appointment(40, "b-3"), "request": {"method": "GET", "url": "Appointment"}},
                  post({**appointment(10, "b-4"), "serviceType": [{"coding": [{"system": CERNER_SERVICE_TYPES, "code": "?"}]}]}))
    r = await gateway.post("/fhir/cerner", content=body, headers=auth(**{"Idempotency-Key": "batch-1"}))
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["resourceType"], out["type"]) == ("Bundle", "batch-response")
    statuses = [e["response"]["status"] for e in out["entry"]]
    # a GET is no interaction the gateway takes in a batch: 405, not-supported
    assert statuses == ["201 Created", "201 Created", "405 Method Not Allowed", "422 Unprocessable Entity"]
    booked = {a.id for a in state(sandbox).appointments()}
    assert {out["entry"][0]["resource"]["id"], out["entry"][1]["resource"]["id"]} == booked
    location = f"{gateway.base_url}/fhir/cerner/Appointment/{out['entry'][0]['resource']['id']}"
    assert out["entry"][0]["response"]["location"] == location == out["entry"][0]["fullUrl"]
    assert out["entry"][2]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    again = (await gateway.post("/fhir/cerner", content=body, headers=auth(**{"Idempotency-Key": "batch-1"}))).json()
    assert [e.get("resource") for e in again["entry"][:2]] == [e.get("resource") for e in out["entry"][:2]]
    assert len(state(sandbox).appointments()) == 2  # the retried batch booked nothing again


async def test_a_batch_cancels_by_identifier_what_an_earlier_one_booked(gateway, sandbox):
    first = (await gateway.post("/fhir/cerner", content=bundle(post(appointment(0, "c-1"))), headers=auth())).json()
    sf_id = first["entry"][0]["resource"]["id"]
    cancel = {"resource": {**appointment(0, "c-1"), "status": "cancelled"},
              "request": {"method": "PUT", "url": "Appointment?identifier=urn:oid:1.2.3|c-1"}}
    move = {"resource": appointment(0, "c-9"), "request": {"method": "PUT", "url": "Appointment/not-an-id"}}
    out = (await gateway.post("/fhir/cerner", content=bundle(cancel, move), headers=auth())).json()
    assert [e["response"]["status"] for e in out["entry"]] == ["200 OK", "404 Not Found"]
    assert out["entry"][0]["resource"]["status"] == "cancelled"
    assert state(sandbox).get(sf_id).status == "Cancelled"


async def test_a_transaction_or_a_non_bundle_is_refused_whole(gateway, sandbox):
    r = await gateway.post("/fhir/cerner", content=bundle(post(appointment(0, "t-1")), kind="transaction"), headers=auth())
    assert r.status_code == 422 and r.json()["issue"][0]["expression"] == ["Bundle.type"]
    r = await gateway.post("/fhir/cerner", content=corpus(VIDEO_VISIT), headers=auth())
    assert r.status_code == 400
    assert (await gateway.post("/fhir/cerner", content=bundle(), headers=auth("epic"))).status_code == 403
    assert state(sandbox).appointments() == []


async def test_entries_carry_their_full_url_and_unsupported_ones_are_405_not_supported(gateway, sandbox):
    """A batch-response entry holding an Appointment has `fullUrl`, absolute and equal to its
    `response.location`; an entry whose interaction the gateway does not take in a batch (a read, a
    search, a delete, another resource type, with or without a resource) is `405 Method Not
    Allowed` with a `not-supported` issue pointing at its request, and nothing is booked for it."""
    first = (await gateway.post("/fhir/cerner", content=bundle(post(appointment(0, "f-1"))), headers=auth())).json()
    sf_id = first["entry"][0]["resource"]["id"]
    move = {"resource": {**appointment(15, "f-1"), "status": "booked", "id": sf_id},
            "request": {"method": "PUT", "url": f"Appointment/{sf_id}"}}
    unsupported = [
        {"request": {"method": "GET", "url": f"Appointment/{sf_id}"}},
        {"request": {"method": "GET", "url": "Slot?start=ge2026-12-01&start=le2026-12-02&actor=Practitioner/593923"}},
        {"request": {"method": "DELETE", "url": f"Appointment/{sf_id}"}},
        {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": appointment(30, "f-2"), "request": {"method": "PATCH", "url": f"Appointment/{sf_id}"}},
    ]
    r = await gateway.post("/fhir/cerner", content=bundle(move, *unsupported), headers=auth())
    assert r.status_code == 200, r.text
    out = validate(r.content, "Bundle")
    assert out["type"] == "batch-response"
    changed, *refused = out["entry"]
    assert changed["response"]["status"] == "200 OK", changed
    assert changed["fullUrl"] == changed["response"]["location"] == f"{gateway.base_url}/fhir/cerner/Appointment/{sf_id}"
    assert first["entry"][0]["fullUrl"] == changed["fullUrl"]
    for i, entry in enumerate(refused, start=1):
        assert entry["response"]["status"] == "405 Method Not Allowed", entry
        (issue,) = entry["response"]["outcome"]["issue"]
        assert (issue["code"], issue["expression"]) == ("not-supported", [f"Bundle.entry[{i}].request"])
        assert "fullUrl" not in entry and "resource" not in entry
    assert len(state(sandbox).appointments()) == 1
