"""A source's credentials fail everywhere except on its own source (issue 5's "done when").

Every route the app registers is walked, so a route added later without authentication shows up
here: each credential of source `cerner` (its API key and a SMART token) is tried on every route
that takes a credential, and must be refused (403) on every other source's routes and on the admin
API, while it works on cerner's own. Routes that take no credential are listed explicitly.
"""

from __future__ import annotations

import re

import msgspec
import pytest

from gateway.app import create_app
from tests.conftest import KEYS, VIDEO_VISIT, corpus, make_settings, serve_gateway
from tests.test_smart import JWKS, assertion, get_token, with_smart

# routes that answer without any credential (their answers hold no patient data and no secret)
PUBLIC = {
    ("GET", "/health/live"), ("GET", "/health/ready"), ("GET", "/metrics"), ("GET", "/openapi.json"),
    ("GET", "/fhir/{source:str}/metadata"),  # the CapabilityStatement: FHIR clients read it before any key
    ("GET", "/fhir/{source:str}/OperationDefinition/{name:str}"),  # what the CapabilityStatement points to
    ("POST", "/auth/token"),  # the credential is the client assertion in the form
    ("GET", "/admin"), ("GET", "/admin/static/{name:str}"),  # the dashboard's files; its data needs a key
    ("POST", "/admin/api/session"),  # the key is in the body: tried below
    ("GET", "/iam/metadata"),  # Health Cloud's base's CapabilityStatement
}
FILL = {"source": "epic", "entry_id": "0-0", "action": "replay", "name": "app.js", "appointment_id": "08pxx0000000001AAA",
        "system": "epic", "slot_id": "e-s1-203001070900", "first": "epic", "second": "1000001", "hold": "0" * 24}


def routes(app) -> list[tuple[str, str]]:
    found = []
    for route in app.routes:
        for method in sorted(getattr(route, "methods", ()) - {"HEAD", "OPTIONS"}):
            found.append((method, route.path))
    return found


def concrete(path: str, **fill: str) -> str:
    return re.sub(r"\{(\w+):\w+\}", lambda m: {**FILL, **fill}[m.group(1)], path)


@pytest.fixture
async def gateway_and_token(redis_url, prefix, sandbox):
    settings = with_smart(make_settings(redis_url, prefix, sandbox.url), "cerner", jwks=JWKS)
    # dozens of deliberate wrong admin keys from one address: lift the throttle (tested in test_admin)
    admin = msgspec.structs.replace(settings.file.admin, failed_key_burst=1000)
    settings = msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, admin=admin))
    async with serve_gateway(settings) as gw:
        r = await get_token(gw, assertion("cerner-client", str(gw.base_url) + "/auth/token"))
        assert r.status_code == 200, r.text
        yield gw, settings, r.json()["access_token"]


async def test_a_sources_credentials_work_on_its_own_source_only(gateway_and_token):
    gw, settings, token = gateway_and_token
    table = routes(create_app(settings))
    guarded = [(m, p) for m, p in table if (m, p) not in PUBLIC]
    # every guarded route is a source's, the admin API's or Health Cloud's; nothing else hides among them
    assert guarded and all(p.startswith(("/fhir/{source:str}", "/admin/api/", "/iam/")) for _, p in guarded), guarded
    assert any(p.startswith("/fhir/") for _, p in guarded) and any(p.startswith("/admin/api/") for _, p in guarded)
    headers = {"Content-Type": "application/fhir+json"}
    for credential in (KEYS["cerner"], token):
        auth = {**headers, "Authorization": f"Bearer {credential}"}
        for method, path in guarded:
            r = await gw.request(method, concrete(path), headers=auth, content=b"{}" if method != "GET" else None)
            assert r.status_code == 403, (method, path, r.status_code)
            assert r.json()["resourceType"] == "OperationOutcome"
            if path.startswith("/fhir/"):  # on its own source it is accepted (and the body then judged)
                mine = await gw.request(method, concrete(path, source="cerner"), headers=auth,
                                        content=corpus(VIDEO_VISIT) if method != "GET" else None)
                assert mine.status_code not in (401, 403), (method, path, mine.status_code, mine.text)
        # the key in the dashboard's sign-in form: refused as a source's
        assert (await gw.post("/admin/api/session", json={"key": credential})).status_code == 403
    # and without any credential, the same routes are 401 (none of them is open by mistake)
    for method, path in guarded:
        r = await gw.request(method, concrete(path), headers=headers, content=b"{}" if method != "GET" else None)
        assert r.status_code == 401, (method, path, r.status_code)
