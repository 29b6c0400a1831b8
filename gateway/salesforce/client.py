"""The Salesforce appointment-management client.

Calls go through gateway/outbound (the gateway's own HTTP/1.1 client, and the call every called
system shares: breaker, token, renewal). Answers are read leniently, because Salesforce's own samples
disagree: an object or a one-element array, `error` or `errorMessages`, status in any case, 200 or
201; `isSuccess: false` is a refusal.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar, get_args

import msgspec

from gateway.state.breaker import CircuitBreaker
from gateway.errors import SalesforceFailed, SalesforceRefused, Unavailable
from gateway.outbound.calls import Caller, CallRecord
from gateway.outbound.http import Answer, HttpClient
from gateway.salesforce.auth import TokenProvider
from gateway.salesforce.wire import (
    AvailableSlot,
    BookingRequest,
    CancelRequest,
    CompositeAnswer,
    CompositeRequest,
    CompositeSub,
    CompositeSubAnswer,
    FoundSlots,
    FreeSlot,
    SfParticipant,
    SlotsAnswer,
    SlotsRequest,
)
from gateway.settings import SalesforceConnection, SalesforceTuning

_LIMIT_INFO = re.compile(r"api-usage=(\d+)/(\d+)")
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Booked:
    id: str
    status: str


@dataclass(slots=True)
class ApiUsage:
    used: int = 0
    limit: int = 0


def soql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _soql_datetime(value: str) -> str | None:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# Salesforce's clock and Redis's may disagree; a booking made this long before the first attempt is
# still not ours.
_CLOCK_MARGIN_MS = 120_000


def lookup_query(request: BookingRequest, since_ms: int) -> str | None:
    """The SOQL that finds the appointment a booking request would have created, in standard
    ServiceAppointment fields only: patient (ParentRecordId), facility (ServiceTerritoryId), times,
    work type, and CreatedDate since the first attempt. None when the request has no patient."""
    refs = {p.reference.partition("/")[0]: p.reference.partition("/")[2] for p in reversed(request.participants)}
    patient = refs.get("Patient")
    if not patient:
        return None
    where = [f"ParentRecordId = {soql_string(patient)}", "Status != 'Canceled'"]
    if facility := refs.get("Facility"):
        where.append(f"ServiceTerritoryId = {soql_string(facility)}")
    for field, value in (("SchedStartTime", request.startDate), ("SchedEndTime", request.endDate)):
        if value and (literal := _soql_datetime(value)):
            where.append(f"{field} = {literal}")
    if request.workTypeId:
        where.append(f"WorkTypeId = {soql_string(request.workTypeId)}")
    since = datetime.fromtimestamp(max(0, since_ms - _CLOCK_MARGIN_MS) / 1000, timezone.utc)
    where.append(f"CreatedDate >= {since.strftime('%Y-%m-%dT%H:%M:%SZ')}")
    return f"SELECT Id FROM ServiceAppointment WHERE {' AND '.join(where)} ORDER BY CreatedDate ASC LIMIT 2"


# Salesforce's record ids: 15 or 18 letters and digits. Anything else in an answer is not an id of
# Salesforce's (it would go into Location and the body): the booking is then in doubt.
SALESFORCE_ID = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")
# refusals Salesforce documents as made before any processing: the request certainly stored nothing
_NOT_PROCESSED = frozenset({"REQUEST_LIMIT_EXCEEDED"})


def _salesforce_errors(payload: Any) -> list[dict[str, Any]] | None:
    """The errors of an answer in Salesforce's own error shape (a JSON array of objects with an
    `errorCode`, or the appointment API's object with `isSuccess: false`); None for anything else
    (an HTML page, a proxy's text, an empty body): that answer did not come from Salesforce."""
    if isinstance(payload, list) and payload and all(
            isinstance(e, dict) and isinstance(e.get("errorCode"), str) for e in payload):
        return payload
    if isinstance(payload, dict):
        lowered = {k.lower(): v for k, v in payload.items()}
        if isinstance(lowered.get("errorcode"), str):
            return [payload]
        errs = _errors(lowered.get("error")) or _errors(lowered.get("errormessages"))
        success = lowered.get("issuccess")
        if success is False or (success is None and errs):
            return errs or [{"message": "isSuccess is false"}]
    return None


def _decode(content: bytes) -> Any:
    try:
        return msgspec.json.decode(content) if content else None
    except msgspec.DecodeError:
        return None


def _unhealthy(response: Answer) -> bool:
    """An answer that says Salesforce (or the way to it) cannot serve: a 5xx, a 401, 408 or 429, the
    spent allowance, a redirect, or any other 4xx that is not in Salesforce's error shape (an
    intermediary's). A refusal of the request itself is an answer, not a failure."""
    status = response.status
    if status < 300:
        return False
    if status >= 500 or status < 400 or status in (401, 408, 429):
        return True
    errs = _salesforce_errors(_decode(response.content))
    return errs is None or any(e.get("errorCode") in _NOT_PROCESSED for e in errs)


def _instance(token: Any) -> str:
    return token.instance_url  # Salesforce's calls go to the instance its token names


def _is_invalid_session(response: Answer) -> bool:
    try:
        errs = _errors(msgspec.json.decode(response.content))
    except msgspec.DecodeError:
        return True  # a 401 with no readable body is still an auth failure
    return not errs or any(str(e.get("errorCode", "")).upper() == "INVALID_SESSION_ID" for e in errs)


def _errors(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, list):
        return [e if isinstance(e, dict) else {"message": str(e)} for e in value]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, str) and value:
        return [{"message": value}]
    return []


