"""Health Cloud's operations on the EHRs' calendars: find slots across the EHRs, a slot's status, book,
cancel and read, each through the source's EHR client (gateway/ehr) in the EHR's own API.

A callout names its EHR by the source system (`source_system` of a `[sources.<name>]` with an `ehr`
table). Codes Health Cloud sends (its work-type code sets hold each source system's own codes) go to
the EHR as they came, in the code system of the map group that lists them (gateway/scheduling/to_ehr.py).

Many EHRs do not refuse a taken slot (a plain FHIR server books it again): each create holds its slot
in Redis against every other create of the gateway while the EHR is asked, the FHIR client takes a
slot as taken when a live Appointment names it, and an EHR appointment is bound to the one Salesforce
appointment that booked it (gateway/state/callouts.py).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timezone
from typing import TypeVar

import msgspec

from gateway.booking.codemaps import SourceMaps
from gateway.ehr.base import EhrClient
from gateway.ehr.model import BookRequest, EhrSlot
from gateway.errors import Conflict, EhrRefused, GatewayError, InvalidRequest, NotFound, Unavailable, cut
from gateway.scheduling.callouts import Callout, Search, SourceCriteria
from gateway.scheduling.to_ehr import book_request, slot_query
from gateway.scheduling.answers import booked_answer
from gateway.scheduling.results import Booked, Calls, Found, Kept
from gateway.settings import HealthCloudSettings, SourceSettings
from gateway.state.callouts import CalloutState
from gateway.state.idempotency import REDIS_FAILURES, IdempotencyStore
from gateway.state.links import Links

T = TypeVar("T")
_CATEGORIES = {"service_types": "serviceTypes", "appointment_types": "appointmentTypes"}


class Scheduler:
    def __init__(self, sources: Mapping[str, SourceSettings], clients: Mapping[str, EhrClient],
                 maps: Mapping[str, SourceMaps], settings: HealthCloudSettings, store: IdempotencyStore,
                 links: Links, state: CalloutState) -> None:
        """`clients`: source name -> its EHR client (sources with an `ehr` table); `store` keeps a
        record per Salesforce appointment; `links` know the appointments the first direction booked;
        `state` the EHR appointments the callouts booked, the slots being booked, the known patients."""
        self._store, self._links, self._state = store, links, state
        self._clients = {sources[name].source_system: client for name, client in clients.items()}
        self._names = {sources[name].source_system: name for name in clients}
        self._dialects = {sources[name].source_system: sources[name].adapter for name in clients}
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
            query = slot_query(self._maps.get(self._names[system]), search, criteria, system=system,
                               dialect=self._dialects[system])
            slots = await self._bounded(client.find_slots(query, calls.record(system)), system, "a slot search",
                                        self.settings.search_timeout_seconds)
            if client.keeps_slot_status:
                return Found(system, slots=slots)
            try:  # what the callouts booked stays out, whatever the EHR calls it
                booked = await self._state.booked(self._names[system], [s.id for s in slots])
            except REDIS_FAILURES:
                booked = set()  # the EHR's word alone; a create still checks the slot
            return Found(system, slots=[s for s in slots if s.id not in booked])
        except GatewayError as exc:
            return Found(system, error=exc)

    async def _bounded(self, work: Awaitable[T], system: str, what: str, seconds: float | None = None) -> T:
        """`work` within its deadline (a search's, else every other callout's), the wait for a
        connection to the EHR included: Health Cloud gives up on a callout after 10 s by default."""
        try:
            return await asyncio.wait_for(work, seconds or self.settings.call_timeout_seconds)
        except TimeoutError:
            raise Unavailable(f"the {cut(system, 64)} EHR did not answer {what} in time",
                              retry_after=self.client(system).retry_after()) from None

    # -- one slot, one appointment ----------------------------------------------------------------

    async def slot(self, system: str | None, slot_id: str, calls: Calls) -> tuple[str, EhrSlot]:
        return await self._locate([system] if system else self.systems,
                                  lambda s: self.client(s).read_slot(slot_id, calls.record(s)), "slot")

    async def read(self, system: str | None, appointment_id: str, calls: Calls) -> Kept:
        """The appointment as its EHR has it now, with the answer its create gave (None when the
        callouts did not book it)."""
        found_in, appointment = await self._locate(
            await self._in_scope(system, appointment_id),
            lambda s: self.client(s).read(appointment_id, calls.record(s)), "appointment")
        return Kept(found_in, appointment, await self._kept_answer(found_in, appointment_id))

    async def cancel(self, system: str | None, appointment_id: str, reason: str | None, calls: Calls) -> Kept:
        systems = await self._in_scope(system, appointment_id)
        if len(systems) > 1:  # the bare id's EHR is the one that has it
            systems = [(await self.read(None, appointment_id, calls)).system]
        found_in = systems[0]
        cancelled = await self._bounded(self.client(found_in).cancel(appointment_id, reason, calls.record(found_in)),
                                        found_in, "the cancel")
        kept = Kept(found_in, cancelled, await self._kept_answer(found_in, appointment_id))
        slot = cancelled.slot or kept.slot()
        if slot and cancelled.status == "cancelled":
            try:
                await self._state.unmark_booked(self._names[found_in], slot, appointment_id)
            except REDIS_FAILURES:
                pass  # Find leaves the slot out until the mark runs out; a create checks the EHR itself
        return kept

    async def _in_scope(self, system: str | None, appointment_id: str) -> list[str]:
        """The source systems whose EHR may be asked for this appointment: with `scope = "known"`,
        only those where the gateway booked it (the callouts, or the first direction); else 404, as
        for an id that does not exist, and no EHR is asked."""
        systems = [system] if system else self.systems
        for named in systems:
            self.client(named)  # an unknown source system is 404 first
        if self.settings.scope == "all":
            return systems
        try:
            known = [s for s in systems if await self._known(s, appointment_id)]
        except REDIS_FAILURES:
            raise Unavailable("the gateway's records (Redis) are unavailable", retry_after=5) from None
        if not known:
            raise NotFound("no EHR has this appointment")
        return known

    async def _known(self, system: str, appointment_id: str) -> bool:
        source = self._names[system]
        return await self._state.owner(source, appointment_id) is not None \
            or bool(await self._links.resolve(source, None, appointment_id, any_system=True))

    async def _kept_answer(self, system: str, appointment_id: str) -> bytes | None:
        try:
            return await self._state.answer(self._names[system], appointment_id)
        except REDIS_FAILURES:
            return None  # answered from the EHR alone: shaped less fully, but answered

    async def _locate(self, systems: list[str], read: Callable[[str], Awaitable[T]], what: str) -> tuple[str, T]:
        """`read` from the one source system named, or from the one EHR that knows a bare id,
        asking each at once when there are several; each within the callout's deadline."""
        if len(systems) == 1:
            return systems[0], await self._bounded(read(systems[0]), systems[0], f"the {what} read")

        async def attempt(s: str) -> T | None:
            try:
                return await self._bounded(read(s), s, f"the {what} read")
            except (NotFound, InvalidRequest):  # an id outside this EHR's grammar: not one of its own
                return None

        answers = await asyncio.gather(*(attempt(s) for s in systems), return_exceptions=True)
        known = [(s, a) for s, a in zip(systems, answers) if a is not None and not isinstance(a, BaseException)]
        if len(known) == 1:
            return known[0]  # type: ignore[return-value]
        if len(known) > 1:
            article = "an" if what[0] in "aeiou" else "a"
            raise InvalidRequest(f"several EHRs have {article} {what} of this id: name its source system in the path "
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
        self.client(system)  # an unknown source system is 404
        source = self._names[system]
        request = self.book_request(system, callout)
        salesforce_id = request.identifiers[0][1]
        try:
            from_ehr = await self._links.record(source, salesforce_id)
        except REDIS_FAILURES:
            raise Unavailable("the gateway's records (Redis) are unavailable; nothing was sent", retry_after=5) from None
        if from_ehr is not None:
            # it came from this EHR through the first direction: it is on the calendar already
            booked = await self._bounded(self._existing(system, request, calls, came_from_ehr=True), system,
                                         "the look-up")
            # the EHR's own appointment, whichever Salesforce appointment the callouts bound it to before
            return await self._bound(booked, callout, salesforce_id, exclusive=False)
        fp = hashlib.blake2b(msgspec.json.encode((request.slot, request.patient)), digest_size=16).hexdigest()
        claim = await self._store.claim(self._store.record_key(f"hc-{source}", salesforce_id), fp)
        if claim.state == "done":
            return Booked(system, None, answer=claim.body, replayed=True)
        if claim.state == "busy":
            raise Unavailable("an earlier call is booking this appointment now", retry_after=1 + claim.retry_after_ms // 1000)
        if claim.state == "mismatch":
            raise Conflict("this Salesforce appointment was booked with another slot or patient")
        try:
            booked = await asyncio.wait_for(self._book_once(system, request, calls, doubt=claim.doubt),
                                            self.settings.call_timeout_seconds)
        except TimeoutError:
            # the EHR may have taken it: the next create looks before sending again
            booked = Booked(system, None, reason=f"the {cut(system, 64)} EHR did not answer in time", in_doubt=True)
        except (NotFound, InvalidRequest):
            await self._store.park(claim)
            raise
        if booked.appointment is not None:
            booked = await self._bound(booked, callout, salesforce_id)
        if booked.appointment is None:
            # nothing known booked: the next create tries again (after a look, when this one was in doubt)
            await self._store.park(claim, in_doubt=booked.in_doubt)
            booked.answer = booked_answer(booked, callout)
            return booked
        await self._store.complete(claim, 200, booked.answer or b"")
        return booked

    async def _bound(self, booked: Booked, callout: Callout, salesforce_id: str, *, exclusive: bool = True) -> Booked:
        """The EHR appointment bound to this Salesforce appointment with the answer given, so a read or
        cancel answers the same; one bound to another Salesforce appointment already is not this one's."""
        if booked.appointment is None:
            booked.answer = booked_answer(booked, callout)
            return booked
        answer = booked_answer(booked, callout)
        try:
            owner = await self._state.bind(self._names[booked.system], booked.appointment.id, salesforce_id, answer)
        except REDIS_FAILURES:
            raise Unavailable("the booking was made but could not be recorded; retry later", retry_after=5) from None
        if owner != salesforce_id and exclusive:
            return Booked(booked.system, None, reason="the appointment found in the EHR is another Salesforce "
                                                      "appointment's; none is booked for this one")
        slot = booked.appointment.slot or callout.slot_id()
        if slot:
            try:
                await self._state.mark_booked(self._names[booked.system], slot, booked.appointment.id,
                                              _until_past(booked.appointment.end or callout.end))
            except REDIS_FAILURES:
                pass  # the EHR is asked about the slot before any create all the same
        booked.answer = answer
        return booked

    async def _book_once(self, system: str, request: BookRequest, calls: Calls, *, doubt: bool) -> Booked:
        """After a look when an earlier try may have booked it; then for a patient the EHR has, with the
        slot held against every other create of the gateway while the EHR is asked."""
        if doubt:
            found = await self._existing(system, request, calls)
            if found.appointment is not None or found.in_doubt:
                return found  # found; or the look failed, so nothing is sent: it stays in doubt
        try:
            known = await self._patient_known(system, request.patient, calls)
        except NotFound:
            raise
        except GatewayError as exc:  # nothing was booked: the next create asks again
            return Booked(system, None, reason=exc.issues[0].diagnostics)
        if not known:
            raise NotFound(f"the {cut(system, 64)} EHR has no such patient")
        source, owner = self._names[system], request.identifiers[0][1]
        hold = 3 * self.settings.call_timeout_seconds  # outlives this create, so an in-doubt one keeps it
        try:
            held = await self._state.hold_slot(source, request.slot, owner, hold)
        except REDIS_FAILURES:
            raise Unavailable("the gateway's records (Redis) are unavailable; nothing was sent", retry_after=5) from None
        if not held:
            return Booked(system, None, reason="another appointment is being booked on this slot now; nothing was sent")
        try:
            booked = await self._book(system, self.client(system), request, calls)
        except (NotFound, InvalidRequest):
            await self._release(source, request.slot, owner)
            raise
        if not booked.in_doubt:  # an in-doubt create keeps the slot until the hold runs out
            await self._release(source, request.slot, owner)
        return booked

    async def _release(self, source: str, slot: str, owner: str) -> None:
        try:
            await self._state.release_slot(source, slot, owner)
        except REDIS_FAILURES:
            pass  # the hold runs out on its own

    async def _patient_known(self, system: str, patient: str, calls: Calls) -> bool:
        """Whether the EHR has the patient: read once, then remembered (a while; an unknown one less)."""
        source, s = self._names[system], self.settings
        try:
            known = await self._state.patient_known(source, patient)
        except REDIS_FAILURES:
            known = None
        if known is not None:
            return known
        try:
            await self.client(system).patient(patient, None, calls.record(system))
            known = True
        except NotFound:
            known = False
        try:
            await self._state.remember_patient(source, patient, known, s.patient_cache_seconds if known
                                               else s.unknown_patient_cache_seconds)
        except REDIS_FAILURES:
            pass
        return known

    async def _book(self, system: str, client: EhrClient, request: BookRequest, calls: Calls) -> Booked:
        record = calls.record(system)
        try:
            return Booked(system, await client.book(request, record))
        except (NotFound, InvalidRequest):
            raise
        except EhrRefused as exc:
            # a slot taken may be taken by this very booking (its first direction, or an earlier try)
            found = await self._existing(system, request, calls)
            return found if found.appointment is not None else Booked(system, None, reason=exc.issues[0].diagnostics)
        except GatewayError as exc:
            if isinstance(exc, Unavailable) and record.status is None and not record.in_doubt:
                return Booked(system, None, reason=exc.issues[0].diagnostics)  # nothing reached the EHR
            # the EHR may have stored it (a lost answer, a 5xx after storing): look before anything else,
            # and when the look finds nothing it stays in doubt: the next create looks again first
            found = await self._existing(system, request, calls)
            if found.appointment is not None:
                return found
            return Booked(system, None, reason=exc.issues[0].diagnostics, in_doubt=True)

    async def _existing(self, system: str, request: BookRequest, calls: Calls, *,
                        came_from_ehr: bool = False) -> Booked:
        """This booking's appointment in the EHR (by its identifier where the EHR keeps one, else its
        patient, slot and time); `in_doubt` when the look-up itself failed."""
        try:
            found = await self.client(system).find_booked(request, calls.record(system))
        except GatewayError as exc:
            return Booked(system, None, reason=exc.issues[0].diagnostics, in_doubt=True)
        if found is None:
            reason = "it came from the EHR, and its patient and slot are not found booked there" if came_from_ehr \
                else "not found booked in the EHR"
            return Booked(system, None, reason=reason)
        return Booked(system, found, came_from_ehr=came_from_ehr)

    def book_request(self, system: str, callout: Callout) -> BookRequest:
        return book_request(self._maps.get(self._names[system]), callout, dialect=self._dialects[system])


def _until_past(end: str | None) -> float | None:
    """Seconds until a day after `end` (an instant), or None when it cannot be read."""
    try:
        moment = datetime.fromisoformat((end or "").replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return (moment - datetime.now(timezone.utc)).total_seconds() + 86_400
