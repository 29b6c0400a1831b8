"""Health Cloud's operations on the EHRs' calendars: find slots across the EHRs, a slot's status, book,
cancel and read, each through the source's EHR client (gateway/ehr) in the EHR's own API.

A callout names its EHR by the source system (`source_system` of a `[sources.<name>]` with an `ehr`
table). Codes Health Cloud sends (its work-type code sets) go to the EHR through the engineers' maps
read in reverse (gateway/booking/codemaps.py, `to_ehr`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import msgspec

from gateway.booking.codemaps import SourceMaps
from gateway.ehr.base import EhrClient
from gateway.ehr.model import BookRequest, EhrAppointment, EhrSlot
from gateway.errors import Conflict, EhrRefused, GatewayError, InvalidRequest, NotFound, Unavailable, cut
from gateway.scheduling.callouts import Callout, Search, SourceCriteria
from gateway.scheduling.to_ehr import book_request, slot_query
from gateway.scheduling.answers import booked_answer
from gateway.scheduling.results import Booked, Calls, Found
from gateway.settings import HealthCloudSettings, SourceSettings
from gateway.state.idempotency import REDIS_FAILURES, IdempotencyStore
from gateway.state.links import Links

T = TypeVar("T")
_CATEGORIES = {"service_types": "serviceTypes", "appointment_types": "appointmentTypes"}


class Scheduler:
    def __init__(self, sources: Mapping[str, SourceSettings], clients: Mapping[str, EhrClient],
                 maps: Mapping[str, SourceMaps], settings: HealthCloudSettings, store: IdempotencyStore,
                 links: Links) -> None:
        """`clients`: source name -> its EHR client (sources with an `ehr` table); `store` keeps a
        record per Salesforce appointment; `links` know the appointments the first direction booked."""
        self._store, self._links = store, links
        self._clients = {sources[name].source_system: client for name, client in clients.items()}
        self._names = {sources[name].source_system: name for name in clients}
        self._maps, self.settings = maps, settings

    @property
    def systems(self) -> list[str]:
        return list(self._clients)

    def source(self, system: str) -> str:
        return self._names[system]

    def names(self) -> dict[str, str]:
        """Source system -> source name."""
        return dict(self._names)

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
            query = slot_query(self._maps.get(self._names[system]), search, criteria, system=system)
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
        """Book the callout's slot in its EHR, once per Salesforce appointment: its record (the
        bookings' machinery: a lease, in doubt, taken over) answers a repeated create as the first
        was answered. What the EHR refuses or cannot do is answered as `reason` (status `proposed`);
        a slot or patient it does not know is 404."""
        client, source = self.client(system), self._names[system]
        request = self.book_request(system, callout)
        salesforce_id = request.identifiers[0][1]
        try:
            from_ehr = await self._links.record(source, salesforce_id)
        except REDIS_FAILURES:
            raise Unavailable("the gateway's records (Redis) are unavailable; nothing was sent", retry_after=5) from None
        if from_ehr is not None:
            # it came from this EHR through the first direction: it is on the calendar already
            return await self._existing(system, request, calls, came_from_ehr=True)
        fp = hashlib.blake2b(msgspec.json.encode((request.slot, request.patient)), digest_size=16).hexdigest()
        claim = await self._store.claim(self._store.record_key(f"hc-{source}", salesforce_id), fp)
        if claim.state == "done":
            return Booked(system, None, answer=claim.body, replayed=True)
        if claim.state == "busy":
            raise Unavailable("an earlier call is booking this appointment now", retry_after=1 + claim.retry_after_ms // 1000)
        if claim.state == "mismatch":
            raise Conflict("this Salesforce appointment was booked with another slot or patient")
        booked = await self._existing(system, request, calls) if claim.doubt else None
        if booked is None or booked.appointment is None:
            booked = await self._book(system, client, request, calls)
        if booked.appointment is None:
            # nothing known booked: the next create tries again (after a look, when this one was in doubt)
            await self._store.park(claim, in_doubt=booked.in_doubt)
            return booked
        booked.answer = booked_answer(booked, callout)
        await self._store.complete(claim, 200, booked.answer)
        return booked

    async def _book(self, system: str, client: EhrClient, request: BookRequest, calls: Calls) -> Booked:
        try:
            return Booked(system, await client.book(request, calls.record(system)))
        except (NotFound, InvalidRequest):
            raise
        except EhrRefused as exc:
            # a slot taken may be taken by this very booking (its first direction, or an earlier try)
            found = await self._existing(system, request, calls)
            return found if found.appointment is not None else Booked(system, None, reason=exc.issues[0].diagnostics)
        except GatewayError as exc:
            # the EHR may have stored it (a lost answer, a 5xx after storing): look before anything else
            found = await self._existing(system, request, calls)
            if found.appointment is not None:
                return found
            return Booked(system, None, reason=exc.issues[0].diagnostics, in_doubt=found.in_doubt)

    async def _existing(self, system: str, request: BookRequest, calls: Calls, *,
                        came_from_ehr: bool = False) -> Booked:
        """This booking's appointment in the EHR, by its patient, slot and time (the EHR keeps no
        Salesforce id); `in_doubt` when the look-up itself failed."""
        looked = msgspec.structs.replace(request, identifiers=())
        try:
            found = await self.client(system).find_booked(looked, calls.record(system))
        except GatewayError as exc:
            return Booked(system, None, reason=exc.issues[0].diagnostics, in_doubt=True)
        if found is None:
            reason = "it came from the EHR, and its patient and slot are not found booked there" if came_from_ehr \
                else "not found booked in the EHR"
            return Booked(system, None, reason=reason)
        return Booked(system, found, came_from_ehr=came_from_ehr)

    def book_request(self, system: str, callout: Callout) -> BookRequest:
        return book_request(self._maps.get(self._names[system]), callout)
