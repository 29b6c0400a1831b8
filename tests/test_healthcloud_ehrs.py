"""Health Cloud's callouts carried to the EHRs: the gateway in front of the Cerner, Epic and FHIR twins
(each on its own port, Epic's cancel over its MLLP interface), everything over real HTTP and MLLP with
a real Redis. What Health Cloud reads back is checked with the suite's own R4 validator."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from gateway.edges.server import ThreadedServer
from gateway.twins import TwinConfig, create_ehr_twin
from gateway.twins.app import base_path
from gateway.twins.config import default_patients, default_schedules, key_pair
from gateway.settings import EhrCredentials, EhrSettings, HealthCloudSettings, Settings
from tests.conftest import digest, free_port, make_settings, serve_gateway
from tests.fhir_validate import validate
from tests.test_dashboard import chromium  # noqa: F401  (the fixture)

CONTROL, CLIENT, SECRET = "test-ehr-twin-control", "gateway-client", "test-ehr-twin-secret-94c1"
HC = "Basic " + __import__("base64").b64encode(b"hc:hc-secret-3318").decode()
FORM = {"Content-Type": "application/x-www-form-urlencoded", "Authorization": HC}
JSON = {"Content-Type": "application/fhir+json", "Authorization": HC}
DIALECTS = ("cerner", "epic", "fhir")
# Health Cloud's work-type codes that the shipped maps send back as each twin's service
SERVICE = {"cerner": "2572307911", "epic": "40111223", "fhir": "124"}
DAY = (date.today() + timedelta(days=3)).isoformat()
WINDOW = f"start=ge{DAY}T09:00:00Z&start=lt{DAY}T11:00:00Z"


PRIVATE, PUBLIC = key_pair()


@dataclass
class Twin:
    dialect: str
    server: ThreadedServer
    mllp_port: int | None = None

    def control(self, method: str, path: str, **kwargs: Any) -> Any:
        r = httpx.request(method, self.server.url + path, headers={"Authorization": f"Bearer {CONTROL}"}, **kwargs)
        assert r.status_code == 200, r.text
        return r.json()

    def appointments(self) -> list[dict[str, Any]]:
        return self.control("GET", "/twin/appointments")["appointments"]

    def counters(self) -> dict[str, int]:
        return self.control("GET", "/twin/counters")

    def faults(self, **changes: Any) -> None:
        self.control("POST", "/twin/faults", json=changes)

    def ehr(self) -> EhrSettings:
        url = self.server.url
        return EhrSettings(base_url=url + base_path(self.dialect), token_url=url + "/oauth2/token", client_id=CLIENT,
                           mllp_out=f"127.0.0.1:{self.mllp_port}" if self.mllp_port else None,
                           timeout_seconds=3.0, connect_timeout_seconds=1.0)


def start_twins(stack: ExitStack, *, wrap: Callable[[Any], Any] = lambda app: app,
                make: Callable[[str, ThreadedServer, int | None, Any], Twin] = lambda d, server, mllp, _: Twin(d, server, mllp),
                **fhir: Any) -> dict[str, Twin]:
    """A twin of each EHR on a port of its own (Epic's MLLP cancel interface too), stopped with `stack`;
    `fhir`: the FHIR twin's own settings (permissive, conditional_create); `wrap` the app served."""
    found = {}
    for dialect in DIALECTS:
        mllp = free_port() if dialect == "epic" else None
        config = TwinConfig(dialect=dialect, control_key=CONTROL, client_id=CLIENT,
                            client_secret=None if dialect == "epic" else SECRET,
                            public_key_pem=PUBLIC if dialect == "epic" else None, mllp_port=mllp,
                            **(fhir if dialect == "fhir" else {}))
        app = wrap(create_ehr_twin(config))
        found[dialect] = make(dialect, stack.enter_context(ThreadedServer(app)), mllp, app)
    return found


@pytest.fixture
def twins() -> Iterator[dict[str, Twin]]:
    with ExitStack() as stack:
        yield start_twins(stack)


def fleet_settings(redis_url: str, prefix: str, login_url: str, twins: dict[str, Twin], tmp: Path) -> Settings:
    hc = HealthCloudSettings(basic_sha256=(digest("hc:hc-secret-3318"),), search_timeout_seconds=4)
    settings = make_settings(redis_url, prefix, login_url, healthcloud=hc)
    key_file = tmp / "epic.pem"
    key_file.write_text(PRIVATE)
    key_file.chmod(0o600)
    sources, credentials = {}, {}
    for name, src in settings.file.sources.items():
        twin = twins.get(src.adapter)
        if twin is not None:
            ehr = twin.ehr()
            if twin.dialect == "epic":
                ehr = msgspec.structs.replace(ehr, private_key_file=str(key_file))
                credentials[name] = EhrCredentials(private_key_pem=PRIVATE)
            else:
                credentials[name] = EhrCredentials(client_secret=SECRET)
            src = msgspec.structs.replace(src, ehr=ehr)
        sources[name] = src
    file = msgspec.structs.replace(settings.file, sources=sources)
    return msgspec.structs.replace(settings, file=file, ehr_credentials=credentials)


@pytest.fixture
async def hc(redis_url, prefix, sandbox, twins, tmp_path):
    settings = fleet_settings(redis_url, prefix, sandbox.url, twins, tmp_path)
    async with serve_gateway(settings) as client:
        client.systems = {src.adapter: src.source_system for src in settings.sources.values()  # type: ignore[attr-defined]
                          if src.ehr is not None}
        _DIALECT.update({system: dialect for dialect, system in client.systems.items()})  # type: ignore[attr-defined]
        yield client


def _search(systems: dict[str, str], dialects: tuple[str, ...] = DIALECTS, **extra: str) -> str:
    codes = ",".join(f"{systems[d]}|{SERVICE[d]}" for d in dialects)
    doctors = ",".join(f"{systems[d]}|{default_schedules(d)[0].practitioner}" for d in dialects)
    line = f"schedule:Schedule.actor:Practitioner._id={doctors}&{WINDOW}&service-type={codes}" \
           "&status=free&_include=Slot:schedule&_sort=start"
    return line + "".join(f"&{k}={v}" for k, v in extra.items())


_DIALECT: dict[str, str] = {}  # source system -> its EHR's dialect


def _patient(system: str, n: int = 0) -> str:
    """The n-th of the EHR twin's patients (a create for a patient the EHR does not have is 404)."""
    return default_patients(_DIALECT[system])[n].id  # type: ignore[arg-type]


def _create(system: str, slot: str, practitioner: str, salesforce_id: str, patient: str | None = None,
            **changes: Any) -> dict[str, Any]:
    patient = patient or _patient(system)
    return {"resourceType": "Appointment", "status": "proposed",
            "identifier": [{"system": "urn:salesforce:ServiceAppointment", "value": salesforce_id},
                           {"system": "urn:salesforce:Account", "value": "001xx000003DGb2AAG"},
                           {"system": "urn:salesforce:sourceSystem", "value": system}],
            "serviceType": [{"coding": [{"code": "x"}]}], "slot": [{"reference": f"Slot/{slot}"}],
            "comment": "booked by the call centre",
            "participant": [{"actor": {"reference": f"Patient/{patient}"}, "status": "accepted"},
                            {"actor": {"reference": f"Practitioner/{practitioner}"}, "status": "accepted"}],
            **changes}


async def _found(hc: httpx.AsyncClient, body: str) -> dict[str, Any]:
    response = await hc.post("/iam/Slot/_search", content=body, headers=FORM)
    assert response.status_code == 200, response.text
    bundle = response.json()
    validate(bundle, "Bundle")
    return bundle


def _slots(bundle: dict[str, Any], system: str | None = None) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"
            and (system is None or e["resource"]["extension"][0]["valueString"] == system)]


