"""The README's first command, as a newcomer runs it: `ehr-gateway serve` with nothing configured
starts an embedded Redis and the sandbox, prints a demo key, and books the corpus's Cerner
appointment over real HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from tests.certs import CA
from tests.conftest import CORPUS, ROOT

VIDEO_VISIT = CORPUS / "cerner-millennium-r4" / "r4_appointment_video_visit_entry.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _started(tmp_path: Path, workers: int = 1) -> tuple[subprocess.Popen[bytes], str]:
    """`ehr-gateway serve` with nothing configured, its data under `tmp_path`, once ready: the process
    and its address (what it printed: `tmp_path / "stdout"`)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SALESFORCE_", "REDIS_URL", "EHR_GATEWAY_DATA_KEY"))}
    env["EHR_GATEWAY_DATA"] = str(tmp_path / "data")
    out = (tmp_path / "stdout").open("w+")
    exe = Path(sys.executable).with_name("ehr-gateway")
    proc = subprocess.Popen([str(exe), "serve", "--port", str(port), "--workers", str(workers)], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"gateway did not become ready:\n{(tmp_path / 'stdout').read_text()}")
        time.sleep(0.2)


@contextmanager
def demo(tmp_path: Path, workers: int = 1) -> Iterator[tuple[str, str]]:
    """`ehr-gateway serve` as the README's first command runs it, with nothing configured: its address
    and what it printed once ready. Stopped as an operator stops it; nothing of it may outlive it."""
    proc, base = _started(tmp_path, workers)
    try:
        yield base, (tmp_path / "stdout").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)  # as an operator or a process manager stops it
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        leftovers = _processes_mentioning(str(tmp_path))
        if leftovers:
            os.killpg(proc.pid, signal.SIGKILL)
    assert leftovers == [], "the embedded Redis outlived the gateway"


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_with_embedded_defaults_books_the_demo(tmp_path: Path, workers: int):
    with demo(tmp_path, workers) as (base, printed):
        assert "started an embedded Redis" in printed
        assert "No Salesforce credentials: serving the Health Cloud sandbox" in printed
        assert "Authorization: Bearer demo-cerner-key" in printed
        sandbox_url = re.search(r"sandbox at (http://127\.0\.0\.1:\d+)", printed).group(1)

        headers = {"Authorization": "Bearer demo-cerner-key", "Content-Type": "application/fhir+json",
                   "Idempotency-Key": "readme-demo"}
        r = httpx.post(f"{base}/fhir/cerner/Appointment", content=VIDEO_VISIT.read_bytes(), headers=headers, timeout=10)
        assert r.status_code == 201, r.text
        again = httpx.post(f"{base}/fhir/cerner/Appointment", content=VIDEO_VISIT.read_bytes(), headers=headers, timeout=10)
        assert again.content == r.content and again.headers["idempotent-replayed"] == "true"
        assert httpx.get(f"{sandbox_url}/sandbox/appointments", timeout=5).status_code == 401  # not without its key
        control = re.search(r"sandbox/appointments with Authorization: Bearer (\S+)", printed).group(1)
        stored = httpx.get(f"{sandbox_url}/sandbox/appointments", timeout=5,
                           headers={"Authorization": f"Bearer {control}"}).json()
        listing = stored if isinstance(stored, list) else stored.get("appointments", stored)
        assert [a["id"] for a in listing] == [r.json()["id"]]
        # the org (IAM configured) calls back into the Cerner twin for this booking: the twin holds the
        # corpus's slot and the appointment the EHR made on it, so the loop is recognised, not refused
        deadline = time.monotonic() + 20
        while not (called := [c for c in httpx.get(f"{sandbox_url}/sandbox/iam-callouts", timeout=5,
                                                   headers={"Authorization": f"Bearer {control}"}).json()
                              if c["service_appointment"] == r.json()["id"] and c.get("create_status")]):
            assert time.monotonic() < deadline, "the org made no callout"
            time.sleep(0.2)
        assert (called[0]["slot_status"], called[0]["slot_state"]) == (200, "busy"), called
        assert (called[0]["create_status"], called[0]["appointment_status"], called[0]["ehr_appointment"]) == \
            (200, "booked", "4817572"), called
        assert "12724066" not in (tmp_path / "stdout").read_text()  # the patient id: never logged
        # /metrics on whichever worker answers counts every worker's requests (two bookings sent)
        from prometheus_client.parser import text_string_to_metric_families

        for _ in range(3):
            scraped = httpx.get(f"{base}/metrics", timeout=5)
            total = sum(s.value for fam in text_string_to_metric_families(scraped.text)
                        for s in fam.samples if s.name == "ehrgw_requests_total")
            assert total == 2, scraped.text
        # the dashboard opens too: the operator keys printed for this start, on every worker
        admin_key = re.search(r"^\s+admin\s+(\S+)", printed, re.M).group(1)
        phi_key = re.search(r"^\s+PHI\s+(\S+)", printed, re.M).group(1)
        assert f"the operators' dashboard: {base}/admin/" in printed
        assert httpx.get(f"{base}/admin/", timeout=5).status_code == 200
        for _ in range(3):  # whichever worker answers
            logged = httpx.get(f"{base}/admin/api/requests", headers={"Authorization": f"Bearer {admin_key}"}, timeout=5)
            assert logged.status_code == 200 and len(logged.json()["requests"]) >= 1, logged.text
            booked = next(e["id"] for e in logged.json()["requests"] if e["outcome"] == "booked")
            as_admin = httpx.get(f"{base}/admin/api/requests/{booked}", timeout=5,
                                 headers={"Authorization": f"Bearer {admin_key}"}).json()
            as_phi = httpx.get(f"{base}/admin/api/requests/{booked}", timeout=5,
                               headers={"Authorization": f"Bearer {phi_key}"}).json()
            assert "patient" not in as_admin and as_phi["patient"] == "Patient/12724066", as_phi
            assert httpx.get(f"{base}/admin/api/requests", headers={"Authorization": "Bearer demo-cerner-key"},
                             timeout=5).status_code == 403  # a source's key is not an operator's
        key_file = tmp_path / "data" / "data.key"
        assert key_file.exists() and key_file.stat().st_mode & 0o077 == 0  # the demo's sealing key, owner-only
    assert (tmp_path / "data" / "redis" / "appendonly.aof").exists() or any((tmp_path / "data" / "redis").glob("appendonly*"))


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    ca = CA()
    cert_file, key_file = ca.issue(tmp_path, "gateway", common_name="127.0.0.1", ip="127.0.0.1")
    # the chain in one file, as a CA-issued server certificate is usually installed
    cert_file.write_bytes(cert_file.read_bytes() + ca.cert.public_bytes(serialization.Encoding.PEM))
    return cert_file, key_file


