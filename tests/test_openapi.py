"""The gateway's own OpenAPI document (`GET /openapi.json`, gateway/edges/openapi.py), and schemathesis
run against it over real HTTP (issue 5): whatever the document lets a client send, and whatever it
sends that the document forbids, the gateway answers with a documented status, media type, headers
and body, never a 5xx, and every refusal is a FHIR OperationOutcome.

One sandbox and one gateway (served as `serve` serves it) for the module, on the suite's Redis
under the run's key prefix (deleted with it at the end of the run). Examples are bounded and
derandomized, and no example database is written. Each example is sent with credentials chosen
from its own content: the right source's key, another source's, an admin or PHI key, a signed-in
session with or without its CSRF token, or whatever schemathesis generated (none, or made up); and
`ignored_auth` sends every accepted call again without them. Now and then a body that books, or a
request-log entry that exists, stands in for the generated one, so 2xx answers are checked too.
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from gateway.operators.admin import COOKIE
from gateway.app import create_app
from gateway.edges.openapi import OPENAPI_PATH, build_openapi
from gateway.sandbox import SandboxConfig, create_sandbox_app
from gateway.edges.server import ThreadedServer, gateway_server_options
from gateway.settings import Settings
from tests.conftest import ADMIN_KEY, CLIENT_ID, CLIENT_SECRET, KEYS, PHI_KEY, VIDEO_VISIT, corpus, make_settings

EXAMPLES = 12  # per operation, on top of schemathesis' explicit and coverage cases
BOOKS = msgspec.json.decode(corpus(VIDEO_VISIT))  # books through the shipped maps and the sandbox
BOOKS_AS_PARAMETERS = {"resourceType": "Parameters", "parameter": [{"name": "appt-resource", "resource": BOOKS}]}
QUEUE_SOURCE = "fhir"  # configured with delivery = "queue" here, so the queue routes reach Redis


def _settings(redis_url: str, prefix: str, login_url: str) -> Settings:
    s = make_settings(redis_url, prefix, login_url)
    sources = {name: msgspec.structs.replace(src, delivery="queue") if name == QUEUE_SOURCE else src
               for name, src in s.file.sources.items()}
    # made-up admin keys are most of what is sent here: the throttle on them (tested in test_admin.py)
    # would otherwise answer 429 to every example after the first few, whatever it sends
    admin = msgspec.structs.replace(s.file.admin, failed_key_burst=1_000_000)
    return msgspec.structs.replace(s, file=msgspec.structs.replace(s.file, sources=sources, admin=admin))


@dataclass
class Served:
    url: str
    entries: dict[str, str]  # request-log entries made before the run: kind -> id
    session: tuple[str, str] | None = None  # a signed-in dashboard session: cookie, CSRF token

    def sign_in(self, *, throwaway: bool = False) -> tuple[str, str]:
        """The module's session, or with `throwaway` one of its own (for the call that signs out)."""
        if self.session is not None and not throwaway:
            return self.session
        signed = requests.post(f"{self.url}/admin/api/session", json={"key": ADMIN_KEY}, timeout=30)
        assert signed.status_code == 200, signed.text
        session = signed.cookies[COOKIE], signed.json()["csrf"]
        if not throwaway:
            self.session = session
        return session


@pytest.fixture(scope="module")
def served(redis_url: str, key_prefix: str) -> Iterator[Served]:
    prefix = f"{key_prefix}:openapi-{uuid.uuid4().hex[:6]}"
    with ThreadedServer(create_sandbox_app(SandboxConfig(client_id=CLIENT_ID, client_secret=CLIENT_SECRET))) as sandbox:
        cfg = _settings(redis_url, prefix, sandbox.url)
        options = gateway_server_options(cfg.file, cfg.config_dir)  # as `serve` runs it
        with ThreadedServer(create_app(cfg), **options) as server:
            yield Served(server.url, _seed(server.url))


