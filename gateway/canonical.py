"""The canonical booking: what every adapter produces and everything downstream reads.

A leaf module: it imports nothing from the gateway, so adapters can depend on it without reaching
up the chain. Every field keeps the FHIR path it came from, so a later refusal can name it.
"""

from __future__ import annotations

from typing import Literal

import msgspec

ParticipantKind = Literal["Patient", "Facility", "Practitioner", "Device"]


class Coding(msgspec.Struct, frozen=True, omit_defaults=True):
    system: str | None = None
    code: str | None = None
    display: str | None = None


class Concept(msgspec.Struct, frozen=True, omit_defaults=True):
    """A CodeableConcept, with the FHIR path of the element it came from."""

    path: str
    codings: tuple[Coding, ...] = ()
    text: str | None = None


class Participant(msgspec.Struct, frozen=True, omit_defaults=True):
    """A participant as the EHR named it: `reference` is Salesforce's kind and the EHR's own id
    (`Facility/32216049`), which the identity step (gateway/identity) turns into the org's record.
    `system`: the EHR named it by an identifier of that system (FHIR `actor.identifier`, PID-3 with
    its assigning authority), not by a literal reference; `role`: a FHIR PractitionerRole, which is
    the practitioner at a facility already (a HealthcarePractitionerFacility, not a practitioner)."""

    kind: ParticipantKind
    reference: str
    path: str
    system: str | None = None
    role: bool = False

    @property
    def value(self) -> str:
        """The EHR's id (or identifier value) alone."""
        return self.reference.partition("/")[2]


class Slot(msgspec.Struct, frozen=True):
    id: str
    path: str


class Identifier(msgspec.Struct, frozen=True, omit_defaults=True):
    value: str
    system: str | None = None


class Instant(msgspec.Struct, frozen=True):
    """A point in time exactly as the EHR wrote it (offset kept), and its FHIR path."""

    text: str
    path: str


class Person(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the EHR's message says of the patient (HL7 v2 PID): only what creating the patient in the
    org needs (`unknown_patient = "create"`). Patient data: sealed wherever it is kept."""

    family: str | None = None
    given: str | None = None
    birth_date: str | None = None  # YYYY-MM-DD
    gender: str | None = None  # FHIR's administrative gender: male | female | other | unknown
    phone: str | None = None


class CanonicalBooking(msgspec.Struct, frozen=True, omit_defaults=True):
    """One booking request, independent of the EHR dialect it arrived in."""

    resource_path: str = "Appointment"  # e.g. "Parameters.parameter[0].resource" for $book
    identifiers: tuple[Identifier, ...] = ()
    status: str | None = None
    start: Instant | None = None
    end: Instant | None = None
    appointment_types: tuple[Concept, ...] = ()
    service_types: tuple[Concept, ...] = ()
    service_categories: tuple[Concept, ...] = ()
    specialties: tuple[Concept, ...] = ()
    participants: tuple[Participant, ...] = ()
    # participants the adapter saw but could not turn into a Salesforce reference (a type and no
    # reference, or an actor of a kind Salesforce has no place for); kept only as paths, for messages
    unresolved_participants: tuple[str, ...] = ()
    slots: tuple[Slot, ...] = ()
    comment: str | None = None
    comment_path: str | None = None
    time_zone: str | None = None
    cancel_reason: Concept | None = None  # Appointment.cancelationReason, for a cancellation
    patient: Person | None = None  # demographics the message carried (HL7 v2 PID), for creating the patient
    # Appointment.id as sent: not part of the booking (left out of its fingerprint), only what an
    # update's body must agree with (FHIR: the id in the URL)
    resource_id: str | None = None

    def first(self, kind: ParticipantKind) -> Participant | None:
        """The first participant of a kind (the booking's patient: `first("Patient")`)."""
        return next((p for p in self.participants if p.kind == kind), None)
