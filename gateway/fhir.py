"""FHIR answers: the one place errors become OperationOutcomes, and bookings become Appointments."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from gateway.canonical import CanonicalBooking
from gateway.errors import GatewayError, Issue

FHIR_JSON = "application/fhir+json"
SALESFORCE_ERROR_SYSTEM = "urn:ehr-gateway:salesforce:errorCode"
SALESFORCE_ID_SYSTEM = "urn:ehr-gateway:salesforce:appointment"


class _Coding(msgspec.Struct, omit_defaults=True):
    system: str
    code: str


class _Details(msgspec.Struct, omit_defaults=True):
    text: str
    coding: list[_Coding] | None = None


class _OOIssue(msgspec.Struct, omit_defaults=True):
    severity: str
    code: str
    details: _Details
    expression: list[str] | None = None


class _OperationOutcome(msgspec.Struct, omit_defaults=True, tag_field="resourceType", tag="OperationOutcome"):
    issue: list[_OOIssue]


_encoder = msgspec.json.Encoder()


def operation_outcome(issues: Iterable[Issue]) -> bytes:
    return _encoder.encode(
        _OperationOutcome(
            issue=[
                _OOIssue(
                    severity=i.severity,
                    code=i.code,
                    details=_Details(
                        text=i.diagnostics,
                        coding=[_Coding(SALESFORCE_ERROR_SYSTEM, i.details_code)] if i.details_code else None,
                    ),
                    expression=list(i.expression) or None,
                )
                for i in issues
            ]
        )
    )


def error_body(error: GatewayError) -> bytes:
    return operation_outcome(error.issues)


# --- the Appointment answered for a booking ---


class _Identifier(msgspec.Struct, omit_defaults=True):
    value: str
    system: str | None = None


class _Reference(msgspec.Struct):
    reference: str


class _Participant(msgspec.Struct):
    actor: _Reference
    status: str = "accepted"


class _Appointment(msgspec.Struct, omit_defaults=True, tag_field="resourceType", tag="Appointment"):
    id: str
    status: str
    identifier: list[_Identifier] | None = None
    start: str | None = None
    end: str | None = None
    slot: list[_Reference] | None = None
    participant: list[_Participant] | None = None


_FHIR_KIND = {"Facility": "Location"}  # Salesforce's Facility/ is FHIR's Location/


def booked_appointment(booking: CanonicalBooking, salesforce_id: str, *, status: str = "booked") -> bytes:
    """The 201 body: the Salesforce id as `id`, the EHR's identifiers kept, and Salesforce's id as an
    identifier too, so the EHR can store it against its own.

    A replay rebuilds this body from the booking and the stored id (idempotency record format
    `\x03`), and the contract wants it byte for byte: a change to what this writes must get a new
    format byte there, with this version kept for the records stored under `\x03`."""
    identifiers = [_Identifier(value=i.value, system=i.system) for i in booking.identifiers]
    identifiers.append(_Identifier(value=salesforce_id, system=SALESFORCE_ID_SYSTEM))
    participants = []
    for p in booking.participants:
        kind, _, ident = p.reference.partition("/")
        participants.append(_Participant(actor=_Reference(f"{_FHIR_KIND.get(kind, kind)}/{ident}")))
    return _encoder.encode(
        _Appointment(
            id=salesforce_id,
            status=status,
            identifier=identifiers,
            start=booking.start.text if booking.start else None,
            end=booking.end.text if booking.end else None,
            slot=[_Reference(f"Slot/{s.id}") for s in booking.slots] or None,
            participant=participants or None,
        )
    )
