"""Reschedules and cancellations (PUT), end to end: gateway -> real Redis -> the Health Cloud sandbox
over real HTTP. By the Salesforce id the booking was answered with, or by the EHR's own identifier
(FHIR's conditional update), exactly once per idempotency key, and never out of a cancellation."""

from __future__ import annotations

import msgspec
import redis.asyncio as aredis

from tests.conftest import VIDEO_VISIT, auth, corpus

IDENTIFIER = "urn:oid:1.2.3|appt-4817572"  # the corpus booking's identifier is replaced by this one


def state(sandbox):
    return sandbox.app.state.sandbox


def appointment(**changes) -> dict:
    data = msgspec.json.decode(corpus(VIDEO_VISIT))
    del data["id"]  # Cerner's own id: an update's body carries the appointment's (see `put`)
    data["identifier"] = [{"system": "urn:oid:1.2.3", "value": "appt-4817572"}]
    data["status"] = "booked"
    data.pop("cancelationReason", None)
    data.update(changes)
    return data


async def book(gateway, data: dict | None = None) -> str:
    r = await gateway.post("/fhir/cerner/Appointment", content=msgspec.json.encode(data or appointment()), headers=auth())
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def put(gateway, path: str, data: dict, **headers: str):
    """By id, the body carries that id (FHIR's update); by identifier, none."""
    if "?" not in path:
        data = {**data, "id": path.rsplit("/", 1)[1]}
    return await gateway.put(path, content=msgspec.json.encode(data), headers=auth(**headers))


async def test_a_reschedule_by_salesforce_id_moves_the_appointment(gateway, sandbox):
    sf_id = await book(gateway)
    moved = appointment(start="2026-12-01T15:00:00Z", end="2026-12-01T15:30:00Z")
    r = await put(gateway, f"/fhir/cerner/Appointment/{sf_id}", moved)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["id"], body["status"], body["start"]) == (sf_id, "booked", "2026-12-01T15:00:00Z")
    assert r.headers["location"] == f"{gateway.base_url}/fhir/cerner/Appointment/{sf_id}"
    stored = state(sandbox).get(sf_id)
    assert stored.status == "Scheduled" and stored.request["startDate"] == "2026-12-01T15:00:00Z"
    assert stored.request["id"] == sf_id and len(state(sandbox).appointments()) == 1
    assert state(sandbox).counters().update_calls == 1


async def test_a_cancellation_by_identifier_maps_its_reason_and_is_sent_once(gateway, sandbox):
    sf_id = await book(gateway)
    cancelled = appointment(status="cancelled", cancelationReason=msgspec.json.decode(corpus(VIDEO_VISIT))["cancelationReason"])
    first = await put(gateway, f"/fhir/cerner/Appointment?identifier={IDENTIFIER}", cancelled, **{"Idempotency-Key": "cx-1"})
    assert first.status_code == 200, first.text
    assert (first.json()["id"], first.json()["status"]) == (sf_id, "cancelled")
    stored = state(sandbox).get(sf_id)
    # the HL7 coding maps through config/codemaps/cerner/cancellation-reasons.json; Millennium's own
    # code set 14229 has no group, so its coding is ignored
    assert stored.status == "Cancelled" and stored.cancellation_reason == "Scheduled in Error"
    again = await put(gateway, f"/fhir/cerner/Appointment?identifier={IDENTIFIER}", cancelled, **{"Idempotency-Key": "cx-1"})
    assert again.status_code == 200 and again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert state(sandbox).counters().cancel_calls == 1


async def test_a_reason_with_no_mapped_coding_is_sent_as_its_text(gateway, sandbox):
    sf_id = await book(gateway)
    reason = {"coding": [{"system": "https://example.org/reasons", "code": "x1"}], "text": "Family emergency"}
    r = await put(gateway, f"/fhir/cerner/Appointment/{sf_id}", appointment(status="cancelled", cancelationReason=reason))
    assert r.status_code == 200, r.text
    assert state(sandbox).get(sf_id).cancellation_reason == "Family emergency"


