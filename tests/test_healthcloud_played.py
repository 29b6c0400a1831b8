"""Issue 15's "done when", from the README's first command: `ehr-gateway serve` with nothing configured
starts the Cerner, Epic and FHIR twins beside the Salesforce sandbox; a scripted Health Cloud
(`ehr-gateway healthcloud …`, its named credential as printed) finds slots across the three in one
search, books one in each, and cancels all three (Epic's through its HL7 v2 interface); and an
appointment that came from an EHR, told back to the gateway by the sandbox as an org with IAM
configured, is not booked in that EHR a second time. All over real HTTP and MLLP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx

from gateway.twins.config import corpus_bookings, default_patients
from tests.conftest import ROOT, VIDEO_VISIT, corpus, free_port

EXE = Path(sys.executable).with_name("ehr-gateway")
SERVICE = {"cerner": "2572307911", "epic": "40111223", "Salesforce": "124"}  # the work-type codes, per source system
# a patient of each EHR twin (a create for one the EHR does not have is 404)
PATIENTS = {system: default_patients(dialect)[0].id  # type: ignore[arg-type]
            for system, dialect in (("cerner", "cerner"), ("epic", "epic"), ("Salesforce", "fhir"))}
OTHER_FHIR_PATIENT = default_patients("fhir")[1].id
# what the demo's Cerner twin holds from the start (the corpus's booking): not this test's
HELD = {b.appointment_id for d in ("cerner", "epic", "fhir") for b in corpus_bookings(d)}  # type: ignore[arg-type]


def _booked_here(url: str, key: str) -> list[dict[str, Any]]:
    """The twin's appointments this test made."""
    return [a for a in _get(f"{url}/twin/appointments", key)["appointments"] if a["id"] not in HELD]


