"""FHIR answers: the one place errors become OperationOutcomes, bookings become Appointments, and
free slots a searchset Bundle."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from typing import Any
from urllib.parse import urlencode

import msgspec

from gateway.canonical import CanonicalBooking
from gateway.errors import GatewayError, InvalidRequest, Issue, NotAcceptable, http
from gateway.salesforce.wire import FoundSlots

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
    location: list[str] | None = None


class _OperationOutcome(msgspec.Struct, omit_defaults=True, tag_field="resourceType", tag="OperationOutcome"):
    issue: list[_OOIssue]


_encoder = msgspec.json.Encoder()


def outcome_resource(issues: Iterable[Issue]) -> _OperationOutcome:
    """An OperationOutcome of `issues`, to encode alone or inside a Bundle."""
    return _OperationOutcome(
        issue=[
            _OOIssue(
                severity=i.severity,
                code=i.code,
                details=_Details(
                    text=i.diagnostics,
                    coding=[_Coding(SALESFORCE_ERROR_SYSTEM, i.details_code)] if i.details_code else None,
                ),
                expression=list(i.expression) or None,
                location=list(i.location) or None,
            )
            for i in issues
        ]
    )


def operation_outcome(issues: Iterable[Issue]) -> bytes:
    return _encoder.encode(outcome_resource(issues))


def error_body(error: GatewayError) -> bytes:
    return operation_outcome(error.issues)


def warning_header(issues: Iterable[Issue]) -> str:
    """Warnings beside an answer whose body has no room for them (`$translate`'s is the Salesforce
    request): HTTP's `Warning` (RFC 7234, 5.5), code 299, one warning-value per issue."""
    def text(issue: Issue) -> str:
        where = f"{issue.expression[0]}: " if issue.expression else ""
        plain = "".join(c if " " <= c <= "~" else "?" for c in where + issue.diagnostics)  # a header is ASCII
        return plain.replace("\\", "\\\\").replace('"', '\\"')

    return ", ".join(f'299 ehr-gateway "{text(i)}"' for i in issues)


# -- content negotiation (FHIR http.html#mime-type) -----------------------------------------------

# what the gateway answers in, and the media ranges that name it; `json` is FHIR's `_format` shorthand
_ANSWERED = ("application/fhir+json", "application/json")
_FORMAT_SHORTHAND = {"json": FHIR_JSON}
_REFUSAL = "this server answers in JSON only (application/fhir+json or application/json, FHIR 4.0)"


def negotiate(format_value: str | None, accept: str | None) -> None:
    """Refuses (406) a client that accepts none of the gateway's formats: `_format` when given (it
    overrides `Accept`, for clients that cannot set headers), else `Accept`; neither accepts all."""
    if format_value is not None:
        # `+` in a query string decodes to a space: `_format=application/fhir+json` unescaped
        wanted = format_value.strip().lower().replace(" ", "+")
        if not _accepts_json(_FORMAT_SHORTHAND.get(wanted, wanted)):
            raise NotAcceptable(_REFUSAL, location=http("_format"))
    elif accept and not _accepts_json(accept):
        raise NotAcceptable(_REFUSAL, location=http("Accept"))


@lru_cache(maxsize=256)  # clients send a handful of distinct headers; the cache keeps parsing off the path
def _accepts_json(accept: str) -> bool:
    """RFC 9110 §12.5.1: for each media type answered, the most specific range that matches it gives
    its quality; acceptable when one of them has a quality above 0. A range whose `fhirVersion` is
    not 4.0 matches nothing."""
    best = {media: (-1, 0.0) for media in _ANSWERED}  # media type -> (specificity, quality)
    for part in accept.split(","):
        media, *params = part.split(";")
        media = media.strip().lower()
        quality, version_ok = 1.0, True
        for param in params:
            name, _, value = param.partition("=")
            name, value = name.strip().lower(), value.strip().strip('"')
            if name == "q":
                try:
                    quality = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    quality = 0.0
            elif name == "fhirversion":
                version_ok = value == "4.0" or value.startswith("4.0.")
        if not version_ok:
            continue
        for answered, (specificity, _) in best.items():
            rank = 2 if media == answered else 1 if media == "application/*" else 0 if media == "*/*" else -1
            if rank > specificity:
                best[answered] = (rank, quality)
    return any(rank >= 0 and quality > 0 for rank, quality in best.values())


# --- the Appointment answered for a booking ---


class _Identifier(msgspec.Struct, omit_defaults=True):
    value: str
    system: str | None = None


class _Reference(msgspec.Struct):
    reference: str


class _Logical(msgspec.Struct):
    """An actor the EHR named by its identifier, answered as it was named."""

    type: str
    identifier: _Identifier


class _Participant(msgspec.Struct):
    actor: _Reference | _Logical
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
    # actors named by an identifier: (FHIR type, system, value); added last, so older records still read
    logical: tuple[tuple[str, str, str], ...] = ()


