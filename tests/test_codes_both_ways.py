"""Codes both ways (issue 15, item 3): the engineers' same ConceptMaps, read in reverse where an element
is equivalent or equal, give a Salesforce code's EHR coding back, and a reverse group decides where two
elements would give two. An ambiguous reverse is refused at load, naming the file and the elements.
Health Cloud's callouts carry the EHR's own codes (item 5, tests/test_healthcloud_codes.py): the
reverse is the fallback for a code that no group lists among its source codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.booking.codemaps import CodeMapError, load_all, load_source_maps
from tests.conftest import CONFIG
from tests.test_codemaps import T, group, write_map

NEW, OLD = "http://terminology.hl7.org/CodeSystem/v2-0276", "http://hl7.org/fhir/v2/0276"
VISITS = "urn:oid:1.2.840.114350.1.13.861.1.7.3.808267.11"


def reverse_group(category: str, system: str, codes: dict[str, str]) -> dict:
    return {"source": T + category, "target": system,
            "element": [{"code": sf, "target": [{"code": ehr, "equivalence": "equivalent"}]} for sf, ehr in codes.items()]}


def test_an_equivalent_element_maps_its_salesforce_code_back(tmp_path: Path):
    maps = load_source_maps(write_map(tmp_path / "m", "m.json", [
        group("serviceTypes", {"40111223": "OFFICE", "99": [{"code": "WIDE", "equivalence": "wider"}]}, source=VISITS),
        group("appointmentTypes", {"ROUTINE": "ROUTINE"}, source=NEW),
        group("specialties", {"394802001": "GENERAL"}, source="http://snomed.info/sct"),
    ]).parent)
    back = maps.to_ehr("serviceTypes", "OFFICE")
    assert (back.system, back.code, back.where) == (VISITS, "40111223", "$.group[0].element[0]")
    assert maps.to_ehr("appointmentTypes", "ROUTINE").system == NEW
    # wider is no exact equivalent, and specialties are no callout's: neither maps back
    assert maps.to_ehr("serviceTypes", "WIDE") is None and maps.to_ehr("specialties", "GENERAL") is None
    assert maps.to_ehr("serviceTypes", "NOT-MAPPED") is None


def test_two_ehr_codes_for_one_salesforce_code_are_refused_at_load_naming_both(tmp_path: Path):
    folder = write_map(tmp_path / "m", "a.json", [group("appointmentTypes", {"ROUTINE": "ROUTINE"}, source=NEW)]).parent
    write_map(folder, "b.json", [group("appointmentTypes", {"R": "ROUTINE"}, source=OLD)])
    with pytest.raises(CodeMapError) as caught:
        load_source_maps(folder, tmp_path)
    [problem] = caught.value.problems
    assert problem.startswith("m/a.json: $.group[0].element[0]: appointmentTypes 'ROUTINE' maps back to 2 EHR codes")
    assert "m/b.json $.group[0].element[0]" in problem and "add a reverse group" in problem


def test_a_reverse_group_decides(tmp_path: Path):
    folder = write_map(tmp_path / "m", "a.json", [
        group("appointmentTypes", {"ROUTINE": "ROUTINE", "WALKIN": "WALKIN"}, source=NEW),
        group("appointmentTypes", {"ROUTINE": "ROUTINE", "WALKIN": "WALKIN"}, source=OLD),
        reverse_group("appointmentTypes", NEW, {"ROUTINE": "ROUTINE", "WALKIN": "WALKIN"}),
    ]).parent
    maps = load_source_maps(folder)
    assert {code: (b.system, b.code) for code, b in maps.reverse["appointmentTypes"].items()} == {
        "ROUTINE": (NEW, "ROUTINE"), "WALKIN": (NEW, "WALKIN")}
    # forward lookups are untouched: both systems still map in
    assert maps.group("appointmentTypes", OLD).lookup("ROUTINE") == ("ROUTINE",)
    assert maps.group("appointmentTypes", T + "appointmentTypes") is None


@pytest.mark.parametrize(("bad", "named"), [
    ({"source": T + "specialties", "target": NEW, "element": []}, "$.group[0].source: a reverse group maps from"),
    ({"source": T + "serviceTypes", "target": T + "serviceTypes", "element": []}, "$.group[0].target: the EHR code system"),
    ({"source": T + "serviceTypes", "target": NEW, "element": [{"code": "A", "target": []}]},
     "$.group[0].element[0].target: one target"),
    ({"source": T + "serviceTypes", "target": NEW, "element": [], "unmapped": {"mode": "provided"}},
     "$.group[0].unmapped: a reverse group names each code"),
])
def test_reverse_groups_are_checked_like_the_rest(tmp_path: Path, bad: dict, named: str):
    with pytest.raises(CodeMapError) as caught:
        load_source_maps(write_map(tmp_path / "m", "m.json", [bad]).parent)
    assert any(named in p for p in caught.value.problems), caught.value.problems


def test_a_salesforce_code_mapped_back_twice_by_reverse_groups_is_refused(tmp_path: Path):
    folder = write_map(tmp_path / "m", "a.json", [reverse_group("serviceTypes", NEW, {"X": "1"})]).parent
    write_map(folder, "b.json", [reverse_group("serviceTypes", OLD, {"X": "2"})])
    with pytest.raises(CodeMapError, match=r"b.json: \$.group\[0\].element\[0\]: serviceTypes 'X' is already mapped back"):
        load_source_maps(folder)


def test_the_shipped_maps_map_back_without_ambiguity():
    """Table 0276 is mapped in under both of its system URIs; Health Cloud's appointment types go back
    under R4's, as the shipped reverse groups say; each source's own visit codes go back to its system."""
    maps = load_all(CONFIG, ["cerner", "epic", "fhir", "athena"])
    for source in ("cerner", "epic", "fhir"):
        assert maps[source].to_ehr("appointmentTypes", "ROUTINE").system == NEW
    assert maps["epic"].to_ehr("serviceTypes", "40111223").system == VISITS
    assert maps["cerner"].to_ehr("serviceTypes", "2572307911").system.endswith("/codeSet/14249")