async def test_one_search_finds_slots_in_all_three_ehrs(hc):
    bundle = await _found(hc, _search(hc.systems))
    slots = _slots(bundle)
    starts = [s["start"] for s in slots]
    assert starts == sorted(starts) and bundle["total"] == len(slots)
    by_system = {system: _slots(bundle, system) for system in hc.systems.values()}
    # each twin's first practitioner has four free half hours between 09:00 and 11:00
    assert {system: len(found) for system, found in by_system.items()} == {s: 4 for s in hc.systems.values()}
    schedules = {e["resource"]["id"]: e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "include"}
    for dialect, system in hc.systems.items():
        doctor = default_schedules(dialect)[0].practitioner
        for slot in by_system[system]:
            schedule = schedules[slot["schedule"]["reference"].removeprefix("Schedule/")]
            # the Schedule's actor carries the very id Health Cloud asked about
            assert {"reference": f"Practitioner/{doctor}"} in schedule["actor"]
    assert not [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]


async def test_a_failing_ehr_is_an_outcome_entry_and_the_others_still_answer(hc, twins):
    twins["epic"].faults(fail_before=5, fail_status=500)
    bundle = await _found(hc, _search(hc.systems))
    outcomes = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert [o["extension"][0]["valueString"] for o in outcomes] == [hc.systems["epic"]]
    assert {e["resource"]["extension"][0]["valueString"] for e in bundle["entry"]
            if e["search"]["mode"] == "match"} == {hc.systems["cerner"], hc.systems["fhir"]}


