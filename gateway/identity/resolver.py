"""The Resolver: a booking's participants as the org's records.

`find` answers each EHR id from the cache (gateway/state/identities.py) and asks the org for the rest
in one call (queries.py), one look-up in flight per id across workers; `references` then turns what
was found into the Book body's references, or refuses: a participant the org does not hold, or holds
twice, is `Unmatched` (422, naming the element, never the id), a patient it does not hold yet is
`PatientUnknown` (the source's policy decides). A practitioner is the active HealthcarePractitioner
Facility of that practitioner at the booking's facility (its first Location), effective on the
appointment's day.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Iterable, Sequence

import msgspec

from gateway.canonical import CanonicalBooking, Participant
from gateway.errors import Issue, PatientUnknown, SalesforceFailed, Unavailable, Unmatched
from gateway.identity import queries
from gateway.identity.model import WORDS, EhrId, Found, Hpf, IdentityRecord, ehr_id
from gateway.ids import new_id
from gateway.outbound.calls import CallRecord
from gateway.salesforce.client import SalesforceClient
from gateway.salesforce.wire import CompositeSub, CompositeSubAnswer
from gateway.settings import IdentitySettings, SourceSettings
from gateway.state.idempotency import REDIS_FAILURES
from gateway.state.identities import Flights, IdentityCache, digest, settle

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Found)
# Book's reference kind for each participant kind (a PractitionerRole books as its HPF, a Practitioner)
_SF_KIND = {"patient": "Patient", "location": "Facility", "practitioner": "Practitioner", "role": "Practitioner",
            "device": "Device"}


class Resolver:
    def __init__(self, sources: dict[str, SourceSettings], cache: IdentityCache, client: SalesforceClient,
                 settings: IdentitySettings) -> None:
        self._sources, self._cache, self._client, self._settings = sources, cache, client, settings
        self._flights = Flights()
        self._ids: dict[tuple[str, tuple[Participant, ...]], tuple[EhrId, ...]] = {}
        self._refs: dict[tuple[object, ...], tuple[str, ...]] = {}
        # what this worker read of the cache lately: an id the org holds -> (until when, the cached value)
        self._local: dict[EhrId, tuple[float, bytes]] = {}
        self._local_s = settings.local_cache_seconds
        hours = int(settings.cache_hours * 3_600_000)
        self._ttl_ms = {"patient": int(settings.patient_cache_seconds * 1000), "location": hours,
                        "practitioner": hours, "role": hours, "device": hours}
        self._miss_ms = int(settings.miss_cache_seconds * 1000)

    def ids(self, source: str, booking: CanonicalBooking) -> tuple[EhrId, ...]:
        """Each participant's EHR id as the org keeps it, in the booking's order."""
        return self.ids_of(source, booking.participants)

    def ids_of(self, source: str, participants: Sequence[Participant]) -> tuple[EhrId, ...]:
        """Worked out once per worker for the same participants (the same people book again and again)."""
        key = (source, tuple(participants))
        found = self._ids.get(key)
        if found is None:
            if len(self._ids) >= _MEMO:  # a bound, not an eviction policy
                self._ids.clear()
            settings = self._sources[source]
            found = self._ids[key] = tuple(ehr_id(p, settings) for p in participants)
        return found

    async def cached(self, ids: Sequence[EhrId]) -> dict[EhrId, Found]:
        """What the cache holds for `ids` (one MGET); an id it does not hold is left out."""
        return await self.collect(ids, self.ask_cache(ids))

    def ask_cache(self, ids: Sequence[EhrId]) -> Asked:
        """The cache asked for `ids` now, in the round trip of the call the caller makes next
        (`collect` reads the answer); or, when this worker read every one of them from it within
        `local_cache_seconds` (and found it), that answer again, with no round trip at all."""
        if self._local_s > 0:
            now, local, answer = time.monotonic(), self._local, []
            for i in dict.fromkeys(ids):
                hit = local.get(i)
                if hit is None or hit[0] < now:
                    break
                answer.append(hit[1])
            else:
                return _known(tuple(ids), tuple(answer))
        return self._cache.get_soon(_names(tuple(ids)))

    def unread(self, asked: Asked) -> None:
        """An answer of the cache that will not be read (the booking was replayed, or the claim failed)."""
        if not isinstance(asked, Known):
            settle(asked)

    async def collect(self, ids: Sequence[EhrId], asked: Asked) -> dict[EhrId, Found]:
        """The cache's answer: what it holds for each id (`Known`, which remembers the answer it was read from)."""
        if isinstance(asked, Known):
            return asked
        try:
            values = await asked
        except REDIS_FAILURES:
            return {}  # the org is the truth, the cache only spares it: ask it
        self._keep(dict.fromkeys(ids), values)
        return _known(tuple(ids), tuple(values))

    def _keep(self, ids: Iterable[EhrId], values: Iterable[bytes | None]) -> None:
        """What the cache said of ids the org holds, kept in this worker for `local_cache_seconds`
        (a miss never: a patient may be about to arrive)."""
        if self._local_s <= 0:
            return
        until = time.monotonic() + self._local_s
        if len(self._local) >= _MEMO:
            self._local.clear()
        for i, v in zip(ids, values):
            if v is not None and _found(v).known:
                self._local[i] = (until, v)

    async def forget_all(self) -> int:
        """Every cached record dropped, this worker's at once; the other workers' within their
        `local_cache_seconds`. How many cache keys went."""
        self._local.clear()
        return await self._cache.forget()

    async def find(self, ids: Sequence[EhrId], record: IdentityRecord, cached: dict[EhrId, Found] | None = None,
                   *, fresh: bool = False) -> dict[EhrId, Found]:
        """What the org holds for each id: the cache's answer (`cached`, if already read), the rest
        asked of the org in one call. `fresh`: an id the cache remembers as missing is asked again.
        Raises Unavailable when the org cannot be asked."""
        found = cached if cached is not None else await self.cached(ids)
        if fresh:
            found = {i: f for i, f in found.items() if f.known}
        missing = [i for i in dict.fromkeys(ids) if i not in found]
        record.cached += len(found) if not missing else len(set(ids)) - len(missing)
        if missing:
            found = dict(found)  # what the cache said, and the rest: no longer one answer of the cache
            found.update(await self._in_flight(missing, record))
        return found

    def explain(self, booking: CanonicalBooking, ids: Sequence[EhrId],
                found: dict[EhrId, Found]) -> list[tuple[str | None, Issue | None]]:
        """For each participant: its record (a Book reference's id), or why it has none. A practitioner
        is looked for at the booking's facility (its first Location the org holds), on its day."""
        facility = next((found[i].records[0] for p, i in zip(booking.participants, ids)
                         if p.kind == "Facility" and len(found[i].records) == 1), None)
        day = _day(booking)
        rows: list[tuple[str | None, Issue | None]] = []
        for p, i in zip(booking.participants, ids):
            if i.kind in ("practitioner", "role"):
                rows.append(_hpf_at(p, i, found[i], facility, day) if facility else (None, None))
            else:
                rows.append(_one(p, i, found[i]))
        return rows

    def ready(self, booking: CanonicalBooking, ids: tuple[EhrId, ...], cached: dict[EhrId, Found] | None,
              record: IdentityRecord) -> tuple[str, ...] | None:
        """The references, when this worker worked them out before for the same ids and the same answer
        of the cache on the same day (the hot path: no look-up, nothing to work out); else None."""
        memo = _memo(booking, ids, cached)
        refs = self._refs.get(memo) if memo is not None else None
        if refs is not None and cached is not None:
            record.cached += len(cached)
        return refs

    def references(self, booking: CanonicalBooking, ids: Sequence[EhrId], found: dict[EhrId, Found]) -> tuple[str, ...]:
        """The Book body's reference for each participant, in order; raises Unmatched for a gap (with
        the patient's problem too, if it has one), else PatientUnknown for a patient the org lacks.
        The same ids with the same answer of the cache on the same day give the same references:
        worked out once per worker."""
        memo = _memo(booking, ids, found)
        if memo is not None and (refs := self._refs.get(memo)) is not None:
            return refs
        refs = self._references(booking, ids, found)
        if memo is not None:
            if len(self._refs) >= _MEMO:
                self._refs.clear()
            self._refs[memo] = refs
        return refs

    def _references(self, booking: CanonicalBooking, ids: Sequence[EhrId], found: dict[EhrId, Found]) -> tuple[str, ...]:
        gaps: list[Issue] = []
        patient: Issue | None = None
        refs: list[str] = []
        for i, (record, issue) in zip(ids, self.explain(booking, ids, found)):
            if record is not None:
                refs.append(f"{_SF_KIND[i.kind]}/{record}")
            elif i.kind == "patient" and issue is not None and issue.code == "not-found":
                patient = issue
            elif issue is not None:
                gaps.append(issue)
        if gaps:
            raise Unmatched(issues=gaps + ([patient] if patient else []))
        if patient is not None:
            raise PatientUnknown(issues=[patient])
        return tuple(refs)

    def resources(self, actors: Sequence[Participant], ids: Sequence[EhrId], found: dict[EhrId, Found],
                  location: tuple[Participant, EhrId] | None) -> list[tuple[str, ...]]:
        """A slot search's resources, for each actor: a device's Asset; a practitioner's HPF at the
        search's location, or, with none named, its HPFs at every facility. Raises Unmatched."""
        issues: list[Issue] = []
        facility = None
        if location is not None:
            facility, issue = _one(location[0], location[1], found[location[1]])
            issues += [issue] if issue else []
        out: list[tuple[str, ...]] = []
        for p, i in zip(actors, ids):
            f = found[i]
            if i.kind not in ("practitioner", "role"):
                record, issue = _one(p, i, f)
                out.append((record,) if record else ())
            elif facility is not None:
                record, issue = _hpf_at(p, i, f, facility, None)
                out.append((record,) if record else ())
            else:
                out.append(tuple(dict.fromkeys(h.id for h in f.hpfs)))
                issue = None if out[-1] else _hpf_at(p, i, f, "", None)[1]
            issues += [issue] if issue else []
        if issues:
            raise Unmatched(issues=issues)
        return out

    async def remember(self, ehr: EhrId, found: Found) -> None:
        """What the gateway itself made in the org (a patient it created), cached as if looked up."""
        value = _encoder.encode(found)
        self._keep([ehr], [value])
        try:
            await self._cache.put([(_name(ehr), value, self._ttl_ms[ehr.kind])])
        except REDIS_FAILURES:
            pass

    # -- asking the org ---------------------------------------------------------------------------

    async def _in_flight(self, missing: list[EhrId], record: IdentityRecord) -> dict[EhrId, Found]:
        """Ids another task of this worker is already asking for are awaited; the rest asked here."""
        names = {i: _name(i) for i in missing}
        theirs = {i: f for i in missing if (f := self._flights.running(names[i])) is not None}
        own = [i for i in missing if i not in theirs]
        found: dict[EhrId, Found] = {}
        if own:
            found.update(await self._flights.run([names[i] for i in own], lambda: self._across_workers(own, record)))
        for i, flight in theirs.items():
            answer = await flight
            found[i] = answer[i] if i in answer else (await self._ask([i], record))[i]
        return found

    async def _across_workers(self, ids: list[EhrId], record: IdentityRecord) -> dict[EhrId, Found]:
        """Ids no other worker is asking for are asked now, under a short lock each; the others are
        waited for in the cache, and asked here only if they did not come in time."""
        token, wait = new_id(), self._settings.lookup_wait_seconds
        names = [_name(i) for i in ids]
        try:
            taken = await self._cache.lock(names, token, int(wait * 1000))
        except REDIS_FAILURES:
            taken = [True] * len(ids)  # no lock to take: ask, at worst twice
        mine = [i for i, t in zip(ids, taken) if t]
        theirs = [i for i, t in zip(ids, taken) if not t]
        record.waited += len(theirs)

        async def ask_mine() -> dict[EhrId, Found]:
            try:
                return await self._ask(mine, record) if mine else {}
            finally:
                try:
                    await self._cache.unlock([_name(i) for i in mine], token)
                except REDIS_FAILURES:
                    pass  # the locks lapse on their own

        async def wait_theirs() -> dict[EhrId, Found | None]:
            if not theirs:
                return {}
            try:
                values = await self._cache.wait([_name(i) for i in theirs], wait)
            except REDIS_FAILURES:
                values = [None] * len(theirs)
            return {i: _decoder.decode(v) if v is not None else None for i, v in zip(theirs, values)}

        found, waited = await asyncio.gather(ask_mine(), wait_theirs())
        late = [i for i, f in waited.items() if f is None]
        found.update({i: f for i, f in waited.items() if f is not None})
        if late:
            found.update(await self._ask(late, record))
        return found

    async def _ask(self, ids: list[EhrId], record: IdentityRecord) -> dict[EhrId, Found]:
        """One call to the org per MAX_VALUES distinct values (a booking's few: one call), the answers cached."""
        self._check_allowance()
        found: dict[EhrId, Found] = {}
        for chunk in _chunks(ids):
            call = CallRecord()
            planned = queries.plan(chunk)
            try:
                if len(planned) == 1:  # one query needs no Composite around it (still one API call)
                    rows = await self._client.query(planned[0][1], call)
                    answers = [CompositeSubAnswer(200, planned[0][0], {"records": rows, "done": True})]
                else:
                    data = self._client.data_path
                    answers = await self._client.composite(
                        [CompositeSub(method="GET", url=f"{data}/query?{queries.query_string(soql)}", referenceId=ref)
                         for ref, soql in planned], call)
                answer = queries.read(chunk, answers)
            except queries.LookupFailed as failed:
                call.error_code = failed.code
                raise SalesforceFailed("the org's answer to the identity look-up cannot be read",
                                       details_code=failed.code, retry_after=30) from None
            finally:
                record.calls += 1
                record.looked_up += len(chunk)
                record.call = call
            found.update(answer)
        values = {i: _encoder.encode(f) for i, f in found.items()}
        self._keep(values, values.values())
        try:
            await self._cache.put([(_name(i), v, self._ttl_ms[i.kind] if found[i].known else self._miss_ms)
                                   for i, v in values.items()])
        except REDIS_FAILURES:
            pass  # found, not kept: the next booking asks again
        return found

    def _check_allowance(self) -> None:
        """Look-ups never spend the org's last share of its daily allowance (Sforce-Limit-Info, as
        last answered): bookings whose people are cached still go."""
        usage = self._client.usage
        if usage.limit and usage.used >= usage.limit * (1 - self._settings.api_reserve_percent / 100):
            raise Unavailable("the org's daily API allowance is nearly spent: identity look-ups wait for it",
                              retry_after=300, details_code="API_ALLOWANCE_RESERVED")


