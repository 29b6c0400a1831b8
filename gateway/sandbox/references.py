"""Book, Update and Get Slots take the org's record ids (identity.md): `Patient/<id>` a person Account,
`Facility/<id>` a business Account, `Practitioner/<id>` an active HealthcarePractitionerFacility at the
booking's facility, `Device/<id>` an Asset, Get Slots' `resourceId` an active HPF (Provider) or an Asset
(Device). Anything else, an EHR's id above all, is refused INVALID_ID_FIELD naming the field and never the
value. Only with `SandboxConfig.require_records`, until the gateway resolves ids (issue 20).
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.sandbox.org import Org
from gateway.sandbox.rules import BookingRequest, SfError, SlotsRequest, error
from gateway.sandbox.values import looks_like_id

WHAT = {
    "Patient": "a person account",
    "Facility": "a business account",
    # inference from the Book page's samples (`Practitioner/0bS…`) and IAM's "practitioner+facility
    # combination": the HPF is the practitioner *at the booking's facility*, so another facility's is refused
    "Practitioner": "an active healthcare practitioner facility at the booking's facility",
    "Device": "an asset",
}


def _record(org: Org, ident: str, sobject: str) -> dict[str, Any] | None:
    found = org.resolve(ident) if looks_like_id(ident) else None
    return found[1] if found and found[0] == sobject else None


def record_for(org: Org, kind: str, ident: str, facilities: set[str] | None) -> dict[str, Any] | None:
    """The record a reference of `kind` names, when it is one of the right kind; `facilities`: the
    booking's facility Accounts (None: any facility, as Get Slots has none)."""
    if kind in ("Patient", "Facility"):
        account = _record(org, ident, "Account")
        return account if account and bool(account["IsPersonAccount"]) == (kind == "Patient") else None
    if kind == "Device":
        return _record(org, ident, "Asset")
    hpf = _record(org, ident, "HealthcarePractitionerFacility")
    if hpf is None or not hpf["IsActive"] or (facilities is not None and hpf["AccountId"] not in facilities):
        return None
    return hpf


def _invalid(kind: str, field: str) -> SfError:
    return error("INVALID_ID_FIELD", f"A {kind} reference must be the id of {WHAT[kind]}.", field)


def check_booking(org: Org, booking: BookingRequest) -> tuple[list[SfError], BookingRequest]:
    """The refusals a Book or Update earns for its references, and the booking with each reference's
    id written as the record's 18-character id (a 15-character id names the record it begins)."""
    full: dict[str, str] = {}
    refs = [p.reference.partition("/")[::2] for p in booking.participants]
    facilities = {r["Id"] for kind, ident in refs if kind == "Facility" and (r := record_for(org, kind, ident, None))}
    errors = []
    for kind, ident in refs:
        if kind not in WHAT or not ident:
            continue  # a malformed reference: check_booking in rules.py refuses it
        record = record_for(org, kind, ident, facilities)
        if record is None:
            errors.append(_invalid(kind, "participants"))
        else:
            full[ident] = record["Id"]
    for slot in booking.slots or ():
        kind, _, ident = slot.reference.partition("/")
        if kind == "Practitioner" and ident and record_for(org, kind, ident, facilities) is None:
            errors.append(_invalid(kind, "slots"))

    def written(reference: str) -> str:
        kind, _, ident = reference.partition("/")
        return f"{kind}/{full[ident]}" if ident in full else reference

    participants = tuple(msgspec.structs.replace(p, reference=written(p.reference)) for p in booking.participants)
    slots = tuple(msgspec.structs.replace(s, reference=written(s.reference)) for s in booking.slots or ()) or booking.slots
    return errors, msgspec.structs.replace(booking, participants=participants, slots=slots)


def check_slots(org: Org, body: SlotsRequest) -> tuple[list[SfError], dict[str, str]]:
    """Refusals for Get Slots' resources, and each resource id's 18-character id."""
    full: dict[str, str] = {}
    errors = []
    for resource in body.resources or ():
        kind = "Device" if resource.resourceType == "Device" else "Practitioner"
        record = record_for(org, kind, resource.resourceId or "", None)
        if record is None:
            errors.append(error("INVALID_ID_FIELD", f"A {resource.resourceType or 'Provider'} resource must be the id "
                                f"of {'an asset' if kind == 'Device' else 'an active healthcare practitioner facility'}.",
                                "resources"))
        else:
            full[resource.resourceId or ""] = record["Id"]
    return errors, full
