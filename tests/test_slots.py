"""Slot search end to end: FHIR search parameters -> the source's code maps -> the sandbox's Get
Slots over real HTTP -> a FHIR searchset Bundle whose Slot ids book."""

from __future__ import annotations

from urllib.parse import urlencode

import msgspec
import pytest

from gateway.salesforce.client import read_slots
from gateway.salesforce.wire import SlotResource, SlotsRequest
from tests.conftest import VIDEO_VISIT, auth, corpus, visit_records
from tests.fhir_validate import validate

VIDEO = "https://fhir.cerner.com/ec2458f2-1e24-41c8-b71b-0e701af7583d/codeSet/14249|2572307911"
DAY = "2026-12-01"


def state(sandbox):
    return sandbox.app.state.sandbox


def query(**extra) -> str:
    params = [("start", f"ge{DAY}T09:00:00Z"), ("start", f"le{DAY}T11:00:00Z"), ("service-type", VIDEO),
              ("actor", "Practitioner/593923"), ("actor", "Location/21304876")]
    params = [(k, v) for k, v in params if k not in extra] + [(k, v) for k, vs in extra.items() for v in vs]
    return "/fhir/cerner/Slot?" + urlencode(params)


async def test_free_slots_come_back_as_a_searchset_of_slots(gateway, sandbox):
    r = await gateway.get(query(), headers=auth())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    bundle = r.json()
    assert (bundle["resourceType"], bundle["type"]) == ("Bundle", "searchset")
    slots = [e["resource"] for e in bundle["entry"]]
    # the sandbox's working day starts at 09:00 UTC with 30-minute slots: four in two hours
    assert [(s["start"], s["end"]) for s in slots] == [
        (f"{DAY}T09:00:00Z", f"{DAY}T09:30:00Z"), (f"{DAY}T09:30:00Z", f"{DAY}T10:00:00Z"),
        (f"{DAY}T10:00:00Z", f"{DAY}T10:30:00Z"), (f"{DAY}T10:30:00Z", f"{DAY}T11:00:00Z")]
    assert bundle["total"] == 4 and all(s["resourceType"] == "Slot" and s["status"] == "free" for s in slots)
    assert all(e["fullUrl"].endswith(f"/fhir/cerner/Slot/{e['resource']['id']}") for e in bundle["entry"])
    assert slots[0]["schedule"] == {"display": "Practitioner/593923"}
    assert state(sandbox).counters().slots_calls == 1  # one Get Slots call


async def test_salesforces_documented_answer_is_read_and_the_searchset_is_valid_fhir(gateway, sandbox):
    """The sandbox answers Get Slots as salesforce.md documents it (resourceSlotDetails); each slot
    belongs to the resource its entry names, with the type the search asked for."""
    state(sandbox).org.add_device("cerner", "DV-7", "Sandbox pump DV-7")  # the org holds the device too
    r = await gateway.get(query(actor=["Practitioner/593923", "Device/DV-7", "Location/21304876"]), headers=auth())
    assert r.status_code == 200, r.text
    bundle = validate(r.content, "Bundle")
    sent = state(sandbox).counters().slots_calls
    assert sent == 1
    actors = [e["resource"]["schedule"]["display"] for e in bundle["entry"]]
    assert actors == ["Practitioner/593923"] * 4 + ["Device/DV-7"] * 4
    assert all(e["search"]["mode"] == "match" for e in bundle["entry"]) and bundle["total"] == 8
    assert len({e["resource"]["id"] for e in bundle["entry"]}) == 8


@pytest.mark.parametrize("sandbox_config", [{"slot_times": "zoneless", "answer_shape": "array"}], indirect=True)
async def test_times_without_a_zone_are_read_as_utc_and_said_so(gateway, sandbox):
    r = await gateway.get(query(), headers=auth())
    assert r.status_code == 200, r.text
    bundle = validate(r.content, "Bundle")
    slots = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "match"]
    assert [(s["start"], s["end"]) for s in slots][0] == (f"{DAY}T09:00:00Z", f"{DAY}T09:30:00Z")
    assert bundle["total"] == len(slots) == 4
    (outcome,) = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["severity"] == "warning"
    assert "4 slot(s)" in outcome["issue"][0]["details"]["text"] and "UTC" in outcome["issue"][0]["details"]["text"]


