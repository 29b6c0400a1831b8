"""FHIR's REST rules over real HTTP (gateway -> real Redis -> the Health Cloud sandbox): required
bindings, update by id, conditional update and create, versions and If-Match. Every FHIR body the
gateway answers here is validated by the suite's own R4 validator, and the sandbox's counters show
what reached Salesforce."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

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
    start = datetime(2026, 12, 1, 13, tzinfo=timezone.utc) + timedelta(minutes=minute)
    data.update(status="booked", identifier=[{"system": SYSTEM, "value": ident}],
                start=start.strftime("%Y-%m-%dT%H:%M:%SZ"), end=(start + timedelta(minutes=15)).strftime("%Y-%m-%dT%H:%M:%SZ"))
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


# -- item 9: conditional update and create, versions ----------------------------------------------

async def test_a_conditional_update_matching_several_appointments_is_412(gateway, sandbox):
    """`identifier=value` (no bar) matches that value under any system: two appointments booked with
    it under two systems are two matches, 412, nothing changed (it used to find neither: 404). And
    one system|value booked twice (two Idempotency-Keys) used to change the last one silently."""
    a = (await book(gateway, appointment("dup-1", 0), **{"Idempotency-Key": "a"})).json()["id"]
    b = (await book(gateway, appointment("dup-1", 20, identifier=[{"system": "urn:oid:9.9", "value": "dup-1"}]),
                    **{"Idempotency-Key": "b"})).json()["id"]
    c = (await book(gateway, appointment("dup-2", 40), **{"Idempotency-Key": "c"})).json()["id"]
    d = (await book(gateway, appointment("dup-2", 50), **{"Idempotency-Key": "d"})).json()["id"]
    cancel = appointment("dup-1", status="cancelled")
    for query in ("dup-1", f"{SYSTEM}|dup-2"):
        r = await gateway.put(f"/fhir/cerner/Appointment?identifier={query}", content=encode(cancel), headers=auth())
        [issue] = refusal(r, 412)
        assert (issue["code"], issue["location"]) == ("multiple-matches", ["http.identifier"]), query
    assert calls(sandbox) == (4, 0, 0)
    assert {state(sandbox).get(i).status for i in (a, b, c, d)} == {"Scheduled"}
    # one system names one of them; `|value` (no system) names none of these
    r = await gateway.put("/fhir/cerner/Appointment?identifier=urn:oid:9.9|dup-1", content=encode(cancel), headers=auth())
    assert r.status_code == 200 and validate(r.content, "Appointment")["id"] == b
    r = await gateway.put("/fhir/cerner/Appointment?identifier=|dup-1", content=encode(cancel), headers=auth())
    assert refusal(r, 404)[0]["location"] == ["http.identifier"]
    assert calls(sandbox) == (4, 0, 1) and state(sandbox).get(a).status == "Scheduled"


async def test_a_conditional_create_answers_the_appointment_booked_and_books_nothing(gateway, sandbox, redis_url, prefix):
    """If-None-Exist: identifier=system|value. The header used to be ignored: a second booking with
    that identifier (another key, other times) booked a second appointment. Now: 200 with the
    appointment as booked (its answer, kept sealed in its record), no Salesforce call; none
    matching books (201); two matching, 412."""
    import redis.asyncio as aredis

    first = await book(gateway, appointment("cc-1", 0), **{"Idempotency-Key": "cc-a"})
    again = appointment("cc-1", 30)
    r = await gateway.post("/fhir/cerner/Appointment", content=encode(again),
                           headers=auth(**{"Idempotency-Key": "cc-b", "If-None-Exist": f"identifier={SYSTEM}|cc-1"}))
    assert r.status_code == 200, r.text
    assert r.content == first.content and validate(r.content, "Appointment")["id"] == first.json()["id"]
    assert (r.headers["location"], r.headers["etag"]) == (first.headers["location"], 'W/"1"')
    assert calls(sandbox) == (1, 0, 0)
    # the same through $book and in a batch entry
    parameters = {"resourceType": "Parameters", "parameter": [{"name": "appt-resource", "resource": again}]}
    r = await gateway.post("/fhir/cerner/Appointment/$book", content=encode(parameters),
                           headers=auth(**{"If-None-Exist": f"identifier={SYSTEM}%7Ccc-1"}))  # percent-encoded, as a query
    assert r.status_code == 200 and r.content == first.content
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": again, "request": {"method": "POST", "url": "Appointment", "ifNoneExist": f"identifier={SYSTEM}|cc-1"}},
        {"resource": appointment("cc-2", 40), "request": {"method": "POST", "url": "Appointment",
                                                          "ifNoneExist": f"identifier={SYSTEM}|cc-2"}}]}
    r = await gateway.post("/fhir/cerner", content=encode(batch), headers=auth())
    entries = validate(r.content, "Bundle")["entry"]
    assert [e["response"]["status"] for e in entries] == ["200 OK", "201 Created"]
    assert entries[0]["resource"] == first.json() and entries[0]["response"]["etag"] == 'W/"1"'
    assert calls(sandbox) == (2, 0, 0)  # only cc-2, which matched nothing, was booked
    # after a reschedule, "it" is the appointment as last answered, with its version
    sf_id = first.json()["id"]
    moved = await gateway.put(f"/fhir/cerner/Appointment/{sf_id}", content=encode({**appointment("cc-1", 10), "id": sf_id}),
                              headers=auth())
    assert moved.status_code == 200
    r = await gateway.post("/fhir/cerner/Appointment", content=encode(again),
                           headers=auth(**{"If-None-Exist": f"identifier={SYSTEM}|cc-1"}))
    assert r.status_code == 200 and r.content == moved.content and r.headers["etag"] == 'W/"2"'
    # the kept answer names the patient: sealed at rest
    client = aredis.Redis.from_url(redis_url)
    try:
        kept = await client.hget(f"{prefix}:appointment:{{cerner:{sf_id}}}", "a")
    finally:
        await client.aclose()
    assert kept and b"12724066" not in kept and b"Patient" not in kept
    # two appointments under the value (any system): 412; unsupported parameters: 400
    await book(gateway, appointment("cc-1", 50, identifier=[{"system": "urn:oid:9.9", "value": "cc-1"}]))
    r = await gateway.post("/fhir/cerner/Appointment", content=encode(again), headers=auth(**{"If-None-Exist": "identifier=cc-1"}))
    [issue] = refusal(r, 412)
    assert (issue["code"], issue["location"]) == ("multiple-matches", ["http.If-None-Exist"])
    for header in ("_id=08pxx0000000001AAA", f"identifier={SYSTEM}|cc-1&status=booked", "identifier=", "cc-1",
                   f"identifier={SYSTEM}|cc-1&identifier={SYSTEM}|cc-2"):
        r = await gateway.post("/fhir/cerner/Appointment", content=encode(again), headers=auth(**{"If-None-Exist": header}))
        assert refusal(r, 400)[0]["location"] == ["http.If-None-Exist"], header
    assert calls(sandbox) == (3, 1, 0)


async def test_versions_are_etags_and_a_stale_if_match_is_412(gateway, sandbox):
    """Each answer carries the appointment's version (`ETag: W/"n"`, `meta.versionId`): 1 when
    booked, one more per change. If-Match used to be ignored (a stale one changed the appointment);
    now a version other than the current one is 412 and nothing is sent."""
    first = await book(gateway)
    sf_id = first.json()["id"]
    assert first.headers["etag"] == 'W/"1"' and first.json()["meta"] == {"versionId": "1"}
    replay = await gateway.post("/fhir/cerner/Appointment", content=encode(appointment()), headers=auth())
    assert replay.content == first.content and replay.headers["etag"] == 'W/"1"'
    path = f"/fhir/cerner/Appointment/{sf_id}"
    moved = await gateway.put(path, content=encode({**appointment(minute=30), "id": sf_id}), headers=auth(**{"If-Match": 'W/"1"'}))
    assert moved.status_code == 200 and moved.headers["etag"] == 'W/"2"'
    assert validate(moved.content, "Appointment")["meta"] == {"versionId": "2"}
    stale = await gateway.put(path, content=encode({**appointment(minute=40), "id": sf_id}), headers=auth(**{"If-Match": 'W/"1"'}))
    [issue] = refusal(stale, 412)
    assert issue["location"] == ["http.If-Match"] and 'W/"2"' in issue["details"]["text"]
    assert calls(sandbox) == (1, 1, 0) and state(sandbox).get(sf_id).request["startDate"] == "2026-12-01T13:30:00Z"
    # a strong tag, a list, `*`: any that names the current version goes through; not an ETag: 400
    # (each another change: the same change again would be a replay of its first answer)
    for minute, (header, expected) in enumerate((('"2"', 200), ('W/"7", W/"3"', 200), ("*", 200), ("4", 400),
                                                 ('W/"abc", W/"1"', 412))):
        r = await gateway.put(path, content=encode({**appointment(minute=41 + minute), "id": sf_id}),
                              headers=auth(**{"If-Match": header}))
        assert r.status_code == expected, (header, r.text)
        validate(r.content)
    # a retry of a change is its first answer, with its ETag, whatever the version now
    replayed = await gateway.put(path, content=encode({**appointment(minute=30), "id": sf_id}), headers=auth(**{"If-Match": 'W/"1"'}))
    assert replayed.content == moved.content and replayed.headers["etag"] == 'W/"2"'
    # by identifier and in a batch entry, the same (the appointment is at version 5 now)
    by_identifier = f"/fhir/cerner/Appointment?identifier={SYSTEM}|rest-1"
    r = await gateway.put(by_identifier, content=encode(appointment(status="cancelled")), headers=auth(**{"If-Match": 'W/"4"'}))
    assert refusal(r, 412)[0]["location"] == ["http.If-Match"]
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": appointment(status="cancelled"), "request": {"method": "PUT", "url": f"Appointment?identifier={SYSTEM}|rest-1",
                                                                 "ifMatch": 'W/"4"'}},
        {"resource": {**appointment(status="cancelled"), "id": sf_id}, "request": {"method": "PUT", "url": f"Appointment/{sf_id}",
                                                                                   "ifMatch": 'W/"5"'}}]}
    r = await gateway.post("/fhir/cerner", content=encode(batch), headers=auth())
    entries = validate(r.content, "Bundle")["entry"]
    assert [e["response"]["status"] for e in entries] == ["412 Precondition Failed", "200 OK"]
    assert entries[1]["response"]["etag"] == 'W/"6"' and entries[1]["resource"]["meta"] == {"versionId": "6"}
    assert calls(sandbox) == (1, 4, 1) and state(sandbox).get(sf_id).status == "Cancelled"


async def test_two_changes_on_one_version_one_wins(gateway, sandbox):
    """Two reschedules sent at once, each with If-Match of the version both read: the version is
    taken before Salesforce is called, atomically, so one goes through and the other is 412,
    however the two interleave."""
    import asyncio

    sf_id = (await book(gateway)).json()["id"]
    state(sandbox).faults.set(latency_ms=300)
    answers = await asyncio.gather(*(
        gateway.put(f"/fhir/cerner/Appointment/{sf_id}", content=encode({**appointment(minute=m), "id": sf_id}),
                    headers=auth(**{"If-Match": 'W/"1"'})) for m in (20, 40)))
    assert sorted(a.status_code for a in answers) == [200, 412]
    for a in answers:
        validate(a.content)
    assert calls(sandbox)[1] == 1


async def test_a_change_that_failed_keeps_its_version_for_its_retry(gateway, sandbox):
    """A change whose answer was lost may have been applied: its version stays taken, and its retry
    (same key) goes through with it; a change Salesforce certainly did not apply (over its limit)
    gives the version back, so If-Match of the old one still holds."""
    sf_id = (await book(gateway)).json()["id"]
    path, body = f"/fhir/cerner/Appointment/{sf_id}", encode({**appointment(minute=30), "id": sf_id})
    state(sandbox).faults.set(request_limit_exceeded=1)
    r = await gateway.put(path, content=body, headers=auth(**{"If-Match": 'W/"1"', "Idempotency-Key": "v-1"}))
    assert refusal(r, 503)
    state(sandbox).faults.set(server_error=1)
    r = await gateway.put(path, content=body, headers=auth(**{"If-Match": 'W/"1"', "Idempotency-Key": "v-2"}))
    assert r.status_code in (502, 503), r.text
    validate(r.content, "OperationOutcome")
    retried = await gateway.put(path, content=body, headers=auth(**{"If-Match": 'W/"1"', "Idempotency-Key": "v-2"}))
    assert retried.status_code == 200, retried.text
    assert retried.headers["etag"] == 'W/"2"' and validate(retried.content, "Appointment")["meta"]["versionId"] == "2"
    other = await gateway.put(path, content=body, headers=auth(**{"If-Match": 'W/"1"', "Idempotency-Key": "v-3"}))
    assert refusal(other, 412)


async def test_the_capability_statement_says_what_the_appointment_routes_honour(gateway):
    """It said `versioning: no-version` and `conditionalCreate: false`: no longer true."""
    r = await gateway.get("/fhir/cerner/metadata")
    [appointment_resource] = [res for res in validate(r.content, "CapabilityStatement")["rest"][0]["resource"]
                              if res["type"] == "Appointment"]
    assert (appointment_resource["versioning"], appointment_resource["conditionalCreate"],
            appointment_resource["conditionalUpdate"]) == ("versioned-update", True, True)


async def test_without_a_data_key_no_answer_is_kept_and_a_match_says_where_it_is(settings, sandbox, monkeypatch,
                                                                                 redis_url, prefix):
    """A gateway with no data key keeps nothing of the patient's: a conditional create that matches
    is then a 200 informational OperationOutcome with the appointment's Location and ETag."""
    import redis.asyncio as aredis

    from tests.conftest import serve_gateway

    monkeypatch.delenv("EHR_GATEWAY_DATA_KEY")
    async with serve_gateway(settings) as gw:
        first = await book(gw, appointment("nk-1"))
        r = await gw.post("/fhir/cerner/Appointment", content=encode(appointment("nk-1", 30)),
                          headers=auth(**{"If-None-Exist": f"identifier={SYSTEM}|nk-1"}))
    assert r.status_code == 200 and r.headers["location"] == first.headers["location"] and r.headers["etag"] == 'W/"1"'
    [issue] = validate(r.content, "OperationOutcome")["issue"]
    assert (issue["severity"], issue["code"]) == ("information", "informational")
    assert calls(sandbox) == (1, 0, 0)
    client = aredis.Redis.from_url(redis_url)
    try:
        record = await client.hgetall(f"{prefix}:appointment:{{cerner:{first.json()['id']}}}")
    finally:
        await client.aclose()
    assert (record[b"st"], record[b"v"], record[b"a"]) == (b"booked", b"1", b"")