def _ready(base: str, proc: subprocess.Popen[bytes], out: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, out.read_text()
        assert time.monotonic() < deadline, "the gateway did not become ready"
        time.sleep(0.2)


def _healthcloud(env: dict[str, str], *args: str) -> tuple[int, Any]:
    done = subprocess.run([str(EXE), "healthcloud", *args], env=env, capture_output=True, timeout=60)
    return done.returncode, json.loads(done.stdout)


def _get(url: str, key: str) -> Any:
    r = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_scripted_health_cloud_books_and_cancels_on_three_ehrs(tmp_path: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SALESFORCE_", "REDIS_URL", "EHR_GATEWAY_DATA_KEY"))}
    env["EHR_GATEWAY_DATA"] = str(tmp_path / "data")
    out = tmp_path / "stdout"
    proc = subprocess.Popen([str(EXE), "serve", "--port", str(port)], cwd=ROOT, env=env, stdout=out.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _ready(base, proc, out)
        printed = out.read_text()
        twins = {d: (url, key) for d, url, key in re.findall(
            r"(\w+) EHR twin at (http://\S+) \(its appointments: \S+ with Authorization: Bearer (\S+)\)", printed)}
        assert set(twins) == {"cerner", "epic", "fhir"}, printed
        credential = re.search(r"with HTTP Basic (healthcloud-demo:\S+?);", printed).group(1)
        sandbox, control = re.search(r"sandbox at (http://\S+)\n.*Bearer (\S+) \(the sandbox's control key\)",
                                     printed).groups()
        hc_env = {**env, "EHR_GATEWAY_HEALTHCLOUD_URL": f"{base}/iam", "EHR_GATEWAY_HEALTHCLOUD_CREDENTIAL": credential}

        # one search across the three EHRs (values named by source system, as an org with several sends them)
        day = (date.today() + timedelta(days=2)).isoformat()
        code, bundle = _healthcloud(hc_env, "find", "--start", f"{day}T09:00:00Z", "--end", f"{day}T10:00:00Z",
                                    *(f"--service-type={s}|{c}" for s, c in SERVICE.items()))
        assert code == 0, bundle
        slots = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "match"]
        by_system: dict[str, list[dict[str, Any]]] = {}
        for slot in slots:
            by_system.setdefault(slot["extension"][0]["valueString"], []).append(slot)
        assert set(by_system) == set(SERVICE), bundle

        # book one in each: the status first, as Health Cloud does
        booked = {}
        for number, (system, found) in enumerate(sorted(by_system.items())):
            code, status = _healthcloud(hc_env, "status", system, found[0]["id"])
            assert (code, status["status"]) == (0, "free")
            code, appointment = _healthcloud(hc_env, "book", system, found[0]["id"], "--patient", PATIENTS[system],
                                             "--service-appointment", f"08pxx00000000D{number}AAA")
            assert (code, appointment["status"]) == (0, "booked"), appointment
            booked[system] = (found[0], appointment)
        dialect = {"cerner": "cerner", "epic": "epic", "Salesforce": "fhir"}
        # each twin numbers its appointments in a space of its own: a bare id names one EHR's
        assert len({appointment["id"] for _, appointment in booked.values()}) == 3, booked

        # the FHIR twin is a plain server that would book the slot again: the gateway does not
        slot, appointment = booked["Salesforce"]
        code, again = _healthcloud(hc_env, "book", "Salesforce", slot["id"], "--patient", OTHER_FHIR_PATIENT,
                                   "--service-appointment", "08pxx00000000D9AAA")
        assert (code, again["status"]) == (0, "proposed") and "id" not in again, again
        code, status = _healthcloud(hc_env, "status", "Salesforce", slot["id"])
        assert (code, status["status"]) == (0, "busy")
        code, read = _healthcloud(hc_env, "read", "Salesforce", appointment["id"])
        shaped = ("identifier", "slot", "participant", "start", "end")  # answered as the create was
        assert code == 0 and read["id"] == appointment["id"] and read["status"] == "booked"
        assert {k: read[k] for k in shaped} == {k: appointment[k] for k in shaped}
        for system, (slot, appointment) in booked.items():
            url, key = twins[dialect[system]]
            stored = _booked_here(url, key)
            assert [(a["id"], a["slot"], a["status"]) for a in stored] == [(appointment["id"], slot["id"], "booked")]

        # the Cerner appointment, now on Cerner's calendar, comes back through the first direction;
        # the org (IAM configured) tells the gateway, which answers it from Cerner and books nothing
        slot, appointment = booked["cerner"]
        first = json.loads(corpus(VIDEO_VISIT))
        first |= {"id": appointment["id"], "status": "booked", "start": slot["start"], "end": slot["end"],
                  "slot": [{"reference": f"Slot/{slot['id']}"}]}
        first.pop("cancelationReason")
        r = httpx.post(f"{base}/fhir/cerner/Appointment", json=first, timeout=10,
                       headers={"Authorization": "Bearer demo-cerner-key", "Content-Type": "application/fhir+json"})
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 20
        while not (called := [c for c in _get(f"{sandbox}/sandbox/iam-callouts", control)
                              if c["service_appointment"] == r.json()["id"]]):
            assert time.monotonic() < deadline, "the org made no callout"
            time.sleep(0.1)
        assert (called[0]["create_status"], called[0]["appointment_status"]) == (200, "booked"), called
        assert called[0]["ehr_appointment"] == appointment["id"]
        url, key = twins["cerner"]
        assert len(_booked_here(url, key)) == 1

        # cancel all three; Epic's goes as HL7 v2 over MLLP
        for system, (slot, appointment) in booked.items():
            code, cancelled = _healthcloud(hc_env, "cancel", system, appointment["id"])
            assert (code, cancelled["status"]) == (0, "cancelled"), cancelled
            url, key = twins[dialect[system]]
            assert [a["status"] for a in _booked_here(url, key)] == ["cancelled"]
        url, key = twins["epic"]
        assert _get(f"{url}/twin/counters", key)["mllp_messages"] == 1
        assert not [p for p in (*PATIENTS.values(), OTHER_FHIR_PATIENT) if p in out.read_text()]  # never logged
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
