"""Health Cloud's callouts (`[healthcloud] path_prefix`), over real HTTP: who may call them, what the
search form may hold, and (with the three EHR twins behind the gateway) what each operation answers."""

from __future__ import annotations

import base64

import msgspec
import pytest

from gateway.settings import HealthCloudSettings
from tests.conftest import KEYS, digest, make_settings, serve_gateway
from tests.fhir_validate import validate

HC_USER, HC_PASSWORD, HC_BEARER = "hc-callouts", "hc-password-7d1e", "hc-bearer-token-51c0"
BASIC = "Basic " + base64.b64encode(f"{HC_USER}:{HC_PASSWORD}".encode()).decode()
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
WINDOW = "start=ge2030-01-07&start=le2030-01-08"


def healthcloud_settings(redis_url: str, prefix: str, login_url: str, **sources_ehr: object):
    hc = HealthCloudSettings(basic_sha256=(digest(f"{HC_USER}:{HC_PASSWORD}"),),
                             bearer_keys_sha256=(digest(HC_BEARER),))
    return make_settings(redis_url, prefix, login_url, healthcloud=hc)


@pytest.fixture
async def hc_gateway(redis_url, prefix, sandbox):
    async with serve_gateway(healthcloud_settings(redis_url, prefix, sandbox.url)) as client:
        yield client


@pytest.mark.parametrize("authorization, status", [
    (None, 401),
    ("Basic " + base64.b64encode(b"hc-callouts:wrong").decode(), 401),
    ("Basic !!!not-base64", 401),
    ("Bearer not-a-known-token", 401),
    (f"Bearer {KEYS['cerner']}", 403),  # a source's key opens only that source's routes
    (BASIC, 200),
    (f"Bearer {HC_BEARER}", 200),
    (f"bearer {HC_BEARER}", 200),  # the scheme is case-insensitive
])
async def test_who_may_call_the_callouts(hc_gateway, authorization, status):
    headers = {"Authorization": authorization} if authorization else {}
    response = await hc_gateway.post("/iam/Slot/_search", content=WINDOW, headers={**FORM, **headers})
    assert response.status_code == status
    body = response.json()
    if status == 200:
        validate(body, "Bundle")
        assert body["type"] == "searchset" and body["total"] == 0  # no EHR is configured here
    else:
        validate(body, "OperationOutcome")
        assert body["issue"][0]["code"] == ("login" if status == 401 else "forbidden")
        assert HC_PASSWORD not in response.text and KEYS["cerner"] not in response.text
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Basic")


@pytest.mark.parametrize("authorization", [BASIC, f"Bearer {HC_BEARER}"])
async def test_health_clouds_credential_does_not_open_a_sources_routes(hc_gateway, authorization):
    response = await hc_gateway.post("/fhir/cerner/Appointment", content=b"{}",
                                     headers={"Authorization": authorization, "Content-Type": "application/fhir+json"})
    assert response.status_code == 403
    assert response.json()["issue"][0]["code"] == "forbidden"


@pytest.mark.parametrize("form, where", [
    ("start=ge2030-01-07", "http.start"),  # one bound
    ("start=le2030-01-08&start=ge2030-01-07&start=ge2030-01-06", "http.start"),  # two lower bounds
    ("start=ge2030-01-09&start=le2030-01-08", "http.start"),  # upside down
    ("start=ge2030-01-01&start=le2030-06-30", "http.start"),  # wider than max_search_days
    ("start=ge2030-13-01&start=le2030-01-08", "http.start"),  # not a date
    (f"{WINDOW}&status=busy", "http.status"),
    (f"{WINDOW}&_sort=-start", "http._sort"),
    (f"{WINDOW}&practitioner=123", "http.practitioner"),  # not a parameter Find sends
])
async def test_a_search_find_would_not_send_is_400(hc_gateway, form, where):
    response = await hc_gateway.post("/iam/Slot/_search", content=form, headers={**FORM, "Authorization": BASIC})
    assert response.status_code == 400, response.text
    body = response.json()
    validate(body, "OperationOutcome")
    assert body["issue"][0]["location"] == [where]


async def test_find_is_a_form_and_creates_are_fhir_json(hc_gateway):
    as_json = await hc_gateway.post("/iam/Slot/_search", content=b"{}",
                                    headers={"Authorization": BASIC, "Content-Type": "application/fhir+json"})
    assert as_json.status_code == 415
    as_form = await hc_gateway.post("/iam/Appointment/cerner", content=b"status=booked",
                                    headers={**FORM, "Authorization": BASIC})
    assert as_form.status_code == 415


async def test_metadata_says_what_the_base_serves(hc_gateway):
    response = await hc_gateway.get("/iam/metadata")
    assert response.status_code == 200
    body = response.json()
    validate(body, "CapabilityStatement")
    served = {r["type"]: {i["code"] for i in r["interaction"]} for r in body["rest"][0]["resource"]}
    assert served == {"Slot": {"read", "search-type"}, "Appointment": {"read", "create", "update"}}


