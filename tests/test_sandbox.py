"""The Health Cloud sandbox over real HTTP: it must answer as salesforce.md says Salesforce does,
refuse what Salesforce refuses, and misbehave exactly when told to, or every test built on it lies."""

from __future__ import annotations

import asyncio
import base64
import copy
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import httpx
import jwt
import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from gateway.salesforce.wire import TokenAnswer
from gateway.sandbox import SandboxConfig, create_sandbox_app
from gateway.sandbox.state import SandboxState
from gateway.edges.server import ThreadedServer

CLIENT_ID = "test-client-id"
CLIENT_SECRET = "test-client-secret"
CONTROL_KEY = "test-control-key"
USERNAME = "integration@example.test"
API = "/services/data/v66.0"
BOOK = f"{API}/connect/health/appointment-management/appointment"
SLOTS = f"{API}/connect/health/appointment-management/slots"
QUERY = f"{API}/query"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DROP = object()


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _certificate(key: rsa.RSAPrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ehr-gateway test")])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return _key()


@pytest.fixture(scope="module")
def certificate_pem(signing_key: rsa.RSAPrivateKey) -> str:
    return _certificate(signing_key)


@dataclass
class Running:
    server: ThreadedServer
    state: SandboxState
    client: httpx.Client
    _token: str | None = field(default=None)

    @property
    def url(self) -> str:
        return self.server.url

    def token(self) -> str:
        r = self.client.post(
            "/services/oauth2/token",
            data={"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
        )
        assert r.status_code == 200, r.text
        return r.json()["access_token"]

    def auth(self) -> dict[str, str]:
        if self._token is None:
            self._token = self.token()
        return {"Authorization": f"Bearer {self._token}"}

    def book(self, body: dict[str, Any]) -> httpx.Response:
        return self.client.post(BOOK, json=body, headers=self.auth())

    def query(self, q: str) -> httpx.Response:
        return self.client.get(QUERY, params={"q": q}, headers=self.auth())

    def faults(self, **values: Any) -> dict[str, Any]:
        r = self.client.post("/sandbox/faults", json=values)
        assert r.status_code == 200, r.text
        return r.json()


_TLS = ssl.create_default_context()  # built once: each httpx.Client would otherwise load the CA bundle


def _start(pem: str, **overrides: Any) -> Running:
    settings: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "username": USERNAME,
        "certificate_pem": pem,
        "control_key": CONTROL_KEY,
        # the shapes of Salesforce's requests and answers, with references of any id: whether they
        # name the org's records is tests/test_sandbox_org.py's
        "require_records": False,
    }
    settings.update(overrides)
    app = create_sandbox_app(SandboxConfig(**settings))
    server = ThreadedServer(app).start()
    client = httpx.Client(base_url=server.url, timeout=10, verify=_TLS)
    client.headers["Authorization"] = f"Bearer {CONTROL_KEY}"  # the sandbox's own endpoints; API calls set theirs
    return Running(server=server, state=app.state.sandbox, client=client)


def _close(running: Running) -> None:
    running.client.close()
    running.server.stop()


@pytest.fixture
def start_sandbox(certificate_pem: str) -> Iterator[Any]:
    """A sandbox with its own settings, for the tests that need non-default ones."""
    started: list[Running] = []

    def start(**overrides: Any) -> Running:
        started.append(_start(certificate_pem, **overrides))
        return started[-1]

    yield start
    for running in started:
        _close(running)


@pytest.fixture(scope="module")
def _shared(certificate_pem: str) -> Iterator[Running]:
    running = _start(certificate_pem)
    yield running
    _close(running)


@pytest.fixture
def sandbox(_shared: Running) -> Running:
    """The default-settings sandbox, reset to a fresh org (no bookings, sessions, counters, faults)."""
    _shared.state.reset()
    _shared._token = None
    return _shared


def booking(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "startDate": "2030-01-07T09:00:00Z",
        "endDate": "2030-01-07T09:30:00Z",
        "workTypeId": "08qHs0000000001AAA",
        "channelId": "0eFHs0000000001AAA",
        "timeZone": "America/Indiana/Indianapolis",
        "comment": "gw:req-1 follow-up",
        "participants": [
            {"reference": "Patient/001Hs00000AAAAA"},
            {"reference": "Facility/0HhHs00000BBBBB"},
            {"reference": "Practitioner/PR-42"},
        ],
        "appointmentTypes": ["FOLLOWUP"],
        "sourceSystem": "cerner",
        "slots": [{"id": "24477854-21304876-62852027-2", "reference": "Practitioner/PR-42"}],
    }
    for key, value in changes.items():
        if value is DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def assert_sf_error(r: httpx.Response, status: int, code: str, fields: list[str] | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body, list) and body, body
    codes = [e["errorCode"] for e in body]
    assert code in codes, body
    if fields is not None:
        assert any(e["errorCode"] == code and e.get("fields") == fields for e in body), body


# --- the threaded server --------------------------------------------------------------------------


def test_threaded_server_listens_on_an_ephemeral_port_and_stops(certificate_pem: str) -> None:
    server = ThreadedServer(create_sandbox_app(SandboxConfig(control_key=CONTROL_KEY)))
    with server:
        assert server.port and server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert httpx.get(server.url + "/sandbox/faults", headers={"Authorization": f"Bearer {CONTROL_KEY}"}).status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/sandbox/faults", timeout=2)


@pytest.mark.parametrize("control_key", [None, CONTROL_KEY])
def test_the_sandboxs_own_endpoints_need_its_control_key(control_key: str | None) -> None:
    """Appointments, faults, counters and reset are the sandbox's, not Salesforce's: a caller without
    the control key (or any key, when none is configured) reads and changes nothing."""
    with ThreadedServer(create_sandbox_app(SandboxConfig(control_key=control_key))) as server:
        calls = [("GET", "/sandbox/appointments"), ("GET", "/sandbox/faults"), ("POST", "/sandbox/faults"),
                 ("GET", "/sandbox/counters"), ("POST", "/sandbox/reset")]
        for credential in (None, "Bearer wrong", "Basic " + CONTROL_KEY, "Bearer " + CONTROL_KEY + "x"):
            headers = {"Authorization": credential} if credential else {}
            for method, path in calls:
                r = httpx.request(method, server.url + path, headers=headers, json={"server_error": 5})
                assert r.status_code == 401, (credential, method, path)
        assert server.app.state.sandbox.faults.snapshot().server_error == 0  # nothing was changed
        if control_key:
            for method, path in calls:
                r = httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {control_key}"},
                                  json={"server_error": 0})
                assert r.status_code == 200, (method, path, r.text)