_MEMO = 16_384  # entries of a worker's memos of what the same people come to, again and again
Asked = Awaitable[list[bytes | None]]  # the cache's answer to come (or, `Known`, already here)


class Known(dict[EhrId, Found]):
    """What the cache held for a booking's ids, and the answer (its raw values) it was read from."""

    __slots__ = ("answer",)

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.answer: tuple[bytes | None, ...] = ()


@functools.lru_cache(maxsize=4_096)
def _names(ids: tuple[EhrId, ...]) -> tuple[str, ...]:
    return tuple(_name(i) for i in dict.fromkeys(ids))


@functools.lru_cache(maxsize=4_096)
def _known(ids: tuple[EhrId, ...], answer: tuple[bytes | None, ...]) -> Known:
    """The cache's answer for ids, read once per worker for the same answer (callers never change it)."""
    known = Known((i, _found(v)) for i, v in zip(dict.fromkeys(ids), answer) if v is not None)
    known.answer = answer
    return known


@functools.lru_cache(maxsize=16_384)
def _name(ehr: EhrId) -> str:
    """The id's cache key name (a digest: a patient's id is patient data); the same ids come again
    and again, so each is hashed once."""
    return digest(ehr.kind, ehr.system, ehr.value)


@functools.lru_cache(maxsize=4_096)
def _found(value: bytes) -> Found:
    """A cached value read (the same few bytes for the same people, booking after booking)."""
    return _decoder.decode(value)


