"""What a Health Cloud callout becomes for an EHR, without calling it: its codes through the engineers'
maps read in reverse (`SourceMaps.to_ehr`), a create as the neutral `BookRequest` every EHR client
takes, a search's share as a `SlotQuery`. The Scheduler uses it, and so does `ehr-gateway translate
--to-ehr`."""

from __future__ import annotations

from gateway.booking.codemaps import SourceMaps
from gateway.canonical import Coding
from gateway.ehr.model import BookRequest, SlotQuery
from gateway.errors import InvalidRequest, cut
from gateway.scheduling.callouts import Callout, Search, SourceCriteria

# the Salesforce appointment's identifier among the three a create carries: a ServiceAppointment's
# id starts with its key prefix, 08p
SERVICE_APPOINTMENT_PREFIX = "08p"


def ehr_codes(maps: SourceMaps | None, category: str, codes: list[str], *, system: str) -> tuple[Coding, ...]:
    """Health Cloud's codes as the EHR's: each through a map read in reverse, else refused."""
    found = []
    for code in codes:
        reverse = maps.to_ehr(category, code) if maps is not None else None
        if reverse is None:
            raise InvalidRequest(f"{category}: the code {cut(code, 64)} has no map to the "
                                 f"{cut(system, 64)} EHR's codes (an equivalent element or a reverse group)")
        found.append(Coding(system=reverse.system, code=reverse.code))
    return tuple(found)


def known_codes(maps: SourceMaps | None, category: str, codes: list[str]) -> tuple[Coding, ...]:
    """A create's codes as the EHR's where a map says so: the slot already carries what the EHR
    needs, so a code without one is left out rather than stopping the booking."""
    found = (maps.to_ehr(category, code) if maps is not None else None for code in codes)
    return tuple(Coding(system=r.system, code=r.code) for r in found if r is not None)


def slot_query(maps: SourceMaps | None, search: Search, criteria: SourceCriteria, *, system: str) -> SlotQuery:
    return SlotQuery(start=search.start, end=search.end, practitioners=tuple(criteria.practitioners),
                     locations=tuple(criteria.locations),
                     service_types=ehr_codes(maps, "serviceTypes", criteria.service_types, system=system),
                     appointment_types=ehr_codes(maps, "appointmentTypes", criteria.appointment_types, system=system))


def book_request(maps: SourceMaps | None, callout: Callout) -> BookRequest:
    slot, patient = callout.slot_id(), callout.actor("Patient")
    if not slot:
        raise InvalidRequest("slot: the slot to book is required", expression=("Appointment.slot",))
    if not patient:
        raise InvalidRequest("participant: a Patient participant is required", expression=("Appointment.participant",))
    identifiers = salesforce_ids(callout)
    if not identifiers:
        raise InvalidRequest("identifier: the Salesforce appointment's id is required (a ServiceAppointment id)",
                             expression=("Appointment.identifier",))
    codes = [c.code for concept in callout.serviceType for c in concept.coding if c.code]
    kinds = [c.code for c in (callout.appointmentType.coding if callout.appointmentType else []) if c.code]
    return BookRequest(
        slot=slot, patient=patient, practitioner=callout.actor("Practitioner"),
        location=callout.actor("Location"), start=callout.start, end=callout.end,
        service_types=known_codes(maps, "serviceTypes", codes),
        appointment_types=known_codes(maps, "appointmentTypes", kinds),
        comment=callout.comment, identifiers=tuple(identifiers),
    )


def salesforce_ids(callout: Callout) -> list[tuple[str, str]]:
    """The create's identifiers that name the Salesforce appointment (its ServiceAppointment id), as
    (system, value): what the booking is known by outside the EHR."""
    return [(i.system or "", i.value) for i in callout.identifier
            if i.value and i.value.startswith(SERVICE_APPOINTMENT_PREFIX) and len(i.value) in (15, 18)]
