"""Health Cloud's operations on the EHRs' calendars: find slots across the EHRs, a slot's status, book,
cancel and read, each through the source's EHR client (gateway/ehr) in the EHR's own API.

A callout names its EHR by the source system (`source_system` of a `[sources.<name>]` with an `ehr`
table). Codes Health Cloud sends (its work-type code sets) go to the EHR through the engineers' maps
read in reverse (gateway/booking/codemaps.py, `to_ehr`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from gateway.booking.codemaps import SourceMaps
from gateway.canonical import Coding
from gateway.ehr.base import EhrClient
from gateway.ehr.model import BookRequest, EhrAppointment, EhrSlot, SlotQuery
from gateway.errors import GatewayError, InvalidRequest, NotFound, Unavailable, cut
from gateway.outbound.calls import CallRecord
from gateway.scheduling.callouts import Callout, Search, SourceCriteria
from gateway.settings import HealthCloudSettings, SourceSettings

T = TypeVar("T")
# the Salesforce appointment's identifier among the three a create carries: a ServiceAppointment's
# id starts with its key prefix, 08p
SERVICE_APPOINTMENT_PREFIX = "08p"
_CATEGORIES = {"service_types": "serviceTypes", "appointment_types": "appointmentTypes"}


@dataclass(slots=True)
class Calls:
    """The EHR calls one callout made, for its log line (no patient data)."""

    ehr: list[tuple[str, CallRecord]] = field(default_factory=list)  # (source system, call)
    op: str = ""  # what the callout turned out to be (a POST to an appointment: create or cancel)

    def record(self, system: str) -> CallRecord:
        call = CallRecord()
        self.ehr.append((system, call))
        return call


@dataclass(slots=True)
class Found:
    """One source system's share of a search: its slots, or why it has none."""

    system: str
    slots: list[EhrSlot] = field(default_factory=list)
    error: GatewayError | None = None


@dataclass(slots=True)
class Booked:
    """What a create did: the EHR's appointment, or (`reason`) why nothing was booked."""

    system: str
    appointment: EhrAppointment | None
    reason: str | None = None


