"""Salesforce's booking rules, checked before any call so that a refusal costs no API allowance and
names the FHIR element to fix. The sandbox enforces the same rules on its side."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.canonical import CanonicalBooking, Instant
from gateway.errors import Issue, cut
from gateway.salesforce.wire import BookingRequest

COMMENT_LIMIT = 256
# Statuses that say the appointment is not (or no longer) to happen: not a booking.
NOT_BOOKABLE = frozenset({"cancelled", "entered-in-error"})
# unresolved participants a message names; the rest are counted (a body may carry a hundred)
_NAMED = 5


def _instant(value: Instant | None, name: str, base: str, issues: list[Issue]) -> datetime | None:
    if value is None:
        issues.append(Issue(code="required", diagnostics=f"{name} is required", expression=(f"{base}.{name}",)))
        return None
    try:
        parsed = datetime.fromisoformat(value.text)
    except ValueError:
        issues.append(Issue(code="value", diagnostics=f"{name} is not an ISO-8601 instant", expression=(value.path,)))
        return None
    if parsed.tzinfo is None:
        issues.append(
            Issue(code="value", diagnostics=f"{name} has no time zone offset; its instant is unknown",
                  expression=(value.path,))
        )
        return None
    return parsed


def check(booking: CanonicalBooking, request: BookingRequest) -> list[Issue]:
    """Every broken rule, as issues (empty when the request may be sent)."""
    issues: list[Issue] = []
    base = booking.resource_path
    if booking.status in NOT_BOOKABLE:
        issues.append(Issue(code="business-rule", diagnostics=f"an appointment with status {cut(booking.status)!r} "
                            "cannot be booked", expression=(f"{base}.status",)))

    kinds: dict[str, int] = {}
    for p in booking.participants:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    unresolved = ""
    if booking.unresolved_participants:
        paths = booking.unresolved_participants
        named = ", ".join(paths[:_NAMED]) + (f" and {len(paths) - _NAMED} more" if len(paths) > _NAMED else "")
        unresolved = (f"; {named} could not be used (no reference to a "
                      "Patient, Location, Practitioner, PractitionerRole or Device)")
    if not kinds.get("Patient"):
        issues.append(Issue(code="required", diagnostics="a Patient participant is required" + unresolved,
                            expression=(f"{base}.participant",)))
    elif kinds["Patient"] > 1:
        issues.append(Issue(code="business-rule", diagnostics="a booking is for one Patient; "
                            f"{kinds['Patient']} are given", expression=(f"{base}.participant",)))
    if not kinds.get("Facility"):
        issues.append(Issue(code="required", diagnostics="a Location participant (Salesforce Facility) is required"
                            + unresolved, expression=(f"{base}.participant",)))
    if not kinds.get("Practitioner") and not kinds.get("Device"):
        issues.append(Issue(code="required", diagnostics="a Practitioner, PractitionerRole or Device participant "
                            "is required" + unresolved, expression=(f"{base}.participant",)))

    if not (request.workTypeId or request.appointmentTypes or request.serviceTypes or request.serviceCategories):
        issues.append(Issue(code="required", diagnostics="one of a work type, an appointment type, a service type "
                            "or a service category is required (after code mapping)",
                            expression=(f"{base}.appointmentType", f"{base}.serviceType", f"{base}.serviceCategory")))
    codes_sent = request.appointmentTypes or request.serviceTypes or request.serviceCategories or request.specialties
    if codes_sent and not request.workTypeId and not request.sourceSystem:
        issues.append(Issue(code="required", diagnostics="sourceSystem is required when codes are sent without a "
                            "work type"))

    start = _instant(booking.start, "start", base, issues)
    end = _instant(booking.end, "end", base, issues)
    if start and end and not start < end:
        issues.append(Issue(code="invariant", diagnostics="start must be before end",
                            expression=(booking.start.path, booking.end.path)))  # type: ignore[union-attr]

    if request.timeZone:
        try:
            ZoneInfo(request.timeZone)
        except (ZoneInfoNotFoundError, ValueError):
            issues.append(Issue(code="value", diagnostics="timeZone is not an IANA time zone name"))
    if request.comment is not None and len(request.comment) > COMMENT_LIMIT:
        issues.append(Issue(code="too-long", diagnostics=f"comment has {len(request.comment)} characters; Salesforce "
                            f"accepts at most {COMMENT_LIMIT}. Shorten it in the EHR: the gateway does not cut "
                            "clinical text", expression=(booking.comment_path or f"{base}.comment",)))
    return issues
