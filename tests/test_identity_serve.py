"""Issue 20's "done when", from the README's first command: `ehr-gateway serve` with nothing
configured books the corpus's bookings of every dialect and the SIU feed with the org's record ids,
in a sandbox that refuses anything else; a booking for a patient the org does not know is held, then
booked once when the patient is added."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx

from tests.conftest import CORPUS
from tests.hl7_strict import read
from tests.test_hl7v2 import exchange
from tests.test_serve import demo

VIDEO_VISIT = CORPUS / "cerner-millennium-r4" / "r4_appointment_video_visit_entry.json"
FHIR_EXAMPLE = CORPUS / "fhir-r4-official" / "Appointment-example.json"
ATHENA = CORPUS / "hl7v2" / "athena-siu-s12-501.hl7"


def _all_records(request: dict) -> bool:
    """Every reference of a stored Book body is an org record's id (18 characters, 001/0bS/02i…), the
    slots' ids apart (the EHR's)."""
    refs = [p["reference"].partition("/")[2] for p in request["participants"]]
    refs += [s["reference"].partition("/")[2] for s in request.get("slots") or ()]
    return all(re.fullmatch(r"(001|0bS|02i)[A-Za-z0-9]{15}", r) for r in refs)


def test_serve_books_every_dialect_with_the_orgs_records_and_releases_a_held_booking(tmp_path: Path):
    with demo(tmp_path) as (base, printed):
        sandbox = re.search(r"sandbox at (http://127\.0\.0\.1:\d+)", printed).group(1)
        control = {"Authorization": "Bearer " + re.search(r"Authorization: Bearer (\S+) \(the sandbox's control key\)",
                                                           printed).group(1)}
        admin = {"Authorization": "Bearer " + re.search(r"^\s+admin\s+(\S+)", printed, re.M).group(1)}
        mllp = int(re.search(r"athena\s+HL7 v2 SIU over MLLP on [\d.]+:(\d+)", printed).group(1))

        def fhir(source: str, body: bytes, key: str) -> httpx.Response:
            return httpx.post(f"{base}/fhir/{source}/Appointment", content=body, timeout=20,
                              headers={"Authorization": f"Bearer demo-{source}-key", "Idempotency-Key": key,
                                       "Content-Type": "application/fhir+json"})

        assert fhir("cerner", VIDEO_VISIT.read_bytes(), "done-cerner").status_code == 201
        assert fhir("fhir", FHIR_EXAMPLE.read_bytes(), "done-fhir").status_code == 201
        (ack,) = asyncio.run(exchange(mllp, ATHENA.read_bytes(), start_block=False))
        assert read(ack.encode("ascii")).code == "AA", ack
        stored = httpx.get(f"{sandbox}/sandbox/appointments", headers=control, timeout=5).json()
        assert len(stored) == 3 and all(_all_records(a["request"]) for a in stored), stored

        # a patient the org does not know yet: held, then booked once it is added
        stranger = VIDEO_VISIT.read_bytes().replace(b"Patient/12724066", b"Patient/12999999")
        held = fhir("cerner", stranger, "done-held")
        assert held.status_code == 202, held.text
        made = httpx.post(f"{sandbox}/sandbox/org/patients", headers=control, timeout=5, json={
            "sourceSystem": "cerner", "idValue": "12999999", "firstName": "Late", "lastName": "Arrival"})
        assert made.status_code == 201, made.text
        (row,) = httpx.get(f"{base}/admin/api/held", headers=admin, timeout=5).json()["sources"]["cerner"]
        released = httpx.post(f"{base}/admin/api/held/cerner/{row['hold']}/release", headers=admin, timeout=5)
        assert released.status_code == 200, released.text
        deadline = time.monotonic() + 30
        while (answer := fhir("cerner", stranger, "done-held")).status_code == 202:
            assert time.monotonic() < deadline, "the held booking was not booked"
            time.sleep(0.2)
        assert answer.status_code == 201, answer.text
        stored = httpx.get(f"{sandbox}/sandbox/appointments", headers=control, timeout=5).json()
        assert len(stored) == 4
        assert {"reference": f"Patient/{made.json()['account']}"} in stored[-1]["request"]["participants"]
        assert "12999999" not in (tmp_path / "stdout").read_text()  # the patient's id: never logged
