"""FHIR's REST rules over real HTTP (gateway -> real Redis -> the Health Cloud sandbox): required
bindings, update by id, conditional update and create, versions and If-Match. Every FHIR body the
gateway answers here is validated by the suite's own R4 validator, and the sandbox's counters show
what reached Salesforce."""

from __future__ import annotations

import msgspec

from tests.conftest import VIDEO_VISIT, auth, corpus
from tests.fhir_validate import validate

SYSTEM = "urn:oid:1.2.3"


def state(sandbox):
    return sandbox.app.state.sandbox


def appointment(ident: str = "rest-1", minute: int = 0, **changes) -> dict:
    """The corpus's Cerner video visit, booked, with an identifier of its own and no id."""
    data = msgspec.json.decode(corpus(VIDEO_VISIT))
    data.pop("id")
    data.pop("cancelationReason")
    data.update(status="booked", identifier=[{"system": SYSTEM, "value": ident}],
                start=f"2026-12-01T13:{minute:02d}:00Z", end=f"2026-12-01T13:{minute + 15:02d}:00Z")
    data.update(changes)
    return data


def encode(data: dict) -> bytes:
    return msgspec.json.encode(data)


def refusal(r, status: int) -> list[dict]:
    """The issues of a refusal, once it is the status expected and a valid OperationOutcome."""
    assert r.status_code == status, r.text
    return validate(r.content, "OperationOutcome")["issue"]


def calls(sandbox) -> tuple[int, int, int]:
    c = state(sandbox).counters()
    return c.book_calls, c.update_calls, c.cancel_calls


# -- item 10: required bindings -------------------------------------------------------------------

async def test_a_status_outside_its_value_set_is_400_on_every_route(gateway, sandbox):
    """`"status": "not-a-status"` used to book (201); a participant status outside
    participationstatus too. Now each is a 400 naming the element, and nothing reaches Salesforce."""
    bad = appointment(status="not-a-status")
    bad_participant = appointment()
    bad_participant["participant"][2]["status"] = "maybe"
    parameters = {"resourceType": "Parameters", "parameter": [{"name": "appt-resource", "resource": bad}]}
    for path, body, where in (
        ("/fhir/cerner/Appointment", bad, "Appointment.status"),
        ("/fhir/cerner/Appointment", bad_participant, "Appointment.participant[2].status"),
        ("/fhir/epic/Appointment/$book", parameters, "Parameters.parameter[0].resource.status"),
        ("/fhir/fhir/Appointment/$translate", bad, "Appointment.status"),
    ):
        source = path.split("/")[2]
        r = await gateway.post(path, content=encode(body), headers=auth(source))
        [issue] = refusal(r, 400)
        assert (issue["code"], issue["expression"]) == ("code-invalid", [where]), path
    booked = await gateway.post("/fhir/cerner/Appointment", content=encode(appointment()), headers=auth())
    assert booked.status_code == 201
    sf_id = booked.json()["id"]
    r = await gateway.put(f"/fhir/cerner/Appointment/{sf_id}", content=encode(appointment(status="not-a-status", id=sf_id)),
                          headers=auth())
    assert refusal(r, 400)[0]["expression"] == ["Appointment.status"]
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": appointment("rest-2", 30, status="not-a-status"), "request": {"method": "POST", "url": "Appointment"}}]}
    r = await gateway.post("/fhir/cerner", content=encode(batch), headers=auth())
    assert r.status_code == 200
    [entry] = validate(r.content, "Bundle")["entry"]
    assert entry["response"]["status"].startswith("400")
    assert entry["response"]["outcome"]["issue"][0]["expression"] == ["Appointment.status"]
    assert calls(sandbox) == (1, 0, 0)  # the one good booking
    assert [a.id for a in state(sandbox).appointments()] == [sf_id]


# -- item 8: update by id -------------------------------------------------------------------------

async def book(gateway, data: dict | None = None, **headers: str):
    r = await gateway.post("/fhir/cerner/Appointment", content=encode(data or appointment()), headers=auth(**headers))
    assert r.status_code == 201, r.text
    validate(r.content, "Appointment")
    return r


async def test_an_update_whose_body_id_is_not_the_urls_is_400_and_changes_nothing(gateway, sandbox):
    """FHIR's update: the body's id must be the URL's. A missing or other id used to reschedule
    (200); now 400 naming Appointment.id, nothing stored, nothing sent."""
    sf_id = (await book(gateway)).json()["id"]
    moved = appointment(minute=30)
    for body in (moved, {**moved, "id": "4817572"}):  # none; the EHR's own id
        r = await gateway.put(f"/fhir/cerner/Appointment/{sf_id}", content=encode(body), headers=auth())
        [issue] = refusal(r, 400)
        assert issue["expression"] == ["Appointment.id"], issue
    # a conditional update: an id, if sent, is the one the identifier finds
    r = await gateway.put(f"/fhir/cerner/Appointment?identifier={SYSTEM}|rest-1", content=encode({**moved, "id": "4817572"}),
                          headers=auth())
    assert refusal(r, 400)[0]["expression"] == ["Appointment.id"]
    # an update's body is the Appointment, not $book Parameters around one
    parameters = {"resourceType": "Parameters", "parameter": [{"name": "appt-resource", "resource": {**moved, "id": sf_id}}]}
    r = await gateway.put(f"/fhir/cerner/Appointment/{sf_id}", content=encode(parameters), headers=auth())
    assert refusal(r, 400)[0]["expression"] == ["resourceType"]
    # and in a batch entry, the same rule
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": moved, "request": {"method": "PUT", "url": f"Appointment/{sf_id}"}}]}
    r = await gateway.post("/fhir/cerner", content=encode(batch), headers=auth())
    [entry] = validate(r.content, "Bundle")["entry"]
    assert entry["response"]["status"].startswith("400")
    assert entry["response"]["outcome"]["issue"][0]["expression"] == ["Appointment.id"]
    assert calls(sandbox) == (1, 0, 0)
    assert state(sandbox).get(sf_id).request["startDate"] == "2026-12-01T13:00:00Z"
    # with the id, by id and by identifier, the update goes through
    r = await gateway.put(f"/fhir/cerner/Appointment/{sf_id}", content=encode({**moved, "id": sf_id}), headers=auth())
    assert r.status_code == 200 and validate(r.content, "Appointment")["start"] == "2026-12-01T13:30:00Z"
    r = await gateway.put(f"/fhir/cerner/Appointment?identifier={SYSTEM}|rest-1",
                          content=encode({**appointment(minute=40), "id": sf_id}), headers=auth())
    assert r.status_code == 200 and validate(r.content, "Appointment")["id"] == sf_id
    assert calls(sandbox) == (1, 2, 0)