def _seed(url: str) -> dict[str, str]:
    """Entries for the entry-id routes to find: a booking and an unmapped one (kept, replayable)."""
    headers = {"Authorization": f"Bearer {KEYS['cerner']}", "Content-Type": "application/fhir+json"}
    booked = requests.post(f"{url}/fhir/cerner/Appointment", data=corpus(VIDEO_VISIT), headers=headers, timeout=30)
    assert booked.status_code == 201, booked.text
    unmapped = requests.post(f"{url}/fhir/cerner/Appointment", headers=headers, timeout=30, data=msgspec.json.encode(
        {"resourceType": "Appointment", "status": "booked", "participant": [{"actor": {"reference": "Patient/1"}}]}))
    assert unmapped.status_code == 422, unmapped.text
    entries = {"booked": booked.headers["x-request-id"], "unmapped": unmapped.headers["x-request-id"]}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for _ in range(200):  # the request log is written in the background
        if all(requests.get(f"{url}/admin/api/requests/{i}", headers=admin, timeout=30).status_code == 200
               for i in entries.values()):
            return entries
        time.sleep(0.02)
    raise AssertionError("the seeded entries never reached the request log")


# The document the served gateway answers at /openapi.json (test_served_document_is_this_one checks
# that), loaded at import so that schemathesis' pytest plugin makes one test per operation. (Its
# fixture-based loader, `schemathesis.pytest.from_fixture`, does not run under pytest 9.2: it sets
# `Node._nodeid`, which pytest no longer has.) The settings differ from the served ones only in the
# Redis and Salesforce URLs and the key prefix, none of which the document shows.
DOCUMENT = build_openapi(_settings("redis://127.0.0.1:1", "openapi-doc", "http://127.0.0.1:9"))
# An explicit configuration (no schemathesis.toml is looked for). `$book` runs through the same
# handler as `POST …/Appointment` with the same body schema, so its coverage phase (every boundary
# and wrong type of every Appointment element, ~1,400 requests) would repeat that one's byte for
# byte: it is fuzzed only.
ST_CONFIG = schemathesis.Config.from_dict({"operations": [
    {"include-path": "/fhir/{source}/Appointment/$book", "phases": {"coverage": {"enabled": False}}},
]})
schema = schemathesis.openapi.from_dict(DOCUMENT, config=ST_CONFIG)

CHECKS = [
    not_a_server_error,
    ignored_auth,
    missing_required_header,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
]
# what each example authenticates with; "generated" leaves schemathesis' own (random, or none)
FHIR_CREDENTIALS = ["own", "own", "own", "other-source", "generated"]
ADMIN_CREDENTIALS = ["admin", "phi", "session", "session-without-csrf", "source-key", "generated"]


def _pick(case: schemathesis.Case, options: list[str], salt: str) -> str:
    """One option per case, chosen by the case's own content: the same case always gets the same one
    (so a failure replays and shrinks alike), and schemathesis' examples need no extra strategy."""
    seen = repr((salt, case.path_parameters, case.query, case.headers, case.cookies, case.body))
    return options[zlib.crc32(seen.encode()) % len(options)]


