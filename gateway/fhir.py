"""FHIR answers: the one place errors become OperationOutcomes, bookings become Appointments, and
free slots a searchset Bundle."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import msgspec

from gateway.canonical import CanonicalBooking
from gateway.errors import GatewayError, InvalidRequest, Issue

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


class _Meta(msgspec.Struct):
    versionId: str


class _Appointment(msgspec.Struct, omit_defaults=True, kw_only=True, tag_field="resourceType", tag="Appointment"):
    id: str
    meta: _Meta | None = None
    status: str
    identifier: list[_Identifier] | None = None
    start: str | None = None
    end: str | None = None
    slot: list[_Reference] | None = None
    participant: list[_Participant] | None = None


_FHIR_KIND = {"Facility": "Location"}  # Salesforce's Facility/ is FHIR's Location/


class AppointmentContent(msgspec.Struct, array_like=True, frozen=True):
    """What an answered Appointment holds besides its id, status and version. An appointment's record
    keeps it (`pack_content`: about 140 bytes, 170 sealed, where the body is 500) to answer it again."""

    identifiers: tuple[tuple[str, str | None], ...] = ()  # the EHR's (value, system)
    start: str | None = None
    end: str | None = None
    slots: tuple[str, ...] = ()  # Slot ids
    actors: tuple[str, ...] = ()  # FHIR references


def appointment_content(booking: CanonicalBooking) -> AppointmentContent:
    actors = []
    for p in booking.participants:
        kind, _, ident = p.reference.partition("/")
        actors.append(f"{_FHIR_KIND.get(kind, kind)}/{ident}")
    return AppointmentContent(
        identifiers=tuple((i.value, i.system) for i in booking.identifiers),
        start=booking.start.text if booking.start else None,
        end=booking.end.text if booking.end else None,
        slots=tuple(s.id for s in booking.slots),
        actors=tuple(actors),
    )


def appointment_body(content: AppointmentContent, salesforce_id: str, *, status: str = "booked",
                     version: int | None = None) -> bytes:
    """The Appointment answered: the Salesforce id as `id`, the EHR's identifiers kept, and Salesforce's
    id as an identifier too, so the EHR can store it against its own; `version` as `meta.versionId`
    (the `ETag` beside it says the same).

    A replay rebuilds a booking's 201 from the booking and the stored id (idempotency record format
    `\x04`: version 1; `\x03`, written before versions: none), and the contract wants it byte for
    byte: a change to what this writes must get a new format byte there, with this version kept for
    the records stored under the old ones."""
    identifiers = [_Identifier(value=value, system=system) for value, system in content.identifiers]
    identifiers.append(_Identifier(value=salesforce_id, system=SALESFORCE_ID_SYSTEM))
    return _encoder.encode(
        _Appointment(
            id=salesforce_id,
            meta=_Meta(str(version)) if version is not None else None,
            status=status,
            identifier=identifiers,
            start=content.start,
            end=content.end,
            slot=[_Reference(f"Slot/{s}") for s in content.slots] or None,
            participant=[_Participant(actor=_Reference(a)) for a in content.actors] or None,
        )
    )


def booked_appointment(booking: CanonicalBooking, salesforce_id: str, *, status: str = "booked",
                       version: int | None = None) -> bytes:
    return appointment_body(appointment_content(booking), salesforce_id, status=status, version=version)


_content_decoder = msgspec.msgpack.Decoder(AppointmentContent)


def pack_content(content: AppointmentContent) -> bytes:
    return msgspec.msgpack.encode(content)


def unpack_content(packed: bytes) -> AppointmentContent:
    return _content_decoder.decode(packed)


def etag(version: int) -> str:
    """FHIR's version as an ETag: weak, since the gateway's bytes for one version may differ."""
    return f'W/"{version}"'


class _Versioned(msgspec.Struct):
    meta: _Meta | None = None


def answered_version(body: bytes) -> int | None:
    """The `meta.versionId` an answered Appointment carries (None: another body, or none)."""
    try:
        meta = msgspec.json.decode(body, type=_Versioned).meta
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return int(meta.versionId) if meta is not None and meta.versionId.isdigit() else None


_ETAGS = re.compile(r'\s*(?:W/)?"[^"\s]*"\s*(?:,\s*(?:W/)?"[^"\s]*"\s*)*')
_ETAG = re.compile(r'"([^"]*)"')


def if_match(header: str | None) -> tuple[str, ...] | None:
    """If-Match: None when absent, () for `*` (any version), else the tags it names (weak or strong,
    FHIR sends `W/"<versionId>"`). Not a list of entity tags: 400."""
    if header is None:
        return None
    if header.strip() == "*":
        return ()
    if not _ETAGS.fullmatch(header):
        raise InvalidRequest('If-Match takes the ETag an answer gave: W/"<version>"', expression=("If-Match",))
    return tuple(_ETAG.findall(header))


# -- slot search ----------------------------------------------------------------------------------

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


class _SlotSchedule(msgspec.Struct, omit_defaults=True):
    reference: str | None = None
    display: str | None = None


class _CodeableConcept(msgspec.Struct, omit_defaults=True):
    coding: list[_Coding]


class _Slot(msgspec.Struct, omit_defaults=True, tag_field="resourceType", tag="Slot"):
    id: str
    schedule: _SlotSchedule
    status: str
    start: str
    end: str
    serviceType: list[_CodeableConcept] | None = None


class _Search(msgspec.Struct):
    mode: str = "match"


class _Entry(msgspec.Struct):
    fullUrl: str
    resource: _Slot
    search: _Search


class _Link(msgspec.Struct):
    relation: str
    url: str


class _Bundle(msgspec.Struct, tag_field="resourceType", tag="Bundle"):
    type: str
    total: int
    link: list[_Link]
    entry: list[_Entry]


def slot_searchset(found: list[dict[str, Any]], params: Any, base: str, self_url: str) -> bytes:
    """A slot search's answer (gateway/slots.py): one Slot per free slot Salesforce named, in its
    order; those without an id, times or a usable FHIR id are left out."""
    wanted = [_Coding(system=system, code=code) for v in params.getall("service-type", []) for t in v.split(",")
              for system, bar, code in [t.rpartition("|")] if bar and system and code]
    entries = []
    for slot in found:
        sid, start, end = slot.get("id"), slot.get("startTime"), slot.get("endTime")
        if not (isinstance(sid, str) and _FHIR_ID.fullmatch(sid) and isinstance(start, str) and isinstance(end, str)):
            continue
        resource = slot.get("reference") or (f"{slot.get('resourceType') or 'Practitioner'}/{slot.get('resourceId')}"
                                             if slot.get("resourceId") else None)
        entries.append(_Entry(
            fullUrl=f"{base}/Slot/{sid}",
            resource=_Slot(id=sid, schedule=_SlotSchedule(display=resource), status="free", start=start, end=end,
                           serviceType=[_CodeableConcept(coding=wanted)] if wanted else None),
            search=_Search(),
        ))
    return _encoder.encode(_Bundle(type="searchset", total=len(entries), link=[_Link("self", self_url)], entry=entries))
