"""Codes toward the EHR (issue 15, item 5). Health Cloud's `service-type` and `appointment-type` come
from the org's Work Type Code Set Bundles, which hold each source system's own codes: a code is taken
as the EHR's, in the code system of the source's map group that lists it among its source codes
(Cerner's code set, Epic's OID); only a code no group lists is read through the maps in reverse (a
Salesforce-side code); one no map knows goes bare, unless the EHR cannot be asked so (Cerner's Slot
search: 400, an OperationOutcome). The rule itself, then the three twins over HTTP (which find their
slots only by their own codings), then `ehr-gateway translate --to-ehr`."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from gateway.booking.codemaps import load_source_maps
from gateway.cli import main
from gateway.edges.server import ThreadedServer
from gateway.errors import InvalidRequest
from gateway.scheduling.callouts import read_callout, read_search
from gateway.scheduling.to_ehr import book_request, ehr_coding, slot_query
from gateway.twins import TwinConfig, create_ehr_twin
from gateway.twins.config import CERNER_TENANT, TwinSchedule, default_patients, default_schedules
from tests.conftest import CONFIG, serve_gateway
from tests.test_codemaps import group, write_map
from tests.test_healthcloud_ehrs import (CLIENT, CONTROL, DIALECTS, JSON, PUBLIC, SECRET, WINDOW, Twin, _found,
                                         _slots, fleet_settings)

CERNER_SET = f"https://fhir.cerner.com/{CERNER_TENANT}/codeSet/14249"
EPIC_VISITS = "urn:oid:1.2.840.114350.1.13.861.1.7.3.808267.11"
HL7_SERVICES = "http://terminology.hl7.org/CodeSystem/service-type"
ARGONAUT = "http://fhir.org/guides/argonaut-scheduling/CodeSystem/visit-type"
SNOMED = "http://snomed.info/sct"
R4_0276, OLD_0276 = "http://terminology.hl7.org/CodeSystem/v2-0276", "http://hl7.org/fhir/v2/0276"
# each twin's own service code (its schedules offer it in its own system, and it finds slots by that
# coding only), and the Salesforce code the test maps give it: not the same code, as in a real org
OWN = {"cerner": "2572307911", "epic": "40111223", "fhir": "124"}
SYSTEM = {"cerner": CERNER_SET, "epic": EPIC_VISITS, "fhir": HL7_SERVICES}
SALESFORCE = {"cerner": "VIDEO", "epic": "OFFICE", "fhir": "GP"}
# a service the FHIR twin also offers, in a local system no map knows
LOCAL_SYSTEM, LOCAL = "http://example.org/fhir/CodeSystem/local-services", "LOCAL-7"


def create(system: str, dialect: str, slot: str, salesforce_id: str, **changes: Any) -> dict[str, Any]:
    """Health Cloud's create for one of the twin's own patients, with its first practitioner."""
    patient, doctor = default_patients(dialect)[0].id, default_schedules(dialect)[0].practitioner  # type: ignore[arg-type]
    return {"resourceType": "Appointment", "status": "proposed",
            "identifier": [{"system": "urn:salesforce:ServiceAppointment", "value": salesforce_id},
                           {"system": "urn:salesforce:sourceSystem", "value": system}],
            "slot": [{"reference": f"Slot/{slot}"}],
            "participant": [{"actor": {"reference": f"Patient/{patient}"}, "status": "accepted"},
                            {"actor": {"reference": f"Practitioner/{doctor}"}, "status": "accepted"}], **changes}


def related(code: str) -> list[dict[str, str]]:
    """A target that maps in but not back (only equivalent and equal reverse)."""
    return [{"code": code, "equivalence": "relatedto"}]


def write_config(root: Path) -> Path:
    """The shipped gateway.toml with maps where each twin's code maps to another Salesforce code. Epic's
    and Cerner's code is also listed by a standard terminology's group, in a file that loads first:
    the EHR's own system must still win. FHIR's appointment types: the shipped table 0276 maps (two
    groups list each code; the reverse group sends them under R4's URI)."""
    config = root / "config"
    config.mkdir()
    shutil.copy(CONFIG / "gateway.toml", config / "gateway.toml")
    maps = config / "codemaps"
    write_map(maps / "cerner", "a-snomed.json", [group("serviceTypes", {OWN["cerner"]: related("VIDEO")}, source=SNOMED)])
    write_map(maps / "cerner", "services.json", [group("serviceTypes", {OWN["cerner"]: "VIDEO"}, source=CERNER_SET)])
    write_map(maps / "epic", "a-argonaut.json", [group("serviceTypes", {OWN["epic"]: related("OFFICE"),
                                                                         "consult": "CONSULT"}, source=ARGONAUT)])
    write_map(maps / "epic", "visit-types.json", [group("serviceTypes", {OWN["epic"]: "OFFICE"}, source=EPIC_VISITS)])
    write_map(maps / "fhir", "services.json", [group("serviceTypes", {OWN["fhir"]: "GP"}, source=HL7_SERVICES)])
    shutil.copy(CONFIG / "codemaps" / "fhir" / "v2-0276.json", maps / "fhir" / "v2-0276.json")
    return config


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path)