_SEARCH = SlotsRequest(resources=(SlotResource(resourceId="PR-1", resourceType="Provider"),
                                  SlotResource(resourceId="0bSxx0000000001AAA", resourceType="Device")),
                       startDate="2030-01-07T00:00:00Z", endDate="2030-01-08T00:00:00Z")


def test_the_answer_is_read_leniently():
    """Keys in any case, an object or a one-element array; a slot that cannot be read, or an entry
    naming a resource the search did not ask for, is left out and counted, not a failure of all."""
    answer = {"ResourceSlotDetails": [
        {"RESOURCEID": "PR-1", "availableslots": [
            {"slotId": "s1", "slotStartDate": "2030-01-07T09:00:00Z", "slotEndDate": "2030-01-07T09:30:00Z",
             "sourceSystem": None, "somethingNew": "ignored"},
            {"slotId": "s2"},  # no times
            "not an object",
            {"slotId": "s3", "slotStartDate": "2030-01-07T10:00:00Z", "slotEndDate": "2030-01-07T09:30:00Z"},
            {"slotId": "s4", "slotStartDate": "2030-01-07", "slotEndDate": "2030-01-07T09:30:00Z"},
            {"slotId": 5, "slotStartDate": "2030-01-07T11:00:00Z", "slotEndDate": "2030-01-07T11:30:00Z"}]},
        # the 15-letter form of the Device's id: the same record
        {"resourceId": "0bSxx0000000001", "availableSlots": [
            {"slotid": "d1", "SLOTSTARTDATE": "2030-01-07T09:00:00+02:00", "slotEndDate": "2030-01-07T09:30:00+02:00"}]},
        {"resourceId": "PR-UNASKED", "availableSlots": [
            {"slotId": "u1", "slotStartDate": "2030-01-07T09:00:00Z", "slotEndDate": "2030-01-07T09:30:00Z"}]},
    ]}
    for payload in (answer, [answer]):
        found = read_slots(payload, _SEARCH)
        assert found is not None
        assert [(s.id, s.resource_type, s.resource_id, s.zone_assumed) for s in found.slots] == [
            ("s1", "Provider", "PR-1", False), ("d1", "Device", "0bSxx0000000001AAA", False)]
        assert found.slots[1].start.utcoffset().total_seconds() == 7200
        assert found.unread == 6
    zoneless = read_slots({"resourceSlotDetails": [{"resourceId": "PR-1", "availableSlots": [
        {"slotId": "z", "slotStartDate": "2025-07-14T00:12:00.7912", "slotEndDate": "2025-07-14T00:42:00.7912"}]}]}, _SEARCH)
    (slot,) = zoneless.slots
    assert slot.zone_assumed and slot.start.isoformat() == "2025-07-14T00:12:00.791200+00:00"


@pytest.mark.parametrize("payload", [
    None, [], [{}, {}], {"slots": []}, {"resourceSlotDetails": "none"}, {"isSuccess": False, "resourceSlotDetails": []},
])
def test_what_is_not_get_slots_answer_is_not_read_as_one(payload):
    assert read_slots(payload, _SEARCH) is None


async def test_a_slot_found_books_and_is_then_taken(gateway, sandbox):
    first = (await gateway.get(query(), headers=auth())).json()["entry"][0]["resource"]
    data = msgspec.json.decode(corpus(VIDEO_VISIT))
    data.update(start=first["start"], end=first["end"], slot=[{"reference": f"Slot/{first['id']}"}])
    booked = await gateway.post("/fhir/cerner/Appointment", content=msgspec.json.encode(data), headers=auth())
    assert booked.status_code == 201, booked.text
    stored = state(sandbox).get(booked.json()["id"])
    assert stored.request["slots"] == [{"id": first["id"], "reference": visit_records(sandbox)["Practitioner"]}]
    again = (await gateway.get(query(), headers=auth())).json()
    assert first["id"] not in {e["resource"]["id"] for e in again["entry"]} and again["total"] == 3