def _code(errs: list[dict[str, Any]]) -> str | None:
    """The first errorCode, bounded: it goes into logs, metrics and the EHR's answer."""
    code = next((str(e.get("errorCode")) for e in errs if e.get("errorCode")), None)
    return code[:64] if code else None


def error_codes(body: Any) -> list[str]:
    """Each errorCode of a Salesforce error body (an error list, or one error, as a Composite
    subrequest answers), bounded as `_code`'s; never a message (it may quote values)."""
    return [str(e["errorCode"])[:64] for e in _errors(body) if e.get("errorCode")]


def _scrub(message: str, request: BookingRequest) -> str:
    """Salesforce messages may quote values; never pass a patient's identifiers or comment on."""
    for p in request.participants:
        ident = p.reference.partition("/")[2]
        if ident:
            message = message.replace(ident, "[redacted]")
    if request.comment:
        message = message.replace(request.comment, "[redacted]")
    return message[:300]


_S = TypeVar("_S", bound=msgspec.Struct)


class _Lenient:
    """Decoded JSON into a wire Struct, read as Salesforce's samples need: keys in any case, keys the
    Struct does not name ignored, and an element of a list of objects that does not fit left out
    (counted in `skipped`) rather than failing the whole answer."""

    def __init__(self) -> None:
        self.skipped = 0

    def read(self, value: Any, kind: type[_S]) -> _S | None:
        if not isinstance(value, dict):
            return None
        fields = _lenient_fields(kind)
        clean: dict[str, Any] = {}
        for key, item in value.items():
            field = fields.get(key.lower()) if isinstance(key, str) else None
            if field is None:
                continue
            name, element = field
            if element is not None and isinstance(item, list):
                read = [self.read(e, element) for e in item]
                self.skipped += read.count(None)
                item = [e for e in read if e is not None]
            clean[name] = item
        try:
            return msgspec.convert(clean, kind)
        except msgspec.ValidationError:
            return None


_LENIENT_FIELDS: dict[type, dict[str, tuple[str, type | None]]] = {}


def _lenient_fields(kind: type) -> dict[str, tuple[str, type | None]]:
    """A Struct's fields by lower-case name: (name, the Struct of its elements when it is a list of them)."""
    fields = _LENIENT_FIELDS.get(kind)
    if fields is None:
        fields = {}
        for f in msgspec.structs.fields(kind):
            element = next((a for a in get_args(f.type) if isinstance(a, type) and issubclass(a, msgspec.Struct)), None)
            fields[f.encode_name.lower()] = (f.encode_name, element)
        _LENIENT_FIELDS[kind] = fields
    return fields


def _slot_time(value: str) -> tuple[datetime, bool] | None:
    """A slot's date-time, and whether it had no zone (then it is read as UTC, as the spec says)."""
    if "T" not in value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (moment, False) if moment.tzinfo is not None else (moment.replace(tzinfo=timezone.utc), True)


def _free_slot(slot: AvailableSlot, resource_type: str, resource_id: str) -> FreeSlot | None:
    start, end = _slot_time(slot.slotStartDate), _slot_time(slot.slotEndDate)
    if not slot.slotId or start is None or end is None or end[0] <= start[0]:
        return None
    return FreeSlot(id=slot.slotId, start=start[0], end=end[0], resource_type=resource_type, resource_id=resource_id,
                    zone_assumed=start[1] or end[1])