def test_threaded_server_sends_no_server_header(sandbox: Running) -> None:
    assert "server" not in sandbox.client.get("/sandbox/faults").headers


@pytest.mark.parametrize(
    "bad",
    [{"answer_status": 204}, {"answer_shape": "list"}, {"error_key": "errors"}, {"api_version": "v66"}, {"slot_minutes": 0},
     {"slot_times": "local"}],
)
def test_config_refuses_values_the_sandbox_cannot_honour(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SandboxConfig(**bad)


# --- OAuth ----------------------------------------------------------------------------------------


def test_client_credentials_grant_answers_like_salesforce(sandbox: Running) -> None:
    before = int(time.time() * 1000)
    r = sandbox.client.post(
        "/services/oauth2/token",
        data={"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert "expires_in" not in body and "refresh_token" not in body
    answer = msgspec.json.decode(r.content, type=TokenAnswer)
    assert answer.token_type == "Bearer" and body["token_type"] == "Bearer"
    assert answer.instance_url == sandbox.url
    assert answer.id and answer.id.startswith(sandbox.url + "/id/00D")
    assert answer.issued_at and answer.issued_at.isdigit() and int(answer.issued_at) >= before
    assert answer.signature and base64.b64decode(answer.signature)
    assert sandbox.state.counters().token_grants == 1
    ok = sandbox.client.get(QUERY, params={"q": "SELECT Id FROM ServiceAppointment"},
                            headers={"Authorization": f"Bearer {answer.access_token}"})
    assert ok.status_code == 200


def test_client_credentials_accepts_http_basic(sandbox: Running) -> None:
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    r = sandbox.client.post(
        "/services/oauth2/token", data={"grant_type": "client_credentials"}, headers={"Authorization": f"Basic {basic}"}
    )
    assert r.status_code == 200 and r.json()["access_token"]


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": "wrong"}, "invalid_client"),
        ({"grant_type": "client_credentials", "client_id": "other", "client_secret": CLIENT_SECRET}, "invalid_client"),
        ({"grant_type": "client_credentials", "client_id": CLIENT_ID}, "invalid_client"),
        ({"grant_type": "password", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}, "unsupported_grant_type"),
        ({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}, "unsupported_grant_type"),
        ({"grant_type": JWT_GRANT}, "invalid_grant"),
    ],
)
def test_token_refusals_are_plain_oauth_json(sandbox: Running, form: dict[str, str], error: str) -> None:
    r = sandbox.client.post("/services/oauth2/token", data=form)
    assert r.status_code == 400
    assert r.json()["error"] == error and r.json()["error_description"]
    counters = sandbox.state.counters()
    assert counters.token_grants == 0 and counters.token_refusals == 1


def _assertion(key: rsa.RSAPrivateKey, **claims: Any) -> str:
    payload: dict[str, Any] = {
        "iss": CLIENT_ID,
        "sub": USERNAME,
        "aud": "https://login.salesforce.com",
        "exp": int(time.time()) + 180,
    }
    for name, value in claims.items():
        if value is DROP:
            payload.pop(name)
        else:
            payload[name] = value
    return jwt.encode(payload, key, algorithm="RS256")


def test_jwt_bearer_grant_with_the_certificates_key(sandbox: Running, signing_key: rsa.RSAPrivateKey) -> None:
    r = sandbox.client.post("/services/oauth2/token", data={"grant_type": JWT_GRANT, "assertion": _assertion(signing_key)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["instance_url"] == sandbox.url and body["token_type"] == "Bearer" and "expires_in" not in body
    api = sandbox.client.get(
        QUERY, params={"q": "SELECT Id FROM ServiceAppointment"}, headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert api.status_code == 200


def test_jwt_signed_by_another_key_is_refused(sandbox: Running) -> None:
    r = sandbox.client.post("/services/oauth2/token", data={"grant_type": JWT_GRANT, "assertion": _assertion(_key())})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    assert sandbox.state.counters().token_grants == 0


@pytest.mark.parametrize(
    ("claims", "error"),
    [
        ({"exp": int(time.time()) - 60}, "invalid_grant"),
        ({"exp": DROP}, "invalid_grant"),
        ({"aud": "https://test.salesforce.com"}, "invalid_grant"),
        ({"sub": "someone@else.test"}, "invalid_grant"),
        ({"iss": "another-client"}, "invalid_client"),
    ],
)
def test_jwt_claims_are_checked(
    sandbox: Running, signing_key: rsa.RSAPrivateKey, claims: dict[str, Any], error: str
) -> None:
    r = sandbox.client.post(
        "/services/oauth2/token", data={"grant_type": JWT_GRANT, "assertion": _assertion(signing_key, **claims)}
    )
    assert r.status_code == 400 and r.json()["error"] == error


def test_jwt_audience_is_configurable(start_sandbox: Any, signing_key: rsa.RSAPrivateKey) -> None:
    sb = start_sandbox(audience="https://test.salesforce.com")
    good = _assertion(signing_key, aud="https://test.salesforce.com")
    assert sb.client.post("/services/oauth2/token", data={"grant_type": JWT_GRANT, "assertion": good}).status_code == 200
    bad = _assertion(signing_key)
    assert sb.client.post("/services/oauth2/token", data={"grant_type": JWT_GRANT, "assertion": bad}).status_code == 400


def test_jwt_with_hmac_algorithm_is_refused(sandbox: Running) -> None:
    forged = jwt.encode(
        {"iss": CLIENT_ID, "sub": USERNAME, "aud": "https://login.salesforce.com", "exp": int(time.time()) + 60},
        "a-shared-secret-long-enough-for-hs256-32b",
        algorithm="HS256",
    )
    r = sandbox.client.post("/services/oauth2/token", data={"grant_type": JWT_GRANT, "assertion": forged})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


def test_jwt_flow_refused_without_a_certificate(start_sandbox: Any, signing_key: rsa.RSAPrivateKey) -> None:
    sb = start_sandbox(certificate_pem=None)
    r = sb.client.post("/services/oauth2/token", data={"grant_type": JWT_GRANT, "assertion": _assertion(signing_key)})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


# --- sessions and the limit header ----------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer not-a-token", "Basic abc", "Bearer"])
def test_api_without_a_valid_session_is_401(sandbox: Running, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    r = sandbox.client.post(BOOK, json=booking(), headers=headers)
    assert_sf_error(r, 401, "INVALID_SESSION_ID")
    assert r.json() == [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
    assert r.headers["Sforce-Limit-Info"] == "api-usage=0/15000"
    assert sandbox.state.appointments() == []


def test_limit_header_counts_api_calls(sandbox: Running) -> None:
    first = sandbox.query("SELECT Id FROM ServiceAppointment")
    second = sandbox.book(booking())
    refused = sandbox.book(booking(startDate=DROP))
    assert first.headers["Sforce-Limit-Info"] == "api-usage=1/15000"
    assert second.headers["Sforce-Limit-Info"] == "api-usage=2/15000"
    assert refused.headers["Sforce-Limit-Info"] == "api-usage=3/15000"
    assert sandbox.state.counters().api_calls == 3


def test_daily_limit_is_enforced(start_sandbox: Any) -> None:
    sb = start_sandbox(daily_limit=2)
    assert sb.book(booking()).status_code == 201
    assert sb.book(booking(startDate="2030-01-07T10:00:00Z", endDate=DROP)).status_code == 201
    r = sb.book(booking(startDate="2030-01-07T11:00:00Z", endDate=DROP))
    assert_sf_error(r, 403, "REQUEST_LIMIT_EXCEEDED")
    assert r.headers["Sforce-Limit-Info"] == "api-usage=2/2"
    assert len(sb.state.appointments()) == 2


def test_session_times_out_when_idle(start_sandbox: Any) -> None:
    sb = start_sandbox(session_timeout_s=0.2)
    headers = sb.auth()
    assert sb.client.get(QUERY, params={"q": "SELECT Id FROM ServiceAppointment"}, headers=headers).status_code == 200
    time.sleep(0.3)
    r = sb.client.get(QUERY, params={"q": "SELECT Id FROM ServiceAppointment"}, headers=headers)
    assert_sf_error(r, 401, "INVALID_SESSION_ID")


@pytest.mark.parametrize(("version", "status"), [("v66.0", 201), ("v65.0", 201), ("v64.0", 404), ("v67.0", 404), ("66", 404)])
def test_appointment_api_versions(sandbox: Running, version: str, status: int) -> None:
    path = f"/services/data/{version}/connect/health/appointment-management/appointment"
    r = sandbox.client.post(path, json=booking(), headers=sandbox.auth())
    assert r.status_code == status, r.text
    if status == 404:
        assert_sf_error(r, 404, "NOT_FOUND")


def test_unknown_path_and_method_answer_salesforce_errors(sandbox: Running) -> None:
    assert_sf_error(sandbox.client.get(f"{API}/nothing-here", headers=sandbox.auth()), 404, "NOT_FOUND")
    assert_sf_error(sandbox.client.get(BOOK, headers=sandbox.auth()), 405, "METHOD_NOT_ALLOWED")


# --- Book -----------------------------------------------------------------------------------------


def test_valid_booking_is_stored_listed_and_queryable(sandbox: Running) -> None:
    body = booking()
    r = sandbox.book(body)
    assert r.status_code == 201, r.text
    answer = r.json()
    appt_id = answer["id"]
    assert answer == {"id": appt_id, "isSuccess": True, "status": "Scheduled", "error": []}
    assert len(appt_id) == 18 and appt_id.startswith("08p")
    assert sandbox.state.counters().book_calls == 1

    listed = sandbox.client.get("/sandbox/appointments").json()
    assert [a["id"] for a in listed] == [appt_id]
    assert listed[0]["request"] == body and listed[0]["status"] == "Scheduled"
    stored = sandbox.state.appointments()
    assert [a.id for a in stored] == [appt_id] and stored[0].request == body

    q = sandbox.query(
        "SELECT Id, Status, SchedStartTime, SchedEndTime, Comments, WorkTypeId, ParentRecordId, "
        "ServiceTerritoryId, AppointmentType FROM ServiceAppointment WHERE Id = '" + appt_id + "'"
    )
    assert q.status_code == 200, q.text
    assert q.json() == {
        "totalSize": 1,
        "done": True,
        "records": [
            {
                "attributes": {"type": "ServiceAppointment", "url": f"/services/data/v66.0/sobjects/ServiceAppointment/{appt_id}"},
                "Id": appt_id,
                "Status": "Scheduled",
                "SchedStartTime": "2030-01-07T09:00:00.000+0000",
                "SchedEndTime": "2030-01-07T09:30:00.000+0000",
                "Comments": "gw:req-1 follow-up",
                "WorkTypeId": "08qHs0000000001AAA",
                "ParentRecordId": "001Hs00000AAAAA",
                "ServiceTerritoryId": "0HhHs00000BBBBB",
                "AppointmentType": "FOLLOWUP",
            }
        ],
    }
    record = sandbox.client.get(f"{API}/sobjects/ServiceAppointment/{appt_id}", headers=sandbox.auth())
    assert record.status_code == 200 and record.json()["Id"] == appt_id
    assert record.json()["attributes"]["url"].endswith(appt_id)


def test_each_booking_gets_a_distinct_id(sandbox: Running) -> None:
    ids = {sandbox.book(booking(startDate=f"2030-01-07T1{i}:00:00Z", endDate=DROP)).json()["id"] for i in range(4)}
    assert len(ids) == 4


def test_answer_variations_are_configurable(start_sandbox: Any) -> None:
    sb = start_sandbox(answer_status=200, answer_shape="array", error_key="errorMessages")
    r = sb.book(booking())
    assert r.status_code == 200
    body = r.json()
    assert isinstance(body, list) and len(body) == 1
    assert body[0]["isSuccess"] is True and body[0]["errorMessages"] == [] and "error" not in body[0]
    assert body[0]["id"].startswith("08p")


def test_zone_offsets_are_accepted_and_normalised_to_utc(sandbox: Running) -> None:
    r = sandbox.book(booking(startDate="2030-01-07T04:00:00-05:00", endDate="2030-01-07T04:30:00-05:00"))
    assert r.status_code == 201, r.text
    q = sandbox.query("SELECT SchedStartTime FROM ServiceAppointment")
    assert q.json()["records"][0]["SchedStartTime"] == "2030-01-07T09:00:00.000+0000"


SINGLE_PRACTITIONER = [{"reference": "Patient/P1"}, {"reference": "Facility/F1"}, {"reference": "Practitioner/D1"}]


@pytest.mark.parametrize(
    ("changes", "code", "fields"),
    [
        ({"startDate": DROP}, "REQUIRED_FIELD_MISSING", ["startDate"]),
        ({"startDate": "2030-01-07T09:00:00"}, "INVALID_INPUT", ["startDate"]),
        ({"startDate": "2030-01-07"}, "INVALID_INPUT", ["startDate"]),
        ({"startDate": "next tuesday"}, "INVALID_INPUT", ["startDate"]),
        ({"endDate": "2030-01-07T09:30:00"}, "INVALID_INPUT", ["endDate"]),
        ({"endDate": "2030-01-07T08:30:00Z"}, "INVALID_INPUT", ["endDate"]),
        ({"endDate": "2030-01-07T09:00:00Z"}, "INVALID_INPUT", ["endDate"]),
        ({"participants": DROP}, "REQUIRED_FIELD_MISSING", ["participants"]),
        ({"participants": []}, "REQUIRED_FIELD_MISSING", ["participants"]),
        ({"participants": SINGLE_PRACTITIONER[1:], "slots": DROP}, "REQUIRED_FIELD_MISSING", ["participants"]),
        ({"participants": [SINGLE_PRACTITIONER[0], SINGLE_PRACTITIONER[2]], "slots": DROP}, "REQUIRED_FIELD_MISSING", ["participants"]),
        ({"participants": SINGLE_PRACTITIONER[:2], "slots": DROP}, "REQUIRED_FIELD_MISSING", ["participants"]),
        ({"participants": [*SINGLE_PRACTITIONER, {"reference": "Doctor/9"}], "slots": DROP}, "INVALID_INPUT", ["participants"]),
        ({"participants": [*SINGLE_PRACTITIONER, {"reference": "Practitioner/"}], "slots": DROP}, "INVALID_INPUT", ["participants"]),
        ({"participants": [{"isReferenceRequired": True}]}, "REQUIRED_FIELD_MISSING", ["participants"]),
        (
            {"workTypeId": DROP, "appointmentTypes": DROP},
            "REQUIRED_FIELD_MISSING",
            ["workTypeId", "appointmentTypes", "serviceTypes", "serviceCategories"],
        ),
        ({"workTypeId": DROP, "appointmentTypes": []}, "REQUIRED_FIELD_MISSING", None),
        ({"workTypeId": DROP, "sourceSystem": DROP}, "REQUIRED_FIELD_MISSING", ["sourceSystem"]),
        ({"workTypeId": DROP, "appointmentTypes": DROP, "serviceTypes": ["X"], "sourceSystem": DROP}, "REQUIRED_FIELD_MISSING", ["sourceSystem"]),
        ({"comment": "x" * 257}, "STRING_TOO_LONG", ["comment"]),
        ({"slots": [{"id": "S1", "reference": "Practitioner/SOMEONE-ELSE"}]}, "INVALID_INPUT", ["slots"]),
        ({"slots": [{"id": "S1", "reference": "Patient/001Hs00000AAAAA"}]}, "INVALID_INPUT", ["slots"]),
        ({"timeZone": "Mars/Olympus_Mons"}, "INVALID_INPUT", ["timeZone"]),
        ({"timeZone": "EST5EDT/../../etc"}, "INVALID_INPUT", ["timeZone"]),
        ({"startDate": 20300107}, "JSON_PARSER_ERROR", ["startDate"]),
    ],
)
def test_each_booking_rule_refuses(sandbox: Running, changes: dict[str, Any], code: str, fields: list[str] | None) -> None:
    r = sandbox.book(booking(**changes))
    assert_sf_error(r, 400, code, fields)
    assert all(set(e) <= {"message", "errorCode", "fields"} for e in r.json())
    assert sandbox.state.appointments() == []
    assert r.headers["Sforce-Limit-Info"].startswith("api-usage=")


@pytest.mark.parametrize(
    "changes",
    [
        {"endDate": DROP},
        {"comment": "x" * 256},
        {"comment": DROP, "timeZone": DROP, "channelId": DROP, "slots": DROP},
        {"participants": [{"reference": "Patient/P1"}, {"reference": "Facility/F1"}, {"reference": "Device/DV1"}], "slots": DROP},
        {"workTypeId": DROP},  # codes with a sourceSystem
        {"appointmentTypes": DROP, "sourceSystem": DROP},  # workTypeId alone
        {"timeZone": "UTC"},
        {"startDate": "2030-01-07T09:00:00.000+00:00", "endDate": "2030-01-07T09:30:00+0000"},
    ],
)
def test_bookings_within_the_rules_are_accepted(sandbox: Running, changes: dict[str, Any]) -> None:
    r = sandbox.book(booking(**changes))
    assert r.status_code == 201, r.text
    assert len(sandbox.state.appointments()) == 1


def test_refusals_list_every_broken_rule(sandbox: Running) -> None:
    r = sandbox.book(booking(startDate=DROP, comment="x" * 300, timeZone="Nowhere/Nothing"))
    assert r.status_code == 400
    assert {e["errorCode"] for e in r.json()} == {"REQUIRED_FIELD_MISSING", "STRING_TOO_LONG", "INVALID_INPUT"}


def test_unparsable_body_is_a_parser_error(sandbox: Running) -> None:
    r = sandbox.client.post(BOOK, content=b"{not json", headers={**sandbox.auth(), "Content-Type": "application/json"})
    assert_sf_error(r, 400, "JSON_PARSER_ERROR")
    r = sandbox.client.post(BOOK, json=[booking()], headers=sandbox.auth())
    assert_sf_error(r, 400, "JSON_PARSER_ERROR")


def test_channel_id_can_be_required(start_sandbox: Any) -> None:
    sb = start_sandbox(require_channel_id=True)
    assert_sf_error(sb.book(booking(channelId=DROP)), 400, "REQUIRED_FIELD_MISSING", ["channelId"])
    assert sb.book(booking()).status_code == 201


def test_book_calls_count_refused_attempts_too(sandbox: Running) -> None:
    sandbox.client.post(BOOK, json=booking())  # no session
    sandbox.book(booking(startDate=DROP))
    sandbox.book(booking())
    counters = sandbox.state.counters()
    assert counters.book_calls == 3 and counters.invalid_session == 1


# --- Update and Cancel ----------------------------------------------------------------------------


def test_update_reschedules_the_stored_booking(sandbox: Running) -> None:
    appt_id = sandbox.book(booking()).json()["id"]
    new = booking(id=appt_id, startDate="2030-01-08T14:00:00Z", endDate="2030-01-08T14:30:00Z", comment="moved")
    r = sandbox.client.put(f"{BOOK}/{appt_id}", json=new, headers=sandbox.auth())
    assert r.status_code == 200, r.text
    assert r.json() == {"id": appt_id, "isSuccess": True, "status": "Scheduled", "error": []}
    (stored,) = sandbox.state.appointments()
    assert stored.request == new
    q = sandbox.query(f"SELECT SchedStartTime, Comments FROM ServiceAppointment WHERE Id = '{appt_id}'")
    assert q.json()["records"][0]["SchedStartTime"] == "2030-01-08T14:00:00.000+0000"
    assert q.json()["records"][0]["Comments"] == "moved"
    assert sandbox.state.counters().update_calls == 1


def test_update_refusals(sandbox: Running) -> None:
    appt_id = sandbox.book(booking()).json()["id"]
    unknown = "08pHs0000000999AAA"
    assert_sf_error(sandbox.client.put(f"{BOOK}/{unknown}", json=booking(id=unknown), headers=sandbox.auth()), 404, "NOT_FOUND")
    assert_sf_error(
        sandbox.client.put(f"{BOOK}/{appt_id}", json=booking(id=appt_id, startDate=DROP), headers=sandbox.auth()),
        400, "REQUIRED_FIELD_MISSING", ["startDate"],
    )
    assert_sf_error(sandbox.client.put(f"{BOOK}/{appt_id}", json=booking(), headers=sandbox.auth()), 400, "REQUIRED_FIELD_MISSING", ["id"])
    assert_sf_error(
        sandbox.client.put(f"{BOOK}/{appt_id}", json=booking(id=unknown), headers=sandbox.auth()), 400, "INVALID_INPUT", ["id"]
    )
    (stored,) = sandbox.state.appointments()
    assert stored.request == booking()


def test_cancel_marks_the_booking_cancelled(sandbox: Running) -> None:
    appt_id = sandbox.book(booking()).json()["id"]
    body = {"id": appt_id, "status": "Cancelled", "cancellationReason": "Patient request", "comment": "called in"}
    r = sandbox.client.patch(f"{BOOK}/{appt_id}", json=body, headers=sandbox.auth())
    assert r.status_code == 200, r.text
    assert r.json() == {"id": appt_id, "isSuccess": True, "status": "Cancelled", "error": []}
    assert sandbox.state.appointments()[0].status == "Cancelled"
    q = sandbox.query(f"SELECT Status, CancellationReason FROM ServiceAppointment WHERE Id = '{appt_id}'")
    assert q.json()["records"][0]["Status"] == "Canceled"
    assert q.json()["records"][0]["CancellationReason"] == "Patient request"


def test_cancel_refusals(sandbox: Running) -> None:
    appt_id = sandbox.book(booking()).json()["id"]
    unknown = "08pHs0000000999AAA"
    r = sandbox.client.patch(f"{BOOK}/{unknown}", json={"id": unknown, "status": "Cancelled"}, headers=sandbox.auth())
    assert_sf_error(r, 404, "NOT_FOUND")
    r = sandbox.client.patch(f"{BOOK}/{appt_id}", json={"id": appt_id, "status": "Scheduled"}, headers=sandbox.auth())
    assert_sf_error(r, 400, "INVALID_INPUT", ["status"])
    r = sandbox.client.patch(f"{BOOK}/{appt_id}", json={"id": appt_id}, headers=sandbox.auth())
    assert_sf_error(r, 400, "REQUIRED_FIELD_MISSING", ["status"])
    r = sandbox.client.patch(
        f"{BOOK}/{appt_id}", json={"id": appt_id, "status": "Cancelled", "comment": "y" * 257}, headers=sandbox.auth()
    )
    assert_sf_error(r, 400, "STRING_TOO_LONG", ["comment"])
    assert sandbox.state.appointments()[0].status == "Scheduled"


# --- Get Slots ------------------------------------------------------------------------------------


def _slots_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resources": [{"resourceId": "PR-42", "serviceTerritoryId": "0HhHs00000BBBBB", "resourceType": "Provider"}],
        "workTypeId": "08qHs0000000001AAA",
        "startDate": "2030-01-07T00:00:00Z",
        "endDate": "2030-01-08T00:00:00Z",
    }
    body.update(changes)
    return body


def _slots(body: dict[str, Any], resource: str = "PR-42") -> list[dict[str, Any]]:
    (entry,) = [e for e in body["resourceSlotDetails"] if e["resourceId"] == resource]
    return entry["availableSlots"]


def test_slots_are_every_half_hour_in_working_hours_minus_bookings(sandbox: Running) -> None:
    r = sandbox.client.post(SLOTS, json=_slots_body(), headers=sandbox.auth())
    assert r.status_code == 200, r.text
    body = r.json()
    starts = [s["slotStartDate"] for s in _slots(body)]
    assert len(starts) == 16
    assert starts[0] == "2030-01-07T09:00:00Z" and starts[-1] == "2030-01-07T16:30:00Z"
    first = _slots(body)[0]
    assert first["slotEndDate"] == "2030-01-07T09:30:00Z" and first["slotId"]

    assert sandbox.book(booking()).status_code == 201  # 09:00-09:30 with PR-42
    again = sandbox.client.post(SLOTS, json=_slots_body(), headers=sandbox.auth()).json()
    assert [s["slotStartDate"] for s in _slots(again)] == starts[1:]
    other = sandbox.client.post(
        SLOTS, json=_slots_body(resources=[{"resourceId": "PR-7"}]), headers=sandbox.auth()
    ).json()
    assert len(_slots(other, "PR-7")) == 16
    assert sandbox.state.counters().slots_calls == 3


def test_slots_answer_is_salesforces_documented_get_slots_output(sandbox: Running) -> None:
    """salesforce.md's "Get Slots Output": resourceSlotDetails, one entry per resource asked for,
    naming it; every property a string or an array (sourceSystem null when the request named none)."""
    resources = [{"resourceId": "PR-42", "resourceType": "Provider"}, {"resourceId": "DV-1", "resourceType": "Device"}]
    r = sandbox.client.post(SLOTS, json=_slots_body(resources=resources, startDate="2030-01-07T09:00:00Z",
                                                    endDate="2030-01-07T10:00:00Z"), headers=sandbox.auth())
    body = r.json()
    assert list(body) == ["resourceSlotDetails"]
    assert [list(e) for e in body["resourceSlotDetails"]] == [["resourceId", "availableSlots"]] * 2
    assert [e["resourceId"] for e in body["resourceSlotDetails"]] == ["PR-42", "DV-1"]
    slots = [s for e in body["resourceSlotDetails"] for s in e["availableSlots"]]
    assert len(slots) == 4
    assert all(list(s) == ["slotId", "slotStartDate", "slotEndDate", "sourceSystem"] for s in slots)
    assert all(isinstance(s[k], str) for s in slots for k in ("slotId", "slotStartDate", "slotEndDate"))
    assert {s["sourceSystem"] for s in slots} == {None}
    named = sandbox.client.post(SLOTS, json=_slots_body(sourceSystem="cerner"), headers=sandbox.auth()).json()
    assert {s["sourceSystem"] for s in _slots(named)} == {"cerner"}


def test_slots_answer_variations_are_configurable(start_sandbox: Any) -> None:
    """A one-element array (answer_shape), and times without a zone as one of Salesforce's samples
    writes them (slot_times)."""
    sb = start_sandbox(answer_shape="array", slot_times="zoneless")
    body = sb.client.post(SLOTS, json=_slots_body(), headers=sb.auth()).json()
    assert isinstance(body, list) and len(body) == 1
    first = _slots(body[0])[0]
    assert (first["slotStartDate"], first["slotEndDate"]) == ("2030-01-07T09:00:00.0000", "2030-01-07T09:30:00.0000")


def test_slots_honour_the_range_edges(sandbox: Running) -> None:
    r = sandbox.client.post(
        SLOTS, json=_slots_body(startDate="2030-01-07T10:15:00Z", endDate="2030-01-07T11:30:00Z"), headers=sandbox.auth()
    )
    assert [s["slotStartDate"] for s in _slots(r.json())] == ["2030-01-07T10:30:00Z", "2030-01-07T11:00:00Z"]


@pytest.mark.parametrize(
    ("changes", "code", "fields"),
    [
        ({"startDate": None}, "REQUIRED_FIELD_MISSING", ["startDate"]),
        ({"endDate": "2030-01-08T00:00:00"}, "INVALID_INPUT", ["endDate"]),
        ({"endDate": "2030-01-06T00:00:00Z"}, "INVALID_INPUT", ["endDate"]),
        ({"endDate": "2031-01-06T00:00:00Z"}, "INVALID_INPUT", ["endDate"]),
        ({"resources": []}, "REQUIRED_FIELD_MISSING", ["resources"]),
        ({"resources": [{"serviceTerritoryId": "X"}]}, "REQUIRED_FIELD_MISSING", ["resourceId"]),
    ],
)
def test_slots_refusals(sandbox: Running, changes: dict[str, Any], code: str, fields: list[str]) -> None:
    assert_sf_error(sandbox.client.post(SLOTS, json=_slots_body(**changes), headers=sandbox.auth()), 400, code, fields)


# --- query ----------------------------------------------------------------------------------------


def _book_three(sb: Running) -> list[str]:
    ids = []
    for i, (start, comment) in enumerate(
        [("2030-01-07T11:00:00Z", "gw:aaa"), ("2030-01-07T09:00:00Z", "gw:bbb"), ("2030-01-07T10:00:00Z", "other")]
    ):
        r = sb.book(booking(startDate=start, endDate=DROP, comment=comment, participants=[
            {"reference": f"Patient/PAT{i % 2}"}, {"reference": "Facility/F1"}, {"reference": "Practitioner/PR-42"}
        ]))
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


def test_query_where_and_like_order_limit(sandbox: Running) -> None:
    ids = _book_three(sandbox)
    r = sandbox.query(
        "select Id, comments from serviceappointment where Comments like 'GW:%' and Status = 'scheduled' "
        "order by SchedStartTime desc limit 5"
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["totalSize"] == 2 and body["done"] is True
    assert [rec["Id"] for rec in body["records"]] == [ids[0], ids[1]]
    assert set(body["records"][0]) == {"attributes", "Id", "Comments"}

    r = sandbox.query("SELECT Id FROM ServiceAppointment WHERE ParentRecordId = 'PAT0' ORDER BY SchedStartTime LIMIT 1")
    assert [rec["Id"] for rec in r.json()["records"]] == [ids[2]]

    r = sandbox.query("SELECT Id FROM ServiceAppointment WHERE SchedStartTime >= 2030-01-07T10:00:00Z AND SchedStartTime < 2030-01-07T11:00:00.000+0000")
    assert [rec["Id"] for rec in r.json()["records"]] == [ids[2]]

    r = sandbox.query(f"SELECT Id FROM ServiceAppointment WHERE Id IN ('{ids[0]}', '{ids[2][:15]}') ORDER BY Id")
    assert sorted(rec["Id"] for rec in r.json()["records"]) == sorted([ids[0], ids[2]])

    r = sandbox.query("SELECT COUNT() FROM ServiceAppointment WHERE Comments LIKE 'gw\\_%'")
    assert r.json() == {"totalSize": 0, "done": True, "records": []}
    r = sandbox.query("SELECT COUNT() FROM ServiceAppointment WHERE Comments LIKE 'gw_%'")
    assert r.json()["totalSize"] == 2

    r = sandbox.query("SELECT Id FROM ServiceAppointment WHERE CancellationReason = null")
    assert r.json()["totalSize"] == 3
    assert sandbox.state.counters().query_calls == 7


@pytest.mark.parametrize(
    ("q", "code"),
    [
        ("SELECT FROM ServiceAppointment", "MALFORMED_QUERY"),
        ("DELETE FROM ServiceAppointment", "MALFORMED_QUERY"),
        ("SELECT Id ServiceAppointment", "MALFORMED_QUERY"),
        # AND and OR mixed without parentheses: SOQL refuses it
        ("SELECT Id FROM ServiceAppointment WHERE Status = 'A' OR Status = 'B' AND Comments = 'C'", "MALFORMED_QUERY"),
        ("SELECT Id FROM ServiceAppointment WHERE Status = 'unterminated", "MALFORMED_QUERY"),
        ("SELECT Id FROM ServiceAppointment LIMIT -1", "MALFORMED_QUERY"),
        ("SELECT Id FROM ServiceAppointment trailing", "MALFORMED_QUERY"),
        ("SELECT Id FROM ServiceAppointment WHERE Status", "MALFORMED_QUERY"),
        ("", "MALFORMED_QUERY"),
        ("SELECT Nope FROM ServiceAppointment", "INVALID_FIELD"),
        ("SELECT Id FROM Opportunity", "INVALID_TYPE"),  # an sObject the sandbox's org does not have
        ("SELECT Id FROM ServiceAppointment WHERE SchedStartTime = '2030-01-07T09:00:00Z'", "INVALID_QUERY_FILTER_OPERATOR"),
    ],
)
def test_query_refusals(sandbox: Running, q: str, code: str) -> None:
    assert_sf_error(sandbox.query(q), 400, code)


# --- faults ---------------------------------------------------------------------------------------


def test_faults_are_visible_and_validated_over_http(sandbox: Running) -> None:
    shown = sandbox.faults(latency_ms=5, request_limit_exceeded=2, server_error=1, drop_after_store=3)
    assert shown["latency_ms"] == 5 and shown["request_limit_exceeded"] == 2
    assert sandbox.client.get("/sandbox/faults").json() == shown
    assert sandbox.state.faults.snapshot().drop_after_store == 3
    assert sandbox.client.post("/sandbox/faults", json={"server_error": -1}).status_code == 400
    assert sandbox.client.post("/sandbox/faults", json={"no_such_fault": 1}).status_code == 400
    assert sandbox.client.post("/sandbox/faults", json={"server_error_status": 502}).status_code == 400


def test_latency_fault_delays_api_calls(sandbox: Running) -> None:
    sandbox.auth()
    sandbox.state.faults.set(latency_ms=300)
    started = time.perf_counter()
    assert sandbox.query("SELECT Id FROM ServiceAppointment").status_code == 200
    assert time.perf_counter() - started >= 0.3
    sandbox.state.faults.set(latency_ms=0)
    started = time.perf_counter()
    sandbox.query("SELECT Id FROM ServiceAppointment")
    assert time.perf_counter() - started < 0.3


@pytest.mark.parametrize("over_http", [True, False])
def test_expire_tokens_invalidates_every_issued_token(sandbox: Running, over_http: bool) -> None:
    old = sandbox.auth()
    other = {"Authorization": f"Bearer {sandbox.token()}"}
    assert sandbox.query("SELECT Id FROM ServiceAppointment").status_code == 200
    if over_http:
        sandbox.faults(expire_tokens=True)
    else:
        sandbox.state.faults.expire_tokens()
    for headers in (old, other):
        r = sandbox.client.get(QUERY, params={"q": "SELECT Id FROM ServiceAppointment"}, headers=headers)
        assert_sf_error(r, 401, "INVALID_SESSION_ID")
    fresh = {"Authorization": f"Bearer {sandbox.token()}"}
    assert sandbox.client.get(QUERY, params={"q": "SELECT Id FROM ServiceAppointment"}, headers=fresh).status_code == 200
    assert sandbox.state.faults.snapshot().tokens_expired == 1


def test_request_limit_exceeded_fault_fires_n_times(sandbox: Running) -> None:
    sandbox.auth()
    sandbox.faults(request_limit_exceeded=2)
    for _ in range(2):
        r = sandbox.book(booking())
        assert r.status_code == 403
        assert r.json() == [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
        assert "Sforce-Limit-Info" in r.headers
    assert sandbox.book(booking()).status_code == 201
    counters = sandbox.state.counters()
    assert counters.limit_refusals == 2 and counters.token_grants == 1 and counters.book_calls == 3
    assert len(sandbox.state.appointments()) == 1


@pytest.mark.parametrize(("status", "code"), [(503, "SERVER_UNAVAILABLE"), (500, "UNKNOWN_EXCEPTION")])
def test_server_error_fault_fires_n_times(sandbox: Running, status: int, code: str) -> None:
    sandbox.auth()
    sandbox.state.faults.set(server_error=1, server_error_status=status)
    assert_sf_error(sandbox.book(booking()), status, code)
    assert sandbox.state.appointments() == []
    assert sandbox.book(booking()).status_code == 201
    assert sandbox.state.counters().server_errors == 1


def test_drop_after_store_stores_then_breaks_the_connection(sandbox: Running) -> None:
    sandbox.auth()
    sandbox.faults(drop_after_store=1)
    with pytest.raises(httpx.RemoteProtocolError):
        sandbox.book(booking())
    stored = sandbox.state.appointments()
    assert len(stored) == 1 and stored[0].request == booking()
    q = sandbox.query("SELECT Id FROM ServiceAppointment WHERE Comments LIKE 'gw:req-1%'")
    assert q.json()["totalSize"] == 1 and q.json()["records"][0]["Id"] == stored[0].id
    retry = sandbox.book(booking())
    assert retry.status_code == 201 and retry.json()["id"] != stored[0].id
    counters = sandbox.state.counters()
    assert counters.dropped_connections == 1 and counters.book_calls == 2


async def test_drop_after_store_with_an_async_client(sandbox: Running) -> None:
    headers = sandbox.auth()
    sandbox.state.faults.set(drop_after_store=1)
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=5, verify=_TLS) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(BOOK, json=booking(), headers=headers)
        assert (await client.post(BOOK, json=booking(), headers=headers)).status_code == 201
    assert len(sandbox.state.appointments()) == 2


async def test_concurrent_bookings_get_unique_ids(sandbox: Running) -> None:
    headers = sandbox.auth()
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=10, verify=_TLS) as client:
        answers = await asyncio.gather(
            *(
                client.post(BOOK, json=booking(startDate=f"2030-02-{d:02d}T10:00:00Z", endDate=DROP), headers=headers)
                for d in range(1, 21)
            )
        )
    assert [a.status_code for a in answers] == [201] * 20
    assert len({a.json()["id"] for a in answers}) == 20
    assert len(sandbox.state.appointments()) == 20 and sandbox.state.counters().book_calls == 20


def test_counters_and_reset_over_http(sandbox: Running) -> None:
    sandbox.book(booking())
    counters = sandbox.client.get("/sandbox/counters").json()
    assert counters["token_grants"] == 1 and counters["book_calls"] == 1 and counters["api_calls"] == 1
    sandbox.faults(server_error=3)
    assert sandbox.client.post("/sandbox/reset").status_code == 200
    assert sandbox.client.get("/sandbox/appointments").json() == []
    assert sandbox.client.get("/sandbox/counters").json()["book_calls"] == 0
    assert sandbox.state.faults.snapshot().server_error == 0
    assert_sf_error(sandbox.client.post(BOOK, json=booking(), headers=sandbox.auth()), 401, "INVALID_SESSION_ID")


def test_listing_is_a_snapshot(sandbox: Running) -> None:
    sandbox.book(booking())
    snapshot = sandbox.state.appointments()
    copy.deepcopy(snapshot)  # plain data, safe to hand to another thread
    sandbox.book(booking(startDate="2030-01-07T12:00:00Z", endDate=DROP))
    assert len(snapshot) == 1 and len(sandbox.state.appointments()) == 2


# --- ratio faults on Book ---------------------------------------------------------------------------


def _book_outcome(sandbox: Running) -> str:
    """'ok', 'fail' (500 before storing) or 'drop' (connection closed without an answer)."""
    try:
        r = sandbox.book(booking())
    except httpx.RemoteProtocolError:
        return "drop"
    if r.status_code == 201:
        return "ok"
    assert_sf_error(r, 500, "UNKNOWN_EXCEPTION")
    assert "Sforce-Limit-Info" in r.headers
    return "fail"


def test_fail_before_store_ratio_one_fails_every_book_call(sandbox: Running) -> None:
    sandbox.auth()
    shown = sandbox.faults(fail_before_store_ratio=1.0)
    assert shown["fail_before_store_ratio"] == 1.0 and shown["drop_after_store_ratio"] == 0.0
    assert [_book_outcome(sandbox) for _ in range(5)] == ["fail"] * 5
    assert sandbox.state.appointments() == []
    counters = sandbox.state.counters()
    assert counters.faults_before_store == 5 and counters.server_errors == 5
    assert counters.faults_dropped_after_store == 0 and counters.book_calls == 5
    sandbox.faults(fail_before_store_ratio=0)
    assert _book_outcome(sandbox) == "ok" and len(sandbox.state.appointments()) == 1


def test_drop_after_store_ratio_one_stores_then_drops_every_book_call(sandbox: Running) -> None:
    sandbox.auth()
    sandbox.faults(drop_after_store_ratio=1.0)
    assert [_book_outcome(sandbox) for _ in range(5)] == ["drop"] * 5
    stored = sandbox.state.appointments()
    assert len(stored) == 5 and all(a.request == booking() for a in stored)
    counters = sandbox.state.counters()
    assert counters.faults_dropped_after_store == 5 and counters.dropped_connections == 5
    assert counters.faults_before_store == 0 and counters.server_errors == 0


def test_ratio_faults_are_disjoint_outcomes_of_one_draw(sandbox: Running) -> None:
    # Two independent draws would let about a quarter of these calls through.
    sandbox.auth()
    sandbox.faults(fail_before_store_ratio=0.5, drop_after_store_ratio=0.5, fault_seed=3)
    outcomes = [_book_outcome(sandbox) for _ in range(40)]
    assert "ok" not in outcomes and {"fail", "drop"} == set(outcomes)
    assert len(sandbox.state.appointments()) == outcomes.count("drop")


def test_ratio_faults_do_not_preempt_session_or_rule_refusals(sandbox: Running) -> None:
    sandbox.faults(fail_before_store_ratio=1.0)
    assert_sf_error(sandbox.client.post(BOOK, json=booking(), headers={"Authorization": "Bearer x"}), 401, "INVALID_SESSION_ID")
    assert_sf_error(sandbox.book(booking(participants=DROP)), 400, "REQUIRED_FIELD_MISSING", ["participants"])
    assert sandbox.state.counters().faults_before_store == 0


def test_seeded_ratio_faults_over_many_calls(sandbox: Running) -> None:
    sandbox.auth()
    sandbox.faults(fail_before_store_ratio=0.1, drop_after_store_ratio=0.1, fault_seed=20240607)
    outcomes = [_book_outcome(sandbox) for _ in range(200)]
    fails, drops, oks = outcomes.count("fail"), outcomes.count("drop"), outcomes.count("ok")
    # 20 expected of each, sd about 4.2: a band of about +-3 sd
    assert 8 <= fails <= 33 and 8 <= drops <= 33, (fails, drops)
    assert len(sandbox.state.appointments()) == oks + drops
    counters = sandbox.state.counters()
    assert (counters.faults_before_store, counters.faults_dropped_after_store) == (fails, drops)
    assert counters.book_calls == 200
    # Setting the seed again restarts the same sequence; another seed gives another one.
    sandbox.faults(fault_seed=20240607)
    assert [_book_outcome(sandbox) for _ in range(200)] == outcomes
    sandbox.faults(fault_seed=1)
    assert [_book_outcome(sandbox) for _ in range(200)] != outcomes


async def test_seeded_ratio_fault_counts_hold_under_concurrency(sandbox: Running) -> None:
    headers = sandbox.auth()
    sandbox.faults(fail_before_store_ratio=0.2, drop_after_store_ratio=0.2, fault_seed=11)
    sequential = [_book_outcome(sandbox) for _ in range(60)]
    sandbox.faults(fault_seed=11)
    before = sandbox.state.counters()
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=10, verify=_TLS) as client:
        answers = await asyncio.gather(
            *(client.post(BOOK, json=booking(), headers=headers) for _ in range(60)), return_exceptions=True
        )
    drops = sum(isinstance(a, httpx.RemoteProtocolError) for a in answers)
    fails = sum(isinstance(a, httpx.Response) and a.status_code == 500 for a in answers)
    oks = sum(isinstance(a, httpx.Response) and a.status_code == 201 for a in answers)
    assert oks + fails + drops == 60, answers
    # Same seed, same number of draws: the same totals, whatever order the calls were served in.
    assert (fails, drops) == (sequential.count("fail"), sequential.count("drop"))
    after = sandbox.state.counters()
    assert after.faults_before_store - before.faults_before_store == fails
    assert after.faults_dropped_after_store - before.faults_dropped_after_store == drops
    assert len(sandbox.state.appointments()) == sequential.count("ok") + sequential.count("drop") + oks + drops


@pytest.mark.parametrize(
    "bad",
    [
        {"fail_before_store_ratio": -0.1},
        {"fail_before_store_ratio": 1.5},
        {"drop_after_store_ratio": float("nan")},
        {"drop_after_store_ratio": True},
        {"fail_before_store_ratio": 0.6, "drop_after_store_ratio": 0.5},
        {"fault_seed": 1.5},
        {"fault_seed": "7"},
    ],
)
def test_ratio_fault_values_are_validated(sandbox: Running, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        sandbox.state.faults.set(**bad)
    assert sandbox.state.faults.snapshot() == type(sandbox.state.faults.snapshot())()


def test_ratio_faults_are_validated_over_http(sandbox: Running) -> None:
    shown = sandbox.faults(fail_before_store_ratio=0.7, drop_after_store_ratio=0.3, fault_seed=5)
    assert (shown["fail_before_store_ratio"], shown["drop_after_store_ratio"], shown["fault_seed"]) == (0.7, 0.3, 5)
    assert sandbox.client.get("/sandbox/faults").json() == shown
    for bad in (
        {"fail_before_store_ratio": 1.01},
        {"drop_after_store_ratio": -1},
        {"drop_after_store_ratio": 0.4},  # 0.7 already set: the sum would pass 1
        {"fail_before_store_ratio": "half"},
        {"fault_seed": 2.5},
    ):
        r = sandbox.client.post("/sandbox/faults", json=bad)
        assert r.status_code == 400 and "error" in r.json(), (bad, r.text)
    assert sandbox.client.get("/sandbox/faults").json() == shown
    assert sandbox.faults(fail_before_store_ratio=0.2, drop_after_store_ratio=0.4)["fault_seed"] == 5


def test_reset_clears_ratio_faults_and_their_counters(sandbox: Running) -> None:
    sandbox.auth()
    sandbox.faults(fail_before_store_ratio=0.5, drop_after_store_ratio=0.5, fault_seed=9)
    for _ in range(6):
        _book_outcome(sandbox)
    assert sandbox.client.post("/sandbox/reset").status_code == 200
    view = sandbox.state.faults.snapshot()
    assert (view.fail_before_store_ratio, view.drop_after_store_ratio, view.fault_seed) == (0.0, 0.0, None)
    counters = sandbox.client.get("/sandbox/counters").json()
    assert counters["faults_before_store"] == 0 and counters["faults_dropped_after_store"] == 0
    sandbox._token = None
    assert [_book_outcome(sandbox) for _ in range(5)] == ["ok"] * 5
