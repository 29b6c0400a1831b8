"""Code maps: loading and checking ConceptMaps, the translation rules of the contract, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gateway.canonical import CanonicalBooking, Coding, Concept, Instant, Participant
from gateway.cli import main
from gateway.booking.codemaps import CodeMapError, load_all, load_source_maps
from gateway.booking.mapping import map_booking
from gateway.settings import SourceSettings
from tests.conftest import CONFIG, CORPUS

T = "urn:ehr-gateway:salesforce:"
SYS = "urn:oid:1.2.3"
SOURCE = SourceSettings(adapter="fhir", source_system="epic", channel_id="0eFdefault")


def write_map(folder: Path, name: str, groups: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"resourceType": "ConceptMap", "group": groups}))
    return path


def group(target: str, elements: dict[str, object], source: str = SYS, **extra) -> dict:
    out = []
    for code, t in elements.items():
        targets = t if isinstance(t, list) else [{"code": t, "equivalence": "equivalent"}]
        out.append({"code": code, "target": targets})
    return {"source": source, "target": T + target, "element": out, **extra}


def booking(*, types=(), services=(), specialties=()) -> CanonicalBooking:
    def concepts(name, codings):
        return tuple(Concept(path=f"Appointment.{name}[{i}]", codings=tuple(c)) for i, c in enumerate(codings))
    return CanonicalBooking(
        start=Instant("2026-01-01T10:00:00Z", "Appointment.start"),
        end=Instant("2026-01-01T10:30:00Z", "Appointment.end"),
        appointment_types=concepts("appointmentType", types),
        service_types=concepts("serviceType", services),
        specialties=concepts("specialty", specialties),
        participants=(Participant("Patient", "Patient/1", "p"), Participant("Practitioner", "Practitioner/2", "p"),
                      Participant("Facility", "Facility/3", "p")),
    )


def test_shipped_maps_load():
    maps = load_all(CONFIG, ["cerner", "epic", "fhir", "athena"])
    assert maps["athena"].group("workTypeId", "urn:ehr-gateway:hl7v2:SCH-8") is not None  # v2: the field's URN
    for name, source in maps.items():  # table 0276 under both system URIs, for every FHIR source
        if name == "athena":
            continue
        for system in ("http://terminology.hl7.org/CodeSystem/v2-0276", "http://hl7.org/fhir/v2/0276"):
            group_ = source.group("appointmentTypes", system)
            assert group_ is not None and {"CHECKUP", "EMERGENCY", "FOLLOWUP", "ROUTINE", "WALKIN"} <= set(group_.mapping)
    assert maps["epic"].group("specialties", "http://snomed.info/sct") is not None  # the YAML one


def test_bad_maps_are_named_by_file_and_element(tmp_path):
    folder = tmp_path / "codemaps" / "epic"
    write_map(folder, "a.json", [
        group("serviceTypes", {"x": [{"code": "X"}]}),  # no equivalence
        {"source": SYS, "target": T + "nonsense", "element": []},
        group("workTypeId", {"v": [{"code": "08q1", "equivalence": "equivalent"}, {"code": "08q2", "equivalence": "wider"}]}),
        group("specialties", {"y": "Y"}, unmapped={"mode": "fixed"}),
    ])
    (folder / "b.yaml").write_text("resourceType: ConceptMap\ngroup: [{source: 1, target: 2}]\n")
    with pytest.raises(CodeMapError) as caught:
        load_source_maps(folder, tmp_path)
    problems = "\n".join(caught.value.problems)
    assert "codemaps/epic/a.json: $.group[0].element[0].target[0].equivalence" in problems
    assert "codemaps/epic/a.json: $.group[1].target: unknown category 'nonsense'" in problems
    assert "$.group[2].element[0].target: workTypeId takes one value" in problems
    assert "$.group[3].unmapped.code: required with mode 'fixed'" in problems
    assert "codemaps/epic/b.yaml: $.group[0].source: Expected `str | null`, got `int`" in problems


def test_same_system_and_category_twice_is_refused(tmp_path):
    folder = tmp_path / "codemaps" / "fhir"
    write_map(folder, "a.json", [group("serviceTypes", {"a": "A"})])
    write_map(folder, "b.json", [group("serviceTypes", {"b": "B"})])
    with pytest.raises(CodeMapError, match=r"b.json: \$.group\[0\]: .* already mapped in .*a.json"):
        load_source_maps(folder, tmp_path)


def test_translation_rules(tmp_path):
    folder = tmp_path / "m"
    write_map(folder, "m.json", [
        group("serviceTypes", {"a": "SA", "gone": [{"equivalence": "unmatched"}]}),
        group("workTypeId", {"a": "08qA"}),
        group("appointmentTypes", {}, source="urn:pass", unmapped={"mode": "provided"}),
        group("appointmentTypes", {}, source="urn:fixed", unmapped={"mode": "fixed", "code": "OTHER"}),
    ])
    maps = load_source_maps(folder)
    ok = map_booking(booking(services=[[Coding(SYS, "a"), Coding("urn:ignored", "z")]],
                             types=[[Coding("urn:pass", "P1")], [Coding("urn:fixed", "whatever")]]), SOURCE, maps)
    assert [i for i in ok.issues if i.severity == "error"] == []
    r = ok.request
    assert (r.serviceTypes, r.workTypeId, r.appointmentTypes) == (("SA",), "08qA", ("P1", "OTHER"))
    assert r.sourceSystem == "epic" and r.channelId == "0eFdefault"

    unknown = map_booking(booking(services=[[Coding(SYS, "nope")]]), SOURCE, maps)
    assert any(i.code == "code-invalid" and i.expression == ("Appointment.serviceType[0].coding[0]",) for i in unknown.issues)
    unmatched = map_booking(booking(services=[[Coding(SYS, "gone")]]), SOURCE, maps)
    assert any(i.expression == ("Appointment.serviceType[0]",) and i.severity == "error" for i in unmatched.issues)
    no_system = map_booking(booking(services=[[Coding(None, "52")]]), SOURCE, maps)
    assert any("without a system" in i.diagnostics for i in no_system.issues)


def test_unmapped_specialty_is_dropped_with_a_warning(tmp_path):
    maps = load_source_maps(write_map(tmp_path / "m", "m.json", [group("serviceTypes", {"a": "SA"})]).parent)
    out = map_booking(booking(services=[[Coding(SYS, "a")]], specialties=[[Coding("urn:x", "derm")]]), SOURCE, maps)
    assert out.request.specialties is None
    assert [(i.severity, i.expression) for i in out.issues] == [("warning", ("Appointment.specialty[0]",))]


def test_two_work_types_are_ambiguous(tmp_path):
    maps = load_source_maps(write_map(tmp_path / "m", "m.json", [group("workTypeId", {"a": "08qA", "b": "08qB"})]).parent)
    out = map_booking(booking(types=[[Coding(SYS, "a")]], services=[[Coding(SYS, "b")]]), SOURCE, maps)
    assert out.request.workTypeId is None
    assert any(i.code == "business-rule" and "2 different workTypeId" in i.diagnostics for i in out.issues)


def test_cli_codemaps_check(tmp_path, capsys):
    assert main(["codemaps", "check", "--config", str(CONFIG)]) == 0
    assert "cerner:" in capsys.readouterr().out
    config = tmp_path / "config"
    shutil.copytree(CONFIG, config)
    bad = config / "codemaps" / "cerner" / "appointment-types.json"
    data = json.loads(bad.read_text())
    del data["group"][0]["element"][0]["code"]
    bad.write_text(json.dumps(data))
    assert main(["codemaps", "check", "--config", str(config)]) == 1
    assert "codemaps/cerner/appointment-types.json: $.group[0].element[0].code: required" in capsys.readouterr().err


def test_a_bad_map_stops_the_start(tmp_path, redis_url):
    from gateway.app import create_app
    from tests.conftest import make_settings

    config = tmp_path / "config"
    shutil.copytree(CONFIG, config)
    (config / "codemaps" / "epic" / "broken.json").write_text('{"resourceType": "ValueSet"}')
    with pytest.raises(CodeMapError, match=r"codemaps/epic/broken.json: \$.resourceType"):
        create_app(make_settings(redis_url, "unused", "http://127.0.0.1:9", config_dir=config))


def test_cli_translate(capsys):
    video = CORPUS / "cerner-millennium-r4" / "r4_appointment_video_visit_entry.json"
    assert main(["translate", "--source", "cerner", str(video), "--config", str(CONFIG)]) == 0
    assert json.loads(capsys.readouterr().out)["workTypeId"] == "08qxx0000000002AAA"
    create = CORPUS / "cerner-millennium-r4" / "r4_appointment_create.json"
    assert main(["translate", "--source", "cerner", str(create), "--config", str(CONFIG)]) == 1
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["resourceType"] == "OperationOutcome"
    assert main(["translate", "--source", "nowhere", str(create), "--config", str(CONFIG)]) == 1
    assert json.loads(capsys.readouterr().out)["issue"][0]["code"] == "not-found"
