"""Every Appointment and $book Parameters file in the shared corpus, through the shipped config:
it either translates, or is refused with an OperationOutcome naming what is missing.

The dry run (`Booker.prepare`) is the whole path up to the Salesforce call, so this is what the
gateway would do with each file."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from gateway.booking.booker import Booker
from gateway.booking.codemaps import load_all
from gateway.errors import GatewayError
from gateway.booking.fhir import error_body
from gateway.settings import load_file_settings
from tests.conftest import CONFIG, CORPUS

PARTICIPANT = "Appointment.participant"
APPT_RESOURCE = "Parameters.parameter.where(name='appt-resource').resource"
CODES = ("Appointment.appointmentType", "Appointment.serviceType", "Appointment.serviceCategory")

# file -> (source, expected): "translates" (or ("translates", the paths warned of as left out)), or
# (status, {issue code: paths that must be named})
EXPECTED: dict[str, tuple[str, object]] = {
    "cerner-millennium-r4/r4_appointment_video_visit_entry.json": ("cerner", "translates"),
    # Millennium's booked create: the slot implies practitioner, location and time in Cerner, but
    # Salesforce needs them in the request, and the gateway does not guess them
    "cerner-millennium-r4/r4_appointment_create.json": ("cerner", (422, {"required": {
        "Appointment.start", "Appointment.end", PARTICIPANT, "Appointment.slot[0]", *CODES}})),
    "cerner-millennium-r4/r4_proposed_appointment_create.json": ("cerner", (422, {"required": {
        "Appointment.start", "Appointment.end", PARTICIPANT}})),
    # a Bundle entry ({fullUrl, resource}) is not a resource
    "cerner-millennium-r4/r4_appointment_entry.json": ("cerner", (400, {"structure": set()})),
    # Argonaut's proposed appointments have no Patient and a display-only location
    "argonaut-scheduling/Appointment-proposed-appt1.json": ("epic", (422, {"required": {PARTICIPANT}})),
    "argonaut-scheduling/Appointment-proposed-appt1a-1.json": ("epic", (422, {"required": {PARTICIPANT}})),
    "argonaut-scheduling/Appointment-proposed-appt2.json": ("epic", (422, {"required": {PARTICIPANT}})),
    "argonaut-scheduling/Appointment-proposed-appt3.json": ("epic", (422, {"required": {PARTICIPANT}})),
    # Epic's own $book carries only ids from $find: no times, no participants but the patient, no codes
    "epic/epic-stu3-appointment-book-request.json": ("epic", (422, {"required": {
        f"{APPT_RESOURCE}.start", f"{APPT_RESOURCE}.end", f"{APPT_RESOURCE}.participant"}})),
    # the official R4 example's trap: serviceType 52 with no system cannot be mapped; its appointmentType
    # and serviceCategory map, so Salesforce has what it needs and the serviceType is left out (warned)
    "fhir-r4-official/Appointment-example.json": ("fhir", ("translates", {"Appointment.serviceType[0]"})),
    "fhir-r4-official/Appointment-2docs.json": ("fhir", (422, {"required": {PARTICIPANT}})),
    "fhir-r4-official/Appointment-examplereq.json": ("fhir", (422, {"required": {
        "Appointment.start", "Appointment.end", PARTICIPANT, "Appointment.slot[0]"}})),
    "ihe-iti-scheduling/example-appointment.json": ("fhir", (422, {"required": {PARTICIPANT}})),
    # pre-R4 renderings (STU3 shapes) through the Epic dialect: example.org systems have no map
    "fhir-pre-r4-variants/appointment-example.json": ("epic", (422, {"code-invalid": {
        "Appointment.appointmentType", "Appointment.serviceType[0]", "Appointment.serviceCategory"}})),
    "fhir-pre-r4-variants/appointment-example2doctors.json": ("epic", (422, {"code-invalid": {
        "Appointment.serviceType[0]"}, "required": {PARTICIPANT}})),
    "fhir-pre-r4-variants/appointment-example-request.json": ("epic", (422, {"required": {
        "Appointment.start", "Appointment.end", PARTICIPANT}})),
}
# Parameters that are not bookings: $find requests
NOT_BOOKINGS = {
    "epic/epic-stu3-appointment-find-request.assembled.json",
    "epic/epic-stu3-appointment-find-request.stackoverflow.json",
}


@pytest.fixture(scope="module")
def booker() -> Booker:
    settings = load_file_settings(CONFIG)
    return Booker(settings.sources, load_all(CONFIG, list(settings.sources)))


def _booking_files() -> list[str]:
    found = []
    for path in sorted(CORPUS.rglob("*.json")):
        data = msgspec.json.decode(path.read_bytes())
        if isinstance(data, dict) and (data.get("resourceType") in ("Appointment", "Parameters") or isinstance(data.get("resource"), dict)):
            found.append(str(path.relative_to(CORPUS)))
    return found


def test_the_table_covers_every_booking_file_in_the_corpus():
    assert set(_booking_files()) == set(EXPECTED) | NOT_BOOKINGS


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_file(booker: Booker, name: str):
    source, expected = EXPECTED[name]
    body = (CORPUS / name).read_bytes()
    if expected == "translates" or expected[0] == "translates":
        mapped = booker.prepare(source, body).mapped
        request = mapped.request
        assert request.startDate and request.participants and request.sourceSystem
        warned = {p for i in mapped.issues if i.severity == "warning" for p in i.expression}
        assert warned == (set() if expected == "translates" else expected[1])
        return
    status, named = expected
    with pytest.raises(GatewayError) as caught:
        booker.prepare(source, body)
    error = caught.value
    assert error.status == status
    outcome = msgspec.json.decode(error_body(error))
    assert outcome["resourceType"] == "OperationOutcome"
    for code, paths in named.items():
        issues = [i for i in outcome["issue"] if i["code"] == code]
        assert issues, f"no {code} issue in {outcome}"
        shown = {p for i in issues for p in i.get("expression", [])}
        assert paths <= shown, f"{name}: {paths - shown} not named"


@pytest.mark.parametrize("name", sorted(NOT_BOOKINGS))
def test_find_requests_are_not_bookings(booker: Booker, name: str):
    with pytest.raises(GatewayError) as caught:
        booker.prepare("epic", (CORPUS / name).read_bytes())
    assert caught.value.status == 422
    assert "appt-resource" in " ".join(caught.value.issues[0].expression)
