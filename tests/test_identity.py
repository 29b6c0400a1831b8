"""Every participant a Salesforce record (issue 20, contract v3): the EHRs' ids found as the org's
records through the sandbox playing an org that refuses anything else, over real HTTP and MLLP.

What each test proves is in its name; the org's records are the sandbox's seed (gateway/sandbox/seed.py)
and what a test adds to it through the sandbox's control key, as an org's data loads would."""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aredis

from gateway.settings import IdentitySettings, Settings, SourceIdentity
from tests.conftest import (
    ADMIN_KEY,
    CONTROL_KEY,
    CORPUS,
    PHI_KEY,
    VIDEO_VISIT,
    auth,
    corpus,
    make_settings,
    serve_gateway,
)
from tests.fhir_validate import validate
from tests.test_healthcloud_ehrs import fleet_settings, twins  # noqa: F401  (twins: the EHR twins fixture)
from tests.test_hl7v2 import exchange, msa, mllp_gateway, with_event

ATHENA = (CORPUS / "hl7v2" / "athena-siu-s12-403.hl7").read_bytes()
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FAST_HOLDS = IdentitySettings(hold_retry_seconds=0.2, hold_retry_max_seconds=0.5, hold_poll_seconds=0.1,
                              miss_cache_seconds=0.1)


def sandbox_state(sandbox: Any) -> Any:
    return sandbox.app.state.sandbox


def seeded(sandbox: Any, system: str, kind: str, ehr_id: str) -> Any:
    return sandbox_state(sandbox).org.seeded[system][kind][ehr_id]


def video_visit(**changes: Any) -> dict[str, Any]:
    body = msgspec.json.decode(corpus(VIDEO_VISIT))
    body.update(changes)
    return body


