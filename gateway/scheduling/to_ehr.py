"""What a Health Cloud callout becomes for an EHR, without calling it: its codes as the EHR's own
(`ehr_coding`), a create as the neutral `BookRequest` every EHR client takes, a search's share as a
`SlotQuery`. The Scheduler uses it, and so does `ehr-gateway translate --to-ehr`.

Health Cloud's `service-type` and `appointment-type` come from the org's Work Type Code Set Bundles,
which hold each source system's own codes: a code is the EHR's, and at most its code system is added,
from the source's map group (of that category) that lists the code among its source codes. Only a
code no such group lists is looked up in the maps read in reverse (a Salesforce-side code); one that
neither knows goes to the EHR bare, unless the EHR's API cannot take it without a system."""

from __future__ import annotations

from typing import Literal

import msgspec

from gateway.booking.codemaps import Group, SourceMaps
from gateway.canonical import Coding
from gateway.ehr.model import BookRequest, SlotQuery
from gateway.errors import InvalidRequest, Issue, cut, http
from gateway.scheduling.callouts import Callout, Search, SourceCriteria

# the Salesforce appointment's identifier among the three a create carries: a ServiceAppointment's
# id starts with its key prefix, 08p
SERVICE_APPOINTMENT_PREFIX = "08p"

# Each EHR's own code systems, what its API searches and books by: Cerner's tenant code sets
# (`https://fhir.cerner.com/<tenant>/codeSet/14249`), Epic's customer OIDs (under Epic's root
# 1.2.840.114350). A source's maps hold its own EHR's systems only, so with no dialect named any of
# these is the EHR's own.
OWN_SYSTEMS: dict[str, tuple[str, ...]] = {
    "cerner": ("https://fhir.cerner.com/",),
    "epic": ("urn:oid:1.2.840.114350.",),
}
# What an EHR's API cannot take without a code system: (dialect, category) -> why, for the refusal.
SYSTEM_REQUIRED: dict[tuple[str, str], str] = {
    ("cerner", "serviceTypes"): "Cerner's Slot search takes service-type only as system|code (its code set 14249)",
}
# the search parameter of each category, for a refusal's location
_PARAMETERS = {"serviceTypes": "service-type", "appointmentTypes": "appointment-type"}


class EhrCode(msgspec.Struct, frozen=True, omit_defaults=True):
    """A code of Health Cloud's as the EHR is sent it, and what said so: `map`, a group listing it
    among its source codes; `reverse`, the maps read in reverse (it was a Salesforce-side code);
    `none`, nothing (sent bare). `file` and `where` name the group or element."""

    coding: Coding
    via: Literal["map", "reverse", "none"]
    file: str | None = None
    where: str | None = None


def ehr_coding(maps: SourceMaps | None, category: str, code: str, *, dialect: str | None = None) -> EhrCode:
    """Health Cloud's `code` of `category` (serviceTypes, appointmentTypes) as the EHR's: in the system
    of the group whose source codes list it; else through the maps read in reverse; else bare."""
    if maps is None:
        return EhrCode(Coding(code=code), "none")
    held = maps.holding(category, code)
    if held:
        system, group = held[0] if len(held) == 1 else _preferred(maps, category, code, held, dialect)
        return EhrCode(Coding(system=system, code=code), "map", group.file, f"$.group[{group.index}]")
    back = maps.to_ehr(category, code)
    if back is not None:
        return EhrCode(Coding(system=back.system, code=back.code), "reverse", back.file, back.where)
    return EhrCode(Coding(code=code), "none")


def _preferred(maps: SourceMaps, category: str, code: str, held: list[tuple[str, Group]],
               dialect: str | None) -> tuple[str, Group]:
    """Of several groups listing the code (table 0276 under its R4 and pre-R4 URIs; a code set and a
    standard terminology that share a code), always the same one:
    1. the EHR's own code system (`OWN_SYSTEMS`: Cerner's code sets, Epic's OIDs), which its API
       searches by; of several, the first as loaded;
    2. else the one the maps read in reverse give this very code under (the engineers' choice for
       Health Cloud's codes, e.g. the shipped reverse groups send 0276 under R4's URI);
    3. else the first as loaded (files by name, groups as written)."""
    own = OWN_SYSTEMS.get(dialect, ()) if dialect is not None else tuple(p for ps in OWN_SYSTEMS.values() for p in ps)
    for system, group in held:
        if system.startswith(own):
            return system, group
    back = maps.to_ehr(category, code)
    if back is not None and back.code == code:
        for system, group in held:
            if system == back.system:
                return system, group
    return held[0]


def ehr_codes(maps: SourceMaps | None, category: str, codes: list[str], *,
              dialect: str | None = None) -> tuple[EhrCode, ...]:
    return tuple(ehr_coding(maps, category, code, dialect=dialect) for code in codes)


def _searchable(found: tuple[EhrCode, ...], category: str, *, dialect: str | None, system: str) -> tuple[Coding, ...]:
    """A search's codes, or the refusal of one the EHR's API cannot take bare (400: nothing is sent)."""
    why = SYSTEM_REQUIRED.get((dialect or "", category))
    bare = next((c for c in found if c.coding.system is None), None) if why else None
    if bare is not None:
        parameter = _PARAMETERS.get(category, category)
        raise InvalidRequest(issues=[Issue(
            code="code-invalid", location=http(parameter),
            diagnostics=f"{parameter}: the code {cut(bare.coding.code, 64)} of source system {cut(system, 64)} is in no "
                        f"{category} group of its code maps, and none maps it back, so its code system is unknown; "
                        f"{why}: add the code to the map group of its code system")])
    return tuple(c.coding for c in found)


def slot_query(maps: SourceMaps | None, search: Search, criteria: SourceCriteria, *, system: str,
               dialect: str | None = None) -> SlotQuery:
    """One source system's share of a search, for its EHR (`dialect`: its source's adapter)."""
    services = ehr_codes(maps, "serviceTypes", criteria.service_types, dialect=dialect)
    kinds = ehr_codes(maps, "appointmentTypes", criteria.appointment_types, dialect=dialect)
    return SlotQuery(start=search.start, end=search.end, practitioners=tuple(criteria.practitioners),
                     locations=tuple(criteria.locations),
                     service_types=_searchable(services, "serviceTypes", dialect=dialect, system=system),
                     appointment_types=_searchable(kinds, "appointmentTypes", dialect=dialect, system=system))


def book_request(maps: SourceMaps | None, callout: Callout, *, dialect: str | None = None) -> BookRequest:
    """A create for its EHR. Its codes as in a search, none refused: no EHR books by a code (the slot
    says what it needs), so a bare one only goes where the EHR keeps codes as sent (FHIR's)."""
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
        service_types=tuple(c.coding for c in ehr_codes(maps, "serviceTypes", codes, dialect=dialect)),
        appointment_types=tuple(c.coding for c in ehr_codes(maps, "appointmentTypes", kinds, dialect=dialect)),
        comment=callout.comment, identifiers=tuple(identifiers),
    )


def salesforce_ids(callout: Callout) -> list[tuple[str, str]]:
    """The create's identifiers that name the Salesforce appointment (its ServiceAppointment id), as
    (system, value): what the booking is known by outside the EHR."""
    return [(i.system or "", i.value) for i in callout.identifier
            if i.value and i.value.startswith(SERVICE_APPOINTMENT_PREFIX) and len(i.value) in (15, 18)]
