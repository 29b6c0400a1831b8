"""One JSON summary line per request, and nothing in it that identifies a patient or opens a door."""

from __future__ import annotations

import json

import msgspec
import pytest

from tests.conftest import CLIENT_SECRET, KEYS, VIDEO_VISIT, auth, corpus


async def test_summary_line_without_patient_data_or_secrets(gateway, sandbox, log_file):
    appointment = msgspec.json.decode(corpus(VIDEO_VISIT))
    appointment["comment"] = "Patient prefers mornings, lives at 12 Elm Street"
    appointment["identifier"] = [{"system": "urn:oid:1.2.3", "value": "MRN-998877"}]
    body = msgspec.json.encode(appointment)
    r = await gateway.post("/fhir/cerner/Appointment", content=body, headers=auth(**{"Idempotency-Key": "log-1"}))
    assert r.status_code == 201
    request_id = r.headers["x-request-id"]
    bad = dict(appointment, start="2020-07-10T13:00:00")
    await gateway.post("/fhir/cerner/Appointment", content=msgspec.json.encode(bad), headers=auth())
    await gateway.post("/fhir/cerner/Appointment", content=body, headers={**auth(), "Authorization": "Bearer wrong-key-42"})

    text = log_file.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    [line] = [x for x in lines if x.get("request_id") == request_id]
    assert line["event"] == "request" and line["source"] == "cerner" and line["status"] == 201
    assert line["idempotency"] == "new" and line["sf_status"] == 201
    assert line["sf_ms"] > 0 and line["ms"] >= line["sf_ms"]
    for secret in ("12724066", "593923", "Elm Street", "MRN-998877", "log-1", "wrong-key-42",
                   CLIENT_SECRET, *KEYS.values()):
        assert secret not in text, secret
    assert "Bearer" not in text and "access_token" not in text


def test_the_end_of_run_secret_check_catches_what_it_looks_for():
    """The suite's last check (tests/conftest.py) reads every logged line for secrets; it must
    catch each kind it names, or its silence proves nothing."""
    from gateway.sandbox.state import ORG_ID
    from tests.conftest import ADMIN_KEY, CLIENT_SECRET, KEYS, _no_secret_was_logged

    clean = '{"event": "request", "status": 201}\n' * 50
    _no_secret_was_logged(clean)
    for leaked in (CLIENT_SECRET, ADMIN_KEY, KEYS["epic"], f"{ORG_ID[:15]}!abcdefgh12345678"):
        with pytest.raises(AssertionError, match="secrets in the log"):
            _no_secret_was_logged(clean + f'{{"detail": "{leaked}"}}\n')