async def test_a_cancelled_appointment_cannot_be_rescheduled(gateway, sandbox):
    sf_id = await book(gateway)
    assert (await put(gateway, f"/fhir/cerner/Appointment/{sf_id}", appointment(status="cancelled"))).status_code == 200
    r = await put(gateway, f"/fhir/cerner/Appointment/{sf_id}", appointment(start="2026-12-02T09:00:00Z", end="2026-12-02T09:15:00Z"))
    assert r.status_code == 422 and r.json()["issue"][0]["code"] == "business-rule"
    assert r.json()["issue"][0]["expression"] == ["Appointment.status"]
    assert state(sandbox).get(sf_id).status == "Cancelled" and state(sandbox).counters().update_calls == 0


async def test_statuses_salesforce_cannot_take_are_422(gateway, sandbox):
    sf_id = await book(gateway)
    r = await put(gateway, f"/fhir/cerner/Appointment/{sf_id}", appointment(status="arrived"))
    assert r.status_code == 422 and r.json()["issue"][0]["code"] == "not-supported"
    counters = state(sandbox).counters()
    assert (counters.update_calls, counters.cancel_calls) == (0, 0)


async def test_unknown_appointments_are_404_and_nothing_is_asked_of_salesforce(gateway, sandbox):
    await book(gateway)
    answers = []
    for path in ("/fhir/cerner/Appointment/08pxx0000009999AAA",  # well formed, not booked here
                 "/fhir/cerner/Appointment/not-an-id",
                 "/fhir/cerner/Appointment?identifier=urn:oid:1.2.3|someone-else"):
        r = await put(gateway, path, appointment(status="cancelled", start="2026-12-03T09:00:00Z", end="2026-12-03T09:15:00Z"))
        assert r.status_code == 404, (path, r.text)
        answers.append(r.json()["issue"])
    assert answers[0] == answers[1]  # a well-formed id tells nothing more than a malformed one
    counters = state(sandbox).counters()
    assert (counters.cancel_calls, counters.appointment_queries) == (0, 0)  # the gateway's records decide


async def test_a_missing_link_is_404_not_an_org_wide_look_up(gateway, sandbox, redis_url, prefix):
    """Without its link the identifier names nothing this source booked: no ServiceAppointment look-up
    by patient, facility and times (which would find, and change, any source's appointment)."""
    sf_id = await book(gateway)
    client = aredis.Redis.from_url(redis_url)
    try:
        links = [k async for k in client.scan_iter(match=f"{prefix}:ids:*", count=1000)]
        # the link, keyed by a digest of the value; its member: a digest of the system, and the id
        assert len(links) == 1 and [m.decode().split("|")[1] for m in await client.hkeys(links[0])] == [sf_id]
        await client.delete(*links)
    finally:
        await client.aclose()
    r = await put(gateway, f"/fhir/cerner/Appointment?identifier={IDENTIFIER}", appointment(status="cancelled"))
    assert r.status_code == 404, r.text
    assert state(sandbox).get(sf_id).status == "Scheduled" and state(sandbox).counters().appointment_queries == 0
    # the appointment's own record still says cerner booked it: by its id, cerner may cancel it
    r = await put(gateway, f"/fhir/cerner/Appointment/{sf_id}", appointment(status="cancelled"))
    assert r.status_code == 200 and state(sandbox).get(sf_id).status == "Cancelled"


async def test_a_conditional_update_needs_one_identifier(gateway, sandbox):
    for query in ("", "?identifier=", "?identifier=a|1&identifier=b|2"):
        r = await put(gateway, f"/fhir/cerner/Appointment{query}", appointment(status="cancelled"))
        assert r.status_code == 400, (query, r.text)
        assert r.json()["issue"][0]["location"] == ["http.identifier"]


