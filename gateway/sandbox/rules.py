"""Salesforce's booking rules, as the sandbox enforces them.

The point of enforcing them here is that a gateway bug which real Salesforce would refuse is refused
in tests too, with the same kind of error body. Messages name fields, never echo values.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

PARTICIPANT_KINDS = ("Patient", "Facility", "Practitioner", "Device")
CODE_ARRAYS = ("appointmentTypes", "serviceTypes", "serviceCategories")
MAX_COMMENT = 256


# The shapes below are written from the spec (shared/spec/salesforce.md), not taken from the
# gateway's client: a field the client names wrong is then a disagreement the tests can see. The
# spec gives each request's whole shape, so a field it does not list is refused, as Salesforce's
# parser refuses it (400 JSON_PARSER_ERROR).


class SfError(msgspec.Struct, frozen=True, omit_defaults=True):
    """One entry of Salesforce's error body: a JSON array of `{"message", "errorCode", "fields"}`."""

    message: str | None = None
    errorCode: str | None = None
    fields: list[str] | None = None


class Participant(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    reference: str
    isReferenceRequired: bool | None = None


class BookedSlot(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    id: str
    reference: str


class BookingRequest(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Body of `POST …/appointment` (Book): the "Book request fields" table."""

    participants: tuple[Participant, ...]
    startDate: str | None = None
    endDate: str | None = None
    workTypeId: str | None = None
    channelId: str | None = None
    comment: str | None = None
    timeZone: str | None = None
    sourceSystem: str | None = None
    appointmentTypes: tuple[str, ...] | None = None
    serviceTypes: tuple[str, ...] | None = None
    serviceCategories: tuple[str, ...] | None = None
    specialties: tuple[str, ...] | None = None
    slots: tuple[BookedSlot, ...] | None = None


class UpdateRequest(BookingRequest, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Body of `PUT …/appointment/{id}` (Update): the booking fields plus `id` (checked against the
    URL by the handler, so a missing one is named like any other required field)."""

    id: str | None = None


class CancelRequest(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Body of `PATCH …/appointment/{id}`: `{id, status: "Cancelled", cancellationReason, comment}`."""

    id: str | None = None
    status: str | None = None
    cancellationReason: str | None = None
    comment: str | None = None


class SlotResource(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One `resources` entry of Get Slots."""

    resourceId: str | None = None
    serviceTerritoryId: str | None = None
    serviceResourceId: str | None = None
    assetCategory: str | None = None
    resourceType: Literal["Provider", "Device"] | None = None


class SlotsRequest(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Body of `POST …/appointment-management/slots`."""

    resources: tuple[SlotResource, ...] | None = None
    channelId: str | None = None
    workTypeId: str | None = None
    startDate: str | None = None
    endDate: str | None = None
    sourceSystem: str | None = None
    appointmentTypes: tuple[str, ...] | None = None
    serviceCategories: tuple[str, ...] | None = None
    serviceTypes: tuple[str, ...] | None = None


class AvailableSlot(msgspec.Struct, kw_only=True, frozen=True):
    """One free slot of the "Get Slots Output"."""

    slotId: str
    slotStartDate: str
    slotEndDate: str
    sourceSystem: str | None  # written out as null when the request named none, as in the sample


class ResourceSlotDetails(msgspec.Struct, kw_only=True, frozen=True):
    resourceId: str
    availableSlots: list[AvailableSlot]


class SlotsOutput(msgspec.Struct, kw_only=True, frozen=True):
    """The answer of Get Slots: each entry names the resource its free slots belong to."""

    resourceSlotDetails: list[ResourceSlotDetails]


def error(code: str, message: str, *fields: str) -> SfError:
    return SfError(message=message, errorCode=code, fields=list(fields))


def missing(*fields: str) -> SfError:
    return error("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(fields)}]", *fields)


def parse_instant(value: str) -> datetime | None:
    """An ISO-8601 date-time carrying a zone, or None: a zoneless time is ambiguous to Salesforce."""
    if "T" not in value and " " not in value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def valid_time_zone(name: str) -> bool:
    if not name or name.startswith("/") or ".." in name:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]{1,64})")
_AT_PATH = re.compile(r"at `\$\.([A-Za-z_]+)")


def decode_body(body: bytes, kind: type[Any]) -> tuple[Any, dict[str, Any] | None, list[SfError]]:
    """Decode a JSON body twice: typed for the rules, raw to keep exactly what the client sent."""
    try:
        raw = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError:
        return None, None, [error("JSON_PARSER_ERROR", "The request body is not valid JSON.")]
    if not isinstance(raw, dict):
        return None, None, [error("JSON_PARSER_ERROR", "The request body must be a JSON object.")]
    try:
        typed = msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if m := _MISSING_FIELD.search(text):
            nested = _AT_PATH.search(text)
            field = nested.group(1) if nested else m.group(1)
            return None, raw, [missing(field)]
        if m := _UNKNOWN_FIELD.search(text):  # Salesforce's parser names the field it does not know
            return None, raw, [error("JSON_PARSER_ERROR", f'Unrecognized field "{m.group(1)}"')]
        nested = _AT_PATH.search(text)
        fields = [nested.group(1)] if nested else []
        # msgspec's message names types and paths ("Expected `str`, got `int` - at `$.x`"), and at
        # most a value that is not one of a field's few allowed ones.
        return None, raw, [error("JSON_PARSER_ERROR", f"Cannot deserialize the request body: {text}", *fields)]
    return typed, raw, []


def check_booking(
    booking: BookingRequest, *, require_channel_id: bool = False
) -> tuple[list[SfError], datetime | None, datetime | None]:
    """Every rule a Book or Update body breaks, with the parsed start and end when they are valid."""
    errors: list[SfError] = []

    start = end = None
    if not booking.startDate:
        errors.append(missing("startDate"))
    else:
        start = parse_instant(booking.startDate)
        if start is None:
            errors.append(
                error("INVALID_INPUT", "startDate must be an ISO-8601 date-time with a time zone.", "startDate")
            )
    if booking.endDate is not None:
        end = parse_instant(booking.endDate)
        if end is None:
            errors.append(error("INVALID_INPUT", "endDate must be an ISO-8601 date-time with a time zone.", "endDate"))
        elif start is not None and end <= start:
            errors.append(error("INVALID_INPUT", "endDate must be after startDate.", "endDate"))

    kinds: dict[str, list[str]] = {k: [] for k in PARTICIPANT_KINDS}
    if not booking.participants:
        errors.append(missing("participants"))
    else:
        for p in booking.participants:
            kind, sep, ident = p.reference.partition("/")
            if not sep or kind not in kinds or not ident or "/" in ident:
                errors.append(
                    error(
                        "INVALID_INPUT",
                        "Each participant reference must be Patient/<id>, Facility/<id>, Practitioner/<id> or Device/<id>.",
                        "participants",
                    )
                )
                continue
            kinds[kind].append(p.reference)
        if not kinds["Patient"]:
            errors.append(error("REQUIRED_FIELD_MISSING", "A Patient participant is required.", "participants"))
        if not kinds["Facility"]:
            errors.append(error("REQUIRED_FIELD_MISSING", "A Facility participant is required.", "participants"))
        if not kinds["Practitioner"] and not kinds["Device"]:
            errors.append(
                error("REQUIRED_FIELD_MISSING", "A Practitioner or a Device participant is required.", "participants")
            )

    codes_present = [name for name in CODE_ARRAYS if getattr(booking, name)]
    if not booking.workTypeId and not codes_present:
        errors.append(
            error(
                "REQUIRED_FIELD_MISSING",
                "Specify at least one of workTypeId, appointmentTypes, serviceTypes or serviceCategories.",
                "workTypeId",
                *CODE_ARRAYS,
            )
        )
    if not booking.workTypeId and codes_present and not booking.sourceSystem:
        errors.append(
            error(
                "REQUIRED_FIELD_MISSING",
                "sourceSystem is required when workTypeId is absent and codes are given.",
                "sourceSystem",
            )
        )

    if require_channel_id and not booking.channelId:
        errors.append(missing("channelId"))

    if booking.comment is not None and len(booking.comment) > MAX_COMMENT:
        errors.append(
            error("STRING_TOO_LONG", f"comment: data value too large (max length={MAX_COMMENT})", "comment")
        )

    if booking.timeZone is not None and not valid_time_zone(booking.timeZone):
        errors.append(error("INVALID_INPUT", "timeZone must be a valid IANA time zone name.", "timeZone"))

    for slot in booking.slots or ():
        if not slot.id:
            errors.append(missing("slots"))
        if slot.reference not in kinds["Practitioner"]:
            errors.append(
                error(
                    "INVALID_INPUT",
                    "Each slot's reference must match the reference of a Practitioner participant.",
                    "slots",
                )
            )

    return errors, start, end
