"""FHIR's HTTP rules over real HTTP (issue 13, item 11): absolute `Location`, content negotiation
(406), header and query problems in `issue.location`, and `X-Request-ID` on every answer. Every FHIR
body answered is checked by the suite's R4 validator."""

from __future__ import annotations

import re

import msgspec
import pytest

from tests.conftest import ADMIN_KEY, VIDEO_VISIT, auth, corpus
from tests.fhir_validate import validate

REQUEST_ID = re.compile(r"[0-9a-f]{16}")
SLOTS = "/fhir/cerner/Slot?start=ge2026-12-01T09:00:00Z&start=le2026-12-01T10:00:00Z&actor=Practitioner/593923"


def state(sandbox):
    return sandbox.app.state.sandbox


def appointment(ident: str, **changes) -> bytes:
    data = msgspec.json.decode(corpus(VIDEO_VISIT))
    data["identifier"] = [{"system": "urn:oid:1.2.3", "value": ident}]
    data.update(changes)
    return msgspec.json.encode(data)


async def test_location_is_absolute_and_a_replay_answers_the_same(gateway, sandbox):
    """`Location` is `[base]/Appointment/<id>`, the base being the source's at the first public URL
    (here the gateway's own address). A replay answers the same Location: a booked record rebuilds
    it, and a change's record keeps the path it stored (as every record stored before absolute
    Locations did), which is made absolute on the way out."""
    booked = await gateway.post("/fhir/cerner/Appointment", content=appointment("loc-1"), headers=auth())
    assert booked.status_code == 201, booked.text
    sf_id = validate(booked.content, "Appointment")["id"]
    where = f"{gateway.base_url}/fhir/cerner/Appointment/{sf_id}"
    assert booked.headers["location"] == where
    again = await gateway.post("/fhir/cerner/Appointment", content=appointment("loc-1"), headers=auth())
    assert again.headers["idempotent-replayed"] == "true" and again.headers["location"] == where
    moved = appointment("loc-1", status="booked", start="2026-12-01T15:00:00Z", end="2026-12-01T15:30:00Z", id=sf_id)
    for attempt in range(2):
        changed = await gateway.put(f"/fhir/cerner/Appointment/{sf_id}", content=moved, headers=auth())
        assert changed.status_code == 200, changed.text
        validate(changed.content, "Appointment")
        assert changed.headers["location"] == where
        assert changed.headers.get("idempotent-replayed") == ("true" if attempt else None)


@pytest.mark.parametrize("accept", [
    "application/fhir+json", "application/json", "*/*", "application/*", "application/fhir+json; fhirVersion=4.0",
    "application/json; charset=utf-8", "application/fhir+xml, application/fhir+json;q=0.5",
    "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",  # a browser's
])
async def test_json_in_any_spelling_is_acceptable(gateway, accept):
    r = await gateway.get("/fhir/cerner/metadata", headers={"Accept": accept})
    assert r.status_code == 200, r.text
    validate(r.content, "CapabilityStatement")


@pytest.mark.parametrize("accept", [
    "application/fhir+xml", "application/xml", "text/html", "text/turtle", "application/fhir+json; fhirVersion=3.0",
    "application/json;q=0", "application/fhir+json;q=0, application/json;q=0, application/xml", "*/*;q=0",
])
async def test_an_accept_without_json_is_406(gateway, accept):
    r = await gateway.get("/fhir/cerner/metadata", headers={"Accept": accept})
    assert r.status_code == 406, r.text
    (issue,) = validate(r.content, "OperationOutcome")["issue"]
    assert (issue["code"], issue["location"]) == ("not-supported", ["http.Accept"])
    assert REQUEST_ID.fullmatch(r.headers["x-request-id"])


async def test_format_overrides_accept(gateway):
    """FHIR's `_format` (for clients that cannot set headers) decides over `Accept`, both ways; its
    `+` may arrive unescaped (a space once the query is decoded)."""
    for value in ("json", "application/json", "application/fhir+json", "application/fhir%2Bjson"):
        r = await gateway.get(f"/fhir/cerner/metadata?_format={value}", headers={"Accept": "application/fhir+xml"})
        assert r.status_code == 200, (value, r.text)
    for value in ("xml", "text/xml", "application/fhir+xml", "html", "ttl"):
        r = await gateway.get(f"/fhir/cerner/metadata?_format={value}", headers={"Accept": "application/fhir+json"})
        assert r.status_code == 406, (value, r.text)
        assert validate(r.content, "OperationOutcome")["issue"][0]["location"] == ["http._format"]