async def test_a_slow_ehr_is_answered_as_its_failure_within_the_search_deadline(hc, twins):
    twins["cerner"].faults(latency_ms=6000)
    started = asyncio.get_running_loop().time()
    bundle = await _found(hc, _search(hc.systems))
    assert asyncio.get_running_loop().time() - started < 5.9  # the 4 s deadline, not the twin's 6 s
    outcomes = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert [o["extension"][0]["valueString"] for o in outcomes] == [hc.systems["cerner"]]
    assert _slots(bundle, hc.systems["epic"]) and _slots(bundle, hc.systems["fhir"])


async def test_an_unknown_source_system_is_its_own_outcome(hc):
    bundle = await _found(hc, _search(hc.systems) + "&schedule:Schedule.actor:Location._id=athena|331")
    outcomes = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert [(o["extension"][0]["valueString"], o["issue"][0]["code"]) for o in outcomes] == [("athena", "not-found")]
    assert len(_slots(bundle)) == 12


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_status_create_again_cancel_again(hc, twins, dialect):
    system = hc.systems[dialect]
    bundle = await _found(hc, _search(hc.systems, (dialect,)))
    slot = _slots(bundle)[0]
    doctor = default_schedules(dialect)[0].practitioner
    status = await hc.get(f"/iam/Slot/{system}/{slot['id']}", headers={"Authorization": HC})
    assert status.status_code == 200 and status.json()["status"] == "free"
    validate(status.json(), "Slot")

    body = _create(system, slot["id"], doctor, "08pxx00000000A1AAA")
    created = await hc.post(f"/iam/Appointment/{system}", json=body, headers=JSON)
    assert created.status_code == 200, created.text
    appointment = created.json()
    validate(appointment, "Appointment")
    assert appointment["status"] == "booked" and appointment["id"]
    assert appointment["slot"] == [{"reference": f"Slot/{slot['id']}"}]
    assert {"system": "urn:salesforce:ServiceAppointment", "value": "08pxx00000000A1AAA"} in appointment["identifier"]
    assert [a["status"] for a in twins[dialect].appointments()] == ["booked"]
    busy = await hc.get(f"/iam/Slot/{system}/{slot['id']}", headers={"Authorization": HC})
    assert busy.json()["status"] == "busy"

    # Health Cloud sends no idempotency key: the same ServiceAppointment books once
    again = await hc.post(f"/iam/Appointment/{system}", json=body, headers=JSON)
    assert again.status_code == 200 and again.json() == appointment
    assert len(twins[dialect].appointments()) == 1

    cancel = {"resourceType": "Appointment", "id": appointment["id"], "status": "cancelled",
              "cancelationReason": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                                          "appointment-cancellation-reason", "code": "pat-mv"}]}}
    cancelled = await hc.post(f"/iam/Appointment/{system}/{appointment['id']}", json=cancel, headers=JSON)
    assert cancelled.status_code == 200, cancelled.text
    validate(cancelled.json(), "Appointment")
    assert (cancelled.json()["id"], cancelled.json()["status"]) == (appointment["id"], "cancelled")
    assert [a["status"] for a in twins[dialect].appointments()] == ["cancelled"]
    if dialect == "epic":  # Epic publishes no FHIR cancel: it went as HL7 v2 over MLLP
        assert twins["epic"].counters()["mllp_messages"] == 1
    twice = await hc.post(f"/iam/Appointment/{system}/{appointment['id']}", json=cancel, headers=JSON)
    assert twice.status_code == 200 and twice.json()["status"] == "cancelled"
    if dialect == "epic":
        assert twins["epic"].counters()["mllp_messages"] == 1  # cancelled already: nothing sent
    read = await hc.get(f"/iam/Appointment/{system}/{appointment['id']}", headers={"Authorization": HC})
    assert read.status_code == 200 and read.json()["status"] == "cancelled"


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_taken_slot_is_proposed_with_the_reason(hc, twins, dialect):
    system = hc.systems[dialect]
    slot = _slots(await _found(hc, _search(hc.systems, (dialect,))))[0]
    doctor = default_schedules(dialect)[0].practitioner
    first = await hc.post(f"/iam/Appointment/{system}", json=_create(system, slot["id"], doctor, "08pxx00000000B1AAA"),
                          headers=JSON)
    assert first.json()["status"] == "booked"
    other = _create(system, slot["id"], doctor, "08pxx00000000B2AAA", patient=_patient(system, 1))
    second = await hc.post(f"/iam/Appointment/{system}", json=other, headers=JSON)
    assert second.status_code == 200
    answer = second.json()
    validate(answer, "Appointment")
    assert answer["status"] == "proposed" and "id" not in answer and answer["comment"]
    assert _patient(system, 1) not in answer["comment"]
    assert len(twins[dialect].appointments()) == 1


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_an_answer_lost_after_the_ehr_stored_it_is_found_not_booked_again(hc, twins, dialect):
    system = hc.systems[dialect]
    slot = _slots(await _found(hc, _search(hc.systems, (dialect,))))[0]
    doctor = default_schedules(dialect)[0].practitioner
    twins[dialect].faults(fail_after_store=1, after_store="drop")
    body = _create(system, slot["id"], doctor, "08pxx00000000C1AAA")
    created = await hc.post(f"/iam/Appointment/{system}", json=body, headers=JSON)
    assert created.status_code == 200 and created.json()["status"] == "booked", created.text
    stored = twins[dialect].appointments()
    assert len(stored) == 1 and created.json()["id"] == stored[0]["id"]
    again = await hc.post(f"/iam/Appointment/{system}", json=body, headers=JSON)
    assert again.json() == created.json() and len(twins[dialect].appointments()) == 1


