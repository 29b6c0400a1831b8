"""Health Cloud's side of Intelligent Appointment Management, played: the callouts an org with IAM
configured makes to its external scheduling system, written from scheduling-out.md §1 (never from the
gateway's routes), through its `Appointment_Management` named credential.

- `Callouts`: Find (one form-encoded line), Get Slot Status, Create, Cancel and Get Appointment, as the
  org sends them. `ehr-gateway healthcloud …` drives them from a shell.
- `IamOrg`: the sandbox behaving as such an org (`SandboxConfig.iam_url`): a Book for an external
  resource (`sourceSystem` and `slots`) is followed, once stored and answered, by the org's slot status
  and Create callouts for it (Apex makes no callout in the transaction that wrote the record, so they
  come after). What they answered is kept for `GET /sandbox/iam-callouts`. Create carries the EHR's own
  ids, which the org finds in its records (`ehr_ids`).
"""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import httpx
import msgspec

from gateway.sandbox.values import looks_like_id, parse_datetime

if TYPE_CHECKING:
    from gateway.sandbox.org import Org

CANCEL_REASONS = "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason"
# the identifiers a create carries (scheduling-out.md: the Salesforce appointment id, the Salesforce
# patient id, and with several source systems the source system); the systems are the org's own
SERVICE_APPOINTMENT_SYSTEM = "urn:salesforce:ServiceAppointment"
ACCOUNT_SYSTEM = "urn:salesforce:Account"
SOURCE_SYSTEM = "urn:salesforce:sourceSystem"


class Callouts:
    """The IAM operations against `base` (the named credential's URL), with `authorization` (the
    header the named credential sends: `Basic …` or `Bearer …`)."""

    def __init__(self, base: str, authorization: str, *, timeout: float = 10.0) -> None:
        self.base = base.rstrip("/")
        self._client = httpx.AsyncClient(timeout=timeout, headers={"Authorization": authorization})

    async def aclose(self) -> None:
        await self._client.aclose()

    async def find(self, start: str, end: str, *, practitioners: list[str] = (),  # type: ignore[assignment]
                   locations: list[str] = (), service_types: list[str] = (),  # type: ignore[assignment]
                   appointment_types: list[str] = ()) -> httpx.Response:  # type: ignore[assignment]
        """Values as the org writes them: `<sourceSystem>|<value>` with several source systems."""
        parts = [("schedule:Schedule.actor:Practitioner._id", practitioners),
                 ("schedule:Schedule.actor:Location._id", locations),
                 ("appointment-type", appointment_types), ("service-type", service_types)]
        line = "&".join(f"{name}={','.join(values)}" for name, values in parts if values)
        line += ("&" if line else "") + f"start=ge{start}&start=le{end}&status=free&_include=Slot:schedule&_sort=start"
        return await self._client.post(f"{self.base}/Slot/_search", content=line.encode(),
                                       headers={"Content-Type": "application/x-www-form-urlencoded"})

    async def slot_status(self, system: str | None, slot_id: str) -> httpx.Response:
        path = f"/Slot/{system}/{slot_id}" if system else f"/Slot/{slot_id}"
        return await self._client.get(self.base + path)

    async def create(self, system: str, slot_id: str, *, service_appointment: str, account: str, patient: str,
                     practitioner: str | None = None, service_type: str | None = None,
                     appointment_type: str | None = None, comment: str | None = None) -> httpx.Response:
        """`patient`, `practitioner`: the EHR's ids; codes: the org's work-type codes."""
        body: dict[str, Any] = {
            "resourceType": "Appointment", "status": "proposed",
            "identifier": [{"system": SERVICE_APPOINTMENT_SYSTEM, "value": service_appointment},
                           {"system": ACCOUNT_SYSTEM, "value": account}, {"system": SOURCE_SYSTEM, "value": system}],
            "cancelationReason": {"coding": []},
            "serviceType": [{"coding": [{"code": service_type}]}] if service_type else [],
            "appointmentType": {"coding": [{"code": appointment_type}]} if appointment_type else {"coding": []},
            "slot": [{"reference": f"Slot/{slot_id}"}],
            "comment": comment or "",
            "participant": [{"actor": {"reference": f"Patient/{patient}"}, "status": "accepted"}]
            + ([{"actor": {"reference": f"Practitioner/{practitioner}"}, "status": "accepted"}] if practitioner else []),
        }
        # the org sends empty elements where it has nothing: the middleware must take them
        body = {k: v for k, v in body.items() if v not in ([], {"coding": []}) or k in ("cancelationReason",)}
        return await self._client.post(f"{self.base}/Appointment/{system}", json=body,
                                       headers={"Content-Type": "application/fhir+json"})

    async def cancel(self, system: str | None, appointment_id: str, reason: str = "pat-mv") -> httpx.Response:
        path = f"/Appointment/{system}/{appointment_id}" if system else f"/Appointment/{appointment_id}"
        body = {"resourceType": "Appointment", "id": appointment_id, "status": "cancelled",
                "cancelationReason": {"coding": [{"system": CANCEL_REASONS, "code": reason}]}}
        return await self._client.post(self.base + path, json=body, headers={"Content-Type": "application/fhir+json"})

    async def read(self, system: str | None, appointment_id: str) -> httpx.Response:
        path = f"/Appointment/{system}/{appointment_id}" if system else f"/Appointment/{appointment_id}"
        return await self._client.get(self.base + path)


