"""What Salesforce needs, not every category (contract, "Code maps"): a coding in a system that no map
knows, in a category the booking does not need, is left out with a warning; the booking is refused
only when nothing gives Salesforce one of workTypeId, appointmentTypes, serviceTypes or
serviceCategories, or when a coding's system has a map that lacks its code (the map is incomplete).

Over real HTTP and MLLP against the sandbox, with the warning shown in `$translate` (the `Warning`
header: its body is the Salesforce request) and in the request log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from gateway.canonical import CanonicalBooking, Coding, Concept
from gateway.booking.codemaps import load_source_maps
from gateway.booking.mapping import map_booking
from gateway.settings import load_file_settings
from tests.conftest import CONFIG, auth, make_settings
from tests.fhir_validate import validate
from tests.test_admin import config_copy, state, wait_for_entries
from tests.test_hl7v2 import ATHENA, exchange, mllp_gateway, with_event

EPIC_VISIT = "urn:oid:1.2.840.114350.1.13.861.1.7.3.808267.11"
SERVICE_CATEGORY = "http://terminology.hl7.org/CodeSystem/service-category"  # FHIR's own; no Epic map has it
RESOURCE = "Parameters.parameter[0].resource"


def epic_book(*, category_system: str = SERVICE_CATEGORY, visit_code: str = "40111223") -> bytes:
    """An Epic `$book` whose serviceType is an Epic visit type (mapped to serviceTypes and a
    workTypeId) and whose serviceCategory is a standard FHIR service-category code."""
    appointment = {
        "resourceType": "Appointment", "status": "booked",
        "identifier": [{"system": "urn:oid:1.2.840.114350.1.13.861.1.7.3.698084.8", "value": "code-rules-1"}],
        "serviceCategory": [{"coding": [{"system": category_system, "code": "17", "display": "General Practice"}]}],
        "serviceType": [{"coding": [{"system": EPIC_VISIT, "code": visit_code}]}],
        "start": "2027-03-01T15:00:00Z", "end": "2027-03-01T15:30:00Z",
        "participant": [
            {"actor": {"reference": "Patient/eTplvxIxTqsb3WI4wX1bpTw3"}, "status": "accepted"},
            {"actor": {"reference": "Practitioner/eM5CWtq15N0WJeuCet5bJlQ3"}, "status": "accepted"},
            {"actor": {"reference": "Location/e4W4rmGe9QzuGm2Dy4NBqVc0JDSNEiE3"}, "status": "accepted"},
        ],
    }
    return json.dumps({"resourceType": "Parameters",
                       "parameter": [{"name": "appt-resource", "resource": appointment}]}).encode()


def epic_auth() -> dict[str, str]:
    return auth("epic")


async def test_an_unknown_system_in_a_category_not_needed_is_left_out_with_a_warning(gateway, sandbox):
    dry = await gateway.post("/fhir/epic/Appointment/$translate", content=epic_book(), headers=epic_auth())
    assert dry.status_code == 200, dry.text  # was 422: no map for the serviceCategory's system
    sent = dry.json()
    assert sent["serviceTypes"] == ["40111223"] and sent["workTypeId"] == "08qxx0000000011AAA"
    assert "serviceCategories" not in sent
    warning = dry.headers["warning"]
    assert warning.startswith('299 ehr-gateway "') and f"{RESOURCE}.serviceCategory[0]" in warning
    assert "left out" in warning and "17" not in warning  # names the element, never the value

    r = await gateway.post("/fhir/epic/Appointment/$book", content=epic_book(), headers=epic_auth())
    assert r.status_code == 201, r.text
    validate(r.content, "Appointment")
    [stored] = state(sandbox).appointments()
    assert "serviceCategories" not in stored.request and stored.request["serviceTypes"] == ["40111223"]
    [entry] = await wait_for_entries(gateway, 1, source="epic", outcome="booked")
    assert [(i["severity"], i["expression"]) for i in entry["issues"]] == [
        ("warning", [f"{RESOURCE}.serviceCategory[0]"])]


async def test_refused_only_when_nothing_gives_salesforce_what_it_needs(gateway, sandbox):
    # the serviceType's code has no entry in its system's map: the map is incomplete, always an error
    incomplete = await gateway.post("/fhir/epic/Appointment/$book", content=epic_book(visit_code="99999999"),
                                    headers=epic_auth())
    assert incomplete.status_code == 422
    issues = validate(incomplete.content, "OperationOutcome")["issue"]
    assert {(i["severity"], i["code"], i["expression"][0]) for i in issues} >= {
        ("error", "code-invalid", f"{RESOURCE}.serviceType[0].coding[0]")}
    # the serviceCategory alone is no longer what refuses: it is an error only because nothing maps
    assert {i["expression"][0]: i["severity"] for i in issues}[f"{RESOURCE}.serviceCategory[0]"] == "error"
    assert state(sandbox).counters().book_calls == 0


SIU_SERVICES = {
    "resourceType": "ConceptMap", "id": "athena-services", "status": "active",
    "group": [{"source": "urn:ehr-gateway:hl7v2:AIS-3", "target": "urn:ehr-gateway:salesforce:serviceTypes",
               "element": [{"code": "OV30", "target": [{"code": "OFFICE_VISIT", "equivalence": "equivalent"}]}]}],
}


def siu_with_local_sch8(control: str) -> bytes:
    """The athena S12 with SCH-8 in a local coding system (`^L`: no map group for `L`) and an AIS
    segment whose service (AIS-3) has a map."""
    segments = ATHENA.read_bytes().decode().replace("\r\n", "\r").replace("\n", "\r").strip("\r\x1c\x0b").split("\r")
    out = []
    for seg in segments:
        fields = seg.split("|")
        if fields[0] == "MSH":
            fields[9] = control
        if fields[0] == "SCH":
            fields[1] = fields[2] = f"local-{control}"  # an appointment of its own
            fields[8] = "ov^office visit^L"
        out.append("|".join(fields))
        if fields[0] == "RGS":
            out.append("AIS|1||OV30^Office visit 30")
    return "\r".join(out).encode()


async def test_an_siu_with_a_local_sch8_beside_a_mapped_ais3_books(redis_url, prefix, sandbox, tmp_path):
    config = config_copy(tmp_path, prefix)
    (config / "codemaps" / "athena" / "services.json").write_text(json.dumps(SIU_SERVICES))
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=config)
    async with mllp_gateway(settings) as (port, http):
        [ack] = await exchange(port, siu_with_local_sch8("local-1"))
        assert ack.split("\r")[1].split("|")[1] == "AA", ack  # was AE: SCH-8's system L has no map
        [stored] = state(sandbox).appointments()
        assert stored.request["serviceTypes"] == ["OFFICE_VISIT"]
        assert "appointmentTypes" not in stored.request and "workTypeId" not in stored.request
        [entry] = await wait_for_entries(http, 1, source="athena", outcome="booked")
        assert [(i["severity"], i["expression"]) for i in entry["issues"]] == [("warning", ["SCH-8"])]
        # the same message's SCH-8 in the system that has a map still maps through it
        [ack] = await exchange(port, with_event(ATHENA.read_bytes(), "S12", control="mapped-1"))
        assert ack.split("\r")[1].split("|")[1] == "AA", ack


# -- the rule, at the mapping ---------------------------------------------------------------------

def _booking(**concepts: list[list[Coding]]) -> CanonicalBooking:
    fields = {"services": ("service_types", "Appointment.serviceType"),
              "types": ("appointment_types", "Appointment.appointmentType"),
              "categories": ("service_categories", "Appointment.serviceCategory")}
    built = {fields[k][0]: tuple(Concept(path=f"{fields[k][1]}[{i}]", codings=tuple(c)) for i, c in enumerate(v))
             for k, v in concepts.items()}
    return CanonicalBooking(resource_path="Appointment", **built)


@pytest.fixture
def maps(tmp_path: Path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "m.json").write_text(json.dumps({"resourceType": "ConceptMap", "status": "active", "group": [
        {"source": "urn:svc", "target": "urn:ehr-gateway:salesforce:serviceTypes",
         "element": [{"code": "a", "target": [{"code": "SA", "equivalence": "equivalent"}]},
                     {"code": "gone", "target": [{"equivalence": "unmatched"}]}]},
    ]}))
    return load_source_maps(folder)


SOURCE = load_file_settings(CONFIG).sources["fhir"]


@pytest.mark.parametrize("ignored", [
    [Coding("urn:nobody-maps-this", "x")],  # a system with no group for the category
    [Coding(None, "52")],  # no system: never mapped
    [Coding("urn:svc", "gone")],  # an explicit no-mapping (unmatched)
])
def test_a_concept_with_nothing_to_send_is_a_warning_beside_a_mapped_category(maps, ignored):
    out = map_booking(_booking(services=[[Coding("urn:svc", "a")]], categories=[ignored]), SOURCE, maps)
    assert out.request.serviceTypes == ("SA",) and out.request.serviceCategories is None
    assert [(i.severity, i.expression) for i in out.issues] == [("warning", ("Appointment.serviceCategory[0]",))]
    alone = map_booking(_booking(categories=[ignored]), SOURCE, maps)
    assert [(i.severity, i.code, i.expression) for i in alone.issues] == [
        ("error", "code-invalid", ("Appointment.serviceCategory[0]",))]


def test_a_code_missing_from_its_systems_map_is_an_error_even_beside_a_mapped_category(maps):
    out = map_booking(_booking(services=[[Coding("urn:svc", "a")], [Coding("urn:svc", "b")]]), SOURCE, maps)
    assert out.request.serviceTypes == ("SA",)
    assert [(i.severity, i.expression) for i in out.issues] == [
        ("error", ("Appointment.serviceType[1].coding[0]",))]


def test_the_translate_command_prints_the_warning_on_stderr(tmp_path):
    path = tmp_path / "book.json"
    path.write_bytes(epic_book())
    exe = Path(sys.executable).with_name("ehr-gateway")
    done = subprocess.run([str(exe), "translate", "--source", "epic", str(path), "--config", str(CONFIG)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert msgspec.json.decode(done.stdout)["serviceTypes"] == ["40111223"]
    assert done.stderr.strip() == (f"warning: {RESOURCE}.serviceCategory[0]: no coding has a Salesforce "
                                   "serviceCategories map; left out")