def _day(booking: CanonicalBooking) -> str | None:
    """The appointment's day (YYYY-MM-DD), on which a practitioner's HPF must be effective."""
    return booking.start.text[:10] if booking.start else None


def _memo(booking: CanonicalBooking, ids: Sequence[EhrId], found: dict[EhrId, Found] | None) -> tuple[object, ...] | None:
    """The key of a worker's memo of references: the same ids, the same answer of the cache, the same
    day give the same references (None: the answer was not the cache's alone, so nothing to key on)."""
    return (tuple(ids), found.answer, _day(booking)) if isinstance(found, Known) else None


def _chunks(ids: list[EhrId]) -> list[list[EhrId]]:
    chunks: list[list[EhrId]] = [[]]
    values: set[str] = set()
    for i in ids:
        if i.value not in values and len(values) >= queries.MAX_VALUES:
            chunks.append([])
            values = set()
        values.add(i.value)
        chunks[-1].append(i)
    return chunks


def _where(ehr: EhrId) -> str:
    return f"(Identifier.SourceSystem {ehr.system!r})"


def _gap(p: Participant, code: str, diagnostics: str) -> tuple[None, Issue]:
    """No one record for the participant: its element named, and the SourceSystem, never its id."""
    return None, Issue(code=code, expression=(p.path,), diagnostics=diagnostics)