async def test_a_bare_id_is_found_in_the_ehr_that_has_it(hc, twins):
    system = hc.systems["epic"]
    slot = _slots(await _found(hc, _search(hc.systems, ("epic",))))[0]
    bare = await hc.get(f"/iam/Slot/{slot['id']}", headers={"Authorization": HC})
    assert bare.status_code == 200 and bare.json()["id"] == slot["id"]
    unknown = await hc.get("/iam/Slot/no-such-slot-1", headers={"Authorization": HC})
    assert unknown.status_code == 404
    validate(unknown.json(), "OperationOutcome")
    assert system


async def test_a_create_without_the_salesforce_appointment_id_is_400(hc):
    system = hc.systems["fhir"]
    body = _create(system, "s1-203001010900", "example", "not-a-salesforce-id")
    response = await hc.post(f"/iam/Appointment/{system}", json=body, headers=JSON)
    assert response.status_code == 400
    assert response.json()["issue"][0]["expression"] == ["Appointment.identifier"]


# -- the loop: what came from the EHR is not booked in it again ---------------------------------------------

@pytest.fixture
async def org_with_iam(redis_url, prefix, twins, tmp_path):
    """The Salesforce sandbox as an org with IAM configured, calling out to the gateway it books through."""
    from gateway.sandbox import SandboxConfig, create_sandbox_app
    from tests.conftest import CLIENT_ID, CLIENT_SECRET, CONTROL_KEY

    port = free_port()
    config = SandboxConfig(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, control_key=CONTROL_KEY,
                           iam_url=f"http://127.0.0.1:{port}/iam", iam_authorization=HC)
    with ThreadedServer(create_sandbox_app(config)) as sandbox:
        settings = fleet_settings(redis_url, prefix, sandbox.url, twins, tmp_path)
        async with serve_gateway(settings, port=port) as gateway:
            yield gateway, sandbox


