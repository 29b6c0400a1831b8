"""The FHIR R4 answers Health Cloud's callouts expect (scheduling-out.md §1): Find's searchset of Slots
with their included Schedules, sorted by start, a failing EHR as an OperationOutcome entry tagged with
its source system; a Slot; the Appointment of a create, a cancel or a read."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Any

import msgspec

from gateway.booking.fhir import outcome_resource
from gateway.ehr.model import EhrAppointment, EhrSlot
from gateway.errors import Issue
from gateway.scheduling.callouts import Callout
from gateway.scheduling.results import Booked, Found, Kept

# the extension that names the source system of an entry (a failing EHR's OperationOutcome, a
# Slot or Schedule when the org has several)
SOURCE_SYSTEM_EXTENSION = "urn:ehr-gateway:extension:source-system"
SOURCE_SYSTEM_ID = "urn:ehr-gateway:source-system"  # the Appointment identifier naming its source system
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_encoder = msgspec.json.Encoder()


def _tag(system: str) -> list[dict[str, str]]:
    return [{"url": SOURCE_SYSTEM_EXTENSION, "valueString": system}]


def _schedule_id(system: str, slot: EhrSlot) -> str:
    """The EHR's schedule id when FHIR takes it as an id, else one made from what names the schedule
    (Epic has none): stable, so the same schedule is included once."""
    if slot.schedule and _FHIR_ID.fullmatch(slot.schedule):
        return slot.schedule
    made = "\x1f".join((system, slot.schedule or "", slot.practitioner or "", slot.location or ""))
    return "s" + hashlib.sha256(made.encode()).hexdigest()[:24]


def slot_resource(system: str, slot: EhrSlot, *, several: bool, schedule: str | None = None) -> dict[str, Any]:
    """`schedule`: its Schedule's id, when the caller made it already."""
    resource: dict[str, Any] = {"resourceType": "Slot", "id": slot.id}
    if several:
        resource["extension"] = _tag(system)
    if slot.service_types:
        resource["serviceType"] = [{"coding": [msgspec.to_builtins(c) for c in slot.service_types]}]
    resource |= {"schedule": {"reference": f"Schedule/{schedule or _schedule_id(system, slot)}"}, "status": slot.status,
                 "start": slot.start, "end": slot.end}
    return resource


def _schedule(system: str, slot: EhrSlot, schedule: str, *, several: bool) -> dict[str, Any]:
    actors = [{"reference": f"{kind}/{value}"} for kind, value in
              (("Practitioner", slot.practitioner), ("Location", slot.location)) if value]
    resource: dict[str, Any] = {"resourceType": "Schedule", "id": schedule}
    if several:
        resource["extension"] = _tag(system)
    return resource | {"actor": actors or [{"display": "the EHR's schedule"}]}


def _start(slot: EhrSlot) -> datetime:
    return datetime.fromisoformat(slot.start.replace("Z", "+00:00"))


def searchset(found: list[Found], warnings: list[Issue], *, several: bool, url: str) -> bytes:
    """Slots of every answering EHR sorted by start, each Schedule once after them, then an
    OperationOutcome per failing EHR (tagged) and one for what the search could not honour."""
    slots = sorted(((f.system, s, _schedule_id(f.system, s)) for f in found for s in f.slots),
                   key=lambda found: (_start(found[1]), found[0]))
    entries: list[dict[str, Any]] = [{"resource": slot_resource(system, s, several=several, schedule=schedule),
                                      "search": {"mode": "match"}} for system, s, schedule in slots]
    included: dict[str, dict[str, Any]] = {}
    for system, s, schedule in slots:
        if schedule not in included:
            included[schedule] = _schedule(system, s, schedule, several=several)
    entries += [{"resource": s, "search": {"mode": "include"}} for s in included.values()]
    for f in found:
        if f.error is not None:
            resource = msgspec.to_builtins(outcome_resource(f.error.issues))
            entries.append({"resource": {"resourceType": "OperationOutcome", "extension": _tag(f.system),
                                         "issue": resource["issue"]}, "search": {"mode": "outcome"}})
    if warnings:
        entries.append({"resource": msgspec.to_builtins(outcome_resource(warnings)), "search": {"mode": "outcome"}})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(slots),
                              "link": [{"relation": "self", "url": url}]}
    if entries:  # FHIR's JSON has no empty arrays
        bundle["entry"] = entries
    return _encoder.encode(bundle)