def _one(p: Participant, ehr: EhrId, found: Found) -> tuple[str | None, Issue | None]:
    if len(found.records) == 1:
        return found.records[0], None
    word = WORDS[ehr.kind]
    if not found.records:
        return _gap(p, "not-found", f"the org holds no {word} for this id {_where(ehr)}")
    return _gap(p, "multiple-matches", f"this id names {len(found.records)} {word} records in the org {_where(ehr)}; "
                                       "it must name one")


def _hpf_at(p: Participant, ehr: EhrId, found: Found, facility: str, day: str | None) -> tuple[str | None, Issue | None]:
    """The one active HPF of this practitioner (or role) at the booking's facility on its day."""
    here: list[Hpf] = list({h.id: h for h in found.hpfs if h.account == facility and h.covers(day)}.values())
    if len(here) == 1:
        return here[0].id, None
    word = WORDS[ehr.kind]
    if len(here) > 1:
        return _gap(p, "multiple-matches", f"this {word} has {len(here)} HealthcarePractitionerFacility records at "
                                           f"the booking's facility {_where(ehr)}; it must have one")
    if not found.known:
        return _gap(p, "not-found", f"the org holds no {word} for this id {_where(ehr)}")
    return _gap(p, "not-found", f"the org holds no active HealthcarePractitionerFacility for this {word} at the "
                                f"booking's facility {_where(ehr)} (the practitioner–facility pair)")