async def _iam_callouts(sandbox: ThreadedServer, count: int) -> list[dict[str, Any]]:
    from tests.conftest import CONTROL_KEY

    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {CONTROL_KEY}"}) as client:
        for _ in range(200):
            called = (await client.get(sandbox.url + "/sandbox/iam-callouts")).json()
            if len(called) >= count:
                return called
            await asyncio.sleep(0.05)
    raise AssertionError(f"the org made {len(called)} of {count} callouts")


async def test_a_booking_that_came_from_the_ehr_is_answered_from_it_and_not_booked_again(org_with_iam, twins):
    from tests.conftest import VIDEO_VISIT, auth, corpus

    gateway, sandbox = org_with_iam
    cerner = twins["cerner"]
    schedule = default_schedules("cerner")[0]
    slot, start, end = f"{schedule.id}-{DAY.replace('-', '')}1000", f"{DAY}T10:00:00Z", f"{DAY}T10:30:00Z"
    # the EHR's own booking, on its own calendar
    token = httpx.post(cerner.server.url + "/oauth2/token", data={"grant_type": "client_credentials"},
                       auth=(CLIENT, SECRET)).json()["access_token"]
    made = httpx.post(cerner.ehr().base_url + "/Appointment", headers={"Authorization": f"Bearer {token}",
                                                                       "Content-Type": "application/fhir+json"},
                      json={"resourceType": "Appointment", "status": "booked", "slot": [{"reference": f"Slot/{slot}"}],
                            "participant": [{"actor": {"reference": "Patient/12724066"}, "status": "accepted"}]})
    assert made.status_code == 201, made.text
    ehr_id = made.headers["Location"].rstrip("/").rpartition("/")[2]
    # ... which its interface sends to the gateway's first direction, on to Health Cloud
    booking = msgspec.json.decode(corpus(VIDEO_VISIT))
    booking |= {"id": ehr_id, "status": "booked", "start": start, "end": end, "slot": [{"reference": f"Slot/{slot}"}]}
    booking.pop("cancelationReason", None)
    booked = await gateway.post("/fhir/cerner/Appointment", json=booking, headers=auth("cerner"))
    assert booked.status_code == 201, booked.text
    salesforce_id = booked.json()["id"]
    # the org, with IAM configured, tells its scheduling system of the ServiceAppointment
    [called] = await _iam_callouts(sandbox, 1)
    assert called["service_appointment"] == salesforce_id and called["source_system"] == "cerner"
    assert (called["slot_status"], called["slot_state"]) == (200, "busy")  # the EHR's own booking holds it
    assert (called["create_status"], called["appointment_status"]) == (200, "booked")
    assert called["ehr_appointment"] == ehr_id  # the appointment that exists
    assert [a["id"] for a in cerner.appointments()] == [ehr_id] and cerner.counters()["creates"] == 1


