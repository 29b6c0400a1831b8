"""Health Cloud's callouts, under `[healthcloud] path_prefix`: the gateway as the external scheduling
system of Intelligent Appointment Management (scheduling-out.md §1, the contract's section v2).

- `POST /Slot/_search` (a form): slots across the EHRs, one searchset.
- `GET /Slot/{id}`, `GET /Slot/{sourceSystem}/{id}`: a slot's status now.
- `POST /Appointment/{sourceSystem}`: book the Appointment's slot in that EHR.
- `POST /Appointment/{id}`, `POST /Appointment/{sourceSystem}/{id}` with `status: cancelled`: cancel.
  A POST to `/Appointment/{x}` is told by its body: `status: cancelled` cancels the appointment `x`
  (or, when `x` is a source system, the body's `id` there); any other status books, and then `x`
  must be a source system.
- `GET /Appointment/{id}`, `GET /Appointment/{sourceSystem}/{id}`: read it from its EHR.
- `GET /metadata`: what this base serves.

Callers authenticate as Health Cloud's named credential does: HTTP Basic or a bearer, compared as
SHA-256 digests. A source's inbound key is 403 here, as Health Cloud's credential is on the sources'
routes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from litestar import Controller, Request, Response, Router, get, post
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException
from litestar.params import FromPath

from gateway.booking.fhir import FHIR_JSON
from gateway.edges.answers import check_media, error_response, media, negotiate_request, read_body, refused_while_reading
from gateway.edges.inbound import basic_credential, key_digest
from gateway.edges.smart import SmartAuth
from gateway.ehr.base import R4_ID_LENGTH, ehr_id
from gateway.errors import CallerGone, Forbidden, GatewayError, InvalidRequest, Unauthorized, UnsupportedMediaType
from gateway.ids import new_id
from gateway.operators.summary import Recorder
from gateway.scheduling.answers import booked_answer, kept_answer, searchset, slot_answer
from gateway.scheduling.callouts import LOCATION_ID, PRACTITIONER_ID, Callout, Search, read_callout, read_search
from gateway.scheduling.scheduler import Calls, Scheduler
from gateway.settings import HealthCloudSettings

FORM = "application/x-www-form-urlencoded"
_ACTORS = ("Patient", "Practitioner", "Location")  # the participants whose ids a create sends (`Callout.actor`)
_json = msgspec.json.Encoder()


class HealthCloudAuth:
    """Health Cloud's named credential: Basic (`sha256("user:password")`) or a bearer (`sha256(token)`).
    `source_digests` and `smart`: the sources' inbound keys and SMART tokens, refused here with 403."""

    def __init__(self, settings: HealthCloudSettings, source_digests: set[str], smart: SmartAuth) -> None:
        self._basic, self._bearer = set(settings.basic_sha256), set(settings.bearer_keys_sha256)
        self._sources, self._smart = source_digests, smart

    async def check(self, authorization: str | None) -> None:
        credential = basic_credential(authorization)
        if credential is not None:
            if key_digest(credential) in self._basic:
                return
            raise Unauthorized("unknown credential")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Health Cloud's named credential is required: HTTP Basic or a bearer",
                               location=("http.Authorization",))
        digest = key_digest(token.strip())
        if digest in self._bearer:
            return
        if digest in self._sources or await self._smart.source_of(token.strip()) is not None:
            raise Forbidden("a source's key does not open Health Cloud's callouts")
        raise Unauthorized("unknown credential")