def _prepare(case: schemathesis.Case, served: Served) -> tuple[dict[str, str], dict[str, str]]:
    """The credentials to send with the case (headers, cookies; passed to schemathesis as explicit
    auth, so `ignored_auth` probes the same call without them and with made-up ones), and now and
    then a body that books or an entry that exists, so the 2xx answers are exercised too."""
    path = case.operation.path
    params = case.path_parameters if case.path_parameters is not None else {}
    # a booking's body stands in for a valid case's only: put in a case made to be refused, it would
    # make that case valid, and schemathesis would then call its 200 a refusal missed
    books = case.meta is None or case.meta.generation.mode.is_positive
    if path.startswith("/fhir/"):
        how = _pick(case, FHIR_CREDENTIALS, "credentials")
        if how == "own" and books and _pick(case, ["generated", "generated", "books"], "body") == "books":
            params["source"] = "cerner"
            case.body = BOOKS_AS_PARAMETERS if path.endswith("$book") else BOOKS
        own = params.get("source") if params.get("source") in KEYS else "cerner"
        if how == "own":
            return {"Authorization": f"Bearer {KEYS[own]}"}, {}
        if how == "other-source":
            return {"Authorization": f"Bearer {KEYS['epic' if own != 'epic' else 'cerner']}"}, {}
        return {}, {}
    if not path.startswith("/admin/api/"):
        return {}, {}
    if path == "/admin/api/session" and case.method.upper() == "POST":  # signing in: the key is the body
        key = {"admin": ADMIN_KEY, "phi": PHI_KEY, "source-key": KEYS["epic"]}.get(
            _pick(case, ["admin", "phi", "source-key", "generated"], "key"))
        if key is not None:
            case.body = {"key": key}
        return {}, {}
    if "entry_id" in params and path.startswith("/admin/api/requests/"):
        pick = _pick(case, ["generated", "booked", "unmapped"], "entry")
        if pick != "generated":
            params["entry_id"] = served.entries[pick]
    if path.startswith("/admin/api/translate/") and books and _pick(case, ["generated", "books"], "body") == "books":
        params["source"], case.body = "cerner", BOOKS
    how = _pick(case, ADMIN_CREDENTIALS, "credentials")
    if how in ("admin", "phi"):
        return {"Authorization": f"Bearer {ADMIN_KEY if how == 'admin' else PHI_KEY}"}, {}
    if how == "source-key":
        return {"Authorization": f"Bearer {KEYS['cerner']}"}, {}
    if how.startswith("session"):
        # one session for the module; signing out ends a session, so that operation gets its own
        cookie, csrf = served.sign_in(throwaway=case.method.upper() == "DELETE")
        if case.headers:
            case.headers.pop("Authorization", None)  # a bearer key, even a made-up one, comes before the cookie
        return ({"X-CSRF-Token": csrf} if how == "session" else {}), {COOKIE: cookie}
    return {}, {}


def refusals_are_operation_outcomes(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                                    case: schemathesis.Case) -> None:
    """Every 4xx/5xx is a FHIR OperationOutcome (the token endpoint's OAuth errors excepted, by
    design: RFC 6749 §5.2), and no answer carries a stack trace."""
    text = response.content.decode("utf-8", "replace")
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    if response.status_code < 400:
        return
    media = (response.headers.get("content-type") or [""])[0].split(";")[0].strip().lower()
    body = msgspec.json.decode(response.content)
    if case.operation.path == "/auth/token" and media == "application/json":
        assert set(body) == {"error", "error_description"}, body
    else:
        assert media == "application/fhir+json", (response.status_code, media, text[:200])
        assert body["resourceType"] == "OperationOutcome" and body["issue"], body


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=False,
          suppress_health_check=list(HealthCheck))
@schema.parametrize()
def test_every_operation_conforms(case: schemathesis.Case, served: Served) -> None:
    headers, cookies = _prepare(case, served)
    case.call_and_validate(base_url=served.url, headers=headers, cookies=cookies, timeout=30,
                           checks=[*CHECKS, refusals_are_operation_outcomes])


# -- the document itself --------------------------------------------------------------------------


def _routes(app) -> set[tuple[str, str]]:
    return {(method, route.path_format.rstrip("/") or "/") for route in app.routes
            for method in route.methods if method not in ("OPTIONS", "HEAD")}


def test_document_lists_every_route_and_the_configured_sources(redis_url: str, prefix: str):
    cfg = _settings(redis_url, prefix, "http://127.0.0.1:9")  # nothing is connected to while building
    doc = build_openapi(cfg)
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.1 meta-schema
    documented = {(method.upper(), path.rstrip("/") or "/") for path, item in doc["paths"].items() for method in item}
    assert documented == _routes(create_app(cfg))  # a route added without documentation fails here
    fhir = sorted(n for n, s in cfg.sources.items() if s.adapter != "hl7v2")  # v2 sources speak MLLP
    for path in ("/fhir/{source}/Appointment", "/fhir/{source}/Appointment/$book",
                 "/fhir/{source}/Appointment/$translate", "/admin/api/translate/{source}"):
        (param,) = (p for p in doc["paths"][path]["post"]["parameters"] if p["name"] == "source")
        assert param["schema"]["enum"] == fhir, path
    encoded = msgspec.json.encode(doc)
    digests = {*cfg.file.admin.api_keys_sha256, *cfg.file.admin.phi_keys_sha256,
               *(d for s in cfg.sources.values() for d in s.api_keys_sha256)}
    for secret in (*KEYS.values(), ADMIN_KEY, PHI_KEY, CLIENT_SECRET, *digests):
        assert secret.encode() not in encoded  # no secret, not even a digest