# -- the operators see this direction too -------------------------------------------------------------------

async def test_operators_see_the_callouts_with_the_ehrs_answer_and_no_patient_data(hc, twins, log_file):
    from prometheus_client.parser import text_string_to_metric_families

    from tests.conftest import ADMIN_KEY, PHI_KEY, VIDEO_VISIT, auth, corpus

    system = hc.systems["epic"]
    slot = _slots(await _found(hc, _search(hc.systems)), system)[0]
    created = await hc.post(f"/iam/Appointment/{system}", headers=JSON,
                            json=_create(system, slot["id"], default_schedules("epic")[0].practitioner,
                                         "08pxx00000000E1AAA", patient=_patient(system, 2)))
    assert created.json()["status"] == "booked"
    assert (await hc.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth())).status_code == 201

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    out = (await hc.get("/admin/api/requests?direction=out", headers=admin)).json()["requests"]
    assert [(e["op"], e["outcome"], e["source"]) for e in out] == [("create", "booked", "epic"),
                                                                    ("find", "found", "healthcloud")]
    assert out[0]["ehr_status"] == 200 and out[0]["ehr_ms"] > 0 and "patient" not in out[0]
    inbound = (await hc.get("/admin/api/requests?direction=in", headers=admin)).json()["requests"]
    assert [e["op"] for e in inbound] == ["book"]
    as_phi = (await hc.get(f"/admin/api/requests/{out[0]['id']}", headers={"Authorization": f"Bearer {PHI_KEY}"}))
    assert as_phi.json()["patient"] == _patient(system, 2)
    assert (await hc.get("/admin/api/requests?direction=sideways", headers=admin)).status_code == 400

    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families((await hc.get("/metrics")).text) for s in fam.samples}
    assert metrics[("ehrgw_callouts_total", (("op", "create"), ("outcome", "booked"), ("status", "200")))] == 1
    assert metrics[("ehrgw_ehr_call_seconds_count", (("source", "epic"),))] >= 2  # the search, the booking
    assert _patient(system, 2) not in (await hc.get("/admin/api/requests", headers=admin)).text
    assert '"callout"' in log_file.read_text() and _patient(system, 2) not in log_file.read_text()


async def test_the_dashboard_shows_each_direction(hc, twins, chromium):
    """In Chromium: the Direction filter splits Health Cloud's callouts from the EHRs' bookings, and a
    callout's row shows what the EHR answered."""
    from playwright.async_api import expect

    from tests.conftest import ADMIN_KEY, VIDEO_VISIT, auth, corpus
    from tests.test_dashboard import browser_page, sign_in

    system = hc.systems["cerner"]
    slot = _slots(await _found(hc, _search(hc.systems, ("cerner",))))[0]
    created = await hc.post(f"/iam/Appointment/{system}", headers=JSON,
                            json=_create(system, slot["id"], default_schedules("cerner")[0].practitioner,
                                         "08pxx00000000F1AAA"))
    assert created.json()["status"] == "booked"
    assert (await hc.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth())).status_code == 201

    async with browser_page(chromium, str(hc.base_url)) as (context, page, problems):
        await sign_in(page, ADMIN_KEY)
        rows = page.locator('[data-testid="request-row"]')
        await expect(rows).to_have_count(3)  # the search, the create, the booking
        await page.get_by_test_id("filter-direction").select_option("out")
        await expect(rows).to_have_count(2)
        create = page.locator('[data-testid="request-row"][data-outcome="booked"]')
        await expect(create).to_have_count(1)
        await expect(create.get_by_test_id("row-ehr")).to_contain_text("EHR 201")  # Cerner's create
        await create.click()  # its detail shows the EHR's side, not Salesforce's empty one
        await expect(page.get_by_test_id("detail-ehr-status")).to_have_text("201")
        await expect(page.get_by_test_id("detail-sf-id")).to_have_count(0)
        await expect(page.locator('[data-testid="request-row"][data-outcome="found"]')).to_have_count(1)
        await page.get_by_test_id("filter-direction").select_option("in")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_have_attribute("data-outcome", "booked")
        await expect(rows.first.get_by_test_id("row-sf-id")).to_be_visible()
        # each direction counted on its own: the EHR's booking, and Health Cloud's two callouts (the
        # create answered "booked" is not a booking from an EHR)
        await expect(page.get_by_test_id("kpi-booked")).to_have_text("1")
        await expect(page.get_by_test_id("kpi-callouts")).to_have_text("2")
        assert problems == []
    stats = (await hc.get("/admin/api/stats", headers={"Authorization": f"Bearer {ADMIN_KEY}"})).json()
    by_direction = {(p["direction"], p["outcome"]): p["count"] for p in stats["series"]}
    assert by_direction == {("in", "booked"): 1, ("out", "booked"): 1, ("out", "found"): 1}