async def test_every_fhir_route_refuses_what_it_cannot_answer_in_before_acting(gateway, sandbox):
    """Bookings, changes, batches, `$book`, `$translate`, Slot search (GET and POST), metadata and the
    OperationDefinition all answer 406 to a client that accepts no JSON, and nothing reaches
    Salesforce."""
    form = SLOTS.partition("?")[2]
    routes = [
        ("POST", "/fhir/cerner/Appointment", appointment("neg-1"), "application/fhir+json"),
        ("POST", "/fhir/cerner/Appointment/$book", appointment("neg-2"), "application/fhir+json"),
        ("POST", "/fhir/cerner/Appointment/$translate", appointment("neg-3"), "application/fhir+json"),
        ("PUT", "/fhir/cerner/Appointment/0Hxxx0000000001AAA", appointment("neg-4"), "application/fhir+json"),
        ("PUT", "/fhir/cerner/Appointment?identifier=urn:oid:1.2.3|neg-5", appointment("neg-5"), "application/fhir+json"),
        ("POST", "/fhir/cerner", msgspec.json.encode({"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": msgspec.json.decode(appointment("neg-6")), "request": {"method": "POST", "url": "Appointment"}}]}),
         "application/fhir+json"),
        ("GET", SLOTS, None, None),
        ("POST", "/fhir/cerner/Slot/_search", form.encode(), "application/x-www-form-urlencoded"),
        ("GET", "/fhir/cerner/metadata", None, None),
        ("GET", "/fhir/cerner/OperationDefinition/appointment-translate", None, None),
    ]
    for method, path, body, media in routes:
        for negotiation, where in (({"Accept": "application/fhir+xml"}, "http.Accept"),
                                   ({"Accept": "*/*", "_format": "xml"}, "http._format")):
            headers = {**auth(), "Accept": negotiation["Accept"]}
            if media:
                headers["Content-Type"] = media
            target = path + (("&" if "?" in path else "?") + "_format=xml" if "_format" in negotiation else "")
            r = await gateway.request(method, target, content=body, headers=headers)
            assert r.status_code == 406, (method, target, r.status_code, r.text)
            assert validate(r.content, "OperationOutcome")["issue"][0]["location"] == [where]
            assert REQUEST_ID.fullmatch(r.headers["x-request-id"]), (method, path)
    counters = state(sandbox).counters()
    assert (counters.book_calls, counters.slots_calls, state(sandbox).appointments()) == (0, 0, [])


async def test_header_and_query_problems_are_located_not_expressed(gateway, sandbox):
    """A header or a query parameter is no FHIRPath: its issue says `location: http.<name>` and has no
    `expression`."""
    reused = await gateway.post("/fhir/cerner/Appointment", content=appointment("hq-1"),
                                headers=auth(**{"Idempotency-Key": "hq"}))
    assert reused.status_code == 201, reused.text
    cases = [
        ("POST", "/fhir/cerner/Appointment", appointment("hq-2"), {"Idempotency-Key": "x" * 256}, 400,
         "http.Idempotency-Key"),
        ("POST", "/fhir/cerner/Appointment", appointment("hq-2"), {"Idempotency-Key": "hq"}, 422,
         "http.Idempotency-Key"),  # the key used before with another booking
        ("PUT", "/fhir/cerner/Appointment", appointment("hq-1", status="booked"), {}, 400, "http.identifier"),
        ("PUT", "/fhir/cerner/Appointment?identifier=urn:oid:1.2.3|never", appointment("hq-1", status="booked"), {}, 404,
         "http.identifier"),
    ]
    for method, path, body, headers, status, where in cases:
        r = await gateway.request(method, path, content=body, headers=auth(**headers))
        assert r.status_code == status, (path, r.text)
        (issue,) = validate(r.content, "OperationOutcome")["issue"]
        assert issue["location"] == [where] and "expression" not in issue, issue


async def test_every_answer_carries_a_request_id(gateway, sandbox):
    """As the README promises: Litestar's own refusals (no route, wrong method, body too large), the
    HTTP server's (a path not in its canonical spelling, headers over the cap), metadata, health,
    metrics, the OpenAPI document, the admin API and dashboard, and the token endpoint."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    calls = [
        ("GET", "/no-such-route", {}, None, 404),
        ("DELETE", "/fhir/cerner/Appointment", {}, None, 405),
        ("POST", "/auth/token", form, b"x=" + b"y" * 1_100_000, 413),
        ("POST", "/auth/token", form, b"grant_type=password", 400),
        ("GET", "/fhir//cerner/metadata", {}, None, 400),
        ("GET", "/fhir/cerner/metadata", {"X-Big": "b" * 20_000}, None, 431),
        ("GET", "/fhir/cerner/metadata", {}, None, 200),
        ("GET", "/fhir/nowhere/metadata", {}, None, 404),
        ("GET", "/health/live", {}, None, 200),
        ("GET", "/health/ready", {}, None, 200),
        ("GET", "/metrics", {}, None, 200),
        ("GET", "/openapi.json", {}, None, 200),
        ("GET", "/admin/", {}, None, 200),
        ("GET", "/admin/api/requests", {}, None, 401),
        ("GET", "/admin/api/requests", admin, None, 200),
        ("GET", "/admin/api/requests/nothing", admin, None, 404),
    ]
    seen = set()
    for method, path, headers, body, status in calls:
        r = await gateway.request(method, path, headers=headers, content=body)
        assert r.status_code == status, (method, path, r.status_code, r.text[:200])
        request_id = r.headers.get("x-request-id", "")
        assert REQUEST_ID.fullmatch(request_id), (method, path, status, dict(r.headers))
        seen.add(request_id)
        if r.headers.get("content-type", "").startswith("application/fhir+json"):
            validate(r.content)
    assert len(seen) == len(calls)  # one id per answer