def appointment_content(booking: CanonicalBooking) -> AppointmentContent:
    """The EHR's own participants are answered back (never the org's record ids), as it named them."""
    actors, logical = [], []
    for p in booking.participants:
        kind = "PractitionerRole" if p.role else _FHIR_KIND.get(p.kind, p.kind)
        if p.system is None:
            actors.append(f"{kind}/{p.value}")
        else:
            logical.append((kind, p.system, p.value))
    return AppointmentContent(
        identifiers=tuple((i.value, i.system) for i in booking.identifiers),
        start=booking.start.text if booking.start else None,
        end=booking.end.text if booking.end else None,
        slots=tuple(s.id for s in booking.slots),
        actors=tuple(actors),
        logical=tuple(logical),
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
            participant=[*(_Participant(actor=_Reference(a)) for a in content.actors),
                         *(_Participant(actor=_Logical(t, _Identifier(value=v, system=sy))) for t, sy, v in content.logical)]
            or None,
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
        raise InvalidRequest('If-Match takes the ETag an answer gave: W/"<version>"', location=http("If-Match"))
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


class _Entry(msgspec.Struct, omit_defaults=True, kw_only=True):
    fullUrl: str | None = None  # none for the warnings' entry: it is no resource of this server
    resource: _Slot | _OperationOutcome
    search: _Search


class _Link(msgspec.Struct):
    relation: str
    url: str


class _Bundle(msgspec.Struct, omit_defaults=True, tag_field="resourceType", tag="Bundle"):
    type: str
    total: int
    link: list[_Link]
    entry: list[_Entry] | None = None  # FHIR JSON has no empty arrays


# Get Slots' resourceType -> the FHIR resource a Slot's schedule names
_SLOT_ACTOR = {"Provider": "Practitioner", "Device": "Device"}


def _instant(value: datetime) -> str:
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def slot_searchset(found: FoundSlots, params: Any, base: str, search_url: str,
                   offset: int = 0, count: int | None = None) -> bytes:
    """A slot search's answer (gateway/booking/slots.py): one Slot per free slot Salesforce named, in its
    order. Slots that could not be read, or whose id cannot be a FHIR id, are left out; a warning
    (an OperationOutcome entry, search mode `outcome`) says how many, and how many times Salesforce
    wrote without a zone and were read as UTC. `search_url` is the search's own address without a
    query; the page holds `count` of them (all when None) from `offset`."""
    wanted = [_Coding(system=system, code=code) for v in params.getall("service-type", []) for t in v.split(",")
              for system, bar, code in [t.rpartition("|")] if bar and system and code]
    entries = []
    left_out, zoneless = found.unread, 0
    for slot in found.slots:
        if not _FHIR_ID.fullmatch(slot.id):
            left_out += 1
            continue
        zoneless += slot.zone_assumed
        actor = f"{_SLOT_ACTOR.get(slot.resource_type, slot.resource_type)}/{slot.resource_id}"
        entries.append(_Entry(
            fullUrl=f"{base}/Slot/{slot.id}",
            resource=_Slot(id=slot.id, schedule=_SlotSchedule(display=actor), status="free",
                           start=_instant(slot.start), end=_instant(slot.end),
                           serviceType=[_CodeableConcept(coding=wanted)] if wanted else None),
            search=_Search(),
        ))
    warnings = []
    if left_out:
        warnings.append(f"{left_out} slot(s) in Salesforce's answer could not be read and are left out")
    if zoneless:
        warnings.append(f"{zoneless} slot(s) came from Salesforce with times without a time zone: read as UTC")
    bundle = _page(entries, params, search_url, offset, count)
    if warnings:  # on every page: it is about the whole answer, and not counted in `total`
        outcome = _OperationOutcome(issue=[_OOIssue(severity="warning", code="informational", details=_Details(text=w))
                                           for w in warnings])
        bundle.entry = [*(bundle.entry or ()), _Entry(resource=outcome, search=_Search(mode="outcome"))]
    return _encoder.encode(bundle)


def _page(entries: list[_Entry], params: Any, search_url: str, offset: int, count: int | None) -> _Bundle:
    """One page of a searchset. Nothing is held between pages: `next` asks the same search again
    with `_offset` moved on (Get Slots has no paging of its own, and a slot taken meanwhile is
    simply gone from the next answer)."""
    kept = [(k, v) for k, v in params.multi_items() if k not in ("_count", "_offset")]

    def url(at: int) -> str:
        paging = ([("_count", str(count))] if count is not None else []) + ([("_offset", str(at))] if at else [])
        return f"{search_url}?{urlencode(kept + paging)}"

    end = len(entries) if count is None else min(len(entries), offset + count)
    links = [_Link("self", url(offset))]
    if count != 0 and end < len(entries):  # `_count=0` asks for the total alone
        links.append(_Link("next", url(end)))
    return _Bundle(type="searchset", total=len(entries), link=links, entry=entries[offset:end] or None)