# -- the rule ------------------------------------------------------------------------------------------

def test_a_code_a_group_lists_is_the_ehrs_own_in_that_groups_system(config: Path):
    maps = load_source_maps(config / "codemaps" / "cerner", config)
    found = ehr_coding(maps, "serviceTypes", OWN["cerner"], dialect="cerner")
    assert (found.coding.system, found.coding.code, found.via) == (CERNER_SET, OWN["cerner"], "map")
    assert (found.file, found.where) == ("codemaps/cerner/services.json", "$.group[0]")
    # a code an element lists is the EHR's, whatever its target (here one that does not map back)
    only_snomed = load_source_maps(write_map(config / "x", "m.json", [
        group("serviceTypes", {"999": [{"equivalence": "unmatched"}]}, source=SNOMED)]).parent)
    assert ehr_coding(only_snomed, "serviceTypes", "999").coding.system == SNOMED


def test_of_several_groups_listing_the_code_the_choice_is_always_the_same(config: Path):
    epic = load_source_maps(config / "codemaps" / "epic")
    # 1. the EHR's own system (Epic's OID), though the Argonaut group loads first
    assert ehr_coding(epic, "serviceTypes", OWN["epic"], dialect="epic").coding.system == EPIC_VISITS
    assert ehr_coding(epic, "serviceTypes", OWN["epic"]).coding.system == EPIC_VISITS  # no dialect named: any EHR's own
    # 2. else the system the maps read in reverse give the code under: 0276's reverse group names R4's
    fhir = load_source_maps(config / "codemaps" / "fhir")
    assert [s for s, _ in fhir.holding("appointmentTypes", "ROUTINE")] == [R4_0276, OLD_0276]
    folder = write_map(config / "y", "m.json", [group("appointmentTypes", {"ROUTINE": "ROUTINE"}, source=OLD_0276),
                                                group("appointmentTypes", {"ROUTINE": "ROUTINE"}, source=R4_0276),
                                                {"source": "urn:ehr-gateway:salesforce:appointmentTypes",
                                                 "target": R4_0276, "element": [{"code": "ROUTINE", "target": [
                                                     {"code": "ROUTINE", "equivalence": "equivalent"}]}]}]).parent
    assert ehr_coding(load_source_maps(folder), "appointmentTypes", "ROUTINE", dialect="fhir").coding.system == R4_0276
    # 3. else the first as loaded (files by name, groups as written)
    folder = write_map(config / "z", "m.json", [group("serviceTypes", {"7": related("A")}, source="urn:b"),
                                                group("serviceTypes", {"7": related("B")}, source="urn:a")]).parent
    assert ehr_coding(load_source_maps(folder), "serviceTypes", "7", dialect="fhir").coding.system == "urn:b"


def test_a_code_no_group_lists_is_read_in_reverse_and_one_no_map_knows_goes_bare(config: Path):
    epic = load_source_maps(config / "codemaps" / "epic", config)
    back = ehr_coding(epic, "serviceTypes", "OFFICE", dialect="epic")  # a Salesforce-side code
    assert (back.coding.system, back.coding.code, back.via) == (EPIC_VISITS, OWN["epic"], "reverse")
    assert (back.file, back.where) == ("codemaps/epic/visit-types.json", "$.group[0].element[0]")
    bare = ehr_coding(epic, "serviceTypes", LOCAL, dialect="epic")
    assert (bare.coding.system, bare.coding.code, bare.via) == (None, LOCAL, "none")
    assert ehr_coding(None, "serviceTypes", "124").coding.system is None  # a source with no maps at all


