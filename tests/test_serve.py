"""The README's first command, as a newcomer runs it: `ehr-gateway serve` with nothing configured
starts an embedded Redis and the sandbox, prints a demo key, and books the corpus's Cerner
appointment over real HTTP."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

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


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_with_embedded_defaults_books_the_demo(tmp_path: Path, workers: int):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SALESFORCE_", "REDIS_URL"))}
    env["EHR_GATEWAY_DATA"] = str(tmp_path / "data")
    out = (tmp_path / "stdout").open("w+")
    exe = Path(sys.executable).with_name("ehr-gateway")
    proc = subprocess.Popen([str(exe), "serve", "--port", str(port), "--workers", str(workers)], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp_path / "stdout").read_text()
            assert time.monotonic() < deadline, "gateway did not become ready"
            time.sleep(0.2)
        printed = (tmp_path / "stdout").read_text()
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
        stored = httpx.get(f"{sandbox_url}/sandbox/appointments", timeout=5).json()
        listing = stored if isinstance(stored, list) else stored.get("appointments", stored)
        assert [a["id"] for a in listing] == [r.json()["id"]]
        assert "12724066" not in (tmp_path / "stdout").read_text()  # the patient id: never logged
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
    assert (tmp_path / "data" / "redis" / "appendonly.aof").exists() or any((tmp_path / "data" / "redis").glob("appendonly*"))
