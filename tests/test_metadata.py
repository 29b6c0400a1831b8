"""`GET /fhir/{source}/metadata`, read by the FHIR client libraries EHR-side teams use: fhirclient
(SMART on FHIR's, synchronous; its models check every element's type) and fhirpy (asynchronous),
which then searches Slots and books through the gateway as its documentation says it may."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import msgspec
from fhirclient import client as fhirclient
from fhirpy import AsyncFHIRClient

from tests.conftest import CORPUS, KEYS, VIDEO_VISIT, auth, corpus, make_settings, serve_gateway
from tests.fhir_validate import validate
from tests.test_smart import JWKS, with_smart

VIDEO = "https://fhir.cerner.com/ec2458f2-1e24-41c8-b71b-0e701af7583d/codeSet/14249|2572307911"


async def test_fhirclient_reads_the_capability_statement(gateway, sandbox):
    base = f"{gateway.base_url}/fhir/cerner/"

    def read():  # fhirclient is synchronous: off the test's loop
        smart = fhirclient.FHIRClient(settings={"app_id": "ehr-gateway-test", "api_base": base})
        smart.prepare()
        return smart.server.capabilityStatement

    caps = await asyncio.to_thread(read)
    assert (caps.fhirVersion, caps.kind, caps.status) == ("4.0.1", "instance", "active")
    rest = caps.rest[0]
    kinds = {r.type: r for r in rest.resource}
    assert set(kinds) == {"Appointment", "Slot", "OperationDefinition"}  # the last: $translate's definition
    assert {i.code for i in kinds["Appointment"].interaction} == {"create", "update"}
    assert kinds["Appointment"].conditionalUpdate is True
    assert {o.name for o in kinds["Appointment"].operation} == {"book", "translate"}
    assert [i.code for i in kinds["Slot"].interaction] == ["search-type"]
    assert {p.name for p in kinds["Slot"].searchParam} >= {"start", "actor", "service-type", "_count"}
    assert [i.code for i in rest.interaction] == ["batch"]
    assert rest.security.service is None  # the cerner source of the test config has no SMART client


async def test_a_smart_source_says_where_its_tokens_come_from(redis_url, prefix, sandbox):
    settings = with_smart(make_settings(redis_url, prefix, sandbox.url), "cerner", jwks=JWKS)
    async with serve_gateway(settings) as gw:
        r = await gw.get("/fhir/cerner/metadata")  # no credentials: FHIR clients read it first
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
        security = r.json()["rest"][0]["security"]
        assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
        (uris,) = security["extension"]
        assert uris["extension"] == [{"url": "token", "valueUri": f"{gw.base_url}/auth/token"}]
        assert KEYS["cerner"] not in r.text
        other = (await gw.get("/fhir/epic/metadata")).json()["rest"][0]["security"]
        assert "service" not in other  # accurate per source
        assert (await gw.get("/fhir/nowhere/metadata")).status_code == 404


async def test_fhirpy_searches_slots_and_books_one(gateway, sandbox):
    fhir = AsyncFHIRClient(f"{gateway.base_url}/fhir/cerner", authorization=f"Bearer {KEYS['cerner']}",
                           extra_headers={"Accept": "application/fhir+json"})
    caps = await fhir.execute("metadata", method="get")
    assert caps["resourceType"] == "CapabilityStatement"
    slots = await fhir.resources("Slot").search(
        start=["ge2026-12-01T09:00:00Z", "le2026-12-01T10:00:00Z"], actor=["Practitioner/593923", "Location/21304876"],
        **{"service-type": VIDEO},
    ).fetch()
    assert [(s["start"], s["end"]) for s in slots] == [("2026-12-01T09:00:00Z", "2026-12-01T09:30:00Z"),
                                                      ("2026-12-01T09:30:00Z", "2026-12-01T10:00:00Z")]
    data = msgspec.json.decode(corpus(VIDEO_VISIT))
    data.update(start=slots[0]["start"], end=slots[0]["end"], slot=[{"reference": f"Slot/{slots[0]['id']}"}])
    booked = await gateway.post("/fhir/cerner/Appointment", content=msgspec.json.encode(data), headers=auth())
    assert booked.status_code == 201, booked.text
    left = await fhir.resources("Slot").search(
        start=["ge2026-12-01T09:00:00Z", "le2026-12-01T10:00:00Z"], actor=["Practitioner/593923", "Location/21304876"],
        **{"service-type": VIDEO},
    ).fetch()
    assert [s["id"] for s in left] == [slots[1]["id"]]


async def test_published_urls_come_from_the_settings_not_the_host_header(redis_url, prefix, sandbox):
    """A forged Host is not reflected into the CapabilityStatement's addresses (its token URL would
    send a SMART client's assertion elsewhere) nor into a searchset's links."""
    settings = with_smart(make_settings(redis_url, prefix, sandbox.url), "cerner", jwks=JWKS)
    server = msgspec.structs.replace(settings.file.server, public_urls=("https://ehr-gateway.example.org/ehr",))
    settings = msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, server=server))
    async with serve_gateway(settings) as gw:
        forged = {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http"}
        caps = await gw.get("/fhir/cerner/metadata", headers=forged)
        assert caps.status_code == 200 and "evil.example" not in caps.text
        body = caps.json()
        assert body["implementation"]["url"] == "https://ehr-gateway.example.org/ehr/fhir/cerner"
        token = body["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"]
        assert token == "https://ehr-gateway.example.org/ehr/auth/token"
        query = "/fhir/cerner/Slot?start=ge2026-12-01T09:00:00Z&start=le2026-12-01T10:00:00Z&actor=Practitioner/593923" \
                f"&actor=Location/21304876&service-type={VIDEO}"
        found = await gw.get(query, headers={**auth(), **forged})
        assert found.status_code == 200 and "evil.example" not in found.text, found.text
        bundle = found.json()
        assert bundle["link"][0]["url"].startswith("https://ehr-gateway.example.org/ehr/fhir/cerner/Slot?")
        assert all(e["fullUrl"].startswith("https://ehr-gateway.example.org/ehr/fhir/cerner/Slot/") for e in bundle["entry"])


async def test_the_capability_statement_tells_the_truth(gateway, sandbox):
    """The batch interaction; Argonaut's canonical `$book` definition (the corpus's own `url`); a
    `$translate` whose definition resolves, served by the gateway as an OperationDefinition of its
    own (not ConceptMap/$translate's); Slot's `_count` and search by POST; and a `format` list that
    content negotiation accepts, each entry of it."""
    r = await gateway.get("/fhir/cerner/metadata")
    caps = validate(r.content, "CapabilityStatement")
    (rest,) = caps["rest"]
    assert [i["code"] for i in rest["interaction"]] == ["batch"]
    resources = {res["type"]: res for res in rest["resource"]}
    operations = {op["name"]: op["definition"] for op in resources["Appointment"]["operation"]}
    argonaut = msgspec.json.decode((CORPUS / "argonaut-scheduling/OperationDefinition-appointment-book.json").read_bytes())
    assert operations["book"] == argonaut["url"]
    assert operations["translate"] == f"{gateway.base_url}/fhir/cerner/OperationDefinition/appointment-translate"
    resolved = await gateway.get(operations["translate"])  # an absolute URL at the gateway: no key needed
    assert resolved.status_code == 200 and resolved.headers["content-type"].startswith("application/fhir+json")
    definition = validate(resolved.content, "OperationDefinition")
    assert (definition["url"], definition["code"], definition["resource"]) == (operations["translate"], "translate",
                                                                               ["Appointment"])
    assert definition["url"] != "http://hl7.org/fhir/OperationDefinition/ConceptMap-translate"
    assert {p["name"] for p in definition["parameter"] if p["use"] == "in"} >= {"appt-resource"}
    assert [i["code"] for i in resources["OperationDefinition"]["interaction"]] == ["read"]
    slot = resources["Slot"]
    assert [i["code"] for i in slot["interaction"]] == ["search-type"] and "_search" in slot["interaction"][0]["documentation"]
    assert {p["name"]: p["type"] for p in slot["searchParam"]}["_count"] == "number"
    for media in caps["format"]:
        assert (await gateway.get(f"/fhir/cerner/metadata?_format={quote(media)}")).status_code == 200, media
        if "/" in media:  # `json` is _format's shorthand, not a media type an Accept names
            assert (await gateway.get("/fhir/cerner/metadata", headers={"Accept": media})).status_code == 200, media
    missing = await gateway.get("/fhir/cerner/OperationDefinition/ConceptMap-translate")
    assert missing.status_code == 404 and validate(missing.content, "OperationOutcome")["issue"][0]["code"] == "not-found"
    assert (await gateway.get("/fhir/nowhere/OperationDefinition/appointment-translate")).status_code == 404