def _record(ident: str) -> str:
    """The record a Salesforce id names: its 15-letter form (the 18-letter one adds a case checksum)."""
    return ident[:15] if SALESFORCE_ID.fullmatch(ident) else ident


def read_slots(payload: Any, request: SlotsRequest) -> FoundSlots | None:
    """Get Slots' answer (`{"resourceSlotDetails": [{"resourceId", "availableSlots": [...]}]}`, an
    object or a one-element array, keys in any case), each slot with the resource of the request its
    entry names. Slots that cannot be read, and entries naming a resource the request did not ask
    for, are left out and counted. None when the payload is not that answer at all."""
    if isinstance(payload, list) and len(payload) == 1:
        payload = payload[0]
    if isinstance(payload, dict) and any(str(k).lower() == "issuccess" and v is False for k, v in payload.items()):
        return None
    reader = _Lenient()
    answer = reader.read(payload, SlotsAnswer)
    if answer is None:
        return None
    # a resource's type and id as the request named them, found by the id of the record it names
    kinds = {_record(r.resourceId): (r.resourceType or "Provider", r.resourceId) for r in reversed(request.resources)}
    found: list[FreeSlot] = []
    unread = reader.skipped
    for entry in answer.resourceSlotDetails:
        kind = kinds.get(_record(entry.resourceId))
        for slot in entry.availableSlots:
            free = _free_slot(slot, *kind) if kind is not None else None
            if free is None:
                unread += 1
            else:
                found.append(free)
    return FoundSlots(slots=tuple(found), unread=unread)


