"""What the gateway asks of an EHR and gets back, whatever the dialect: the neutral shapes every EHR
client takes and returns. Ids are the EHR's own; codes keep their EHR systems."""

from __future__ import annotations

import msgspec

from gateway.canonical import Coding


class SlotQuery(msgspec.Struct, frozen=True, kw_only=True):
    """Free slots starting in [start, end) (ISO 8601 date-times with offsets, or dates), of these
    practitioners and locations (none: any), offering one of these services (EHR codes)."""

    start: str
    end: str
    practitioners: tuple[str, ...] = ()
    locations: tuple[str, ...] = ()
    service_types: tuple[Coding, ...] = ()
    appointment_types: tuple[Coding, ...] = ()


class EhrSlot(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # what the EHR books by (a Slot's id; Epic: a proposed appointment's)
    start: str
    end: str
    status: str = "free"  # FHIR slotstatus
    schedule: str | None = None
    practitioner: str | None = None
    location: str | None = None
    service_types: tuple[Coding, ...] = ()


class BookRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Book `slot` for `patient`. `identifiers`: what names the booking outside the EHR (Salesforce's
    appointment id), sent where the EHR keeps identifiers, and how a lost answer is looked up."""

    slot: str
    patient: str
    practitioner: str | None = None
    location: str | None = None
    start: str | None = None
    end: str | None = None
    service_types: tuple[Coding, ...] = ()
    appointment_types: tuple[Coding, ...] = ()
    comment: str | None = None
    identifiers: tuple[tuple[str, str], ...] = ()  # (system, value)


class EhrAppointment(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    status: str  # FHIR appointmentstatus (booked, cancelled, proposed, …)
    start: str | None = None
    end: str | None = None
    slot: str | None = None
    patient: str | None = None
    practitioner: str | None = None
    location: str | None = None
    version: str | None = None  # the EHR's version (Cerner's ETag) where it has one
    service_types: tuple[Coding, ...] = ()
    identifiers: tuple[tuple[str, str], ...] = ()