def test_a_bare_code_is_refused_only_where_the_ehrs_api_cannot_take_it(config: Path):
    maps = {s: load_source_maps(config / "codemaps" / s) for s in DIALECTS}
    search = read_search(f"service-type={LOCAL}&appointment-type=NOPE&{WINDOW}".encode(), ["x"],
                         max_days=62, max_values=50)
    for dialect in ("epic", "fhir"):
        query = slot_query(maps[dialect], search, search.criteria["x"], system="x", dialect=dialect)
        assert [msgspec.to_builtins(c) for c in query.service_types] == [{"code": LOCAL}]
    with pytest.raises(InvalidRequest) as refused:
        slot_query(maps["cerner"], search, search.criteria["x"], system="cerner", dialect="cerner")
    [issue] = refused.value.issues
    assert (refused.value.status, issue.code, issue.location) == (400, "code-invalid", ("http.service-type",))
    assert LOCAL in issue.diagnostics and "system|code" in issue.diagnostics
    # a create sends Cerner no code at all: nothing to refuse there
    callout = read_callout(msgspec.json.encode(create("cerner", "cerner", "4817572-1", "08pxx00000000Z1AAA",
                                                      serviceType=[{"coding": [{"code": LOCAL}]}])))
    assert book_request(maps["cerner"], callout, dialect="cerner").service_types[0].system is None


# -- over HTTP, against the twins ----------------------------------------------------------------------

def _schedules(dialect: str) -> tuple[TwinSchedule, ...]:
    schedules = default_schedules(dialect)  # type: ignore[arg-type]
    if dialect != "fhir":
        return schedules
    return tuple(msgspec.structs.replace(s, service_types=(*s.service_types, (LOCAL_SYSTEM, LOCAL))) for s in schedules)


@pytest.fixture
def twins() -> Iterator[dict[str, Twin]]:
    """The three twins (as tests/test_healthcloud_ehrs.py has them), the FHIR one also offering LOCAL."""
    with ExitStack() as stack:
        found = {}
        for dialect in DIALECTS:
            config = TwinConfig(dialect=dialect, control_key=CONTROL, client_id=CLIENT,  # type: ignore[arg-type]
                                client_secret=None if dialect == "epic" else SECRET,
                                public_key_pem=PUBLIC if dialect == "epic" else None, schedules=_schedules(dialect))
            found[dialect] = Twin(dialect, stack.enter_context(ThreadedServer(create_ehr_twin(config))))
        yield found