def test_every_refusal_is_documented_as_an_operation_outcome():
    """Except the token endpoint's OAuth errors, and readiness, whose 503 is its report, not a refusal."""
    for path, item in DOCUMENT["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                if int(status) < 400 or path == "/health/ready":
                    continue
                schemas = {media: c["schema"] for media, c in response["content"].items()}
                if path == "/auth/token" and "application/json" in schemas:
                    assert schemas == {"application/json": {"$ref": "#/components/schemas/OAuthError"}}
                else:
                    assert schemas == {"application/fhir+json": {"$ref": "#/components/schemas/OperationOutcome"}}, (
                        method, path, status)


def test_sources_come_from_the_settings(redis_url: str, prefix: str):
    cfg = _settings(redis_url, prefix, "http://127.0.0.1:9")
    sources = {"athena": cfg.sources["cerner"],
               "lab": msgspec.structs.replace(cfg.sources["cerner"], adapter="hl7v2", mllp_port=2575, delivery="queue")}
    doc = build_openapi(msgspec.structs.replace(cfg, file=msgspec.structs.replace(cfg.file, sources=sources)))
    param = doc["paths"]["/fhir/{source}/Appointment"]["post"]["parameters"][0]
    assert param["schema"]["enum"] == ["athena"]  # an HL7 v2 source takes MLLP, not FHIR over HTTP
    (search,) = (p for p in doc["paths"]["/admin/api/requests"]["get"]["parameters"] if p["name"] == "source")
    assert search["schema"]["enum"] == ["athena", "lab"]  # but it has request-log entries
    queue = doc["paths"]["/admin/api/queue/{source}/{entry_id}/{action}"]["post"]["parameters"][0]
    assert queue["schema"]["enum"] == ["lab"]


def test_served_document_is_this_one(served: Served):
    """Served without credentials, and the same document the operations above were generated from."""
    r = requests.get(f"{served.url}{OPENAPI_PATH}", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json() == msgspec.json.decode(msgspec.json.encode(DOCUMENT))
    loaded = schemathesis.openapi.from_url(f"{served.url}{OPENAPI_PATH}")
    # loaded from a URL, schemathesis leaves out the operation that serves the document itself
    assert {op.ok().label for op in loaded.get_all_operations()} | {f"GET {OPENAPI_PATH}"} == {
        op.ok().label for op in schema.get_all_operations()}


# -- what schemathesis found, pinned --------------------------------------------------------------


@pytest.mark.parametrize("entry", ["x", "1", "1-2-3", "18446744073709551616-0", "%E2%91%A0-1", "-", "+"])
@pytest.mark.parametrize("action", ["replay", "drop"])
def test_malformed_dead_letter_id_is_404(served: Served, entry: str, action: str):
    """Redis refused the malformed stream id with an error: a 500 "internal error" before the fix."""
    r = requests.post(f"{served.url}/admin/api/queue/{QUEUE_SOURCE}/{entry}/{action}",
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome", r.text


def test_wrong_method_names_the_allowed_ones(served: Served):
    """A 405 carries `Allow` (RFC 9110); Litestar's was dropped when it became an OperationOutcome."""
    r = requests.delete(f"{served.url}/fhir/cerner/Appointment", timeout=30)
    assert r.status_code == 405 and r.json()["resourceType"] == "OperationOutcome"
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"POST"}