class SalesforceClient:
    def __init__(
        self,
        conn: SalesforceConnection,
        tuning: SalesforceTuning,
        tokens: TokenProvider,
        http: HttpClient,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self._tuning = tuning
        self._tokens = tokens
        self._caller = Caller(
            http, tokens, breaker, limit=tuning.max_concurrent_calls, name="Salesforce",
            retry_after=tuning.unavailable_retry_after_seconds, base=_instance, unhealthy=_unhealthy,
            auth_refused=_is_invalid_session, headers={"Content-Type": "application/json", "Accept": "application/json"},
            lost=lambda: SalesforceFailed("Salesforce's answer did not arrive; the booking may or may not have been stored"),
        )
        self._base = f"/services/data/v{conn.api_version}/connect/health/appointment-management"
        self._query_path = f"/services/data/v{conn.api_version}/query"
        self._resources_path = f"/services/data/v{conn.api_version}/"
        self.usage = ApiUsage()

    async def book(self, request: BookingRequest, record: CallRecord) -> Booked:
        """Book. Not idempotent: after a 401 the token is renewed but the booking is not re-sent
        (`record.reauthenticated`); the caller looks it up first, as after any answer in doubt."""
        body = _encoder.encode(request)
        response = await self._call("POST", f"{self._base}/appointment", body, record, resend=False)
        return self._read_booking(response, request, record)

    async def update(self, appointment_id: str, request: BookingRequest, record: CallRecord) -> Booked:
        """Reschedule (Update): PUT of the booking's fields plus `id`. Idempotent: the same body
        sent twice leaves the same appointment."""
        request = msgspec.structs.replace(request, id=appointment_id)
        response = await self._call("PUT", f"{self._base}/appointment/{appointment_id}", _encoder.encode(request), record)
        return self._read_booking(response, request, record)

    async def cancel(self, appointment_id: str, reason: str | None, comment: str | None, scrub: BookingRequest,
                     record: CallRecord) -> Booked:
        """Cancel: PATCH with status Cancelled. Idempotent too. `scrub`: the request whose patient
        data is kept out of any message passed on."""
        body = _encoder.encode(CancelRequest(id=appointment_id, status="Cancelled", cancellationReason=reason, comment=comment))
        response = await self._call("PATCH", f"{self._base}/appointment/{appointment_id}", body, record)
        return self._read_booking(response, scrub, record)

    async def get_slots(self, request: SlotsRequest, record: CallRecord) -> FoundSlots:
        """Get Slots: the free slots of the request's resources (`read_slots`). Refusals and failures
        raise as for a booking."""
        response = await self._call("POST", f"{self._base}/slots", _encoder.encode(request), record)
        if response.status == 200 and (found := read_slots(_decode(response.content), request)) is not None:
            return found
        # not Get Slots' answer: classified (refused, over the limit, failed) as a booking's answer is
        scrub = BookingRequest(participants=tuple(SfParticipant(reference=f"X/{r.resourceId}") for r in request.resources))
        self._read_booking(response, scrub, record)
        raise SalesforceFailed("Salesforce's answer to Get Slots cannot be read")

    async def find_booking(self, request: BookingRequest, since_ms: int, record: CallRecord) -> str | None:
        """Look for the ServiceAppointment an earlier, unanswered Book may have created (REST query
        API): same patient, facility, times and work type, created since the first attempt. Returns
        its id, or None when there is none. Raises like `book` when Salesforce cannot answer. Not
        counted by the breaker: a look-up that works says nothing of whether Book does."""
        q = lookup_query(request, since_ms)
        if q is None:
            return None
        response = await self._call("GET", self._query_path, b"", record, params={"q": q}, counted=False)
        payload = _decode(response.content)
        if response.status == 200 and isinstance(payload, dict) and isinstance(payload.get("records"), list):
            records = [r.get("Id") for r in payload["records"] if isinstance(r, dict)]
            if all(isinstance(i, str) and SALESFORCE_ID.fullmatch(i) for i in records):
                record.matches = len(records)
                return records[0] if records else None
        errs = _errors(payload)
        record.error_code = _code(errs)
        if response.status in (401, 403, 429, 503):
            raise Unavailable(f"Salesforce cannot be queried now ({record.error_code or response.status})",
                              retry_after=self._tuning.unavailable_retry_after_seconds, details_code=record.error_code)
        raise SalesforceFailed(f"the look-up query failed (HTTP {response.status})", details_code=record.error_code)

    @property
    def data_path(self) -> str:
        """Where the REST API's resources are: `/services/data/vXX.X` (Composite subrequests' urls start so)."""
        return self._resources_path.rstrip("/")

    async def query(self, soql: str, record: CallRecord) -> list[dict[str, Any]]:
        """One SOQL query (REST query API): its records. One API call; not counted by the breaker (a
        read says nothing of whether Book works). Raises Unavailable or SalesforceFailed as a look-up does."""
        response = await self._call("GET", self._query_path, b"", record, params={"q": soql}, counted=False)
        payload = _decode(response.content)
        if response.status == 200 and isinstance(payload, dict) and isinstance(payload.get("records"), list):
            return [r for r in payload["records"] if isinstance(r, dict)]
        raise self._read_failure(response, payload, record, "the query")

    async def composite(self, subrequests: list[CompositeSub], record: CallRecord, *, all_or_none: bool = False,
                        headers: dict[str, str] | None = None, counted: bool = False) -> list[CompositeSubAnswer]:
        """Several subrequests (at most 25, of which 5 queries) in one Composite call: one API call
        whatever they are. Each subrequest's answer comes back in order, refusals included (the caller
        reads each); the call itself failing raises Unavailable or SalesforceFailed. `counted`: its
        health goes to the breaker (for one that writes)."""
        body = _encoder.encode(CompositeRequest(compositeRequest=tuple(subrequests), allOrNone=all_or_none))
        response = await self._call("POST", self._resources_path + "composite", body, record, headers=headers,
                                    counted=counted)
        if response.status == 200:
            try:
                answer = msgspec.json.decode(response.content, type=CompositeAnswer)
            except (msgspec.DecodeError, msgspec.ValidationError):
                answer = None
            if answer is not None and [a.referenceId for a in answer.compositeResponse] == \
                    [s.referenceId for s in subrequests]:
                return list(answer.compositeResponse)
        raise self._read_failure(response, _decode(response.content), record, "the Composite call")

    def _read_failure(self, response: Answer, payload: Any, record: CallRecord, what: str) -> Exception:
        """A read that did not answer as asked: the org unavailable (or its allowance spent) is Unavailable,
        anything else SalesforceFailed; the error code kept, never the message (it may quote values)."""
        record.error_code = _code(_errors(payload)) if payload is not None else None
        if response.status in (401, 403, 429, 503) or record.error_code in _NOT_PROCESSED:
            return Unavailable(f"Salesforce cannot be asked now ({record.error_code or response.status})",
                               retry_after=self._tuning.unavailable_retry_after_seconds, details_code=record.error_code)
        # a read changed nothing: it may be asked again soon
        return SalesforceFailed(f"{what} failed (HTTP {response.status})", details_code=record.error_code,
                                retry_after=self._tuning.unavailable_retry_after_seconds)

    async def check_auth(self) -> None:
        """Readiness: a token can be had (from the cache or freshly minted)."""
        await self._tokens.token()

    async def check_instance(self) -> None:
        """Readiness: the token's instance answers an authenticated call, the REST API's cheapest
        (Resources by Version, readable by any API user): a token renewed on a 401 or an instance that
        cannot be reached, as for any call. Raises unless it answers 200. Neither asks nor tells the
        breaker: whether it answers says nothing of whether Book works. Each call spends the org's
        allowance and readiness needs no key, so a call that worked in the last
        `ready_check_seconds` stands in for it."""
        if time.perf_counter() - self._caller.served_at < self._tuning.ready_check_seconds:
            return
        response = await self._call("GET", self._resources_path, b"", CallRecord(), counted=False, gated=False)
        if response.status != 200:
            raise Unavailable(f"Salesforce's instance answered HTTP {response.status}",
                              retry_after=self._tuning.unavailable_retry_after_seconds)

    async def _call(
        self, method: str, path: str, body: bytes, record: CallRecord, params: dict[str, str] | None = None,
        *, resend: bool = True, counted: bool = True, gated: bool = True, headers: dict[str, str] | None = None,
    ) -> Answer:
        """One call (gateway/outbound/calls.py): one token renewal on a 401 (and, when `resend`, one
        retry with the new token) or when the instance cannot be reached. `counted`: the call's
        health goes to the breaker; `gated`: the breaker is asked first."""
        response = await self._caller.call(method, path, body, record, params, resend=resend, counted=counted,
                                           gated=gated, headers=headers)
        self._read_limit(response)
        return response

    def _read_limit(self, response: Answer) -> None:
        info = response.headers.get("sforce-limit-info")
        if info and (m := _LIMIT_INFO.search(info)):
            self.usage.used, self.usage.limit = int(m.group(1)), int(m.group(2))

    def _read_booking(self, response: Answer, request: BookingRequest, record: CallRecord) -> Booked:
        """Booked, refused (raises SalesforceRefused: Salesforce's own refusal, nothing stored), not
        processed (Unavailable: the spent allowance), or anything else: in doubt (`record.in_doubt`),
        raised as Unavailable (a 401, 429 or 503) or SalesforceFailed. Only Salesforce's own error
        shape is believed: an intermediary's 400 or 408 may follow a stored booking."""
        status = response.status
        payload = _decode(response.content)
        if isinstance(payload, list) and len(payload) == 1 and isinstance(payload[0], dict) and status < 300:
            payload = payload[0]
        errs = _salesforce_errors(payload)
        if 200 <= status < 300 and isinstance(payload, dict) and errs is None:
            lowered = {k.lower(): v for k, v in payload.items()}
            ident = lowered.get("id")
            if isinstance(ident, str) and SALESFORCE_ID.fullmatch(ident):
                return Booked(id=ident, status=str(lowered.get("status") or "scheduled").lower())
        code = _code(errs) if errs is not None else None
        record.error_code = code
        retry_after = self._tuning.unavailable_retry_after_seconds
        if errs is not None and code in _NOT_PROCESSED:  # the org's allowance: nothing was stored
            raise Unavailable(f"Salesforce is over its request limit ({code})", retry_after=retry_after,
                              details_code=code)
        if errs is not None and (status < 300 or 400 <= status < 500) and status not in (401, 408, 429):
            return self._refused(status, errs, request, record)
        record.in_doubt = True  # the request went out; this answer does not prove it was not stored
        record.answered = errs is not None  # ... but in Salesforce's own shape: it is done with it
        if status == 401:
            raise Unavailable("Salesforce refused the gateway's credentials", retry_after=retry_after)
        if status in (429, 503):
            raise Unavailable(f"Salesforce is over its request limit or unavailable ({code or status})",
                              retry_after=retry_after, details_code=code)
        raise SalesforceFailed(
            f"Salesforce failed (HTTP {status})" if status >= 500 else "Salesforce's answer cannot be read",
            details_code=code,
        )

    @staticmethod
    def _refused(status: int, errs: list[dict[str, Any]], request: BookingRequest, record: CallRecord) -> Booked:
        code = _code(errs) or f"HTTP_{status}"
        record.error_code = code
        message = "; ".join(_scrub(str(e.get("message", "")), request) for e in errs if e.get("message"))
        raise SalesforceRefused(
            f"Salesforce refused the booking: {code}" + (f": {message}" if message else ""),
            details_code=code,
        )
