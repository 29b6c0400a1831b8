"""Adapters: every booking-shaped file of the shared corpus through the fitting dialect, then the
malformed bodies, $book forms, dialect hooks and reference rules."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters import ADAPTERS, get_adapter
from gateway.canonical import CanonicalBooking, Identifier, Instant, Participant, Slot
from gateway.errors import GatewayError, InvalidRequest, Unprocessable

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"

V2_0276_R4 = "http://terminology.hl7.org/CodeSystem/v2-0276"
V2_0276_OLD = "http://hl7.org/fhir/v2/0276"
SNOMED = "http://snomed.info/sct"
CERNER_TENANT = "https://fhir.cerner.com/ec2458f2-1e24-41c8-b71b-0e701af7583d/codeSet/"
ARGO_VISIT = "http://fhir.org/guides/argonaut-scheduling/CodeSystem/visit-type"


def load(rel: str) -> object:
    return json.loads((CORPUS / rel).read_bytes())


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def parse(adapter: str, raw: bytes) -> CanonicalBooking:
    return get_adapter(adapter).parse(raw)


def parse_file(adapter: str, rel: str) -> CanonicalBooking:
    return parse(adapter, (CORPUS / rel).read_bytes())


def refused(adapter: str, raw: bytes, kind: type[GatewayError] = InvalidRequest) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        parse(adapter, raw)
    err = info.value
    assert type(err) is kind, (type(err), err.issues)
    return err


def people(b: CanonicalBooking) -> list[tuple[str, str, str]]:
    return [(p.kind, p.reference, p.path) for p in b.participants]


def concepts(cs) -> list[tuple[str, list[tuple[str | None, str | None]], str | None]]:
    return [(c.path, [(x.system, x.code) for x in c.codings], c.text) for c in cs]


def times(b: CanonicalBooking) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    return (
        (b.start.text, b.start.path) if b.start else None,
        (b.end.text, b.end.path) if b.end else None,
    )


# ---------------------------------------------------------------------------------------------
# The corpus: each file whose resourceType is Appointment or Parameters, and Cerner's Bundle entries
# ---------------------------------------------------------------------------------------------


def check_r4_example(b: CanonicalBooking) -> None:
    assert b.resource_path == "Appointment" and b.status == "booked"
    assert people(b) == [
        ("Patient", "Patient/example", "Appointment.participant[0].actor"),
        ("Practitioner", "Practitioner/example", "Appointment.participant[1].actor"),
        ("Facility", "Facility/1", "Appointment.participant[2].actor"),
    ]
    assert b.unresolved_participants == () and b.slots == () and b.identifiers == ()
    assert times(b) == (
        ("2013-12-10T09:00:00Z", "Appointment.start"),
        ("2013-12-10T11:00:00Z", "Appointment.end"),
    )
    assert concepts(b.appointment_types) == [("Appointment.appointmentType", [(V2_0276_R4, "FOLLOWUP")], None)]
    # the official example's trap: serviceType code 52 with no system, kept without a system
    assert concepts(b.service_types) == [("Appointment.serviceType[0]", [(None, "52")], None)]
    assert concepts(b.service_categories) == [
        ("Appointment.serviceCategory[0]", [("http://example.org/service-category", "gp")], None)
    ]
    assert concepts(b.specialties) == [("Appointment.specialty[0]", [(SNOMED, "394814009")], None)]
    assert b.comment is not None and b.comment.startswith("Further expand on the results of the MRI")
    assert b.comment_path == "Appointment.comment"


def check_r4_2docs(b: CanonicalBooking) -> None:
    assert b.status == "booked"
    assert people(b) == [
        ("Patient", "Patient/example", "Appointment.participant[0].actor"),
        ("Practitioner", "Practitioner/example", "Appointment.participant[1].actor"),
        ("Practitioner", "Practitioner/f202", "Appointment.participant[2].actor"),
    ]
    # {"display": "Phone Call"}: an actor with no reference is not guessed
    assert b.unresolved_participants == ("Appointment.participant[3].actor",)
    assert times(b) == (
        ("2013-12-09T09:00:00Z", "Appointment.start"),
        ("2013-12-09T11:00:00Z", "Appointment.end"),
    )
    assert concepts(b.appointment_types) == [("Appointment.appointmentType", [(V2_0276_R4, "WALKIN")], None)]
    assert b.comment == "Clarify the results of the MRI to ensure context of test was correct"


def check_r4_examplereq(b: CanonicalBooking) -> None:
    assert b.status == "proposed"
    assert b.identifiers == (Identifier(value="123", system="http://example.org/sampleappointment-identifier"),)
    assert b.slots == (Slot(id="example", path="Appointment.slot[0]"),)
    assert people(b) == [
        ("Patient", "Patient/example", "Appointment.participant[0].actor"),
        ("Facility", "Facility/1", "Appointment.participant[2].actor"),
    ]
    # participant[1] has only a type (ATND), no actor
    assert b.unresolved_participants == ("Appointment.participant[1]",)
    assert times(b) == (None, None)  # requestedPeriod is not start/end
    assert b.service_types == ()
    assert concepts(b.appointment_types) == [("Appointment.appointmentType", [(V2_0276_R4, "WALKIN")], None)]


def check_pre_r4_example(b: CanonicalBooking) -> None:
    assert b.status == "booked"
    # STU3: a single serviceCategory object, so the path has no index
    assert concepts(b.service_categories) == [
        ("Appointment.serviceCategory", [("http://example.org/service-category", "gp")], None)
    ]
    assert concepts(b.appointment_types) == [
        ("Appointment.appointmentType", [("http://example.org/appointment-type", "follow")], None)
    ]
    assert concepts(b.specialties) == [("Appointment.specialty[0]", [("http://example.org/specialty", "gp")], None)]
    assert [p.reference for p in b.participants] == ["Patient/example", "Practitioner/example", "Facility/1"]
    assert times(b)[0] == ("2013-12-10T09:00:00Z", "Appointment.start")


def check_pre_r4_request(b: CanonicalBooking) -> None:
    assert b.status == "proposed"
    assert b.service_categories[0].path == "Appointment.serviceCategory"
    assert concepts(b.appointment_types) == [
        ("Appointment.appointmentType", [("http://example.org/appointment-type", "wi")], None)
    ]
    assert b.slots == (Slot(id="example", path="Appointment.slot[0]"),)
    assert b.unresolved_participants == ("Appointment.participant[1]",)
    assert b.identifiers == (Identifier(value="123", system="http://example.org/sampleappointment-identifier"),)
    assert times(b) == (None, None)


def check_pre_r4_2docs(b: CanonicalBooking) -> None:
    assert b.service_categories[0].path == "Appointment.serviceCategory"
    assert [p.reference for p in b.participants] == ["Patient/example", "Practitioner/example", "Practitioner/f202"]
    assert b.unresolved_participants == ("Appointment.participant[3].actor",)
    assert times(b)[1] == ("2013-12-09T11:00:00Z", "Appointment.end")


def argonaut_check(start: str, end: str, specialty: bool) -> Callable[[CanonicalBooking], None]:
    def check(b: CanonicalBooking) -> None:
        assert b.status == "proposed"
        assert people(b) == [("Practitioner", "Practitioner/dr-y", "Appointment.participant[0].actor")]
        assert b.unresolved_participants == ("Appointment.participant[1].actor",)  # "Napa Office"
        # the STU3 system is kept as sent; the code maps cover both URIs
        assert concepts(b.appointment_types) == [("Appointment.appointmentType", [(V2_0276_OLD, "ROUTINE")], "Routine")]
        assert concepts(b.service_types) == [("Appointment.serviceType[0]", [(ARGO_VISIT, "consult")], "Office Call")]
        expected_specialty = [("Appointment.specialty[0]", [(SNOMED, "394582007")], "Dermatology")]
        assert concepts(b.specialties) == (expected_specialty if specialty else [])
        assert times(b) == ((start, "Appointment.start"), (end, "Appointment.end"))
        assert b.comment is None

    return check


def check_ihe(b: CanonicalBooking) -> None:
    assert b.status == "booked"
    assert people(b) == [
        ("Practitioner", "Practitioner/dr-y", "Appointment.participant[0].actor"),
        ("Patient", "Patient/pat1", "Appointment.participant[2].actor"),
    ]
    assert b.unresolved_participants == ("Appointment.participant[1].actor",)
    assert concepts(b.service_types) == [("Appointment.serviceType[0]", [(SNOMED, "185389009")], "Office Call")]
    assert concepts(b.appointment_types) == [("Appointment.appointmentType", [(V2_0276_R4, "ROUTINE")], "Routine")]
    assert times(b) == (
        ("2025-03-17T00:45:00Z", "Appointment.start"),
        ("2025-03-17T01:00:00Z", "Appointment.end"),
    )


def check_cerner_create(b: CanonicalBooking) -> None:
    assert b.status == "booked"
    assert b.slots == (Slot(id="24477854-21304876-62852027-0", path="Appointment.slot[0]"),)
    assert people(b) == [("Patient", "Patient/12724066", "Appointment.participant[0].actor")]
    assert b.unresolved_participants == ()
    assert times(b) == (None, None)  # the slot implies the time
    assert b.service_types == b.appointment_types == b.service_categories == ()
    assert b.comment is None  # reasonCode text is not the comment


def check_cerner_proposed(b: CanonicalBooking) -> None:
    assert b.status == "proposed"
    assert people(b) == [
        ("Patient", "Patient/12724066", "Appointment.participant[0].actor"),
        ("Facility", "Facility/21304876", "Appointment.participant[1].actor"),
    ]
    assert concepts(b.service_types) == [("Appointment.serviceType[0]", [(SNOMED, "408443003")], None)]
    assert (b.comment, b.comment_path) == ("Appointment request comment", "Appointment.comment")
    assert times(b) == (None, None) and b.slots == ()


def check_cerner_video(b: CanonicalBooking) -> None:
    assert b.status == "noshow"
    assert people(b) == [
        ("Patient", "Patient/12724066", "Appointment.participant[0].actor"),
        ("Practitioner", "Practitioner/593923", "Appointment.participant[1].actor"),
        ("Facility", "Facility/21304876", "Appointment.participant[2].actor"),
    ]
    # "#28" and "#31": contained HealthcareService virtual rooms are not Salesforce participants
    assert b.unresolved_participants == ("Appointment.participant[3].actor", "Appointment.participant[4].actor")
    assert b.slots == (Slot(id="21265426-633867-6828001-60", path="Appointment.slot[0]"),)
    assert concepts(b.service_types) == [
        ("Appointment.serviceType[0]", [(CERNER_TENANT + "14249", "2572307911")], "Video Visit")
    ]
    assert concepts(b.service_categories) == [
        (
            "Appointment.serviceCategory[0]",
            [(CERNER_TENANT + "16127", "22721463"), (SNOMED, "261004008")],
            "DIAGNOSTIC",
        )
    ]
    assert times(b) == (
        ("2020-07-10T13:00:00.000Z", "Appointment.start"),
        ("2020-07-10T13:15:00.000Z", "Appointment.end"),
    )


def check_cerner_entry_refused(err: GatewayError) -> None:
    assert err.status == 400 and err.issues[0].code == "structure"
    assert err.issues[0].expression == ("resourceType",)
    assert "Bundle entry" in err.issues[0].diagnostics


def check_cerner_entry_resource(b: CanonicalBooking) -> None:
    assert b.status == "cancelled"
    assert people(b) == [
        ("Facility", "Facility/32216049", "Appointment.participant[0].actor"),
        ("Patient", "Patient/12724066", "Appointment.participant[2].actor"),
    ]
    # "Endoscopy Rooms": a resource with a type (codeSet/14250) and a display-only actor
    assert b.unresolved_participants == ("Appointment.participant[1].actor",)
    # Cerner's tenant code set and SNOMED side by side, systems exactly as sent
    assert concepts(b.service_types) == [
        (
            "Appointment.serviceType[0]",
            [(CERNER_TENANT + "14249", "4047611"), (SNOMED, "394576009")],
            "Surgery Rapid",
        )
    ]
    assert times(b) == (("2020-01-23T22:10:00Z", "Appointment.start"), ("2020-01-23T23:10:00Z", "Appointment.end"))
    assert b.comment is None  # the action-comment extension is present but empty


def check_epic_book(b: CanonicalBooking) -> None:
    # Epic's own $book: identifiers only; the rules step refuses what is missing
    assert b.resource_path == "Parameters.parameter.where(name='appt-resource').resource"
    assert people(b) == [
        ("Patient", "Patient/efvHwbc1k1CQ9XjM1zvvefQ3", "Parameters.parameter[0].valueIdentifier")
    ]
    assert b.identifiers == (
        Identifier(value="ezu6MfS.FpOXrHAn1eJHczv4LlH.fMIwtdkA8rsm-Yfu96eUh91EBd0UN9BZx7kbB3"),
    )
    assert b.comment == "Note text containing info related to the appointment."
    assert b.comment_path == "Parameters.parameter[2].valueString"
    assert b.status is None and b.start is None and b.end is None
    assert b.slots == () and b.service_types == () and b.appointment_types == ()


# file -> (adapter, check). A check of an error takes the error; `entry_resource` parses the
# Bundle entry's resource too.
EXPECTED: dict[str, tuple[str, Callable]] = {
    "fhir-r4-official/Appointment-example.json": ("fhir", check_r4_example),
    "fhir-r4-official/Appointment-2docs.json": ("fhir", check_r4_2docs),
    "fhir-r4-official/Appointment-examplereq.json": ("fhir", check_r4_examplereq),
    "fhir-pre-r4-variants/appointment-example.json": ("epic", check_pre_r4_example),
    "fhir-pre-r4-variants/appointment-example-request.json": ("epic", check_pre_r4_request),
    "fhir-pre-r4-variants/appointment-example2doctors.json": ("epic", check_pre_r4_2docs),
    "argonaut-scheduling/Appointment-proposed-appt1.json": (
        "fhir",
        argonaut_check("2017-07-17T00:45:00Z", "2017-07-17T01:00:00Z", True),
    ),
    "argonaut-scheduling/Appointment-proposed-appt1a-1.json": (
        "fhir",
        argonaut_check("2017-07-17T00:45:00Z", "2017-07-17T01:00:00Z", False),
    ),
    "argonaut-scheduling/Appointment-proposed-appt2.json": (
        "fhir",
        argonaut_check("2017-07-17T01:00:00Z", "2017-07-17T01:15:00Z", True),
    ),
    "argonaut-scheduling/Appointment-proposed-appt3.json": (
        "fhir",
        argonaut_check("2017-07-17T02:00:00Z", "2017-07-17T02:15:00Z", True),
    ),
    "ihe-iti-scheduling/example-appointment.json": ("fhir", check_ihe),
    "cerner-millennium-r4/r4_appointment_create.json": ("cerner", check_cerner_create),
    "cerner-millennium-r4/r4_proposed_appointment_create.json": ("cerner", check_cerner_proposed),
    "cerner-millennium-r4/r4_appointment_video_visit_entry.json": ("cerner", check_cerner_video),
    "cerner-millennium-r4/r4_appointment_entry.json": ("cerner", check_cerner_entry_refused),
    "epic/epic-stu3-appointment-book-request.json": ("epic", check_epic_book),
}

# booking-shaped files that are not bookings; test_find_requests_are_not_bookings covers them
SKIPPED: dict[str, str] = {
    "epic/epic-stu3-appointment-find-request.assembled.json": "an Epic $find request (search, not a booking)",
    "epic/epic-stu3-appointment-find-request.stackoverflow.json": "an Epic $find request (search, not a booking)",
}

ENTRY_RESOURCE_CHECKS = {"cerner-millennium-r4/r4_appointment_entry.json": check_cerner_entry_resource}


def corpus_booking_files() -> set[str]:
    found = set()
    for path in sorted(CORPUS.rglob("*.json")):
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict):
            continue
        rel = path.relative_to(CORPUS).as_posix()
        is_entry = "resourceType" not in data and "fullUrl" in data and "resource" in data
        if data.get("resourceType") in ("Appointment", "Parameters") or (is_entry and rel.startswith("cerner")):
            found.add(rel)
    return found


def test_every_booking_file_of_the_corpus_is_covered() -> None:
    found = corpus_booking_files()
    assert len(found) >= 18, "corpus not found or emptied"
    assert not set(EXPECTED) & set(SKIPPED)
    assert found == set(EXPECTED) | set(SKIPPED)


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_corpus_file(rel: str) -> None:
    adapter, check = EXPECTED[rel]
    raw = (CORPUS / rel).read_bytes()
    if check is check_cerner_entry_refused:
        check(refused(adapter, raw))
        entry = json.loads(raw)
        ENTRY_RESOURCE_CHECKS[rel](parse(adapter, body(entry["resource"])))
    else:
        check(parse(adapter, raw))


@pytest.mark.parametrize("rel", sorted(SKIPPED))
def test_find_requests_are_not_bookings(rel: str) -> None:
    raw = (CORPUS / rel).read_bytes()
    err = refused("epic", raw, Unprocessable)
    assert err.status == 422
    assert err.issues[0].expression == (
        "Parameters.parameter.where(name='appt-resource')",
        "Parameters.parameter.where(name='appointment')",
    )
    err = refused("fhir", raw, Unprocessable)
    assert err.issues[0].expression == ("Parameters.parameter.where(name='appt-resource')",)


@pytest.mark.parametrize("adapter", ["fhir", "cerner"])
def test_epic_own_book_is_not_a_booking_in_other_dialects(adapter: str) -> None:
    err = refused(adapter, (CORPUS / "epic/epic-stu3-appointment-book-request.json").read_bytes(), Unprocessable)
    assert err.issues[0].expression == ("Parameters.parameter.where(name='appt-resource')",)
    assert "appt-resource" in err.issues[0].diagnostics


def test_adapters_agree_on_plain_r4() -> None:
    """The dialects share one parser: a plain R4 Appointment yields the same booking in each."""
    for rel in ("fhir-r4-official/Appointment-example.json", "ihe-iti-scheduling/example-appointment.json"):
        results = {parse_file(name, rel) for name in ADAPTERS}
        assert len(results) == 1, rel


def other_resources() -> list[str]:
    out = []
    for path in sorted(CORPUS.rglob("*.json")):
        data = json.loads(path.read_bytes())
        if isinstance(data, dict) and data.get("resourceType") not in (None, "Appointment", "Parameters"):
            out.append(path.relative_to(CORPUS).as_posix())
    return out


@pytest.mark.parametrize("rel", other_resources())
def test_other_corpus_resources_are_refused_naming_their_type(rel: str) -> None:
    rt = load(rel)["resourceType"]  # type: ignore[index]
    err = refused("fhir", (CORPUS / rel).read_bytes())
    assert err.status == 400 and err.issues[0].expression == ("resourceType",)
    assert err.issues[0].diagnostics.startswith(f"resourceType is {rt};")


@pytest.mark.parametrize("path", sorted(p.name for p in (CORPUS / "cerner-millennium-r4").glob("*_patch.json")))
def test_cerner_json_patch_bodies_are_not_resources(path: str) -> None:
    err = refused("cerner", (CORPUS / "cerner-millennium-r4" / path).read_bytes())
    assert err.status == 400 and err.issues[0].expression == ()
    assert err.issues[0].diagnostics == "The body must be a FHIR resource (a JSON object), not an array"


# ---------------------------------------------------------------------------------------------
# Malformed bodies, and that no message carries patient data
# ---------------------------------------------------------------------------------------------

PHI = ("Peter James Chalmers", "12724066", "Further expand on the results", "Smart II, Nancy", "1960-02-29")


def assert_no_phi(err: GatewayError) -> None:
    for issue in err.issues:
        text = issue.diagnostics + " ".join(issue.expression)
        for value in PHI:
            assert value not in text, (value, text)
    assert not any(value in str(err) for value in PHI)


def r4_example() -> dict:
    return copy.deepcopy(load("fhir-r4-official/Appointment-example.json"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "raw, expression, diagnostics",
    [
        (b"", (), "The body is not valid JSON (it is empty or truncated)"),
        (b'{"resourceType": "Appointment", "comment": "Peter James Chalmers', (), "The body is not valid JSON (it is empty or truncated)"),
        (b"{resourceType: Appointment}", (), "The body is not valid JSON (malformed at byte 1)"),
        (b'{"resourceType": "Appointment"} Peter James Chalmers', (), "The body is not valid JSON (malformed at byte 33)"),
        (b'["Peter James Chalmers"]', (), "The body must be a FHIR resource (a JSON object), not an array"),
        (b'"Peter James Chalmers"', (), "The body must be a FHIR resource (a JSON object), not a string"),
        (b"12724066", (), "The body must be a FHIR resource (a JSON object), not an integer"),
        (b'{"status": "booked"}', ("resourceType",), "resourceType is missing; expected Appointment, or Parameters for $book"),
        (b'{"resourceType": "Peter James Chalmers"}', ("resourceType",), "resourceType is not a FHIR resource type; expected Appointment, or Parameters for $book"),
        (b'{"resourceType": 12724066}', ("resourceType",), "resourceType must be a string"),
        (
            b'{"resourceType": "Patient", "id": "12724066", "name": [{"text": "Smart II, Nancy"}], "birthDate": "1960-02-29"}',
            ("resourceType",),
            "resourceType is Patient; expected Appointment, or Parameters for $book",
        ),
        (
            b'{"fullUrl": "https://x/Patient/12724066", "resource": {"resourceType": "Appointment"}}',
            ("resourceType",),
            "The body is a Bundle entry (fullUrl and resource), not a resource: send the entry's "
            "resource, the Appointment, or Parameters for $book, itself",
        ),
    ],
)
def test_malformed_bodies(raw: bytes, expression: tuple[str, ...], diagnostics: str) -> None:
    for name in ADAPTERS:
        err = refused(name, raw)
        assert err.status == 400 and err.issues[0].code == "structure"
        assert err.issues[0].expression == expression
        assert err.issues[0].diagnostics == diagnostics
        assert_no_phi(err)


def set_in(doc: dict, path: tuple, value: object) -> dict:
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    "path, value, expression, diagnostics",
    [
        (("participant", 0, "actor"), "Peter James Chalmers", "Appointment.participant[0].actor", "must be an object, not a string"),
        (("participant", 0, "actor", "reference"), 12724066, "Appointment.participant[0].actor.reference", "must be a string, not an integer"),
        (("participant",), {"actor": "Peter James Chalmers"}, "Appointment.participant", "must be an array, not an object"),
        (("start",), 20131210, "Appointment.start", "must be a string, not an integer"),
        (("end",), ["2013-12-10T11:00:00Z"], "Appointment.end", "must be a string, not an array"),
        (("status",), True, "Appointment.status", "must be a string, not a boolean"),
        (("comment",), {"text": "Further expand on the results"}, "Appointment.comment", "must be a string, not an object"),
        (("identifier",), [{"system": "urn:x", "value": 12724066}], "Appointment.identifier[0].value", "must be a string, not an integer"),
        (("serviceCategory",), 1.5, "Appointment.serviceCategory", "must be an object or an array, not a number"),
        (("serviceType", 0, "coding", 0, "system"), 52, "Appointment.serviceType[0].coding[0].system", "must be a string, not an integer"),
        (("specialty", 0), "394814009", "Appointment.specialty[0]", "must be an object, not a string"),
        (("appointmentType",), [{"text": "x"}], "Appointment.appointmentType", "must be an object, not an array"),
        (("slot",), [{"reference": ["Slot/1"]}], "Appointment.slot[0].reference", "must be a string, not an array"),
    ],
)
def test_wrong_json_types_name_the_fhir_path(path: tuple, value: object, expression: str, diagnostics: str) -> None:
    doc = set_in(r4_example(), path, value)
    for name in ADAPTERS:
        err = refused(name, body(doc))
        assert err.status == 400
        assert err.issues[0].expression == (expression,)
        assert err.issues[0].diagnostics == f"{expression} {diagnostics}"
        assert_no_phi(err)


def test_cerner_extension_of_the_wrong_type_is_refused_by_cerner_only() -> None:
    doc = r4_example()
    doc["extension"] = [{"url": "https://fhir-ehr.cerner.com/r4/StructureDefinition/action-comment", "valueString": 7}]
    err = refused("cerner", body(doc))
    assert err.issues[0].expression == ("Appointment.extension[0].valueString",)
    # the other dialects do not read extensions at all
    assert parse("fhir", body(doc)).comment_path == "Appointment.comment"


def test_json_null_counts_as_absent() -> None:
    doc = r4_example()
    doc.update(slot=None, serviceType=None, comment=None, identifier=None)
    b = parse("fhir", body(doc))
    assert b.slots == () and b.service_types == () and b.comment is None and b.identifiers == ()


def test_start_and_end_are_kept_as_sent_without_validation() -> None:
    doc = r4_example()
    doc.update(start="2013-12-10T09:00:00", end="not a time")
    b = parse("fhir", body(doc))
    assert b.start == Instant(text="2013-12-10T09:00:00", path="Appointment.start")
    assert b.end == Instant(text="not a time", path="Appointment.end")


def test_identifier_without_value_is_skipped() -> None:
    doc = r4_example()
    doc["identifier"] = [{"system": "urn:a"}, {"system": "urn:b", "value": "B1"}, {"value": "C1"}]
    assert parse("fhir", body(doc)).identifiers == (Identifier(value="B1", system="urn:b"), Identifier(value="C1"))


# ---------------------------------------------------------------------------------------------
# Participants and slots
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reference, expected",
    [
        ("Patient/pat1", ("Patient", "Patient/pat1")),
        ("Location/32216049", ("Facility", "Facility/32216049")),
        ("Practitioner/593923", ("Practitioner", "Practitioner/593923")),
        ("PractitionerRole/pr-7", ("Practitioner", "Practitioner/pr-7")),
        ("Device/infusion-1", ("Device", "Device/infusion-1")),
        # Epic's absolute reference, from its $find location-reference
        ("https://hostname/instance/api/FHIR/STU3/Location/eULujY-VWnFz-tbLqZ39RjA3", ("Facility", "Facility/eULujY-VWnFz-tbLqZ39RjA3")),
        ("https://fhir-ehr.cerner.com/r4/tenant/Patient/12724066/", ("Patient", "Patient/12724066")),
        ("Practitioner/593923/_history/2", ("Practitioner", "Practitioner/593923")),
        ("RelatedPerson/rp1", None),
        ("HealthcareService/28", None),
        ("#28", None),
        ("urn:uuid:9f0a1d3c-6a5b-4b1e-8a33-1f1f7f9e3b77", None),
        ("Patient?identifier=urn:mrn|12724066", None),
        ("Patient/", None),
        ("Group/g1", None),
    ],
)
def test_participant_references(reference: str, expected: tuple[str, str] | None) -> None:
    doc = {"resourceType": "Appointment", "status": "booked", "participant": [{"actor": {"reference": reference}, "status": "accepted"}]}
    b = parse("fhir", body(doc))
    if expected is None:
        assert b.participants == ()
        assert b.unresolved_participants == ("Appointment.participant[0].actor",)
    else:
        assert b.participants == (Participant(kind=expected[0], reference=expected[1], path="Appointment.participant[0].actor",
                                              role=reference.startswith("PractitionerRole/")),)
        assert b.unresolved_participants == ()


@pytest.mark.parametrize(
    "actor, expected",
    [
        # a logical reference: the kind from `type`, the EHR's id under the identifier's system
        ({"type": "Patient", "identifier": {"system": "urn:oid:2.16.840.1.113883.3.13.6", "value": "MRN-1"}},
         Participant(kind="Patient", reference="Patient/MRN-1", path="Appointment.participant[0].actor.identifier",
                     system="urn:oid:2.16.840.1.113883.3.13.6")),
        ({"type": "Location", "identifier": {"value": "32216049"}},  # no system: the kind's own ids, as a literal
         Participant(kind="Facility", reference="Facility/32216049", path="Appointment.participant[0].actor.identifier")),
        ({"type": "PractitionerRole", "identifier": {"system": "urn:npi", "value": "1234"}},
         Participant(kind="Practitioner", reference="Practitioner/1234", path="Appointment.participant[0].actor.identifier",
                     system="urn:npi", role=True)),
        # the literal reference wins over an identifier beside it
        ({"reference": "Patient/12724066", "type": "Patient", "identifier": {"system": "urn:mrn", "value": "9"}},
         Participant(kind="Patient", reference="Patient/12724066", path="Appointment.participant[0].actor")),
        ({"identifier": {"system": "urn:mrn", "value": "9"}}, None),  # no type: its kind is not known
        ({"type": "RelatedPerson", "identifier": {"system": "urn:mrn", "value": "9"}}, None),
        ({"type": "Patient", "identifier": {"system": "urn:mrn"}}, None),  # no value
    ],
)
def test_participants_named_by_identifier(actor: dict[str, object], expected: Participant | None) -> None:
    doc = {"resourceType": "Appointment", "status": "booked", "participant": [{"actor": actor, "status": "accepted"}]}
    b = parse("fhir", body(doc))
    assert b.participants == ((expected,) if expected else ())
    assert b.unresolved_participants == (() if expected else ("Appointment.participant[0].actor",))


def test_participant_without_actor_is_kept_by_path() -> None:
    doc = {"resourceType": "Appointment", "participant": [{"type": [{"text": "Resource"}]}, {"status": "accepted"}]}
    b = parse("cerner", body(doc))
    assert b.participants == ()
    assert b.unresolved_participants == ("Appointment.participant[0]", "Appointment.participant[1]")


@pytest.mark.parametrize(
    "reference, slot_id",
    [
        ("Slot/24477854-21304876-62852027-0", "24477854-21304876-62852027-0"),
        ("https://fhir-ehr.cerner.com/r4/ec2458f2/Slot/24477854-21304876-62852027-0", "24477854-21304876-62852027-0"),
    ],
)
def test_slot_ids(reference: str, slot_id: str) -> None:
    doc = {"resourceType": "Appointment", "slot": [{"reference": "Slot/a"}, {"reference": reference}]}
    assert parse("cerner", body(doc)).slots == (Slot(id="a", path="Appointment.slot[0]"), Slot(id=slot_id, path="Appointment.slot[1]"))


@pytest.mark.parametrize("slot", [{"reference": "Schedule/1"}, {"reference": "#slot1"}, {"display": "9:00"}])
def test_a_slot_that_is_not_a_slot_reference_is_422(slot: dict) -> None:
    doc = {"resourceType": "Appointment", "slot": [{"reference": "Slot/a"}, slot]}
    err = refused("cerner", body(doc), Unprocessable)
    assert err.status == 422
    assert err.issues[0].expression == ("Appointment.slot[1].reference",)
    assert err.issues[0].code == "value"


# ---------------------------------------------------------------------------------------------
# $book Parameters
# ---------------------------------------------------------------------------------------------

P0 = "Parameters.parameter[0].resource"


def book(resource: object, *extra: dict, name: str = "appt-resource") -> bytes:
    return body({"resourceType": "Parameters", "parameter": [{"name": name, "resource": resource}, *extra]})


def test_argonaut_book_prefixes_every_path() -> None:
    appt = load("argonaut-scheduling/Appointment-proposed-appt1.json")
    raw = book(
        appt,
        {"name": "comment", "valueString": "Bring the referral letter"},
        {"name": "patient-id", "valueUri": "Patient/pat1"},
    )
    b = parse("fhir", raw)
    assert b.resource_path == P0
    assert people(b) == [
        ("Practitioner", "Practitioner/dr-y", f"{P0}.participant[0].actor"),
        ("Patient", "Patient/pat1", "Parameters.parameter[2].valueUri"),
    ]
    assert b.unresolved_participants == (f"{P0}.participant[1].actor",)
    assert concepts(b.appointment_types) == [(f"{P0}.appointmentType", [(V2_0276_OLD, "ROUTINE")], "Routine")]
    assert b.service_types[0].path == f"{P0}.serviceType[0]"
    assert b.specialties[0].path == f"{P0}.specialty[0]"
    assert times(b) == (("2017-07-17T00:45:00Z", f"{P0}.start"), ("2017-07-17T01:00:00Z", f"{P0}.end"))
    assert (b.comment, b.comment_path) == ("Bring the referral letter", "Parameters.parameter[1].valueString")


def test_book_comment_replaces_the_appointment_comment() -> None:
    appt = r4_example()
    b = parse("fhir", book(appt, {"name": "comment", "valueString": "Booked by phone"}))
    assert (b.comment, b.comment_path) == ("Booked by phone", "Parameters.parameter[1].valueString")
    # without a comment parameter (or an empty one) the Appointment's own comment stays
    b = parse("fhir", book(appt, {"name": "comment", "valueString": ""}))
    assert b.comment_path == f"{P0}.comment" and b.comment == appt["comment"]


def test_ihe_book_and_patient_id_not_duplicated() -> None:
    appt = load("ihe-iti-scheduling/example-appointment.json")
    raw = body(
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "patient-id", "valueUri": "https://ehr.example.org/fhir/Patient/pat1"},
                {"name": "appointment-resource", "resource": appt},
            ],
        }
    )
    b = parse("fhir", raw)
    p1 = "Parameters.parameter[1].resource"
    assert b.resource_path == p1
    assert people(b) == [
        ("Practitioner", "Practitioner/dr-y", f"{p1}.participant[0].actor"),
        ("Patient", "Patient/pat1", f"{p1}.participant[2].actor"),
    ]


def test_cerner_takes_the_book_form_too() -> None:
    b = parse("cerner", book(load("cerner-millennium-r4/r4_appointment_create.json")))
    assert b.slots == (Slot(id="24477854-21304876-62852027-0", path=f"{P0}.slot[0]"),)
    assert people(b) == [("Patient", "Patient/12724066", f"{P0}.participant[0].actor")]


def test_book_without_appointment_is_422() -> None:
    raw = body({"resourceType": "Parameters", "parameter": [{"name": "appt-id", "valueUri": "Appointment/1"}, {"name": "comment", "valueString": "x"}]})
    err = refused("fhir", raw, Unprocessable)
    assert err.status == 422
    assert err.issues[0].expression == ("Parameters.parameter.where(name='appt-resource')",)
    err = refused("fhir", body({"resourceType": "Parameters"}), Unprocessable)
    assert err.issues[0].expression == ("Parameters.parameter.where(name='appt-resource')",)


def test_book_parameter_without_resource_is_422() -> None:
    raw = body({"resourceType": "Parameters", "parameter": [{"name": "appt-resource", "valueString": "Peter James Chalmers"}]})
    err = refused("epic", raw, Unprocessable)
    assert err.issues[0].expression == ("Parameters.parameter[0].resource",)
    assert_no_phi(err)


@pytest.mark.parametrize(
    "raw, expression, diagnostics",
    [
        (
            book({"resourceType": "Patient", "name": [{"text": "Peter James Chalmers"}]}),
            f"{P0}.resourceType",
            f"{P0}.resourceType is Patient; expected Appointment",
        ),
        (book({"status": "booked"}), f"{P0}.resourceType", f"{P0}.resourceType is missing; expected Appointment"),
        (book("Peter James Chalmers"), P0, f"{P0} must be a FHIR resource (a JSON object), not a string"),
        (
            book({"resourceType": "Appointment", "participant": [{"actor": {"reference": 12724066}}]}),
            f"{P0}.participant[0].actor.reference",
            f"{P0}.participant[0].actor.reference must be a string, not an integer",
        ),
        (
            book({"resourceType": "Appointment"}, {"name": "appt-resource", "resource": {"resourceType": "Appointment"}}),
            "Parameters.parameter[1]",
            "Parameters.parameter[1]: $book takes one Appointment resource, this is a second one",
        ),
        (
            body({"resourceType": "Parameters", "parameter": {"name": "appt-resource"}}),
            "Parameters.parameter",
            "Parameters.parameter must be an array, not an object",
        ),
        (
            book({"resourceType": "Appointment"}, {"name": "comment", "valueString": ["Peter James Chalmers"]}),
            "Parameters.parameter[1].valueString",
            "Parameters.parameter[1].valueString must be a string, not an array",
        ),
    ],
)
def test_malformed_book(raw: bytes, expression: str, diagnostics: str) -> None:
    for name in ADAPTERS:
        err = refused(name, raw)
        assert err.status == 400
        assert err.issues[0].expression == (expression,)
        assert err.issues[0].diagnostics == diagnostics
        assert_no_phi(err)


def test_another_resource_in_parameters_is_not_read() -> None:
    """IHE's patient-resource travels beside the Appointment; its content is never decoded."""
    patient = {"resourceType": "Patient", "identifier": {"value": 1}, "start": 5}
    b = parse("fhir", book(load("ihe-iti-scheduling/example-appointment.json"), {"name": "patient-resource", "resource": patient}, name="appointment-resource"))
    assert [p.reference for p in b.participants] == ["Practitioner/dr-y", "Patient/pat1"]


