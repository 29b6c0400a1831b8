"""Canonical booking -> Salesforce booking request, translating codes through the source's maps.

Collects every problem instead of stopping at the first, so an integration engineer sees all that is
wrong with a payload in one answer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import msgspec

from gateway.canonical import CanonicalBooking, Concept
from gateway.booking.codemaps import SourceMaps
from gateway.errors import Issue, cut
from gateway.salesforce.wire import BookingRequest, SfParticipant, SfSlot
from gateway.settings import SourceSettings

# category -> the canonical field that feeds it (contract: "Which FHIR element feeds which category")
_ARRAY_CATEGORIES = (
    ("appointmentTypes", "appointment_types"),
    ("serviceTypes", "service_types"),
    ("serviceCategories", "service_categories"),
    ("specialties", "specialties"),
)
# Salesforce can book without a specialty; one with no map is left out with a warning.
_OPTIONAL = frozenset({"specialties"})
# workTypeId and channelId are looked up from these elements' codings
_SCALAR_FEEDS = ("appointment_types", "service_types")


class Mapped(msgspec.Struct, frozen=True):
    request: BookingRequest
    issues: tuple[Issue, ...]  # errors and warnings found while mapping
    used: tuple[str, ...]  # "<file> $.group[i] <code>" for each map entry used
    maps_version: str


def _codes(
    maps: SourceMaps, category: str, concept: Concept, issues: list[Issue], used: list[str]
) -> list[str] | None:
    """Salesforce codes for one concept in one category; None when no coding's system has a group
    for the category (the concept is ignored for it). A coding whose system has a group but whose
    code has none is an error here: that map is incomplete."""
    found: list[str] | None = None
    for ci, coding in enumerate(concept.codings):
        if not coding.system or not coding.code:
            continue
        group = maps.group(category, coding.system)
        if group is None:
            continue  # contract: a system with no group is ignored for that category
        found = found if found is not None else []
        hit = group.lookup(coding.code)
        if hit is None:
            issues.append(
                Issue(
                    code="code-invalid",
                    diagnostics=f"code {cut(coding.code)!r} of system {cut(coding.system)} has no {category} "
                    f"mapping in {group.file} $.group[{group.index}]",
                    expression=(f"{concept.path}.coding[{ci}]",),
                )
            )
            continue
        used.append(f"{group.file} $.group[{group.index}] {coding.code}")
        found.extend(c for c in hit if c not in found)
    return found


def _ignored_issue(concept: Concept, category: str, *, left_out: bool) -> Issue:
    """A concept none of whose codings has a map for `category`: left out with a warning when
    Salesforce can book without it, else the error that says what is missing."""
    why = " (it has text only, no coding)" if not concept.codings else ""
    if any(not c.system for c in concept.codings):
        why = " (a coding without a system cannot be mapped safely)"
    if left_out:
        return Issue(code="informational", severity="warning", expression=(concept.path,),
                     diagnostics=f"no coding has a Salesforce {category} map{why}; left out")
    return Issue(code="code-invalid", expression=(concept.path,),
                 diagnostics=f"no coding maps to a Salesforce {category} code{why}, and Salesforce needs one of "
                             "workTypeId, appointmentTypes, serviceTypes or serviceCategories")


def _scalar(
    maps: SourceMaps, category: str, concepts: Iterable[Concept], issues: list[Issue], used: list[str]
) -> tuple[str | None, set[str]]:
    """The workTypeId or channelId the concepts map to (two different values is an error), and
    the paths of the concepts that resolved to one."""
    values: dict[str, str] = {}
    resolved: set[str] = set()
    for concept in concepts:
        codes = _codes(maps, category, concept, issues, used)
        if codes:
            resolved.add(concept.path)
        for code in codes or ():
            values.setdefault(code, concept.path)
    if len(values) > 1:
        issues.append(
            Issue(
                code="business-rule",
                diagnostics=f"the codes map to {len(values)} different {category} values; one is needed",
                expression=tuple(dict.fromkeys(values.values())),
            )
        )
        return None, resolved
    return (next(iter(values)) if values else None), resolved


def cancellation_reason(booking: CanonicalBooking, maps: SourceMaps) -> tuple[str | None, tuple[Issue, ...], tuple[str, ...]]:
    """Salesforce's cancellationReason for a cancelled Appointment: its `cancelationReason` mapped
    through the group whose target is `…:cancellationReason`, else the reason's own words (its text,
    else a coding's display or code). The issues are what the mapping refused (a code of a mapped
    system with no entry), as for every other category."""
    concept = booking.cancel_reason
    if concept is None:
        return None, (), ()
    issues: list[Issue] = []
    used: list[str] = []
    code, _ = _scalar(maps, "cancellationReason", [concept], issues, used)
    if code is None and not issues:
        code = concept.text or next((c.display or c.code for c in concept.codings if c.display or c.code), None)
    return code, tuple(issues), tuple(used)


def _sf_participants(references: Iterable[str]) -> tuple[SfParticipant, ...]:
    return tuple(SfParticipant(reference=r) for r in dict.fromkeys(references))


def _slots(booking: CanonicalBooking, references: Sequence[str], issues: list[Issue]) -> tuple[SfSlot, ...] | None:
    """Each slot with its practitioner's reference (`references`: the participants', in order)."""
    if not booking.slots:
        return None
    practitioners = [r for p, r in zip(booking.participants, references) if p.kind == "Practitioner"]
    practitioners = list(dict.fromkeys(practitioners))
    if len(practitioners) == 1:
        return tuple(SfSlot(id=s.id, reference=practitioners[0]) for s in booking.slots)
    if practitioners and len(practitioners) == len(booking.slots):
        return tuple(SfSlot(id=s.id, reference=r) for s, r in zip(booking.slots, practitioners))
    issues.append(
        Issue(
            code="required" if not practitioners else "business-rule",
            diagnostics="each slot is sent with its practitioner's reference: "
            + ("there is no Practitioner participant" if not practitioners
               else f"{len(booking.slots)} slots cannot be paired with {len(practitioners)} practitioners"),
            expression=tuple(s.path for s in booking.slots),
        )
    )
    return None


def map_booking(booking: CanonicalBooking, source: SourceSettings, maps: SourceMaps) -> Mapped:
    issues: list[Issue] = []
    used: list[str] = []
    arrays: dict[str, tuple[str, ...] | None] = {}

    feeds = [c for f in _SCALAR_FEEDS for c in getattr(booking, f)]
    work_type, typed = _scalar(maps, "workTypeId", feeds, issues, used)
    channel, _ = _scalar(maps, "channelId", feeds, issues, used)
    ignored: list[tuple[Concept, str]] = []
    for category, field in _ARRAY_CATEGORIES:
        out: list[str] = []
        for concept in getattr(booking, field):
            before = len(issues)
            codes = _codes(maps, category, concept, issues, used)
            if codes:
                out.extend(c for c in codes if c not in out)
            elif len(issues) == before and concept.path not in typed:
                # no map for its systems, or an explicit no-mapping (unmatched): nothing to send for it
                # (and one that found its workTypeId needs nothing more: the visit type is known)
                ignored.append((concept, category))
        arrays[category] = tuple(out) or None
    # contract: a category whose codings all lack a map is left out when the booking has another
    # thing Salesforce books by; an error only when it has none
    bookable = bool(work_type or arrays["appointmentTypes"] or arrays["serviceTypes"] or arrays["serviceCategories"])
    for concept, category in ignored:
        issues.append(_ignored_issue(concept, category, left_out=bookable or category in _OPTIONAL))

    references = [p.reference for p in booking.participants]  # the EHR's, until the identity step
    request = BookingRequest(
        participants=_sf_participants(references),
        startDate=booking.start.text if booking.start else None,
        endDate=booking.end.text if booking.end else None,
        workTypeId=work_type,
        channelId=channel or source.channel_id,
        timeZone=booking.time_zone or source.time_zone,
        sourceSystem=source.source_system,
        appointmentTypes=arrays["appointmentTypes"],
        serviceTypes=arrays["serviceTypes"],
        serviceCategories=arrays["serviceCategories"],
        specialties=arrays["specialties"],
        slots=_slots(booking, references, issues),
        comment=booking.comment,
    )
    return Mapped(request=request, issues=tuple(issues), used=tuple(used), maps_version=maps.version)


def with_references(request: BookingRequest, booking: CanonicalBooking, references: Sequence[str]) -> BookingRequest:
    """The request with the org's records in place of the EHR's ids: `references` are the Book body's
    references of the booking's participants, in order (gateway/identity). The slots keep their ids
    (the EHR's) and take their practitioner's new reference."""
    slots = None
    if request.slots:
        records = dict(zip((p.reference for p in booking.participants), references))
        slots = tuple(SfSlot(id=s.id, reference=records[s.reference]) for s in request.slots)
    return msgspec.structs.replace(request, participants=_resolved(tuple(references)), slots=slots)


@functools.lru_cache(maxsize=4_096)
def _resolved(references: tuple[str, ...]) -> tuple[SfParticipant, ...]:
    """A request's participants as the org's references (the same people again: made once per worker)."""
    return _sf_participants(references)