class HealthCloudEdge:
    """The work of Health Cloud's routes: the door, the Scheduler, and each callout's log line."""

    def __init__(self, auth: HealthCloudAuth, scheduler: Scheduler, recorder: Recorder, *, base: str) -> None:
        self._auth, self.scheduler, self._recorder, self._base = auth, scheduler, recorder, base

    async def serve(self, request: Request, op: str, work: Callable[[Calls], Awaitable[bytes]]) -> Response[bytes]:
        """One callout: admitted, done, answered, and recorded for the operators (no patient data
        in the log line; the patient it named sealed in the request log)."""
        started, request_id = time.perf_counter(), new_id()
        calls = Calls(op=op, sources=self.scheduler.names())
        status, error = 500, None
        try:
            await self._auth.check(request.headers.get("authorization"))
            negotiate_request(request)
            body = await work(calls)
            status = 200
            return Response(body, status_code=200, headers={"Content-Type": FHIR_JSON, "X-Request-ID": request_id})
        except GatewayError as exc:
            status, error = exc.status, exc
            response = error_response(exc, request_id)
            if status == 401:
                response.headers["WWW-Authenticate"] = 'Basic realm="ehr-gateway", Bearer'
            return response
        except HTTPException as exc:  # the body over the size limit
            status = exc.status_code
            return refused_while_reading(request, exc, request_id)
        finally:
            if status not in (401, 403):  # strangers' knocks are not the operators' business
                self._recorder.callout(request_id, calls, status, started, error)

    async def find(self, request: Request, calls: Calls) -> bytes:
        if media(request) != FORM:
            raise UnsupportedMediaType(f"Find sends {FORM}")
        body = await read_body(request)
        s = self.scheduler
        search = read_search(body, s.systems, max_days=s.settings.max_search_days,
                             max_values=s.settings.max_search_values)
        self._search_ids(search)
        found = await _unless_gone(request, s.find(search, calls))
        if len(search.criteria) == 1 and next(iter(search.criteria)) in s.systems:
            calls.source = s.source(next(iter(search.criteria)))
        calls.outcome = "partial" if any(f.error is not None for f in found) else "found"
        warnings = [InvalidRequest(f"{name}: not searched by; the EHRs' own ids (Practitioner._id) are").issues[0]
                    for name in search.unsupported]
        warnings = [msgspec.structs.replace(w, severity="warning", code="not-supported") for w in warnings]
        return searchset(found, warnings, several=len(s.systems) > 1, url=f"{self._base}/Slot/_search")

    async def slot(self, system: str | None, slot_id: str, calls: Calls) -> bytes:
        self._ehr_id(system, slot_id, "Slot.id")
        self._name(calls, system)
        found_in, slot = await self.scheduler.slot(system, slot_id, calls)
        self._name(calls, found_in)
        calls.outcome = "found"
        return slot_answer(found_in, slot, several=len(self.scheduler.systems) > 1)

    async def post_appointment(self, request: Request, first: str, second: str | None, calls: Calls) -> bytes:
        check_media(request)
        callout = read_callout(await read_body(request))
        calls.op = "cancel" if callout.status == "cancelled" else "create"
        if callout.status == "cancelled":
            system, appointment_id = self._cancel_target(first, second, callout)
            reason = _reason(callout)
            self._name(calls, system)
            kept = await self.scheduler.cancel(system, appointment_id, reason, calls)
            self._name(calls, kept.system)
            calls.outcome = "cancelled"
            return kept_answer(kept, callout)
        if second is not None:
            raise InvalidRequest("a POST to an appointment cancels it: status cancelled",
                                 expression=("Appointment.status",))
        if first not in self.scheduler.systems:
            raise InvalidRequest("a create is POST /Appointment/{sourceSystem}, and no EHR is configured for this "
                                 "source system (a POST to an appointment's id cancels it: status cancelled)")
        self._create_ids(first, callout)
        self._name(calls, first)
        calls.patient = callout.actor("Patient")
        booked = await self.scheduler.create(first, callout, calls)
        calls.outcome = "replayed" if booked.replayed else "existing" if booked.came_from_ehr else \
            "booked" if booked.appointment is not None else "proposed"
        return booked_answer(booked, callout)

    def _cancel_target(self, first: str, second: str | None, callout: Callout) -> tuple[str | None, str]:
        if second is not None:
            system, appointment_id = first, second
        elif first in self.scheduler.systems and callout.id and callout.id != first:
            system, appointment_id = first, callout.id
        else:
            system, appointment_id = None, first
        if callout.id is not None and callout.id != appointment_id:
            raise InvalidRequest("id: the body's id is not the appointment in the path", expression=("Appointment.id",))
        return system, self._ehr_id(system, appointment_id, "Appointment.id")

    async def read(self, system: str | None, appointment_id: str, calls: Calls) -> bytes:
        self._ehr_id(system, appointment_id, "Appointment.id")
        self._name(calls, system)
        kept = await self.scheduler.read(system, appointment_id, calls)
        self._name(calls, kept.system)
        calls.outcome = "found"
        return kept_answer(kept, None)

    # -- the ids a callout names, checked before any EHR is asked about them (one grammar: `ehr_id`)

    def _ehr_id(self, system: str | None, value: str, element: str, *, parameter: bool = False) -> str:
        """`value` in the id grammar of `system`'s EHR; for a bare id (or a source system with no EHR),
        of the most lenient configured. 400 otherwise, and no EHR hears of it."""
        s = self.scheduler
        targets = [system] if system in s.systems else s.systems
        longest = max((s.client(t).longest_id for t in targets), default=R4_ID_LENGTH)
        return ehr_id(value, element, longest, parameter=parameter)

    def _create_ids(self, system: str, callout: Callout) -> None:
        """A create's ids that its EHR is sent: the slot's (`Slot/<id>`, or the bare id) and the
        patient's, practitioner's and location's (`<Kind>/<id>`, as `Callout.actor` reads them)."""
        reference = callout.slot[0].reference if callout.slot else None
        if reference is not None:
            self._ehr_id(system, reference.removeprefix("Slot/"), "Appointment.slot[0].reference")
        for i, participant in enumerate(callout.participant):
            kind, slash, value = ((participant.actor.reference if participant.actor else None) or "").partition("/")
            if slash and kind in _ACTORS:
                self._ehr_id(system, value, f"Appointment.participant[{i}].actor.reference")

    def _search_ids(self, search: Search) -> None:
        """A search's practitioner and location ids, for the source systems that have an EHR."""
        for system, criteria in search.criteria.items():
            if system in self.scheduler.systems:
                for name, ids in ((PRACTITIONER_ID, criteria.practitioners), (LOCATION_ID, criteria.locations)):
                    for value in ids:
                        self._ehr_id(system, value, name, parameter=True)

    def _name(self, calls: Calls, system: str | None) -> None:
        if system is not None and system in self.scheduler.systems:
            calls.source = self.scheduler.source(system)

    def metadata(self) -> bytes:
        return _json.encode(capability(self._base))