# ---------------------------------------------------------------------------------------------
# Dialect hooks: Cerner action-comment, Epic $book and STU3
# ---------------------------------------------------------------------------------------------


def cerner_entry_resource() -> dict:
    return copy.deepcopy(load("cerner-millennium-r4/r4_appointment_entry.json")["resource"])  # type: ignore[index]


def action_comment_from_patch() -> str:
    patch = load("cerner-millennium-r4/r4_appointment_extension_action_comment_patch.json")
    return patch[0]["value"][0]["valueString"]  # type: ignore[index]


def test_cerner_action_comment_feeds_the_comment_when_there_is_none() -> None:
    resource = cerner_entry_resource()
    note = action_comment_from_patch()
    assert note == "not required cancelled"
    resource["extension"][0]["valueString"] = note
    b = parse("cerner", body(resource))
    assert (b.comment, b.comment_path) == (note, "Appointment.extension[0].valueString")
    # plain R4 does not know Cerner's extension
    assert parse("fhir", body(resource)).comment is None
    # Appointment.comment wins over the action-comment
    resource["comment"] = "Patient asked to cancel"
    b = parse("cerner", body(resource))
    assert (b.comment, b.comment_path) == ("Patient asked to cancel", "Appointment.comment")


def test_epic_own_book_with_only_a_patient_and_a_bad_patient() -> None:
    raw = body({"resourceType": "Parameters", "parameter": [{"name": "patient", "valueIdentifier": {"value": "eX1"}}]})
    b = parse("epic", raw)
    assert people(b) == [("Patient", "Patient/eX1", "Parameters.parameter[0].valueIdentifier")]
    assert b.identifiers == () and b.comment is None
    raw = body(
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "patient", "valueString": "eX1"},
                {"name": "appointment", "valueIdentifier": {"system": "urn:oid:1.2.840.114350.1.13.861.1.7.3.698084.8", "value": "A1"}},
            ],
        }
    )
    b = parse("epic", raw)
    assert b.participants == () and b.unresolved_participants == ("Parameters.parameter[0]",)
    assert b.identifiers == (Identifier(value="A1", system="urn:oid:1.2.840.114350.1.13.861.1.7.3.698084.8"),)


