"""The exactly-once proof for Health Cloud's callouts, bounded for the suite: a few dozen
ServiceAppointments across the EHR twins, a third of them created twice, a fifth of the twins'
creates failing (half before storing, half after: a dropped connection or a 500), Redis killed and
restarted once, a gateway worker killed once. The longer run is `benchmarks/callouts_proof.py`.

Also the twins' fault ratios the proof relies on, over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from benchmarks.callouts_proof import ProofOptions, run_proof
from gateway.edges.server import ThreadedServer
from gateway.twins import TwinConfig, create_ehr_twin
from gateway.twins.app import base_path
from gateway.twins.config import default_schedules

CONTROL, CLIENT, SECRET = "test-proof-control", "test-proof-client", "test-proof-secret-19ab"


async def test_every_create_is_exactly_one_appointment_in_the_ehrs(tmp_path):
    opts = ProofOptions(appointments=48, concurrency=8, workers=2, fault_ratio=0.2, deadline_seconds=150)
    fig = await run_proof(opts, tmp_path)
    print("\n" + fig.table())
    # the run met what it was meant to meet
    assert fig.faults_before_store > 0 and fig.faults_after_store > 0
    assert fig.redis_restarts == 1 and fig.workers_killed == 1
    assert fig.sent_twice > 0 and fig.retried > 0
    # and every ServiceAppointment is one appointment, answered with its id
    assert fig.problems == []
    assert fig.answered_booked == fig.held == fig.appointments == 48
    assert fig.duplicates == 0 and fig.lost == 0 and fig.unbooked == 0 and fig.mismatched_answers == 0
    # no create was sent again once one had been stored: the look-up found it first
    assert fig.ehr_creates == fig.appointments


# -- the twins' create fault ratios ------------------------------------------------------------------

@pytest.fixture
def cerner() -> Iterator[str]:
    config = TwinConfig(dialect="cerner", control_key=CONTROL, client_id=CLIENT, client_secret=SECRET)
    with ThreadedServer(create_ehr_twin(config)) as server:
        yield server.url


def _control(url: str, method: str, path: str, **kw) -> dict:
    r = httpx.request(method, url + path, headers={"Authorization": f"Bearer {CONTROL}"}, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def _creates(url: str, n: int) -> list[int]:
    """n creates of n different slots: their statuses (-1: the connection dropped)."""
    token = httpx.post(url + "/oauth2/token", data={"grant_type": "client_credentials"},
                       auth=(CLIENT, SECRET)).json()["access_token"]
    schedule = default_schedules("cerner")[0].id
    slots = [e["resource"]["id"] for e in httpx.get(
        url + base_path("cerner") + "/Slot", headers={"Authorization": f"Bearer {token}"},
        params={"service-type": "https://fhir.cerner.com/ec2458f2-1e24-41c8-b71b-0e701af7583d/codeSet/14249|2572307911",
                "start": ["ge2000-01-01", "lt2100-01-01"], "_count": "100"}).json()["entry"]
        if e["resource"]["id"].startswith(schedule)]
    statuses = []
    for slot in slots[:n]:
        body = {"resourceType": "Appointment", "status": "booked", "slot": [{"reference": f"Slot/{slot}"}],
                "participant": [{"actor": {"reference": "Patient/12724066"}, "status": "accepted"}]}
        try:
            statuses.append(httpx.post(url + base_path("cerner") + "/Appointment", json=body,
                                       headers={"Authorization": f"Bearer {token}",
                                                "Content-Type": "application/fhir+json"}).status_code)
        except httpx.TransportError:
            statuses.append(-1)
    return statuses


def test_every_create_fails_before_storing_when_the_ratio_is_one_and_none_is_stored_after(cerner):
    _control(cerner, "POST", "/twin/faults", json={"create_fail_ratio": 1.0, "after_store_share": 0.0,
                                                    "fail_status": 429})
    assert _creates(cerner, 3) == [429, 429, 429]
    assert _control(cerner, "GET", "/twin/appointments")["appointments"] == []
    assert _control(cerner, "GET", "/twin/counters")["create_faults_before"] == 3


def test_creates_drawn_after_store_are_stored_then_failed(cerner):
    _control(cerner, "POST", "/twin/faults", json={"create_fail_ratio": 1.0, "after_store_share": 1.0,
                                                    "after_store": "500"})
    assert _creates(cerner, 2) == [500, 500]
    assert len(_control(cerner, "GET", "/twin/appointments")["appointments"]) == 2
    counters = _control(cerner, "GET", "/twin/counters")
    assert (counters["create_faults_after_store"], counters["create_faults_before"]) == (2, 0)


def test_the_draws_repeat_with_the_seed_and_spare_the_rest(cerner):
    faults = {"create_fail_ratio": 0.5, "after_store_share": 0.5, "fail_status": 503, "after_store": "drop",
              "fault_seed": 7}
    _control(cerner, "POST", "/twin/faults", json=faults)
    first = _creates(cerner, 12)
    assert {201, 503, -1} <= set(first)  # some pass, some fail before, some drop after storing
    _control(cerner, "POST", "/twin/reset")
    _control(cerner, "POST", "/twin/faults", json=faults)
    assert _creates(cerner, 12) == first
    # stored: the ones answered 201 and the ones dropped after storing; not the 503s
    assert len(_control(cerner, "GET", "/twin/appointments")["appointments"]) == first.count(201) + first.count(-1)