class Scheduler:
    def __init__(self, sources: Mapping[str, SourceSettings], clients: Mapping[str, EhrClient],
                 maps: Mapping[str, SourceMaps], settings: HealthCloudSettings) -> None:
        """`clients`: source name -> its EHR client (sources with an `ehr` table)."""
        self._clients = {sources[name].source_system: client for name, client in clients.items()}
        self._names = {sources[name].source_system: name for name in clients}
        self._maps, self.settings = maps, settings

    @property
    def systems(self) -> list[str]:
        return list(self._clients)

    def source(self, system: str) -> str:
        return self._names[system]

    def client(self, system: str) -> EhrClient:
        found = self._clients.get(system)
        if found is None:
            raise NotFound(f"no EHR is configured for the source system {cut(system, 64)}")
        return found

    # -- find ------------------------------------------------------------------------------------

    async def find(self, search: Search, calls: Calls) -> list[Found]:
        """Every named source system asked at once; one failing (or slower than
        `search_timeout_seconds`) is answered as its failure while the others stand."""
        return list(await asyncio.gather(*(self._find_one(system, criteria, search, calls)
                                           for system, criteria in search.criteria.items())))

    async def _find_one(self, system: str, criteria: SourceCriteria, search: Search, calls: Calls) -> Found:
        try:
            client = self.client(system)
            query = SlotQuery(start=search.start, end=search.end, practitioners=tuple(criteria.practitioners),
                              locations=tuple(criteria.locations),
                              service_types=self._to_ehr(system, "serviceTypes", criteria.service_types),
                              appointment_types=self._to_ehr(system, "appointmentTypes", criteria.appointment_types))
            slots = await self._bounded(client.find_slots(query, calls.record(system)), system, "a slot search")
            return Found(system, slots=slots)
        except GatewayError as exc:
            return Found(system, error=exc)

    async def _bounded(self, work: Awaitable[T], system: str, what: str) -> T:
        try:
            return await asyncio.wait_for(work, self.settings.search_timeout_seconds)
        except TimeoutError:
            raise Unavailable(f"the {cut(system, 64)} EHR did not answer {what} in time",
                              retry_after=self.client(system).retry_after()) from None

    def _to_ehr(self, system: str, category: str, codes: list[str]) -> tuple[Coding, ...]:
        """Health Cloud's codes as the EHR's: each through a map read in reverse, else refused."""
        maps = self._maps.get(self._names[system])
        found = []
        for code in codes:
            reverse = maps.to_ehr(category, code) if maps is not None else None
            if reverse is None:
                raise InvalidRequest(f"{category}: the code {cut(code, 64)} has no map to the "
                                     f"{cut(system, 64)} EHR's codes (an equivalent element or a reverse group)")
            found.append(Coding(system=reverse.system, code=reverse.code))
        return tuple(found)

    # -- one slot, one appointment ----------------------------------------------------------------

    async def slot(self, system: str | None, slot_id: str, calls: Calls) -> tuple[str, EhrSlot]:
        return await self._locate(system, lambda s: self.client(s).read_slot(slot_id, calls.record(s)), "slot")

    async def read(self, system: str | None, appointment_id: str, calls: Calls) -> tuple[str, EhrAppointment]:
        return await self._locate(system, lambda s: self.client(s).read(appointment_id, calls.record(s)),
                                  "appointment")

    async def cancel(self, system: str | None, appointment_id: str, reason: str | None,
                     calls: Calls) -> tuple[str, EhrAppointment]:
        if system is None:  # the bare id's EHR is the one that has it
            system, _ = await self.read(None, appointment_id, calls)
        return system, await self.client(system).cancel(appointment_id, reason, calls.record(system))

    async def _locate(self, system: str | None, read: Callable[[str], Awaitable[T]], what: str) -> tuple[str, T]:
        """`read` from the named source system; a bare id (no system in the path) from the one EHR
        that knows it, asking each at once when there are several."""
        if system is not None:
            return system, await read(system)
        if len(self._clients) == 1:
            only = next(iter(self._clients))
            return only, await read(only)

        async def attempt(s: str) -> T | None:
            try:
                return await read(s)
            except NotFound:
                return None

        answers = await asyncio.gather(*(attempt(s) for s in self._clients), return_exceptions=True)
        known = [(s, a) for s, a in zip(self._clients, answers) if a is not None and not isinstance(a, BaseException)]
        if len(known) == 1:
            return known[0]  # type: ignore[return-value]
        if len(known) > 1:
            raise InvalidRequest(f"several EHRs have a {what} of this id: name its source system in the path "
                                 f"(…/{what.capitalize()}/<sourceSystem>/<id>)")
        failed = next((a for a in answers if isinstance(a, GatewayError)), None)
        if failed is not None:
            raise failed
        raise NotFound(f"no EHR has this {what}")

    async def create(self, system: str, callout: Callout, calls: Calls) -> Booked:
        """Book the callout's slot in its EHR. What the EHR refuses or cannot do now is answered as
        `reason` (the answer's status is then `proposed`); a slot or patient it does not know is 404."""
        client = self.client(system)
        request = self.book_request(system, callout)
        try:
            appointment = await client.book(request, calls.record(system))
        except NotFound:
            raise
        except GatewayError as exc:
            return Booked(system, None, reason=exc.issues[0].diagnostics)
        return Booked(system, appointment)

    def book_request(self, system: str, callout: Callout) -> BookRequest:
        slot, patient = callout.slot_id(), callout.actor("Patient")
        if not slot:
            raise InvalidRequest("slot: the slot to book is required", expression=("Appointment.slot",))
        if not patient:
            raise InvalidRequest("participant: a Patient participant is required",
                                 expression=("Appointment.participant",))
        codes = [c.code for concept in callout.serviceType for c in concept.coding if c.code]
        kinds = [c.code for c in (callout.appointmentType.coding if callout.appointmentType else []) if c.code]
        return BookRequest(
            slot=slot, patient=patient, practitioner=callout.actor("Practitioner"),
            location=callout.actor("Location"), start=callout.start, end=callout.end,
            service_types=self._known(system, "serviceTypes", codes),
            appointment_types=self._known(system, "appointmentTypes", kinds),
            comment=callout.comment, identifiers=tuple(salesforce_ids(callout)),
        )

    def _known(self, system: str, category: str, codes: list[str]) -> tuple[Coding, ...]:
        """A create's codes as the EHR's where a map says so: the slot already carries what the EHR
        needs, so a code without one is left out rather than stopping the booking."""
        maps = self._maps.get(self._names[system])
        found = (maps.to_ehr(category, code) if maps is not None else None for code in codes)
        return tuple(Coding(system=r.system, code=r.code) for r in found if r is not None)


def salesforce_ids(callout: Callout) -> list[tuple[str, str]]:
    """The create's identifiers that name the Salesforce appointment (its ServiceAppointment id), as
    (system, value): what the booking is known by outside the EHR."""
    return [(i.system or "", i.value) for i in callout.identifier
            if i.value and i.value.startswith(SERVICE_APPOINTMENT_PREFIX) and len(i.value) in (15, 18)]