def test_epic_argonaut_book_with_appointment_note() -> None:
    raw = book(load("fhir-pre-r4-variants/appointment-example.json"), {"name": "appointmentNote", "valueString": "Arrive early"})
    b = parse("epic", raw)
    assert (b.comment, b.comment_path) == ("Arrive early", "Parameters.parameter[1].valueString")
    assert b.service_categories[0].path == f"{P0}.serviceCategory"
    # appointmentNote is Epic's: plain R4 keeps the Appointment's comment
    assert parse("fhir", raw).comment_path == f"{P0}.comment"


def test_epic_oid_systems_pass_through() -> None:
    """An Epic R4 read built from the codings and location of the corpus $find request."""
    find = {p["name"]: p for p in load("epic/epic-stu3-appointment-find-request.assembled.json")["parameter"]}  # type: ignore[index]
    appt = {
        "resourceType": "Appointment",
        "status": "booked",
        "serviceType": [find["serviceType"]["valueCodeableConcept"]],
        "specialty": [find["specialties"]["valueCodeableConcept"]],
        "appointmentType": {"coding": [{"system": V2_0276_OLD, "code": "ROUTINE"}]},
        "start": "2018-07-30T18:15:50Z",
        "end": "2018-07-30T18:25:50Z",
        "participant": [
            {"actor": {"reference": "Patient/efvHwbc1k1CQ9XjM1zvvefQ3"}},
            {"actor": find["location-reference"]["valueReference"]},
        ],
    }
    b = parse("epic", body(appt))
    assert concepts(b.service_types) == [
        (
            "Appointment.serviceType[0]",
            [("urn:oid:1.2.840.114350.1.13.861.1.7.3.808267.11", "40111223"), ("DNPRC6", "159")],
            "CDS Office Visit",
        )
    ]
    assert [c.system for c in b.specialties[0].codings] == [
        "urn:oid:1.2.840.114350.1.72.1.7.7.10.688867.4150",
        "urn:oid:1.2.840.114350.1.13.861.1.7.10.686980.110",
    ]
    assert b.appointment_types[0].codings[0].system == V2_0276_OLD
    assert people(b) == [
        ("Patient", "Patient/efvHwbc1k1CQ9XjM1zvvefQ3", "Appointment.participant[0].actor"),
        ("Facility", "Facility/eULujY-VWnFz-tbLqZ39RjA3", "Appointment.participant[1].actor"),
    ]