T = TypeVar("T")


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """`work`, abandoned (its EHR calls cancelled, their slots freed) when the caller disconnects
    first: for a search only, which changes nothing. A create is always finished, whoever waits."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise CallerGone("the caller went away before the answer; the search was abandoned")
    finally:
        gone.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the ASGI server says the client is gone (its body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _reason(callout: Callout) -> str | None:
    concept = callout.cancelationReason
    codes = [c.code for c in concept.coding if c.code] if concept else []
    return codes[0] if codes else None


def capability(base: str) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement", "status": "active", "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"],
        "implementation": {"description": "ehr-gateway: Health Cloud's external scheduling system", "url": base},
        "rest": [{"mode": "server", "resource": [
            {"type": "Slot", "interaction": [{"code": "read"}, {"code": "search-type"}],
             "searchParam": [{"name": n, "type": t} for n, t in (("start", "date"), ("service-type", "token"),
                                                                 ("appointment-type", "token"), ("status", "token"))]},
            {"type": "Appointment", "interaction": [{"code": "read"}, {"code": "create"}, {"code": "update"}]},
        ]}],
    }


HealthCloud = NamedDependency[HealthCloudEdge]


class HealthCloudController(Controller):
    path = "/"

    @post("/Slot/_search", status_code=200)
    async def find(self, request: Request, healthcloud: HealthCloud) -> Response[bytes]:
        return await healthcloud.serve(request, "find", lambda calls: healthcloud.find(request, calls))

    @get("/Slot/{slot_id:str}")
    async def slot(self, request: Request, healthcloud: HealthCloud, slot_id: FromPath[str]) -> Response[bytes]:
        return await healthcloud.serve(request, "slot-status", lambda calls: healthcloud.slot(None, slot_id, calls))

    @get("/Slot/{system:str}/{slot_id:str}")
    async def system_slot(self, request: Request, healthcloud: HealthCloud, system: FromPath[str],
                          slot_id: FromPath[str]) -> Response[bytes]:
        return await healthcloud.serve(request, "slot-status", lambda calls: healthcloud.slot(system, slot_id, calls))

    @post("/Appointment/{first:str}", status_code=200)
    async def post_one(self, request: Request, healthcloud: HealthCloud, first: FromPath[str]) -> Response[bytes]:
        return await healthcloud.serve(request, "create",
                                       lambda calls: healthcloud.post_appointment(request, first, None, calls))

    @post("/Appointment/{first:str}/{second:str}", status_code=200)
    async def post_two(self, request: Request, healthcloud: HealthCloud, first: FromPath[str], second: FromPath[str]) -> Response[bytes]:
        return await healthcloud.serve(request, "cancel",
                                       lambda calls: healthcloud.post_appointment(request, first, second, calls))

    @get("/Appointment/{appointment_id:str}")
    async def read(self, request: Request, healthcloud: HealthCloud, appointment_id: FromPath[str]) -> Response[bytes]:
        return await healthcloud.serve(request, "read", lambda calls: healthcloud.read(None, appointment_id, calls))

    @get("/Appointment/{system:str}/{appointment_id:str}")
    async def system_read(self, request: Request, healthcloud: HealthCloud, system: FromPath[str],
                          appointment_id: FromPath[str]) -> Response[bytes]:
        return await healthcloud.serve(request, "read",
                                       lambda calls: healthcloud.read(system, appointment_id, calls))

    @get("/metadata")
    async def metadata(self, healthcloud: HealthCloud) -> Response[bytes]:
        return Response(healthcloud.metadata(), headers={"Content-Type": FHIR_JSON})


def healthcloud_router(prefix: str, edge: HealthCloudEdge) -> Router:
    return Router(path=prefix, route_handlers=[HealthCloudController],
                  dependencies={"healthcloud": Provide(lambda: edge, use_cache=True, sync_to_thread=False)})