async def test_malformed_searches_are_400_and_name_the_parameter(gateway, sandbox):
    """The parameter is named in `location` (`http.` + its name, as R4 says for HTTP parts), not in
    `expression`, which is a FHIRPath into a resource."""
    cases = {
        "start": query(start=[f"ge{DAY}T09:00:00Z"]),  # no upper bound
        "actor": query(actor=["Patient/1"]),
        "service-type": query(**{"service-type": ["2572307911"]}),  # a code without its system
        "_count": query(_count=["-1"]),
        "_offset": query(_offset=["x"]),
    }
    for name, path in cases.items():
        r = await gateway.get(path, headers=auth())
        assert r.status_code == 400, (name, r.text)
        (issue,) = validate(r.content, "OperationOutcome")["issue"]
        assert issue["location"] == [f"http.{name}"] and "expression" not in issue, issue
    naive = await gateway.get(query(start=[f"ge{DAY}T09:00:00", f"le{DAY}T11:00:00Z"]), headers=auth())
    assert naive.status_code == 400  # a date-time without its offset
    assert state(sandbox).counters().slots_calls == 0


async def test_a_code_the_maps_refuse_is_422(gateway, sandbox):
    system = VIDEO.rpartition("|")[0]
    r = await gateway.get(query(**{"service-type": [f"{system}|999"]}), headers=auth())
    assert r.status_code == 422 and r.json()["issue"][0]["code"] == "code-invalid"
    assert r.json()["issue"][0]["expression"] == ["Slot.serviceType[0].coding[0]"]
    assert state(sandbox).counters().slots_calls == 0


async def test_a_search_needs_the_sources_key(gateway, sandbox):
    assert (await gateway.get(query())).status_code == 401
    assert (await gateway.get(query(), headers=auth("epic"))).status_code == 403


async def test_count_pages_the_answer_and_next_serves_the_rest(gateway, sandbox):
    """`_count` is the page size; `next` is an absolute link that works (it asks the same search
    again with `_offset` moved on: nothing is held between pages); `_count=0` is the total alone."""
    everything = [e["resource"]["id"] for e in (await gateway.get(query(), headers=auth())).json()["entry"]]
    assert len(everything) == 4
    first = await gateway.get(query(_count=["3"]), headers=auth())
    assert first.status_code == 200, first.text
    page = validate(first.content, "Bundle")
    assert page["total"] == 4 and [e["resource"]["id"] for e in page["entry"]] == everything[:3]
    links = {link["relation"]: link["url"] for link in page["link"]}
    assert set(links) == {"self", "next"} and links["next"].startswith(f"{gateway.base_url}/fhir/cerner/Slot?")
    second = await gateway.get(links["next"], headers=auth())
    assert second.status_code == 200, second.text
    rest = validate(second.content, "Bundle")
    assert rest["total"] == 4 and [e["resource"]["id"] for e in rest["entry"]] == everything[3:]
    assert [link["relation"] for link in rest["link"]] == ["self"]  # the last page
    summary = validate((await gateway.get(query(_count=["0"]), headers=auth())).content, "Bundle")
    assert summary["total"] == 4 and "entry" not in summary and [l["relation"] for l in summary["link"]] == ["self"]
    assert state(sandbox).counters().slots_calls == 4  # one Get Slots call per page


async def test_a_search_by_post_is_the_same_search(gateway, sandbox):
    """FHIR search by POST: `POST [base]/Slot/_search` with the parameters form-encoded (some may stay
    in the query) answers what the GET answers; any other body is 415, and nothing is asked of
    Salesforce for it."""
    by_get = await gateway.get(query(_count=["2"]), headers=auth())
    form = query(_count=["2"]).partition("?")[2]
    headers = {**auth(), "Content-Type": "application/x-www-form-urlencoded"}
    by_post = await gateway.post("/fhir/cerner/Slot/_search", content=form, headers=headers)
    assert by_post.status_code == 200, by_post.text
    assert validate(by_post.content, "Bundle") == by_get.json()
    assert by_post.headers["content-type"].startswith("application/fhir+json")
    head, _, tail = form.partition("&service-type")  # the bounds in the query, the rest in the body
    split = await gateway.post(f"/fhir/cerner/Slot/_search?{head}", content="service-type" + tail, headers=headers)
    assert split.status_code == 200 and split.json() == by_get.json(), split.text
    calls = state(sandbox).counters().slots_calls
    wrong = await gateway.post("/fhir/cerner/Slot/_search", content=b'{"start": "ge2026-12-01"}', headers=auth())
    assert wrong.status_code == 415 and validate(wrong.content, "OperationOutcome")["issue"][0]["code"] == "not-supported"
    unauthorised = await gateway.post("/fhir/cerner/Slot/_search", content=form,
                                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert unauthorised.status_code == 401
    assert state(sandbox).counters().slots_calls == calls