def slot_answer(system: str, slot: EhrSlot, *, several: bool) -> bytes:
    return _encoder.encode(slot_resource(system, slot, several=several))


def appointment_answer(system: str, appointment: EhrAppointment | None, callout: Callout | None, *,
                       status: str | None = None, reason: str | None = None) -> bytes:
    """The Appointment Health Cloud reads back: the EHR's id and status, Health Cloud's identifiers and
    codes as it sent them (with the source system), the slot and the participants. `reason`: why
    nothing was booked (`status: proposed`), in `comment`."""
    a = appointment
    identifiers = [msgspec.to_builtins(i) for i in callout.identifier] if callout else []
    identifiers += [{"system": s, "value": v} for s, v in (a.identifiers if a else ())
                    if {"system": s, "value": v} not in identifiers]
    if not any(i.get("system") == SOURCE_SYSTEM_ID for i in identifiers):
        identifiers.append({"system": SOURCE_SYSTEM_ID, "value": system})
    resource: dict[str, Any] = {"resourceType": "Appointment"}
    if a is not None:
        resource["id"] = a.id
        if a.version is not None:
            resource["meta"] = {"versionId": a.version}
    resource |= {"identifier": identifiers, "status": status or (a.status if a else "proposed")}
    if callout is not None and callout.serviceType:
        resource["serviceType"] = msgspec.to_builtins(callout.serviceType)
    elif a is not None and a.service_types:
        resource["serviceType"] = [{"coding": [msgspec.to_builtins(c) for c in a.service_types]}]
    if callout is not None and callout.appointmentType is not None:
        resource["appointmentType"] = msgspec.to_builtins(callout.appointmentType)
    start, end = (a.start, a.end) if a and a.start else ((callout.start, callout.end) if callout else (None, None))
    resource |= {k: v for k, v in (("start", start), ("end", end)) if v}
    slot = a.slot if a and a.slot else (callout.slot_id() if callout else None)
    if slot:
        resource["slot"] = [{"reference": f"Slot/{slot}"}]
    if reason:
        resource["comment"] = reason
    resource["participant"] = _participants(a, callout)
    return _encoder.encode(resource)


def _participants(a: EhrAppointment | None, callout: Callout | None) -> list[dict[str, Any]]:
    found = []
    for kind in ("Patient", "Practitioner", "Location"):
        value = getattr(a, kind.lower(), None) if a else None
        value = value or (callout.actor(kind) if callout else None)
        if value:
            found.append({"actor": {"reference": f"{kind}/{value}"}, "status": "accepted"})
    return found or [{"actor": {"display": "unknown"}, "status": "needs-action"}]


def booked_answer(booked: Booked, callout: Callout) -> bytes:
    if booked.answer is not None:
        return booked.answer
    if booked.appointment is None:
        return appointment_answer(booked.system, None, callout, status="proposed", reason=booked.reason)
    return appointment_answer(booked.system, booked.appointment, callout)


def kept_answer(kept: Kept, callout: Callout | None) -> bytes:
    """A read's or a cancel's answer, shaped as its create's where one was kept (Health Cloud's codes,
    identifiers and participants, as it sent them), with the EHR's status and version now."""
    if kept.answer is None:
        return appointment_answer(kept.system, kept.appointment, callout)
    resource = msgspec.json.decode(kept.answer)
    a = kept.appointment
    resource["status"] = a.status
    resource.pop("meta", None)
    if a.version is not None:
        resource = {"resourceType": "Appointment", "id": resource.get("id", a.id), "meta": {"versionId": a.version},
                    **{k: v for k, v in resource.items() if k not in ("resourceType", "id")}}
    if callout is not None and callout.cancelationReason is not None:
        resource["cancelationReason"] = msgspec.to_builtins(callout.cancelationReason)
    return _encoder.encode(resource)