class Called(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the org's callouts for one ServiceAppointment answered."""

    service_appointment: str
    source_system: str
    slot: str
    slot_status: int | None = None  # HTTP status of Get Slot Status
    slot_state: str | None = None  # the Slot's status it answered
    create_status: int | None = None
    appointment_status: str | None = None  # the Appointment's status Create answered
    ehr_appointment: str | None = None  # its id: the EHR's appointment
    # the callout could not be made: its exception's type, or `no EHR patient id` / `no EHR practitioner
    # id` when the org's records hold none to send (no callout is made then)
    error: str | None = None


class EhrIds(msgspec.Struct, frozen=True):
    """What a Create sends for one booking: the EHR's patient and practitioner ids, the patient's
    Account, or why it can send nothing."""

    patient: str | None = None
    practitioner: str | None = None
    account: str | None = None
    error: str | None = None


# the Salesforce patient id a Create names when the booking's patient is not a record of the org
PLACEHOLDER_ACCOUNT = "001xx000003DGb2AAG"


def _live(identifier: dict[str, Any]) -> bool:
    end = identifier.get("EndDate")
    return end is None or (parse_datetime(end) or datetime.max.replace(tzinfo=timezone.utc)) > datetime.now(timezone.utc)


def _patient_id(org: Org, account: dict[str, Any], system: str) -> str | None:
    """The IdValue of an Identifier on the person Account or its PersonContact: one of the booking's
    source system first, else any of theirs."""
    ids = [i for i in org.identifiers_of(account["Id"], account.get("PersonContactId")) if _live(i)]
    same = [i for i in ids if i["SourceSystem"] == system]
    return (same or ids)[0]["IdValue"] if (same or ids) else None


def _practitioner_id(org: Org, hpf: dict[str, Any], system: str) -> str | None:
    """IAM: "the source system ID comes from the Healthcare Practitioner Facility record for the
    practitioner+facility combination"; else an Identifier of that system on its Contact or provider."""
    if hpf["SourceSystemIdentifier"] and hpf["SourceSystem"] in (None, system):
        return hpf["SourceSystemIdentifier"]  # type: ignore[no-any-return]
    ids = [i for i in org.identifiers_of(hpf["PractitionerId"], hpf["HealthcareProviderId"])
           if i["SourceSystem"] == system and _live(i)]
    return ids[0]["IdValue"] if ids else None


def ehr_ids(org: Org | None, booking: Any) -> EhrIds:
    """The ids a Create sends for `booking`. A reference that names no record of the org at all is an
    EHR id already (the sandbox takes those while `require_records` is off) and goes through as it is."""
    system, slot = booking.sourceSystem, booking.slots[0]
    patient = next((p.reference.partition("/")[2] for p in booking.participants
                    if p.reference.startswith("Patient/")), "")
    practitioner = slot.reference.partition("/")[2] or None
    found = org.resolve(patient) if org and looks_like_id(patient) else None
    account = PLACEHOLDER_ACCOUNT
    if found is not None:
        if found[0] != "Account" or not found[1]["IsPersonAccount"]:
            return EhrIds(error="no EHR patient id")
        account, patient = found[1]["Id"], _patient_id(org, found[1], system)  # type: ignore[arg-type,assignment]
        if not patient:
            return EhrIds(error="no EHR patient id")
    hpf = org.resolve(practitioner) if org and practitioner and looks_like_id(practitioner) else None
    if hpf is not None:
        practitioner = _practitioner_id(org, hpf[1], system) if hpf[0] == "HealthcarePractitionerFacility" else None  # type: ignore[arg-type]
        if not practitioner:
            return EhrIds(error="no EHR practitioner id")
    return EhrIds(patient=patient, practitioner=practitioner, account=account)


class IamOrg:
    """The sandbox as an org with IAM configured: callouts after each Book for an external resource."""

    def __init__(self, base: str, authorization: str, org: Org | None = None, delay_seconds: float = 0.05) -> None:
        self._base, self._authorization, self._delay = base, authorization, delay_seconds
        self._org = org
        self._lock = threading.Lock()
        self._called: list[Called] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def after_booking(self, service_appointment: str, booking: Any) -> None:
        """Called once a Book is stored; `booking` is the Book request (its `sourceSystem`, `slots`
        and `participants`). Only a booking for an external resource calls out. The EHR's ids are read
        now, from the org as the booking found it."""
        if not booking.sourceSystem or not booking.slots:
            return
        ids = ehr_ids(self._org, booking)
        task = asyncio.get_running_loop().create_task(self._call_out(service_appointment, booking, ids))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call_out(self, service_appointment: str, booking: Any, ids: EhrIds) -> None:
        await asyncio.sleep(self._delay)
        slot = booking.slots[0]
        called = Called(service_appointment=service_appointment, source_system=booking.sourceSystem, slot=slot.id)
        if ids.error is not None:
            called.error = ids.error
        else:
            await self._send(called, booking.sourceSystem, slot.id, service_appointment, ids)
        with self._lock:
            self._called.append(called)

    async def _send(self, called: Called, system: str, slot: str, service_appointment: str, ids: EhrIds) -> None:
        callouts = Callouts(self._base, self._authorization)
        try:
            status = await callouts.slot_status(system, slot)
            called.slot_status = status.status_code
            called.slot_state = status.json().get("status") if status.status_code == 200 else None
            # the org's ServiceAppointment exists already: Create tells the middleware of it whatever
            # the slot's status (a slot it booked itself reads busy)
            created = await callouts.create(system, slot, service_appointment=service_appointment,
                                            account=ids.account or PLACEHOLDER_ACCOUNT, patient=ids.patient or "",
                                            practitioner=ids.practitioner)
            called.create_status = created.status_code
            if created.status_code == 200:
                answer = created.json()
                called.appointment_status, called.ehr_appointment = answer.get("status"), answer.get("id")
        except (httpx.HTTPError, ValueError) as exc:
            called.error = type(exc).__name__
        finally:
            await callouts.aclose()

    def called(self) -> list[Called]:
        with self._lock:
            return list(self._called)

    def reset(self) -> None:
        with self._lock:
            self._called.clear()