@pytest.mark.parametrize("status", [503, 429, 500])
async def test_an_ehr_failing_before_it_acted_is_proposed_and_the_next_create_books(hc, twins, status):
    system = hc.systems["fhir"]
    slot = _slots(await _found(hc, _search(hc.systems, ("fhir",))))[0]
    body = _create(system, slot["id"], default_schedules("fhir")[0].practitioner, "08pxx00000000G1AAA")
    twins["fhir"].faults(fail_before=1, fail_status=status)
    first = await hc.post(f"/iam/Appointment/{system}", json=body, headers=JSON)
    assert first.status_code == 200 and first.json()["status"] == "proposed" and first.json()["comment"]
    assert twins["fhir"].appointments() == []
    again = await hc.post(f"/iam/Appointment/{system}", json=body, headers=JSON)
    assert again.json()["status"] == "booked" and len(twins["fhir"].appointments()) == 1


@pytest.mark.parametrize("after_store", ["500", "503", "504"])
async def test_an_ehr_failing_after_it_stored_is_found_not_booked_again(hc, twins, after_store):
    system = hc.systems["cerner"]
    slot = _slots(await _found(hc, _search(hc.systems, ("cerner",))))[0]
    body = _create(system, slot["id"], default_schedules("cerner")[0].practitioner, "08pxx00000000H1AAA")
    twins["cerner"].faults(fail_after_store=1, after_store=after_store)
    first = await hc.post(f"/iam/Appointment/{system}", json=body, headers=JSON)
    assert first.json()["status"] == "booked", first.text
    assert [a["id"] for a in twins["cerner"].appointments()] == [first.json()["id"]]


async def test_the_same_appointment_with_another_slot_is_409(hc, twins):
    system = hc.systems["fhir"]
    first, second = _slots(await _found(hc, _search(hc.systems, ("fhir",))))[:2]
    doctor = default_schedules("fhir")[0].practitioner
    booked = await hc.post(f"/iam/Appointment/{system}", json=_create(system, first["id"], doctor, "08pxx00000000J1AAA"),
                           headers=JSON)
    assert booked.json()["status"] == "booked"
    other = await hc.post(f"/iam/Appointment/{system}", json=_create(system, second["id"], doctor, "08pxx00000000J1AAA"),
                          headers=JSON)
    assert other.status_code == 409 and len(twins["fhir"].appointments()) == 1
    validate(other.json(), "OperationOutcome")


async def test_with_redis_gone_a_create_is_503_and_nothing_is_sent(redis_url, prefix, sandbox, twins, tmp_path):
    settings = fleet_settings(redis_url, prefix, sandbox.url, twins, tmp_path)
    settings = msgspec.structs.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}")
    async with serve_gateway(settings) as gateway:
        system = next(s.source_system for s in settings.sources.values() if s.adapter == "epic")
        body = _create(system, default_schedules("epic")[0].id + "-" + DAY.replace("-", "") + "0900",
                       default_schedules("epic")[0].practitioner, "08pxx00000000K1AAA")
        response = await gateway.post(f"/iam/Appointment/{system}", json=body, headers=JSON)
        assert response.status_code == 503 and "Retry-After" in response.headers
        validate(response.json(), "OperationOutcome")
    assert twins["epic"].counters()["creates"] == 0