def test_epic_stu3_reason_is_not_read() -> None:
    """STU3's singular `reason` (pre-r4 request) is tolerated, whatever its shape."""
    doc = load("fhir-pre-r4-variants/appointment-example-request.json")
    doc["reason"] = "not a CodeableConcept"  # type: ignore[index]
    assert parse("epic", body(doc)).status == "proposed"


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_registry() -> None:
    assert ADAPTERS == ("fhir", "cerner", "epic")
    assert [get_adapter(name).name for name in ADAPTERS] == list(ADAPTERS)
    with pytest.raises(ValueError, match="unknown adapter 'hl7v2'"):
        get_adapter("hl7v2")


@pytest.mark.parametrize("adapter", ["fhir", "cerner", "epic"])
def test_arrays_over_the_cap_are_refused_by_name(adapter: str) -> None:
    from adapters._shapes import MAX_ITEMS

    appointment = r4_example()
    actor = appointment["participant"][0]
    appointment["participant"] = [actor] * (MAX_ITEMS + 1)
    err = refused(adapter, json.dumps(appointment).encode())
    assert err.issues[0].diagnostics == f"Appointment.participant has more than {MAX_ITEMS} items"
    assert err.issues[0].expression == ("Appointment.participant",)

    appointment = r4_example()
    appointment["serviceType"] = [{"coding": [{"system": "http://x", "code": "c"}] * (MAX_ITEMS + 1)}]
    err = refused(adapter, json.dumps(appointment).encode())
    assert err.issues[0].expression == ("Appointment.serviceType[0].coding",)

    appointment = r4_example()
    appointment["participant"] = appointment["participant"][:1] * MAX_ITEMS  # at the cap: not this refusal
    try:
        parse(adapter, json.dumps(appointment).encode())
    except GatewayError as exc:
        assert "items" not in exc.issues[0].diagnostics