def with_patient(body: dict[str, Any], actor: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(body)
    for p in body["participant"]:
        if p.get("actor", {}).get("reference", "").startswith("Patient/"):
            p["actor"] = actor
    return body


def with_actor(body: dict[str, Any], prefix: str, reference: str) -> dict[str, Any]:
    body = copy.deepcopy(body)
    for p in body["participant"]:
        if p.get("actor", {}).get("reference", "").startswith(prefix):
            p["actor"] = {"reference": reference}
    return body


def identity_settings(settings: Settings, *, tuning: IdentitySettings | None = None,
                      **per_source: SourceIdentity) -> Settings:
    sources = {name: msgspec.structs.replace(src, identity=per_source[name]) if name in per_source else src
               for name, src in settings.file.sources.items()}
    file = msgspec.structs.replace(settings.file, sources=sources, identity=tuning or settings.file.identity)
    return msgspec.structs.replace(settings, file=file)


async def book(gw: httpx.AsyncClient, body: dict[str, Any], key: str, source: str = "cerner") -> httpx.Response:
    return await gw.post(f"/fhir/{source}/Appointment", content=msgspec.json.encode(body),
                         headers=auth(source, **{"Idempotency-Key": key}))


async def until(check: Any, seconds: float = 30.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (found := await check()):
            return found
        await asyncio.sleep(0.1)
    raise AssertionError("not within the time given")


# -- every dialect books with the org's records ----------------------------------------------------


async def test_the_corpus_cerner_booking_books_with_the_orgs_records_and_the_ehrs_slot(gateway, sandbox):
    r = await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth())
    assert r.status_code == 201, r.text
    (stored,) = sandbox_state(sandbox).appointments()
    patient = seeded(sandbox, "cerner", "patients", "12724066").account
    facility = seeded(sandbox, "cerner", "facilities", "21304876").account
    hpf = seeded(sandbox, "cerner", "practitioners", "593923").practitioner_facilities[facility]
    assert stored.request["participants"] == [{"reference": f"Patient/{patient}"},
                                              {"reference": f"Practitioner/{hpf}"},
                                              {"reference": f"Facility/{facility}"}]
    # the slot keeps the EHR's id; its reference is the practitioner's record at that facility
    assert stored.request["slots"] == [{"id": "21265426-633867-6828001-60", "reference": f"Practitioner/{hpf}"}]
    # the answer names the participants as the EHR did, never the org's ids
    actors = [p["actor"]["reference"] for p in validate(r.content, "Appointment")["participant"]]
    assert actors == ["Patient/12724066", "Practitioner/593923", "Location/21304876"]


async def test_the_corpus_fhir_booking_books_with_the_orgs_records(gateway, sandbox):
    r = await gateway.post("/fhir/fhir/Appointment", content=corpus("fhir-r4-official/Appointment-example.json"),
                           headers=auth("fhir"))
    assert r.status_code == 201, r.text
    (stored,) = sandbox_state(sandbox).appointments()
    refs = {p["reference"] for p in stored.request["participants"]}
    facility = seeded(sandbox, "fhir", "facilities", "1").account
    assert refs == {f"Patient/{seeded(sandbox, 'fhir', 'patients', 'example').account}",
                    f"Facility/{facility}",
                    f"Practitioner/{seeded(sandbox, 'fhir', 'practitioners', 'example').practitioner_facilities[facility]}"}


async def test_the_siu_feed_books_with_the_orgs_records(settings, sandbox):
    async with mllp_gateway(settings) as (port, _):
        (ack,) = await exchange(port, ATHENA)
    assert msa(ack)[1] == "AA", ack
    (stored,) = sandbox_state(sandbox).appointments()
    facility = seeded(sandbox, "athena", "facilities", "2").account
    # patient 00432 is identified on the PersonContact, kmurphy2 on a HealthcareProvider
    assert {p["reference"] for p in stored.request["participants"]} == {
        f"Patient/{seeded(sandbox, 'athena', 'patients', '00432').account}", f"Facility/{facility}",
        f"Practitioner/{seeded(sandbox, 'athena', 'practitioners', 'kmurphy2').practitioner_facilities[facility]}"}


async def test_every_storage_shape_resolves(redis_url, prefix, sandbox):
    """A patient on its Account or on its Contact, a facility on its Account or on a
    HealthcareFacility, a practitioner on a Contact, on a HealthcareProvider, or only on its HPF."""
    org = sandbox_state(sandbox).org
    made = {}
    for on in ("Account", "Contact"):
        made[f"p-{on}"] = org.add_patient("cerner", f"shape-{on}", first_name="Ann", last_name=on, on=on).account
    for on in ("Account", "HealthcareFacility"):
        made[f"f-{on}"] = org.add_facility("cerner", f"site-{on}", f"Site {on}", on=on).account
    for on in ("Contact", "HealthcareProvider", "HealthcarePractitionerFacility"):
        made[f"d-{on}"] = org.add_practitioner("cerner", f"doc-{on}", f"Doc {on}", on=on, source_on_hpf=None,
                                               facilities=[made["f-Account"], made["f-HealthcareFacility"]])
    settings = make_settings(redis_url, prefix, sandbox.url)
    async with serve_gateway(settings) as gw:
        n = 0
        for patient in ("Account", "Contact"):
            for facility in ("Account", "HealthcareFacility"):
                for doctor in ("Contact", "HealthcareProvider", "HealthcarePractitionerFacility"):
                    n += 1
                    body = with_actor(with_actor(with_actor(video_visit(), "Patient/", f"Patient/shape-{patient}"),
                                                 "Location/", f"Location/site-{facility}"),
                                      "Practitioner/", f"Practitioner/doc-{doctor}")
                    body["identifier"] = [{"system": "urn:test", "value": f"shape-{n}"}]
                    r = await book(gw, body, f"shape-{n}")
                    assert r.status_code == 201, (patient, facility, doctor, r.text)
                    stored = sandbox_state(sandbox).get(r.json()["id"])
                    hpf = made[f"d-{doctor}"].practitioner_facilities[made[f"f-{facility}"]]
                    assert {p["reference"] for p in stored.request["participants"]} == {
                        f"Patient/{made[f'p-{patient}']}", f"Facility/{made[f'f-{facility}']}", f"Practitioner/{hpf}"}


async def test_an_actor_named_by_identifier_is_found_under_the_system_it_maps_to(redis_url, prefix, sandbox):
    settings = identity_settings(make_settings(redis_url, prefix, sandbox.url),
                                 cerner=SourceIdentity(systems={"urn:oid:2.16.840.1.113883.3.13.6": "cerner"}))
    body = with_patient(video_visit(), {"type": "Patient", "identifier": {
        "system": "urn:oid:2.16.840.1.113883.3.13.6", "value": "12724066"}})
    async with serve_gateway(settings) as gw:
        r = await book(gw, body, "by-identifier")
        assert r.status_code == 201, r.text
        answered = validate(r.content, "Appointment")
        # answered as the EHR named it: by its identifier
        assert {"actor": {"type": "Patient", "identifier": {"value": "12724066",
                                                            "system": "urn:oid:2.16.840.1.113883.3.13.6"}},
                "status": "accepted"} in answered["participant"]
    stored = sandbox_state(sandbox).get(r.json()["id"])
    assert {"reference": f"Patient/{seeded(sandbox, 'cerner', 'patients', '12724066').account}"} in \
        stored.request["participants"]


# -- cheap: one call for a booking's misses, none when cached ----------------------------------------


async def test_a_cold_booking_costs_one_lookup_call_and_a_warm_one_only_its_book(gateway, sandbox):
    counters = sandbox_state(sandbox).counters
    first = await book(gateway, video_visit(), "cold")
    assert first.status_code == 201, first.text
    cold = counters()
    assert (cold.api_calls, cold.book_calls, cold.composite_calls) == (2, 1, 1)  # the look-up and the Book
    other = video_visit(identifier=[{"system": "urn:test", "value": "warm"}], start="2020-07-10T14:00:00.000Z",
                        end="2020-07-10T14:15:00.000Z")
    second = await book(gateway, other, "warm")
    assert second.status_code == 201, second.text
    warm = counters()
    assert (warm.api_calls - cold.api_calls, warm.book_calls, warm.composite_calls, warm.query_calls) == \
        (1, 2, 1, cold.query_calls)  # exactly the one Book call


async def test_one_lookup_in_flight_for_many_bookings_of_the_same_people(gateway, sandbox):
    sandbox_state(sandbox).faults.set(latency_ms=300)  # the look-up takes a while: the others wait for it
    bodies = [video_visit(identifier=[{"system": "urn:test", "value": f"many-{i}"}],
                          start=f"2020-07-1{i}T13:00:00.000Z", end=f"2020-07-1{i}T13:15:00.000Z") for i in range(8)]
    answers = await asyncio.gather(*(book(gateway, b, f"many-{i}") for i, b in enumerate(bodies)))
    assert [a.status_code for a in answers] == [201] * 8, [a.text for a in answers if a.status_code != 201]
    counters = sandbox_state(sandbox).counters()
    # one Composite of four queries (the Identifiers, the HPFs three ways), whatever the bookings
    assert (counters.composite_calls, counters.query_calls, counters.book_calls) == (1, 4, 8)


async def test_the_cache_keeps_patients_for_minutes_the_rest_for_hours_and_a_miss_at_most_a_minute(
        redis_url, prefix, sandbox):
    tuning = IdentitySettings(cache_hours=5, patient_cache_seconds=600, miss_cache_seconds=30)
    settings = identity_settings(make_settings(redis_url, prefix, sandbox.url), tuning=tuning,
                                 cerner=SourceIdentity(unknown_patient="refuse"))
    client = aredis.Redis.from_url(redis_url)
    async with serve_gateway(settings) as gw:
        assert (await book(gw, video_visit(), "ttl")).status_code == 201
        missing = with_actor(video_visit(identifier=[{"value": "ttl-2"}]), "Patient/", "Patient/not-in-the-org")
        assert (await book(gw, missing, "ttl-2")).status_code == 422
    ttls = sorted([await client.pttl(k) async for k in client.scan_iter(match=f"{prefix}:ident:*")])
    await client.aclose()
    assert len(ttls) == 4  # the patient, the facility, the practitioner, the missing patient
    assert 0 < ttls[0] <= 30_000  # the miss
    assert 30_000 < ttls[1] <= 600_000  # the patient
    assert all(4 * 3600_000 < t <= 5 * 3600_000 for t in ttls[2:])  # facility and practitioner


# -- gaps in configuration are refused at once, never naming the id -----------------------------------


async def _refused(gw: httpx.AsyncClient, body: dict[str, Any], key: str) -> dict[str, Any]:
    r = await book(gw, body, key)
    assert r.status_code == 422, r.text
    return validate(r.content, "OperationOutcome")


async def test_a_participant_the_org_lacks_or_holds_twice_is_refused_naming_the_element_not_the_id(
        gateway, sandbox, redis_url, prefix):
    org = sandbox_state(sandbox).org
    elsewhere = org.add_facility("cerner", "far-away", "Far Away Clinic").account
    org.add_practitioner("cerner", "only-far-away", "Only Faraway", facilities=[elsewhere])
    org.add_patient("cerner", "twice-named", first_name="One", last_name="Person")
    second = org.add_patient("cerner", "someone-else", first_name="Another", last_name="Person").account
    org.add_identifier(second, "cerner", "twice-named")  # one id, two patients
    cases = {
        "unknown practitioner": (with_actor(video_visit(), "Practitioner/", "Practitioner/nobody-here"),
                                 "not-found", "Appointment.participant[1].actor"),
        "unknown location": (with_actor(video_visit(), "Location/", "Location/nowhere-here"),
                             "not-found", "Appointment.participant[2].actor"),
        "practitioner not at this facility": (with_actor(video_visit(), "Practitioner/",
                                                         "Practitioner/only-far-away"),
                                              "not-found", "Appointment.participant[1].actor"),
        "a patient id naming two records": (with_actor(video_visit(), "Patient/", "Patient/twice-named"),
                                            "multiple-matches", "Appointment.participant[0].actor"),
    }
    for n, (name, (body, code, path)) in enumerate(cases.items()):
        body["identifier"] = [{"system": "urn:test", "value": f"gap-{n}"}]
        outcome = await _refused(gateway, body, f"gap-{n}")
        (issue,) = outcome["issue"]
        assert (issue["code"], issue["expression"]) == (code, [path]), (name, issue)
        text = issue["details"]["text"]
        assert not any(v in text for v in ("nobody-here", "nowhere-here", "only-far-away", "twice-named")), text
    assert sandbox_state(sandbox).counters().book_calls == 0  # nothing was sent for any of them
    logged = (await gateway.get("/admin/api/requests?outcome=unmatched", headers=ADMIN)).json()["requests"]
    assert len(logged) == 4 and all(e["status"] == 422 for e in logged)
    metrics = (await gateway.get("/metrics")).text
    assert 'ehrgw_identity_unmatched_total{kind="practitioner",source="cerner"} 2.0' in metrics
    assert 'ehrgw_identity_unmatched_total{kind="location",source="cerner"} 1.0' in metrics
    assert 'ehrgw_identity_unmatched_total{kind="patient",source="cerner"} 1.0' in metrics
    # a retry once the org holds the practitioner there books: the refusal was not kept
    here = seeded(sandbox, "cerner", "facilities", "21304876").account
    org.add_practitioner("cerner", "nobody-here", "Now Here", facilities=[here])
    await gateway.post("/admin/api/identity/forget", headers=ADMIN)
    body = cases["unknown practitioner"][0]
    body["identifier"] = [{"system": "urn:test", "value": "gap-0"}]
    assert (await book(gateway, body, "gap-0")).status_code == 201


async def test_an_siu_whose_location_the_org_lacks_is_answered_ae_naming_the_field(settings, sandbox):
    unknown_place = ATHENA.replace(b"AIL|||2^Brockton", b"AIL|||NOWHERE^Nowhere")
    async with mllp_gateway(settings) as (port, _):
        (ack,) = await exchange(port, unknown_place)
    fields = msa(ack)
    assert fields[1] == "AE" and "NOWHERE" not in ack, ack
    assert "AIL-3" in ack or "PID-3, AIL-3 or AIP-3/AIG-3" in ack, ack
    assert sandbox_state(sandbox).counters().book_calls == 0


# -- an unknown patient: refuse, hold, create -----------------------------------------------------------


def _new_patient(body: dict[str, Any], patient: str, key: str) -> dict[str, Any]:
    body = with_actor(body, "Patient/", f"Patient/{patient}")
    body["identifier"] = [{"system": "urn:test", "value": key}]
    return body


async def test_refuse_answers_422_and_keeps_nothing(redis_url, prefix, sandbox):
    settings = identity_settings(make_settings(redis_url, prefix, sandbox.url),
                                 cerner=SourceIdentity(unknown_patient="refuse"))
    async with serve_gateway(settings) as gw:
        (issue,) = (await _refused(gw, _new_patient(video_visit(), "not-yet-registered", "r-1"), "r-1"))["issue"]
        assert issue["code"] == "not-found" and "not-yet-registered" not in issue["details"]["text"]
        held = (await gw.get("/admin/api/held", headers=ADMIN)).json()["sources"]
        assert held == {}
    assert sandbox_state(sandbox).counters().book_calls == 0


async def test_refuse_over_mllp_is_ae(redis_url, prefix, sandbox):
    settings = identity_settings(make_settings(redis_url, prefix, sandbox.url),
                                 athena=SourceIdentity(unknown_patient="refuse"))
    stranger = ATHENA.replace(b"PID||00432|00432|", b"PID||55555|55555|")
    async with mllp_gateway(settings) as (port, _):
        (ack,) = await exchange(port, stranger)
    assert msa(ack)[1] == "AE" and "55555" not in ack, ack


async def test_hold_answers_202_then_books_once_when_the_org_knows_the_patient(redis_url, prefix, sandbox):
    settings = identity_settings(make_settings(redis_url, prefix, sandbox.url), tuning=FAST_HOLDS)
    body = _new_patient(video_visit(), "arrives-later", "h-1")
    async with serve_gateway(settings) as gw:
        first = await book(gw, body, "h-1")
        assert first.status_code == 202, first.text
        assert validate(first.content, "OperationOutcome")["issue"][0]["severity"] == "information"
        entry = first.headers["location"].rsplit("/", 1)[1]
        logged = (await gw.get(f"/admin/api/requests/{entry}", headers=ADMIN)).json()
        assert logged["outcome"] == "held"
        again = await book(gw, body, "h-1")
        assert again.status_code == 202
        await asyncio.sleep(1.0)  # several tries, the patient still unknown: nothing booked
        assert sandbox_state(sandbox).counters().book_calls == 0
        held = (await gw.get("/admin/api/held", headers=ADMIN)).json()["sources"]["cerner"]
        assert len(held) == 1 and held[0]["state"] == "held" and held[0]["attempts"] >= 1 and "patient" not in held[0]
        # the patient is registered in the org (a data load; here the sandbox's control key)
        async with httpx.AsyncClient(base_url=sandbox.url) as control:
            made = await control.post("/sandbox/org/patients", headers={"Authorization": f"Bearer {CONTROL_KEY}"},
                                      json={"sourceSystem": "cerner", "idValue": "arrives-later",
                                            "firstName": "Late", "lastName": "Arrival"})
            assert made.status_code == 201, made.text

        async def booked() -> Any:
            r = await book(gw, body, "h-1")
            return r if r.status_code == 201 else None

        done = await until(booked)
        (stored,) = sandbox_state(sandbox).appointments()
        assert done.json()["id"] == stored.id
        assert {"reference": f"Patient/{made.json()['account']}"} in stored.request["participants"]
        await asyncio.sleep(1.0)  # more turns of the holds' worker book nothing more
        assert sandbox_state(sandbox).counters().book_calls == 1
        assert (await gw.get("/admin/api/held", headers=ADMIN)).json()["sources"] == {}
        released = (await gw.get("/admin/api/requests?outcome=booked", headers=ADMIN)).json()["requests"]
        assert any(e["op"] == "release" and e["sf_id"] == stored.id for e in released)


async def test_hold_over_mllp_is_aa_then_booked_once(redis_url, prefix, sandbox):
    settings = identity_settings(make_settings(redis_url, prefix, sandbox.url), tuning=FAST_HOLDS)
    stranger = ATHENA.replace(b"PID||00432|00432|", b"PID||66666|66666|")
    async with mllp_gateway(settings) as (port, _):
        (ack,) = await exchange(port, stranger)
        assert msa(ack)[1] == "AA", ack
        (again,) = await exchange(port, stranger)  # the same message resent: still held, still AA
        assert msa(again)[1] == "AA"
        sandbox_state(sandbox).org.add_patient("athena", "66666", first_name="Six", last_name="Sixes")
        await until(lambda: _one_appointment(sandbox))
        await asyncio.sleep(1.0)
    assert sandbox_state(sandbox).counters().book_calls == 1


async def _one_appointment(sandbox: Any) -> bool:
    return len(sandbox_state(sandbox).appointments()) == 1


async def test_a_change_while_held_applies_to_the_held_booking(redis_url, prefix, sandbox):
    settings = identity_settings(make_settings(redis_url, prefix, sandbox.url), tuning=FAST_HOLDS)
    body = _new_patient(video_visit(), "changes-while-held", "hc-1")
    moved = copy.deepcopy(body)
    moved["start"], moved["end"], moved["status"] = "2020-07-10T15:00:00.000Z", "2020-07-10T15:15:00.000Z", "booked"
    async with serve_gateway(settings) as gw:
        assert (await book(gw, body, "hc-1")).status_code == 202
        changed = await gw.put("/fhir/cerner/Appointment?identifier=urn:test|hc-1", content=msgspec.json.encode(moved),
                               headers=auth())
        assert changed.status_code == 202, changed.text
        sandbox_state(sandbox).org.add_patient("cerner", "changes-while-held", first_name="Chan", last_name="Ging")
        await until(lambda: _one_appointment(sandbox))
    (stored,) = sandbox_state(sandbox).appointments()
    assert stored.request["startDate"] == "2020-07-10T15:00:00.000Z"  # the change, not the first message


async def test_a_cancel_while_held_ends_the_hold_and_nothing_is_booked(redis_url, prefix, sandbox):
    settings = identity_settings(make_settings(redis_url, prefix, sandbox.url), tuning=FAST_HOLDS)
    body = _new_patient(video_visit(), "cancels-while-held", "hx-1")
    cancelled = copy.deepcopy(body)
    cancelled["status"] = "cancelled"
    async with serve_gateway(settings) as gw:
        assert (await book(gw, body, "hx-1")).status_code == 202
        r = await gw.put("/fhir/cerner/Appointment?identifier=urn:test|hx-1", content=msgspec.json.encode(cancelled),
                         headers=auth())
        assert r.status_code == 200, r.text
        assert (await gw.get("/admin/api/held", headers=ADMIN)).json()["sources"] == {}
        sandbox_state(sandbox).org.add_patient("cerner", "cancels-while-held", first_name="Can", last_name="Celled")
        await asyncio.sleep(1.5)
        replay = await book(gw, body, "hx-1")  # the first message again: its final answer, not a booking
        assert replay.status_code == 422, replay.text
    assert sandbox_state(sandbox).counters().book_calls == 0


async def test_a_hold_past_its_deadline_is_refused_and_operators_see_it(redis_url, prefix, sandbox):
    settings = identity_settings(make_settings(redis_url, prefix, sandbox.url), tuning=FAST_HOLDS,
                                 cerner=SourceIdentity(hold_hours=1.5 / 3600))  # 1.5 seconds
    body = _new_patient(video_visit(), "never-arrives", "hd-1")
    async with serve_gateway(settings) as gw:
        assert (await book(gw, body, "hd-1")).status_code == 202

        async def refused() -> Any:
            rows = (await gw.get("/admin/api/held", headers=ADMIN)).json()["sources"].get("cerner", [])
            return rows if rows and rows[0]["state"] == "refused" else None

        (row,) = await until(refused)
        assert row["why"] == "patient-unknown" and "patient" not in row
        final = await book(gw, body, "hd-1")
        assert final.status_code == 422 and validate(final.content, "OperationOutcome")["issue"][0]["code"] == "not-found"
        phi = {"Authorization": f"Bearer {PHI_KEY}"}
        assert "patient" not in (await gw.get("/admin/api/held", headers=phi)).json()["sources"]["cerner"][0]
        one = (await gw.get(f"/admin/api/held/cerner/{row['hold']}", headers=phi)).json()
        assert one["patient"] == "Patient/never-arrives"  # whom: one booking's, for a PHI key only
        assert "patient" not in (await gw.get(f"/admin/api/held/cerner/{row['hold']}", headers=ADMIN)).json()
    assert sandbox_state(sandbox).counters().book_calls == 0


def _siu(control: str, placer: str, pid: str) -> bytes:
    """The corpus's athena S12 for another appointment (SCH-1/2) of another patient (PID-2, PID-3, PID-5, PID-7)."""
    text = with_event(ATHENA, "S12", control=control).decode()
    segments = []
    for seg in text.replace("\n", "\r").split("\r"):
        if seg.startswith("SCH|"):
            f = seg.split("|")
            f[1] = f[2] = placer
            seg = "|".join(f)
        elif seg.startswith("PID|"):
            seg = pid
        segments.append(seg)
    return "\r".join(segments).encode()


async def test_create_makes_the_patient_from_pid_once_then_books(redis_url, prefix, sandbox):
    settings = identity_settings(make_settings(redis_url, prefix, sandbox.url), tuning=FAST_HOLDS,
                                 athena=SourceIdentity(unknown_patient="create"))
    pid = "PID||77777|77777||NEWMAN^NORA^||19800101|F|||1 Main St^^BOSTON^MA^02101||(555)010-7777"
    org = sandbox_state(sandbox).org
    async with mllp_gateway(settings) as (port, _):
        (ack,) = await exchange(port, _siu("c-1", "900001", pid))
        assert msa(ack)[1] == "AA", ack
        (again,) = await exchange(port, _siu("c-2", "900002", pid))  # the same patient's next appointment
        assert msa(again)[1] == "AA", again
    made = [i for i in org.records("Identifier") if i["SourceSystem"] == "athena" and i["IdValue"] == "77777"]
    assert len(made) == 1  # one patient, created once
    account = org.get(made[0]["ParentRecordId"])
    assert (account["FirstName"], account["LastName"], account["PersonBirthdate"], account["IsPersonAccount"]) == \
        ("NORA", "NEWMAN", "1980-01-01", True)
    assert account["SourceSystemIdentifier"] == "athena|77777"
    stored = sandbox_state(sandbox).appointments()
    assert len(stored) == 2 and all({"reference": f"Patient/{account['Id']}"} in s.request["participants"]
                                    for s in stored)


async def test_create_never_makes_a_second_patient_a_duplicate_waits_for_the_operators(redis_url, prefix, sandbox):
    settings = identity_settings(make_settings(redis_url, prefix, sandbox.url), tuning=FAST_HOLDS,
                                 athena=SourceIdentity(unknown_patient="create"))
    # the org knows Roscoe Hall (born 1997-10-06) under athena's 70690; this message names him by another id
    pid = "PID||88888|88888||HALL^ROSCOE^||19971006|M"
    org = sandbox_state(sandbox).org
    people = len(org.records("Account"))
    async with mllp_gateway(settings) as (port, client):
        (ack,) = await exchange(port, _siu("d-1", "900011", pid))
        assert msa(ack)[1] == "AA", ack  # held, for an operator to decide
        rows = await until(lambda: _held_rows(client, "athena"))
        assert rows[0]["why"] == "DUPLICATES_DETECTED"
        await asyncio.sleep(1.0)  # tried again and again: never created
        assert len(org.records("Account")) == people and sandbox_state(sandbox).counters().book_calls == 0
        # the operator decides it is Roscoe Hall: his record gets athena's other id
        org.add_identifier(seeded(sandbox, "athena", "patients", "70690").account, "athena", "88888")
        await until(lambda: _one_appointment(sandbox))
    (stored,) = sandbox_state(sandbox).appointments()
    assert {"reference": f"Patient/{seeded(sandbox, 'athena', 'patients', '70690').account}"} in \
        stored.request["participants"]
    assert len(org.records("Account")) == people


async def _held_rows(client: httpx.AsyncClient, source: str) -> Any:
    return (await client.get("/admin/api/held", headers=ADMIN)).json()["sources"].get(source)


async def test_create_reads_the_ehrs_fhir_patient(redis_url, prefix, sandbox, twins, tmp_path):
    """A FHIR source's unknown patient is created from the EHR's own Patient (its read through the
    source's EHR client: here the Cerner twin, which holds 12742401 while the org does not)."""
    settings = identity_settings(fleet_settings(redis_url, prefix, sandbox.url, twins, tmp_path),
                                 cerner=SourceIdentity(unknown_patient="create"))
    body = _new_patient(video_visit(), "12742401", "fc-1")
    async with serve_gateway(settings) as gw:
        r = await book(gw, body, "fc-1")
        assert r.status_code == 201, r.text
    org = sandbox_state(sandbox).org
    (made,) = [i for i in org.records("Identifier") if i["SourceSystem"] == "cerner" and i["IdValue"] == "12742401"]
    account = org.get(made["ParentRecordId"])
    read = twins["cerner"].control("GET", "/twin/patients")
    patients = read["patients"] if isinstance(read, dict) else read
    twin_patient = next(p for p in patients if p["id"] == "12742401")
    assert account["LastName"] == twin_patient["family"] and account["PersonBirthdate"] == twin_patient["birthDate"]
    assert twins["cerner"].counters()["patient_reads"] == 1


# -- Get Slots asks for the org's records ------------------------------------------------------------


def _slot_query(*actors: str) -> str:
    from urllib.parse import urlencode

    params = [("start", "ge2026-12-01T09:00:00Z"), ("start", "le2026-12-01T10:00:00Z"),
              ("service-type", "https://fhir.cerner.com/ec2458f2-1e24-41c8-b71b-0e701af7583d/codeSet/14249|2572307911"),
              *(("actor", a) for a in actors)]
    return "/fhir/cerner/Slot?" + urlencode(params)


async def test_a_slot_search_asks_for_the_practitioners_records_and_answers_in_the_ehrs_names(gateway, sandbox):
    facility = seeded(sandbox, "cerner", "facilities", "21304876").account
    hpfs = seeded(sandbox, "cerner", "practitioners", "593923").practitioner_facilities
    at_one = await gateway.get(_slot_query("Practitioner/593923", "Location/21304876"), headers=auth())
    assert at_one.status_code == 200, at_one.text
    slots = [e["resource"] for e in validate(at_one.content, "Bundle")["entry"]]
    assert {s["schedule"]["display"] for s in slots} == {"Practitioner/593923"}  # the EHR's name for it
    assert {s["id"].rsplit("-", 1)[0] for s in slots} == {hpfs[facility]}  # the sandbox's slot ids name the HPF
    everywhere = await gateway.get(_slot_query("Practitioner/593923"), headers=auth())  # no Location: every facility
    ids = {e["resource"]["id"].rsplit("-", 1)[0] for e in everywhere.json()["entry"]}
    assert ids == set(hpfs.values()) and len(ids) == 3


async def test_a_slot_search_for_an_actor_the_org_lacks_is_422_and_asks_nothing(gateway, sandbox):
    r = await gateway.get(_slot_query("Practitioner/nobody-at-all"), headers=auth())
    assert r.status_code == 422 and "nobody-at-all" not in r.text
    (issue,) = validate(r.content, "OperationOutcome")["issue"]
    assert issue["code"] == "not-found" and issue["expression"] == ["http.actor"]
    assert sandbox_state(sandbox).counters().slots_calls == 0


# -- operators ---------------------------------------------------------------------------------------


async def test_operators_release_or_refuse_a_held_booking(redis_url, prefix, sandbox):
    slow = msgspec.structs.replace(FAST_HOLDS, hold_retry_seconds=600, hold_retry_max_seconds=600)
    settings = identity_settings(make_settings(redis_url, prefix, sandbox.url), tuning=slow)
    async with serve_gateway(settings) as gw:
        for key in ("op-1", "op-2"):
            assert (await book(gw, _new_patient(video_visit(), f"waits-{key}", key), key)).status_code == 202
        rows = {r["hold"]: r for r in (await gw.get("/admin/api/held", headers=ADMIN)).json()["sources"]["cerner"]}
        assert len(rows) == 2 and all(r["due_ms"] - r["since_ms"] > 500_000 for r in rows.values())
        first, second = rows
        # the patient of the first arrives; the operator does not wait ten minutes for the next try
        sandbox_state(sandbox).org.add_patient("cerner", "waits-op-1", first_name="Op", last_name="One")
        patient = {"Authorization": f"Bearer {PHI_KEY}"}
        whom = {h: (await gw.get(f"/admin/api/held/cerner/{h}", headers=patient)).json()["patient"] for h in rows}
        target = next(h for h, p in whom.items() if p == "Patient/waits-op-1")
        other = second if target == first else first
        r = await gw.post(f"/admin/api/held/cerner/{target}/release", headers=ADMIN)
        assert r.status_code == 200, r.text
        await until(lambda: _one_appointment(sandbox))
        r = await gw.post(f"/admin/api/held/cerner/{other}/refuse", headers=ADMIN)
        assert r.status_code == 200, r.text
        left = (await gw.get("/admin/api/held", headers=ADMIN)).json()["sources"]["cerner"]
        assert [(x["hold"], x["state"], x["why"]) for x in left] == [(other, "refused", "refused-by-operator")]
        assert (await book(gw, _new_patient(video_visit(), "waits-op-2", "op-2"), "op-2")).status_code == 422
        assert (await gw.post(f"/admin/api/held/cerner/{other}/release", headers=ADMIN)).status_code == 404
        assert (await gw.post(f"/admin/api/held/cerner/{other}/forget", headers=ADMIN)).status_code == 404
        audit = (await gw.get("/admin/api/audit", headers=ADMIN)).json()["audit"]
        assert {"held-release", "held-refuse"} <= {a["action"] for a in audit}
    assert sandbox_state(sandbox).counters().book_calls == 1


async def test_forget_drops_the_cache_and_the_next_booking_looks_up_again(gateway, sandbox, redis_url, prefix):
    assert (await book(gateway, video_visit(), "f-1")).status_code == 201
    calls = sandbox_state(sandbox).counters().composite_calls
    r = await gateway.post("/admin/api/identity/forget", headers=ADMIN)
    assert r.status_code == 200 and r.json()["forgotten"] == 3
    other = video_visit(identifier=[{"value": "f-2"}], start="2020-07-10T16:00:00.000Z", end="2020-07-10T16:15:00.000Z")
    assert (await book(gateway, other, "f-2")).status_code == 201
    assert sandbox_state(sandbox).counters().composite_calls == calls + 1
    assert (await gateway.post("/admin/api/identity/forget")).status_code == 401


async def test_identity_check_prints_how_each_participant_resolves(gateway, sandbox, tmp_path, monkeypatch, capsys):
    from gateway.cli import main

    file = tmp_path / "booking.json"
    file.write_bytes(msgspec.json.encode(with_actor(video_visit(), "Location/", "Location/not-a-place")))
    monkeypatch.setenv("EHR_GATEWAY_ADMIN_KEY", ADMIN_KEY)
    code = await asyncio.to_thread(main, ["identity", "--url", str(gateway.base_url), "check", "--source", "cerner",
                                          str(file)])
    out = capsys.readouterr().out
    assert code == 1  # one participant does not resolve
    patient = seeded(sandbox, "cerner", "patients", "12724066").account
    assert "Appointment.participant[0].actor  patient" in out and patient in out
    assert "not-found" in out and "not-a-place" not in out
    assert sandbox_state(sandbox).counters().book_calls == 0  # a dry run


# -- the org's allowance and its failures ---------------------------------------------------------------


@pytest.mark.parametrize("sandbox_config", [{"daily_limit": 40}], indirect=True)
async def test_lookups_stop_near_the_end_of_the_allowance_while_cached_bookings_go(redis_url, prefix, sandbox):
    tuning = IdentitySettings(api_reserve_percent=50)
    settings = identity_settings(make_settings(redis_url, prefix, sandbox.url), tuning=tuning)
    async with serve_gateway(settings) as gw:
        assert (await book(gw, video_visit(), "a-1")).status_code == 201  # cold: look-up and Book
        n = 1
        while sandbox_state(sandbox).counters().api_calls < 21:  # past half the allowance, on cached people
            n += 1
            body = video_visit(identifier=[{"value": f"a-{n}"}], start=f"2021-01-{n:02d}T13:00:00Z",
                               end=f"2021-01-{n:02d}T13:15:00Z")
            assert (await book(gw, body, f"a-{n}")).status_code == 201
        calls = sandbox_state(sandbox).counters().api_calls
        stranger = with_actor(video_visit(identifier=[{"value": "a-x"}]), "Practitioner/", "Practitioner/709937")
        r = await book(gw, stranger, "a-x")  # a practitioner not cached: not looked up now
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
        assert sandbox_state(sandbox).counters().api_calls == calls


@pytest.mark.parametrize("fault", [{"server_error": 1, "server_error_status": 500},
                                   {"server_error": 1, "server_error_status": 503},
                                   {"request_limit_exceeded": 1}, {"expire_tokens": True}])
async def test_a_lookup_that_fails_books_nothing_and_the_retry_books(gateway, sandbox, fault):
    sandbox_state(sandbox).faults.set(**fault)
    first = await book(gateway, video_visit(), "lf-1")
    if "expire_tokens" in fault:  # the token renewed once and the look-up made: booked
        assert first.status_code == 201, first.text
    else:
        assert first.status_code in (502, 503) and "retry-after" in first.headers, first.text
        assert sandbox_state(sandbox).counters().book_calls == 0
        assert (await book(gateway, video_visit(), "lf-1")).status_code == 201  # nothing kept of the failure
    assert len(sandbox_state(sandbox).appointments()) == 1


async def test_a_lookup_that_hangs_times_out_and_books_nothing(redis_url, prefix, sandbox):
    from gateway.settings import SalesforceTuning

    settings = make_settings(redis_url, prefix, sandbox.url, salesforce=SalesforceTuning(timeout_seconds=1))
    sandbox_state(sandbox).faults.set(latency_ms=2500)
    async with serve_gateway(settings) as gw:
        r = await book(gw, video_visit(), "hang-1")
        assert r.status_code in (502, 503), r.text
    await asyncio.sleep(3)  # whatever the sandbox did after the gateway stopped waiting: no Book
    assert sandbox_state(sandbox).counters().book_calls == 0


async def test_an_s15_for_a_held_booking_ends_the_hold_over_mllp(redis_url, prefix, sandbox):
    settings = identity_settings(make_settings(redis_url, prefix, sandbox.url), tuning=FAST_HOLDS)
    stranger = ATHENA.replace(b"PID||00432|00432|", b"PID||77770|77770|")
    cancel = with_event(stranger, "S15", control="77771", reason="pat^patient request")
    async with mllp_gateway(settings) as (port, client):
        acks = await exchange(port, stranger, cancel)
        assert [msa(a)[1] for a in acks] == ["AA", "AA"], acks
        assert (await client.get("/admin/api/held", headers=ADMIN)).json()["sources"] == {}
        sandbox_state(sandbox).org.add_patient("athena", "77770", first_name="Sev", last_name="Enty")
        await asyncio.sleep(1.0)  # several turns of the holds' worker: nothing is held, nothing booked
    assert sandbox_state(sandbox).counters().book_calls == 0


async def test_a_batch_resolves_each_entry_on_its_own(gateway, sandbox):
    """A FHIR batch: each entry's participants found as the org's records; one whose practitioner the
    org lacks is refused in its own entry, the other booked."""
    known = video_visit(identifier=[{"system": "urn:test", "value": "batch-1"}])
    gap = with_actor(video_visit(identifier=[{"system": "urn:test", "value": "batch-2"}],
                                 start="2020-07-10T17:00:00.000Z", end="2020-07-10T17:15:00.000Z"),
                     "Practitioner/", "Practitioner/not-on-staff")
    body = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": b, "request": {"method": "POST", "url": "Appointment"}} for b in (known, gap)]}
    r = await gateway.post("/fhir/cerner", content=msgspec.json.encode(body), headers=auth())
    assert r.status_code == 200, r.text
    statuses = [e["response"]["status"] for e in validate(r.content, "Bundle")["entry"]]
    assert [s.split()[0] for s in statuses] == ["201", "422"]
    (stored,) = sandbox_state(sandbox).appointments()
    assert {"reference": f"Patient/{seeded(sandbox, 'cerner', 'patients', '12724066').account}"} in \
        stored.request["participants"]


async def test_an_argonaut_book_names_its_patient_by_patient_id_and_epic_by_its_identifier(redis_url, prefix, sandbox):
    """STU3 `$book`: Argonaut's `patient-id` parameter, and Epic's `patient` identifier, each found under
    the epic source's SourceSystem (the identifier's system mapped to it)."""
    settings = identity_settings(make_settings(redis_url, prefix, sandbox.url),
                                 epic=SourceIdentity(systems={"urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14": "epic"}))
    appointment = {
        "resourceType": "Appointment", "status": "booked", "start": "2026-12-02T14:00:00Z",
        "end": "2026-12-02T14:30:00Z",
        "appointmentType": {"coding": [{"system": "http://hl7.org/fhir/v2/0276", "code": "ROUTINE"}]},
        "participant": [{"actor": {"reference": "Practitioner/eM5CWtq15N0WJeuCet5bJlQ3"}, "status": "accepted"},
                        {"actor": {"reference": "Location/e4W4rmGe9QzuGm2Dy4NBqVc0JDSNEiE3"}, "status": "accepted"}]}
    by_reference = {"resourceType": "Parameters", "parameter": [
        {"name": "appt-resource", "resource": appointment},
        {"name": "patient-id", "valueUri": "Patient/efvHwbc1k1CQ9XjM1zvvefQ3"}]}
    by_identifier = {"resourceType": "Parameters", "parameter": [
        {"name": "appt-resource", "resource": {**appointment, "start": "2026-12-02T15:00:00Z",
                                               "end": "2026-12-02T15:30:00Z"}},
        {"name": "patient", "valueIdentifier": {"system": "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14",
                                                "value": "eq7IBvJQy2Y5wZqgZ3bRz6A3"}}]}
    async with serve_gateway(settings) as gw:
        for n, body in enumerate((by_reference, by_identifier)):
            r = await gw.post("/fhir/epic/Appointment/$book", content=msgspec.json.encode(body),
                              headers=auth("epic", **{"Idempotency-Key": f"argo-{n}"}))
            assert r.status_code == 201, r.text
    patients = {p["reference"] for a in sandbox_state(sandbox).appointments() for p in a.request["participants"]
                if p["reference"].startswith("Patient/")}
    assert patients == {f"Patient/{seeded(sandbox, 'epic', 'patients', e).account}"
                        for e in ("efvHwbc1k1CQ9XjM1zvvefQ3", "eq7IBvJQy2Y5wZqgZ3bRz6A3")}