@asynccontextmanager
async def gateway(redis_url: str, prefix: str, sandbox: Any, twins: dict[str, Twin], tmp_path: Path, config: Path,
                  dialects: tuple[str, ...] = DIALECTS) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway with the test maps, an EHR for each of `dialects`."""
    settings = fleet_settings(redis_url, prefix, sandbox.url, {d: twins[d] for d in dialects}, tmp_path)
    settings = msgspec.structs.replace(settings, config_dir=config)
    async with serve_gateway(settings) as client:
        client.systems = {s.adapter: s.source_system for s in settings.sources.values() if s.ehr}  # type: ignore[attr-defined]
        yield client


def _search(systems: dict[str, str], codes: dict[str, str], *, bare: bool = False) -> str:
    """Find's line: each dialect's first practitioner, and its code (`<sourceSystem>|<code>`, or bare)."""
    def named(d: str, value: str) -> str:
        return value if bare else f"{systems[d]}|{value}"
    doctors = ",".join(named(d, default_schedules(d)[0].practitioner) for d in codes)  # type: ignore[arg-type]
    services = ",".join(named(d, code) for d, code in codes.items())
    return (f"schedule:Schedule.actor:Practitioner._id={doctors}&{WINDOW}&service-type={services}"
            "&status=free&_include=Slot:schedule&_sort=start")


def _outcomes(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["resource"]["extension"][0]["valueString"]: e["resource"]["issue"][0] for e in bundle["entry"]
            if e["search"]["mode"] == "outcome"}


@pytest.mark.parametrize("named", ["bare", "qualified"])
@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_find_by_the_ehrs_own_code_finds_its_slots(redis_url, prefix, sandbox, twins, tmp_path, config,
                                                           dialect, named):
    """Bare with one source system (one EHR configured), `<sourceSystem>|<code>` with all three: the EHR
    is asked with its code in its own system (Cerner's code set, Epic's OID, the FHIR server's), the
    only coding each twin finds its slots by."""
    dialects = (dialect,) if named == "bare" else DIALECTS
    async with gateway(redis_url, prefix, sandbox, twins, tmp_path, config, dialects) as hc:
        system = hc.systems[dialect]
        bundle = await _found(hc, _search(hc.systems, {dialect: OWN[dialect]}, bare=named == "bare"))
    slots = _slots(bundle, system if named == "qualified" else None)  # one source system: slots are not tagged
    assert _outcomes(bundle) == {} and len(slots) == 4 == len(_slots(bundle))  # four free half hours, 09:00-11:00
    assert all({"system": SYSTEM[dialect], "code": OWN[dialect]} in s["serviceType"][0]["coding"] for s in slots)


async def test_a_salesforce_side_code_is_mapped_back(redis_url, prefix, sandbox, twins, tmp_path, config):
    """A code no group lists among its source codes, but an equivalent element maps back to the EHR's."""
    async with gateway(redis_url, prefix, sandbox, twins, tmp_path, config) as hc:
        bundle = await _found(hc, _search(hc.systems, SALESFORCE))
        assert _outcomes(bundle) == {}
        assert {system: len(_slots(bundle, system)) for system in hc.systems.values()} == {
            system: 4 for system in hc.systems.values()}


async def test_a_code_no_map_knows_goes_bare_and_cerner_is_not_asked(redis_url, prefix, sandbox, twins, tmp_path,
                                                                      config):
    """The FHIR server finds its slots by the bare code (any system, as FHIR's token search reads it);
    Epic is asked and has none; Cerner, whose Slot search takes no code without its code set, is not
    asked: its share is a 400-coded OperationOutcome entry, and the others still answer."""
    async with gateway(redis_url, prefix, sandbox, twins, tmp_path, config) as hc:
        before = {d: t.counters()["searches"] for d, t in twins.items()}
        bundle = await _found(hc, _search(hc.systems, {d: LOCAL for d in DIALECTS}))
        assert len(_slots(bundle, hc.systems["fhir"])) == 4
        assert all({"system": LOCAL_SYSTEM, "code": LOCAL} in s["serviceType"][0]["coding"] for s in _slots(bundle))
        assert not _slots(bundle, hc.systems["epic"])
        outcomes = _outcomes(bundle)
        assert list(outcomes) == [hc.systems["cerner"]]
        assert outcomes[hc.systems["cerner"]]["code"] == "code-invalid"
        assert "system|code" in outcomes[hc.systems["cerner"]]["details"]["text"]
        after = {d: t.counters()["searches"] for d, t in twins.items()}
        assert after["epic"] > before["epic"] and after["fhir"] > before["fhir"] and after["cerner"] == before["cerner"]
    # Cerner alone: its share is that refusal all the same, an entry of the searchset
    async with gateway(redis_url, prefix, sandbox, twins, tmp_path, config, ("cerner",)) as hc:
        bundle = await _found(hc, _search(hc.systems, {"cerner": LOCAL}, bare=True))
        assert [o["code"] for o in _outcomes(bundle).values()] == ["code-invalid"] and _slots(bundle) == []
    assert twins["cerner"].counters()["searches"] == before["cerner"]


async def test_a_creates_codes_are_the_ehrs_and_an_unknown_one_is_kept_bare(redis_url, prefix, sandbox, twins,
                                                                             tmp_path, config):
    async with gateway(redis_url, prefix, sandbox, twins, tmp_path, config) as hc:
        system = hc.systems["fhir"]
        slot = _slots(await _found(hc, _search(hc.systems, {"fhir": OWN["fhir"]})))[0]
        body = create(system, "fhir", slot["id"], "08pxx00000000Q1AAA",
                      serviceType=[{"coding": [{"code": OWN["fhir"]}, {"code": LOCAL}]}],
                      appointmentType={"coding": [{"code": "ROUTINE"}]})
        created = await hc.post(f"/iam/Appointment/{system}", json=body, headers=JSON)
        assert created.status_code == 200 and created.json()["status"] == "booked", created.text
        # a create is not refused for a code without a system, even for Cerner (its create takes none)
        cerner = hc.systems["cerner"]
        cerner_slot = _slots(await _found(hc, _search(hc.systems, {"cerner": OWN["cerner"]})))[0]
        other = create(cerner, "cerner", cerner_slot["id"], "08pxx00000000Q2AAA",
                       serviceType=[{"coding": [{"code": LOCAL}]}])
        booked = await hc.post(f"/iam/Appointment/{cerner}", json=other, headers=JSON)
        assert booked.status_code == 200 and booked.json()["status"] == "booked", booked.text
    # what the FHIR server was sent and stored: its own codings
    fhir = twins["fhir"]
    token = httpx.post(fhir.server.url + "/oauth2/token", data={"grant_type": "client_credentials"},
                       auth=(CLIENT, SECRET)).json()["access_token"]
    stored = httpx.get(f"{fhir.ehr().base_url}/Appointment/{created.json()['id']}",
                       headers={"Authorization": f"Bearer {token}"}).json()
    assert [c for k in stored["serviceType"] for c in k["coding"]] == [
        {"system": HL7_SERVICES, "code": OWN["fhir"]}, {"code": LOCAL}]
    assert stored["appointmentType"]["coding"] == [{"system": R4_0276, "code": "ROUTINE"}]


# -- the CLI -------------------------------------------------------------------------------------------

def test_translate_to_ehr_takes_the_code_as_the_ehrs(config: Path, tmp_path: Path, capsys):
    find = tmp_path / "find.txt"

    def asked(source: str, line: str, *, config_dir: Path | None = config) -> tuple[int, Any, str]:
        find.write_text(f"{line}&{WINDOW}")
        code = main(["translate", "--to-ehr", source, str(find), *(["--config", str(config_dir)] if config_dir else [])])
        out = capsys.readouterr()
        return code, json.loads(out.out), out.err

    code, query, err = asked("fhir", f"service-type={OWN['fhir']}&appointment-type=ROUTINE")
    assert code == 0 and query["service_types"] == [{"system": HL7_SERVICES, "code": OWN["fhir"]}]
    assert query["appointment_types"] == [{"system": R4_0276, "code": "ROUTINE"}]
    assert f"serviceTypes {OWN['fhir']} -> {HL7_SERVICES}|{OWN['fhir']}: the EHR's code" in err
    assert "codemaps/fhir/services.json $.group[0]" in err
    code, query, err = asked("epic", "service-type=OFFICE")  # the reverse fallback
    assert code == 0 and query["service_types"] == [{"system": EPIC_VISITS, "code": OWN["epic"]}]
    assert "a Salesforce code, mapped back" in err
    code, query, err = asked("cerner", f"service-type={OWN['cerner']}")
    assert code == 0 and query["service_types"] == [{"system": CERNER_SET, "code": OWN["cerner"]}]
    code, query, err = asked("fhir", f"service-type={LOCAL}")  # no map knows it: bare
    assert code == 0 and query["service_types"] == [{"code": LOCAL}] and "sent without a system" in err
    code, refused, _ = asked("cerner", f"service-type={LOCAL}")
    assert code == 1 and refused["resourceType"] == "OperationOutcome"
    assert refused["issue"][0]["code"] == "code-invalid" and refused["issue"][0]["location"] == ["http.service-type"]
    # the shipped config: the issue's own example, athena's 124, was "no map to the athena EHR's codes"
    code, query, _ = asked("athena", "service-type=124", config_dir=None)
    assert code == 0 and query["service_types"] == [{"code": "124"}]
    code, query, _ = asked("epic", "service-type=consult", config_dir=None)  # listed by the Argonaut group
    assert code == 0 and query["service_types"] == [{"system": ARGONAUT, "code": "consult"}]
