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


class Participant(msgspec.Struct, frozen=True):
    """A resolved participant: `reference` is already in Salesforce form, e.g. `Facility/123`."""

    kind: ParticipantKind
    reference: str
    path: str


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
    # Appointment.id as sent: not part of the booking (left out of its fingerprint), only what an
    # update's body must agree with (FHIR: the id in the URL)
    resource_id: str | None = None