async def test_a_reused_key_with_another_change_is_422(gateway, sandbox):
    sf_id = await book(gateway)
    path = f"/fhir/cerner/Appointment/{sf_id}"
    first = await put(gateway, path, appointment(start="2026-12-01T15:00:00Z", end="2026-12-01T15:30:00Z"), **{"Idempotency-Key": "mv-1"})
    assert first.status_code == 200
    other = await put(gateway, path, appointment(start="2026-12-01T16:00:00Z", end="2026-12-01T16:30:00Z"), **{"Idempotency-Key": "mv-1"})
    assert other.status_code == 422 and state(sandbox).counters().update_calls == 1


async def test_a_change_salesforce_failed_is_sent_again_on_the_retry(gateway, sandbox):
    """Salesforce's Update and Cancel are idempotent, so a change whose call failed (a 5xx: it may or
    may not have been applied) is simply sent again by the EHR's retry, and the retry's answer is
    the first success's."""
    sf_id = await book(gateway)
    cancel = appointment(status="cancelled")
    state(sandbox).faults.set(server_error=1)
    failed = await put(gateway, f"/fhir/cerner/Appointment/{sf_id}", cancel, **{"Idempotency-Key": "cx-5xx"})
    assert failed.status_code in (502, 503) and "retry-after" in failed.headers
    assert state(sandbox).get(sf_id).status == "Scheduled"
    done = await put(gateway, f"/fhir/cerner/Appointment/{sf_id}", cancel, **{"Idempotency-Key": "cx-5xx"})
    assert done.status_code == 200 and "idempotent-replayed" not in done.headers
    again = await put(gateway, f"/fhir/cerner/Appointment/{sf_id}", cancel, **{"Idempotency-Key": "cx-5xx"})
    assert again.content == done.content and again.headers["idempotent-replayed"] == "true"
    assert state(sandbox).get(sf_id).status == "Cancelled" and state(sandbox).counters().cancel_calls == 2


async def test_changes_show_in_the_request_log_as_what_they_did(gateway, sandbox):
    from tests.test_admin import wait_for_entries

    sf_id = await book(gateway)
    await put(gateway, f"/fhir/cerner/Appointment/{sf_id}", appointment(start="2026-12-01T15:00:00Z", end="2026-12-01T15:30:00Z"))
    await put(gateway, f"/fhir/cerner/Appointment/{sf_id}", appointment(status="cancelled"))
    entries = await wait_for_entries(gateway, 3, source="cerner")
    assert [(e["op"], e["outcome"], e["sf_id"]) for e in entries[:2]] == [
        ("change", "cancelled", sf_id), ("change", "rescheduled", sf_id)]  # newest first
    assert "patient" not in entries[0]  # an admin key's view: no patient data


async def test_links_and_records_written_before_versions_are_still_read(gateway, sandbox, redis_url, prefix):
    """An appointment booked by the version before this one has a string link per system|value and
    a status string: both are still read (as version 1), and its first change writes the new record."""
    import hashlib

    sf_id = await book(gateway)
    client = aredis.Redis.from_url(redis_url)
    try:
        await client.delete(*[k async for k in client.scan_iter(match=f"{prefix}:ids:*", count=1000)],
                            f"{prefix}:appointment:{{cerner:{sf_id}}}")
        digest = hashlib.sha256(f"cerner\0{IDENTIFIER}".encode()).hexdigest()[:40]
        await client.set(f"{prefix}:link:{{cerner:{digest}}}", sf_id)
        await client.set(f"{prefix}:appt:{{cerner:{sf_id}}}", "booked")
        moved = appointment(start="2026-12-01T15:00:00Z", end="2026-12-01T15:30:00Z")
        r = await put(gateway, f"/fhir/cerner/Appointment?identifier={IDENTIFIER}", moved, **{"If-Match": 'W/"1"'})
        assert r.status_code == 200 and r.headers["etag"] == 'W/"2"', r.text
        assert (await client.hget(f"{prefix}:appointment:{{cerner:{sf_id}}}", "v")) == b"2"
        r = await put(gateway, f"/fhir/cerner/Appointment/{sf_id}", appointment(status="cancelled"))
        assert r.status_code == 200 and r.headers["etag"] == 'W/"3"'
    finally:
        await client.aclose()
    assert state(sandbox).get(sf_id).status == "Cancelled"