async def test_each_ehr_has_its_own_breaker(redis_url, prefix, sandbox, twins, tmp_path):
    """An EHR that keeps failing is no longer called (its breaker opens) while the others still are."""
    from gateway.settings import BreakerSettings

    settings = fleet_settings(redis_url, prefix, sandbox.url, twins, tmp_path)
    breaker = BreakerSettings(min_calls=4, failure_ratio=0.5, window_seconds=30, open_seconds=60)
    settings = msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, breaker=breaker))
    twins["epic"].faults(fail_before=1000, fail_status=500)
    async with serve_gateway(settings) as gateway:
        gateway.systems = {s.adapter: s.source_system for s in settings.sources.values() if s.ehr}  # type: ignore[attr-defined]
        # the failures reach the breaker's shared window at its next sync (every 0.5 s): search until
        # a search no longer reaches Epic
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            before = twins["epic"].counters()["api_calls"]
            await _found(gateway, _search(gateway.systems))
            if twins["epic"].counters()["api_calls"] == before:
                break
            assert asyncio.get_running_loop().time() < deadline, "Epic's breaker never opened"
            await asyncio.sleep(0.1)
        called = twins["epic"].counters()["api_calls"]
        others = twins["cerner"].counters()["api_calls"]
        for _ in range(3):
            bundle = await _found(gateway, _search(gateway.systems))
            outcomes = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
            assert [o["extension"][0]["valueString"] for o in outcomes] == [gateway.systems["epic"]]
            assert _slots(bundle, gateway.systems["cerner"])
        assert twins["epic"].counters()["api_calls"] == called  # refused at the breaker: nothing sent
        assert twins["cerner"].counters()["api_calls"] > others


async def test_a_search_its_caller_abandons_frees_the_ehrs_call_slots(redis_url, prefix, sandbox, twins, tmp_path):
    """Health Cloud's callout gives up (its timeout): the gateway stops waiting for the EHRs too, so a
    slow EHR's calls do not pile up behind searches nobody will read."""
    from tests.conftest import ADMIN_KEY

    settings = fleet_settings(redis_url, prefix, sandbox.url, twins, tmp_path)
    sources = {name: msgspec.structs.replace(src, ehr=msgspec.structs.replace(src.ehr, max_concurrent_calls=1, timeout_seconds=30))
               if src.adapter == "cerner" else src for name, src in settings.file.sources.items()}
    hc_settings = msgspec.structs.replace(settings.file.healthcloud, search_timeout_seconds=30)
    settings = msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, sources=sources,
                                                                               healthcloud=hc_settings))
    async with serve_gateway(settings) as gateway:
        systems = {s.adapter: s.source_system for s in settings.sources.values() if s.ehr}
        await _found(gateway, _search(systems, ("cerner",)))  # the token, the connection
        twins["cerner"].faults(latency_ms=15_000)
        with pytest.raises(httpx.ReadTimeout):  # Health Cloud gives up after half a second
            await gateway.post("/iam/Slot/_search", content=_search(systems, ("cerner",)), headers=FORM, timeout=0.5)
        twins["cerner"].faults(latency_ms=0)
        started = asyncio.get_running_loop().time()
        # Cerner's one call slot is free again: held by the abandoned search, this would wait ~15 s
        bundle = await _found(gateway, _search(systems, ("cerner",)))
        assert _slots(bundle) and asyncio.get_running_loop().time() - started < 8
        logged = (await gateway.get("/admin/api/requests?direction=out",
                                    headers={"Authorization": f"Bearer {ADMIN_KEY}"})).json()
        assert [e["status"] for e in logged["requests"]][:2] == [200, 499]
