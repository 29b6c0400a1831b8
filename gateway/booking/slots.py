"""Slot search: FHIR search parameters -> Salesforce Get Slots (the Bundle is `fhir.slot_searchset`).

`GET /fhir/{source}/Slot?start=ge…&start=le…&service-type=system|code&actor=Practitioner/…` reads
like a booking without a patient: the codes go through the source's code maps exactly as an
Appointment's would (so the same workTypeId, channelId and code arrays reach Salesforce), the actors
become Salesforce's resources as the org's records (a Practitioner is a "Provider": its
HealthcarePractitionerFacility at the search's Location, or at each of its facilities when the search
names none; a Device a "Device", its Asset), and each free slot comes back as a Slot whose id books
with `Appointment.slot`, its schedule named as the search named its actor.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, NamedTuple

from adapters.r4 import resolve_reference
from gateway.canonical import CanonicalBooking, Coding, Concept, Participant
from gateway.booking.codemaps import SourceMaps
from gateway.errors import InvalidRequest, Unprocessable, http
from gateway.booking.mapping import map_booking
from gateway.salesforce.wire import SlotResource, SlotsRequest
from gateway.settings import SourceSettings

_LOWER, _UPPER = ("ge", "gt"), ("le", "lt")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# the actors a search takes (a PractitionerRole is a practitioner at a facility)
_ACTORS = frozenset({"Practitioner", "PractitionerRole", "Device"})
# a participant's kind -> Get Slots' resourceType
_KIND_TYPES = {"Practitioner": "Provider", "Device": "Device"}
_NUMBER = re.compile(r"\d{1,9}")


def paging(params: Any) -> tuple[int, int | None]:
    """`_offset` and `_count` of a search (the page's first slot, and how many: all when absent),
    checked before Salesforce is asked. `_offset` is the gateway's own: its `next` links set it."""
    found = []
    for name in ("_offset", "_count"):
        values = params.getall(name, [])
        if len(values) > 1 or (values and not _NUMBER.fullmatch(values[0])):
            raise InvalidRequest(f"{name} takes one whole number, 0 or more", location=http(name))
        found.append(int(values[0]) if values else None)
    return found[0] or 0, found[1]


def _instant(value: str, upper: bool) -> str:
    """A search date as Salesforce takes it: a date-time with its offset; a plain date is that UTC day."""
    if _DATE.fullmatch(value):
        return value + ("T23:59:59Z" if upper else "T00:00:00Z")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise InvalidRequest("start takes a date (YYYY-MM-DD) or a date-time with its offset", location=http("start"))
    return value


def _tokens(values: list[str], name: str, path: str) -> tuple[Concept, ...]:
    """`system|code` tokens (repeated or comma-separated) as one concept each, at `path[i]`."""
    concepts = []
    for token in (t for v in values for t in v.split(",") if t):
        system, bar, code = token.rpartition("|")
        if not bar or not system or not code:
            raise InvalidRequest(f"{name} takes system|code tokens: a code without its system cannot be mapped",
                                 location=http(name))
        concepts.append(Concept(path=f"{path}[{len(concepts)}]", codings=(Coding(system=system, code=code),)))
    return tuple(concepts)


def slots_request(params: Any, source: SourceSettings, maps: SourceMaps) -> SlotSearch:
    """The Get Slots request a search asks for, the code-map entries it used, and its actors (the
    EHR's ids, which the caller finds as the org's records). `params`: the query (a multi-dict with
    `getall`). Raises InvalidRequest (400) for a malformed search, Unprocessable (422) for codes the
    maps refuse."""
    lower = upper = None
    for value in params.getall("start", []):
        prefix, rest = value[:2], value[2:]
        if prefix in _LOWER and lower is None:
            lower = _instant(rest, upper=False)
        elif prefix in _UPPER and upper is None:
            upper = _instant(rest, upper=True)
        else:
            raise InvalidRequest("start is given twice as a bound: start=ge<from>&start=le<to>", location=http("start"))
    if lower is None or upper is None:
        raise InvalidRequest("a slot search needs both bounds: start=ge<from>&start=le<to>", location=http("start"))
    actors: list[Participant] = []
    location: Participant | None = None
    for value in (v for a in params.getall("actor", []) for v in a.split(",") if v):
        resolved = resolve_reference(value)
        if resolved is not None and resolved[0] in _ACTORS:
            kind = "Device" if resolved[0] == "Device" else "Practitioner"
            actors.append(Participant(kind=kind, reference=f"{kind}/{resolved[1]}", path="http.actor",
                                      role=resolved[0] == "PractitionerRole"))
        elif resolved is not None and resolved[0] == "Location" and location in (None, f"Facility/{resolved[1]}"):
            location = Participant(kind="Facility", reference=f"Facility/{resolved[1]}", path="http.actor")
        else:
            raise InvalidRequest("actor takes Practitioner/<id> or Device/<id> references, and at most one Location",
                                 location=http("actor"))
    if not actors:
        raise InvalidRequest("a slot search needs an actor: the Practitioner or Device whose slots are wanted",
                             location=http("actor"))
    # the codes read as an Appointment's would, so they map to what a booking would send
    probe = CanonicalBooking(
        resource_path="Slot",
        service_types=_tokens(params.getall("service-type", []), "service-type", "Slot.serviceType"),
        appointment_types=_tokens(params.getall("appointment-type", []), "appointment-type", "Slot.appointmentType"),
        specialties=_tokens(params.getall("specialty", []), "specialty", "Slot.specialty"),
    )
    mapped = map_booking(probe, source, maps)
    errors = [i for i in mapped.issues if i.severity in ("error", "fatal")]
    if errors:
        raise Unprocessable(issues=errors)
    r = mapped.request
    request = SlotsRequest(
        resources=(), channelId=r.channelId, workTypeId=r.workTypeId, startDate=lower, endDate=upper,
        sourceSystem=r.sourceSystem, appointmentTypes=r.appointmentTypes, serviceCategories=r.serviceCategories,
        serviceTypes=r.serviceTypes,
    )
    return SlotSearch(request, mapped.used, tuple(dict.fromkeys(actors)), location)


class SlotSearch(NamedTuple):
    """A search read: Get Slots' request but for its resources, which are the org's records of
    `actors` (each a Provider or a Device, found by gateway/identity; a practitioner's at `location`,
    the search's Location, when it names one)."""

    request: SlotsRequest
    used: tuple[str, ...]
    actors: tuple[Participant, ...]
    location: Participant | None


def slot_resources(actors: tuple[Participant, ...], records: list[tuple[str, ...]]) -> tuple[SlotResource, ...]:
    """Get Slots' resources: each actor's records (a practitioner's HPFs, a device's Asset)."""
    return tuple(dict.fromkeys(SlotResource(resourceId=r, resourceType=_KIND_TYPES[a.kind])
                               for a, ids in zip(actors, records) for r in ids))