@pytest.mark.parametrize("prefix", ["iam", "/fhir", "/admin/x", "/iam/", "/i am", "/"])
def test_the_prefix_is_a_path_of_its_own(tmp_path, prefix):
    from gateway.settings import ConfigError, load_file_settings

    (tmp_path / "gateway.toml").write_text(f'[healthcloud]\npath_prefix = "{prefix}"\n')
    with pytest.raises(ConfigError, match="path_prefix"):
        load_file_settings(tmp_path)


def test_codes_decode_as_the_spec_shows():
    from gateway.scheduling.callouts import read_search

    line = ("schedule:Schedule.actor:Practitioner.identifier=http://hl7.org/fhir/sid/us-npi|323,434,567"
            "&schedule:Schedule.actor:Location._id=epic|555,epic|123,cerner|222,athena|331"
            "&schedule:Schedule.actor:Practitioner._id=epic|2342342"
            "&start=ge2020-10-10&start=le2021-03-31"
            "&appointment-type=epic|ROUTINE,cerner|RTN,athena|REGULAR"
            "&service-type=epic|H999,cerner|E100,athena|C200"
            "&status=free&_include=Slot:schedule&_sort=start")
    search = read_search(line.encode(), ["epic", "cerner"], max_days=200, max_values=50)
    assert (search.start, search.end) == ("2020-10-10T00:00:00Z", "2021-04-01T00:00:00Z")
    got = {system: msgspec.to_builtins(c) for system, c in search.criteria.items()}
    assert got == {
        "epic": {"practitioners": ["2342342"], "locations": ["555", "123"], "service_types": ["H999"],
                 "appointment_types": ["ROUTINE"]},
        "cerner": {"practitioners": [], "locations": ["222"], "service_types": ["E100"], "appointment_types": ["RTN"]},
        # a source system with no EHR is kept: the search answers its failure, tagged, beside the others
        "athena": {"practitioners": [], "locations": ["331"], "service_types": ["C200"],
                   "appointment_types": ["REGULAR"]},
    }
    assert search.unsupported == ["schedule:Schedule.actor:Practitioner.identifier"]


def test_translate_to_ehr_shows_what_a_callout_would_ask_of_the_ehr(tmp_path, capsys):
    from gateway.cli import main

    create = tmp_path / "create.json"
    create.write_text(msgspec.json.encode({
        "resourceType": "Appointment", "status": "proposed",
        "identifier": [{"system": "urn:salesforce:ServiceAppointment", "value": "08pxx0000000001AAA"}],
        "serviceType": [{"coding": [{"code": "40111223"}, {"code": "no-such-code"}]}],
        "appointmentType": {"coding": [{"code": "ROUTINE"}]},
        "slot": [{"reference": "Slot/e-s1-203001070900"}],
        "participant": [{"actor": {"reference": "Patient/eq7IBvJQy2Y5wZqgZ3bRz6A3"}, "status": "accepted"}]}).decode())
    assert main(["translate", "--to-ehr", "epic", str(create)]) == 0
    asked = msgspec.json.decode(capsys.readouterr().out)
    assert asked["slot"] == "e-s1-203001070900" and asked["identifiers"] == [
        ["urn:salesforce:ServiceAppointment", "08pxx0000000001AAA"]]
    # Health Cloud's work-type codes are Epic's own: its OID added from the group listing the code; a
    # code no map knows goes as it came, without a system
    assert asked["service_types"] == [{"system": "urn:oid:1.2.840.114350.1.13.861.1.7.3.808267.11",
                                       "code": "40111223"}, {"code": "no-such-code"}]
    assert asked["appointment_types"] == [{"system": "http://terminology.hl7.org/CodeSystem/v2-0276",
                                           "code": "ROUTINE"}]

    find = tmp_path / "find.txt"
    find.write_text(f"service-type=2572307911&{WINDOW}")
    assert main(["translate", "--to-ehr", "cerner", str(find)]) == 0
    asked = msgspec.json.decode(capsys.readouterr().out)
    assert asked["service_types"] == [{"system": "https://fhir.cerner.com/ec2458f2-1e24-41c8-b71b-0e701af7583d/"
                                                 "codeSet/14249", "code": "2572307911"}]
    # a code no map knows has no code system, and Cerner's Slot search takes none without one: refused
    find.write_text(f"service-type=not-mapped&{WINDOW}")
    assert main(["translate", "--to-ehr", "cerner", str(find)]) == 1
    refused = msgspec.json.decode(capsys.readouterr().out)
    assert refused["resourceType"] == "OperationOutcome" and refused["issue"][0]["code"] == "code-invalid"
    assert "system|code" in refused["issue"][0]["details"]["text"]