def test_serve_speaks_tls_with_the_configured_certificate(tmp_path: Path):
    import shutil

    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    cert_file, key_file = _self_signed(config)
    with (config / "gateway.toml").open("a") as toml:
        toml.write('\n[tls]\ncertificate_file = "gateway.crt"\nkey_file = "gateway.key"\n')
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SALESFORCE_", "REDIS_URL", "EHR_GATEWAY_DATA_KEY"))}
    env["EHR_GATEWAY_DATA"] = str(tmp_path / "data")
    exe = Path(sys.executable).with_name("ehr-gateway")
    out = (tmp_path / "stdout").open("w+")
    proc = subprocess.Popen([str(exe), "serve", "--port", str(port), "--config", str(config)], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"https://127.0.0.1:{port}/health/live", verify=ssl.create_default_context(cafile=str(cert_file)), timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, (tmp_path / "stdout").read_text()
                assert time.monotonic() < deadline, "gateway did not start"
                time.sleep(0.2)
        assert r.status_code == 200 and r.url.scheme == "https"
        assert f"ehr-gateway on https://127.0.0.1:{port}" in (tmp_path / "stdout").read_text()
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on the TLS port
            httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_key_file_others_can_read_stops_the_start(tmp_path: Path):
    import shutil

    from gateway.settings import ConfigError, load_file_settings

    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    _, key_file = _self_signed(config)
    key_file.chmod(0o644)
    with (config / "gateway.toml").open("a") as toml:
        toml.write('\n[tls]\ncertificate_file = "gateway.crt"\nkey_file = "gateway.key"\n')
    with pytest.raises(ConfigError, match=r"tls.key_file: must be readable by its owner only"):
        load_file_settings(config)


def test_demo_keys_are_accepted_only_while_the_loopback_sandbox_stands_in():
    import hashlib

    from gateway.edges.inbound import DEMO_OPERATORS_ENV, demo_credentials
    from gateway.settings import SalesforceConnection, Settings, load_file_settings

    def settings(login_url: str) -> Settings:
        return Settings(config_dir=ROOT / "config", file=load_file_settings(ROOT / "config"),
                        salesforce=SalesforceConnection(login_url=login_url, client_id="c", client_secret="s"),
                        redis_url="redis://127.0.0.1:6379")

    digests = [hashlib.sha256(k.encode()).hexdigest() for k in ("an-admin-key", "a-phi-key")]
    env = {"EHR_GATEWAY_DEMO_KEYS": "1", DEMO_OPERATORS_ENV: ",".join(digests)}
    demo, extra = demo_credentials(settings("http://127.0.0.1:40001"), env)
    assert digests[0] in demo.file.admin.api_keys_sha256 and digests[1] in demo.file.admin.phi_keys_sha256
    assert extra == {s: [hashlib.sha256(f"demo-{s}-key".encode()).hexdigest()] for s in demo.file.sources}
    for login_url, flags in (("https://acme.my.salesforce.com", env), ("http://127.0.0.1:40001", {}),
                             ("http://127.0.0.1.example.org:80", env)):
        real = settings(login_url)
        kept, none = demo_credentials(real, flags)
        assert none is None and kept.file.admin == real.file.admin, login_url


def test_a_restart_on_the_same_data_never_gives_an_old_id_to_a_new_booking(tmp_path: Path):
    """The gateway's records outlive the in-process sandbox: after `serve` is restarted on the same data,
    a new booking must get an id of its own, not one the records already hold (which answered it as a
    replay, or refused its cancel as 'this appointment is cancelled')."""
    body = json.loads(VIDEO_VISIT.read_bytes())
    headers = {"Authorization": "Bearer demo-cerner-key", "Content-Type": "application/fhir+json"}
    ids = []
    for run, key in enumerate(("before-restart", "after-restart")):
        with demo(tmp_path) as (base, _):
            body["identifier"] = [{"system": "urn:test:restart", "value": key}]
            r = httpx.post(f"{base}/fhir/cerner/Appointment", json=body, timeout=10,
                           headers={**headers, "Idempotency-Key": key})
            assert r.status_code == 201 and "idempotent-replayed" not in r.headers, r.text
            ids.append(r.json()["id"])
            cancelled = {**body, "id": ids[-1], "status": "cancelled"}
            done = httpx.put(f"{base}/fhir/cerner/Appointment/{ids[-1]}", json=cancelled, timeout=10,
                             headers={**headers, "Idempotency-Key": f"{key}-cancel"})
            assert done.status_code == 200 and done.json()["status"] == "cancelled", done.text
    assert ids[0] != ids[1]


def test_serve_stops_within_five_seconds_of_sigterm_with_a_booking_in_flight(tmp_path: Path):
    """An operator's or a process manager's SIGTERM while Salesforce holds a booking: the gateway
    stops within 5 s (the booking is answered or its connection closed; it stays in its record, in
    doubt or not sent, for the EHR's retry), and nothing it started outlives it."""
    proc, base = _started(tmp_path)
    try:
        printed = (tmp_path / "stdout").read_text()
        sandbox_url = re.search(r"sandbox at (http://127\.0\.0\.1:\d+)", printed).group(1)
        control = re.search(r"sandbox/appointments with Authorization: Bearer (\S+)", printed).group(1)
        httpx.post(f"{sandbox_url}/sandbox/faults", json={"latency_ms": 15000}, timeout=5,
                   headers={"Authorization": f"Bearer {control}"}).raise_for_status()
        answers: list[object] = []

        def booking() -> None:
            try:
                answers.append(httpx.post(f"{base}/fhir/cerner/Appointment", content=VIDEO_VISIT.read_bytes(),
                                          timeout=30, headers={"Authorization": "Bearer demo-cerner-key",
                                                               "Content-Type": "application/fhir+json",
                                                               "Idempotency-Key": "in-flight"}))
            except httpx.HTTPError as exc:
                answers.append(exc)

        import threading
        sender = threading.Thread(target=booking)
        sender.start()
        time.sleep(1.5)  # the booking is waiting on Salesforce
        assert not answers
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        took = time.monotonic() - stopping
        sender.join(30)
        assert took < 5.0, f"stopped after {took:.1f} s"
        assert answers  # answered, or its connection closed: never left hanging
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _processes_mentioning(str(tmp_path)) == [], "something the gateway started outlived it"
