"""Only the right caller: every route that names an appointment × every credential × an appointment
of this source, of another source, of none (in Salesforce, never booked through the gateway) and one
that does not exist. A source changes only what it booked; everything else is the same 404, before
anything reaches Salesforce, so it can neither change nor find out about another's appointments.

(`tests/test_credentials.py` walks every route with a source's credentials; this adds what they act on.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import msgspec
import pytest

from tests.conftest import ADMIN_KEY, CLIENT_ID, CLIENT_SECRET, CONFIG, KEYS, PHI_KEY, VIDEO_VISIT, corpus, digest
from tests.conftest import make_settings, serve_gateway, visit_records
from tests.test_smart import JWKS, assertion, get_token, with_smart

OTHER_KEY = "test-clinic-key"  # a second Cerner source, `clinic`, with the same maps
BOOK_API = "/services/data/v66.0/connect/health/appointment-management/appointment"


def visit(n: int, **changes) -> dict:
    data = msgspec.json.decode(corpus(VIDEO_VISIT))
    data.update(start=f"2026-12-1{n}T09:00:00Z", end=f"2026-12-1{n}T09:15:00Z", status="booked",
                identifier=[{"system": "urn:oid:1.2.3", "value": f"authz-{n}"}])
    data.pop("id")  # Cerner's own id: an update's body carries the appointment's, or none by identifier
    data.update(changes)
    data.pop("cancelationReason", None)
    return data


@pytest.fixture
async def world(redis_url, prefix, sandbox, tmp_path):
    """The gateway with sources cerner and clinic; an appointment booked by each, and one made in
    Salesforce directly."""
    cfg = tmp_path / "config"
    shutil.copytree(CONFIG, cfg)
    shutil.copytree(cfg / "codemaps" / "cerner", cfg / "codemaps" / "clinic")
    (cfg / "gateway.toml").write_text((cfg / "gateway.toml").read_text().replace(
        "[sources.epic]", '[sources.clinic]\nadapter = "cerner"\nsource_system = "cerner"\napi_keys_sha256 = []\n\n[sources.epic]'))
    settings = with_smart(make_settings(redis_url, prefix, sandbox.url, config_dir=cfg), "cerner", jwks=JWKS)
    sources = dict(settings.file.sources)
    sources["clinic"] = msgspec.structs.replace(sources["clinic"], api_keys_sha256=(digest(OTHER_KEY),))
    admin = msgspec.structs.replace(settings.file.admin, failed_key_burst=1000)
    settings = msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, sources=sources, admin=admin))
    async with serve_gateway(settings) as gw:
        token = (await get_token(gw, assertion("cerner-client", str(gw.base_url) + "/auth/token"))).json()["access_token"]
        ids = {}
        for name, source, key, n in (("this", "cerner", KEYS["cerner"], 1), ("another", "clinic", OTHER_KEY, 2)):
            r = await gw.post(f"/fhir/{source}/Appointment", content=msgspec.json.encode(visit(n)), headers=_auth(key))
            assert r.status_code == 201, r.text
            ids[name] = r.json()["id"]
        ids["none"] = await _book_in_salesforce(sandbox, 3)
        ids["missing"] = "08pHs0000000999AAA"
        yield gw, sandbox.app.state.sandbox, token, ids


async def _book_in_salesforce(sandbox, n: int) -> str:
    """An appointment the org holds that no source booked through the gateway."""
    people = visit_records(sandbox)
    async with httpx.AsyncClient(base_url=sandbox.url) as sf:
        token = (await sf.post("/services/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})).json()
        r = await sf.post(BOOK_API, headers={"Authorization": f"Bearer {token['access_token']}"}, json={
            "startDate": f"2026-12-1{n}T09:00:00Z", "endDate": f"2026-12-1{n}T09:15:00Z", "workTypeId": "08qxx0000000001",
            "participants": [{"reference": people["Patient"]}, {"reference": people["Facility"]},
                             {"reference": people["Practitioner"]}]})
    assert r.status_code in (200, 201), r.text
    return (r.json()[0] if isinstance(r.json(), list) else r.json())["id"]


def _auth(key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/fhir+json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return headers


CREDENTIALS = ("none", "unknown", "this-key", "this-token", "another-source", "admin", "phi")
RESOURCES = ("this", "another", "none", "missing")
ROUTES = ("put-by-id", "put-by-identifier", "batch-put-by-id", "batch-put-by-identifier")


async def _change(gw: httpx.AsyncClient, route: str, key: str | None, sf_id: str, n: int) -> tuple[int, bytes]:
    """Cancel the appointment through one route; (status of the change, its OperationOutcome or body)."""
    body = visit(n, status="cancelled", **({} if "identifier" in route else {"id": sf_id}))
    identifier = f"urn:oid:1.2.3|authz-{n}"
    if route == "put-by-id":
        r = await gw.put(f"/fhir/cerner/Appointment/{sf_id}", content=msgspec.json.encode(body), headers=_auth(key))
    elif route == "put-by-identifier":
        r = await gw.put(f"/fhir/cerner/Appointment?identifier={identifier}", content=msgspec.json.encode(body),
                         headers=_auth(key))
    else:
        url = f"Appointment/{sf_id}" if route == "batch-put-by-id" else f"Appointment?identifier={identifier}"
        bundle = {"resourceType": "Bundle", "type": "batch",
                  "entry": [{"resource": body, "request": {"method": "PUT", "url": url}}]}
        r = await gw.post("/fhir/cerner", content=msgspec.json.encode(bundle), headers=_auth(key))
        if r.status_code == 200:
            entry = r.json()["entry"][0]
            return int(entry["response"]["status"].split()[0]), msgspec.json.encode(entry.get("resource"))
    return r.status_code, r.content


@pytest.mark.parametrize("route", ROUTES)
async def test_a_source_changes_only_what_it_booked(world, route):
    gw, org, token, ids = world
    keys = {"none": None, "unknown": "not-a-key", "this-key": KEYS["cerner"], "this-token": token,
            "another-source": OTHER_KEY, "admin": ADMIN_KEY, "phi": PHI_KEY}
    number = {"this": 1, "another": 2, "none": 3, "missing": 4}
    not_found = set()
    for credential in CREDENTIALS:
        for resource in RESOURCES:
            if resource == "this" and credential in ("this-key", "this-token"):
                continue  # the one change allowed: made last, below
            status, body = await _change(gw, route, keys[credential], ids[resource], number[resource])
            cell = (route, credential, resource, status)
            if credential in ("none", "unknown", "admin", "phi"):  # not a source's credential
                assert status == 401, cell
            elif credential == "another-source":  # a source's credential on cerner's routes
                assert status == 403, cell
            else:
                assert status == 404, cell
                not_found.add(body)
    # whatever the appointment (another source's, the org's own, none), one and the same answer
    assert len(not_found) == 1, not_found
    assert b"08p" not in next(iter(not_found))  # nothing of the ids named leaks back
    for resource in ("this", "another", "none"):
        assert org.get(ids[resource]).status == "Scheduled", resource
    counters = org.counters()
    assert (counters.cancel_calls, counters.update_calls, counters.appointment_queries) == (0, 0, 0)
    # and the source's own appointment it may change, with its key as with its token
    status, _ = await _change(gw, route, token if "identifier" in route else KEYS["cerner"], ids["this"], 1)
    assert status == 200 and org.get(ids["this"]).status == "Cancelled"


async def test_another_source_cannot_reach_this_sources_appointments_on_its_own_routes(world):
    """The clinic source, on its own routes, naming cerner's appointment: 404, as for none."""
    gw, org, _, ids = world
    for path in (f"/fhir/clinic/Appointment/{ids['this']}", "/fhir/clinic/Appointment?identifier=urn:oid:1.2.3|authz-1"):
        for status in ("cancelled", "booked"):  # booked: "does this patient have an appointment there?"
            by_id = {} if "?" in path else {"id": ids["this"]}
            r = await gw.put(path, content=msgspec.json.encode(visit(1, status=status, **by_id)), headers=_auth(OTHER_KEY))
            assert r.status_code == 404, (path, status, r.text)
            assert ids["this"] not in r.text
    assert org.get(ids["this"]).status == "Scheduled"
    assert (org.counters().cancel_calls, org.counters().update_calls, org.counters().appointment_queries) == (0, 0, 0)
