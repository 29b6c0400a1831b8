"""The sandbox is a twin of Salesforce, not a mirror of the gateway's client: it decodes requests with
its own Structs, written from the spec, and refuses what the spec does not list as Salesforce's
parser does. A field the client names wrong then fails a test instead of passing unseen."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.sandbox import SandboxConfig
from tests.conftest import CLIENT_ID, CLIENT_SECRET, CONTROL_KEY, ROOT

API = "/services/data/v66.0/connect/health/appointment-management"
BOOKING: dict[str, Any] = {
    "startDate": "2030-01-07T09:00:00Z",
    "endDate": "2030-01-07T09:30:00Z",
    "workTypeId": "08qHs0000000001AAA",
    "participants": [{"reference": "Patient/001Hs00000AAAAA"}, {"reference": "Facility/0HhHs00000BBBBB"},
                     {"reference": "Practitioner/PR-42", "isReferenceRequired": True}],
    "slots": [{"id": "S-1", "reference": "Practitioner/PR-42"}],
}
SLOTS: dict[str, Any] = {
    "resources": [{"resourceId": "PR-42", "resourceType": "Provider", "serviceTerritoryId": "0HhHs00000BBBBB"}],
    "startDate": "2030-01-07T00:00:00Z",
    "endDate": "2030-01-08T00:00:00Z",
}


def _imports(path: Path) -> list[str]:
    """Every module a file imports, relative imports resolved against its package."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return found


def test_the_sandbox_imports_nothing_of_the_gateways_salesforce_client():
    files = sorted((ROOT / "gateway" / "sandbox").glob("*.py"))
    assert len(files) >= 6
    offending = {f.name: m for f in files for m in _imports(f)
                 if m == "gateway.salesforce" or m.startswith("gateway.salesforce.")}
    assert offending == {}
    # nor through anything it imports: a fresh interpreter loads the sandbox and no module of the client
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, gateway.sandbox, gateway.sandbox.app; "
         "print(' '.join(m for m in sys.modules if m.startswith('gateway.')))"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert "gateway.sandbox.app" in loaded and not [m for m in loaded if m.startswith("gateway.salesforce")]


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    """The request shapes are this module's, with references of any id: whether they name the org's
    records is tests/test_sandbox_org.py's."""
    return SandboxConfig(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, control_key=CONTROL_KEY,
                         require_records=False)


@pytest.fixture
def org(sandbox) -> httpx.Client:
    """An HTTP client carrying an access token of the sandbox's."""
    with httpx.Client(base_url=sandbox.url, timeout=10) as client:
        grant = client.post("/services/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
        client.headers["Authorization"] = f"Bearer {grant.json()['access_token']}"
        yield client


def _parser_error(r: httpx.Response, field: str) -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    assert isinstance(body, list) and [e["errorCode"] for e in body] == ["JSON_PARSER_ERROR"], body
    assert field in body[0]["message"]


@pytest.mark.parametrize(("changes", "field"), [
    ({"patientId": "001Hs00000AAAAA"}, "patientId"),  # not a field of Book
    ({"id": "08pHs0000000001AAA"}, "id"),  # only Update carries an id
    ({"participants": [*BOOKING["participants"], {"reference": "Device/D1", "role": "x"}]}, "role"),
    ({"slots": [{"id": "S-1", "reference": "Practitioner/PR-42", "start": "2030-01-07T09:00:00Z"}]}, "start"),
])
def test_a_field_salesforce_does_not_know_is_a_parser_error_and_nothing_is_stored(org, sandbox, changes, field):
    _parser_error(org.post(f"{API}/appointment", json={**BOOKING, **changes}), field)
    assert sandbox.app.state.sandbox.appointments() == []
    assert org.post(f"{API}/appointment", json=BOOKING).status_code == 201  # the documented fields book


def test_update_cancel_and_get_slots_refuse_unknown_fields_too(org, sandbox):
    ident = org.post(f"{API}/appointment", json=BOOKING).json()["id"]
    _parser_error(org.put(f"{API}/appointment/{ident}", json={**BOOKING, "id": ident, "appointmentId": ident}),
                  "appointmentId")
    _parser_error(org.patch(f"{API}/appointment/{ident}", json={"id": ident, "status": "Cancelled", "reason": "x"}),
                  "reason")
    (stored,) = sandbox.app.state.sandbox.appointments()
    assert stored.status == "Scheduled" and stored.request == BOOKING
    _parser_error(org.post(f"{API}/slots", json={**SLOTS, "practitionerId": "PR-42"}), "practitionerId")
    _parser_error(org.post(f"{API}/slots", json={**SLOTS, "resources": [{**SLOTS["resources"][0], "kind": "x"}]}),
                  "kind")
    # the documented shapes pass: Update with its id, Cancel, Get Slots with every resource field
    assert org.put(f"{API}/appointment/{ident}", json={**BOOKING, "id": ident}).status_code == 200
    resource = {**SLOTS["resources"][0], "serviceResourceId": "0HnHs0000000001", "assetCategory": "Imaging"}
    assert org.post(f"{API}/slots", json={**SLOTS, "resources": [resource], "channelId": "0eFHs0000000001AAA",
                                          "workTypeId": "08qHs0000000001AAA", "sourceSystem": "cerner",
                                          "appointmentTypes": ["A"], "serviceCategories": ["C"],
                                          "serviceTypes": ["T"]}).status_code == 200
    cancel = {"id": ident, "status": "Cancelled", "cancellationReason": "Patient request", "comment": "called"}
    assert org.patch(f"{API}/appointment/{ident}", json=cancel).status_code == 200


def test_a_resource_type_is_provider_or_device(org):
    """Get Slots' resourceType is "Provider" or "Device" (salesforce.md); FHIR's "Practitioner" is not."""
    r = org.post(f"{API}/slots", json={**SLOTS, "resources": [{"resourceId": "PR-42", "resourceType": "Practitioner"}]})
    assert r.status_code == 400 and r.json()[0]["errorCode"] == "JSON_PARSER_ERROR"
    device = org.post(f"{API}/slots", json={**SLOTS, "resources": [{"resourceId": "DV-1", "resourceType": "Device"}]})
    assert device.status_code == 200 and device.json()["resourceSlotDetails"][0]["availableSlots"]