@pytest.mark.parametrize("adapter", ["fhir", "cerner", "epic"])
def test_codes_outside_their_required_bindings_are_400(adapter: str) -> None:
    """Appointment.status (appointmentstatus) and participant.status (participationstatus) are bound
    `required` in FHIR: a code outside the value set is a 400 naming each element, in every dialect
    and inside $book's Parameters too; the value is not repeated."""
    doc = r4_example()
    doc["status"] = "not-a-status"
    doc["participant"][1]["status"] = "maybe"
    err = refused(adapter, body(doc))
    assert err.status == 400
    assert [(i.code, i.expression) for i in err.issues] == [
        ("code-invalid", ("Appointment.status",)), ("code-invalid", ("Appointment.participant[1].status",))]
    assert not any("not-a-status" in i.diagnostics or "maybe" in i.diagnostics for i in err.issues)
    prefix = "Parameters.parameter[0].resource"
    err = refused(adapter, body({"resourceType": "Parameters", "parameter": [{"name": "appt-resource", "resource": doc}]}))
    assert [i.expression for i in err.issues] == [(f"{prefix}.status",), (f"{prefix}.participant[1].status",)]
    # codes are case-sensitive; an empty string is no code either
    for status in ("Booked", ""):
        assert refused(adapter, body({**r4_example(), "status": status})).issues[0].expression == ("Appointment.status",)


@pytest.mark.parametrize("status", ["proposed", "pending", "booked", "arrived", "fulfilled", "cancelled", "noshow",
                                    "entered-in-error", "checked-in", "waitlist"])
def test_every_r4_appointment_status_is_read(status: str) -> None:
    """R4's whole value set passes (STU3's is the same less checked-in and waitlist), with every
    participant status, and an absent status is no code to check."""
    doc = r4_example()
    doc["status"] = status
    for participant, code in zip(doc["participant"], ["accepted", "declined", "tentative", "needs-action"]):
        participant["status"] = code
    assert parse("epic", body(doc)).status == status
    doc.pop("status")
    assert parse("fhir", body(doc)).status is None
