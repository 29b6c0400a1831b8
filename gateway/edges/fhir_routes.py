"""The FHIR routes of a source, `/fhir/{source}/…`: bookings (create, `$book`), changes (update,
conditional update), the dry run (`$translate`), batches, Slot search (GET and POST), and the
conformance resources (metadata, the OperationDefinition it points to).

`FhirController` holds the routes; `FhirEdge`, built once by the composition root and injected as
`fhir`, does their work: the door (`Admission`), the Booker, and the request's summary (`Recorder`).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qsl

import msgspec
from litestar import Controller, Request, Response, get, post, put
from litestar.datastructures import MultiDict
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.params import FromPath

from gateway.booking.batch import Item, batch_response, parse_batch, response_entry
from gateway.booking.booker import NO_SUCH_APPOINTMENT, Booker, Target, Trace, identifier_target, if_none_exist
from gateway.booking.capability import TRANSLATE, capability_statement, translate_definition
from gateway.booking.fhir import FHIR_JSON, error_body, if_match, slot_searchset, warning_header
from gateway.booking.slots import paging
from gateway.edges.answers import (
    absolute,
    check_media,
    error_response,
    media,
    negotiate_request,
    read_body,
    refused_while_reading,
    respond,
)
from gateway.edges.inbound import Admission
from gateway.errors import GatewayError, InvalidRequest, NotFound, UnsupportedMediaType, http
from gateway.ids import new_id
from gateway.logs import log
from gateway.operators.summary import Recorder
from gateway.salesforce.client import SALESFORCE_ID
from gateway.settings import SourceSettings
from gateway.state.idempotency import parse_key_header

_FORM = "application/x-www-form-urlencoded"  # a FHIR search by POST
_json = msgspec.json.Encoder()


def target_of(appointment_id: str | None, values: list[str]) -> Target:
    """What a PUT names: the Salesforce id in the path, or `?identifier=system|value` (FHIR's
    conditional update, with a token: `|value` means no system, `value` alone any system)."""
    if appointment_id is not None:
        if not SALESFORCE_ID.fullmatch(appointment_id):
            raise NotFound(NO_SUCH_APPOINTMENT)
        return Target(salesforce_id=appointment_id)
    if len(values) != 1:
        raise InvalidRequest("a conditional update names the appointment by one identifier: ?identifier=system|value",
                             location=http("identifier"))
    return identifier_target(values[0], "identifier")


class FhirEdge:
    """The work of a source's FHIR routes. `public`: the gateway's published address (`[server]
    public_urls`, never a request's Host); `published`: the date the conformance resources give."""

    def __init__(self, sources: dict[str, SourceSettings], booker: Booker, admission: Admission, recorder: Recorder,
                 *, public: str, published: str) -> None:
        self._sources, self._booker, self._admission, self._recorder = sources, booker, admission, recorder
        self._public, self._published = public, published

    async def _admit(self, request: Request, source: str, *, spend: bool = True) -> None:
        await self._admission.admit(source, request.scope, request.headers.get("authorization"), spend=spend)

    async def handle(self, request: Request, source: str, dry_run: bool, change: str | None = None) -> Response[bytes]:
        """A booking, a dry run, or (`change`) a PUT: `change` is its path id, or "" for a conditional
        update by identifier."""
        started = time.perf_counter()
        request_id = new_id()
        trace = Trace(request_id=request_id)
        status, body, key, error, admitted = 500, None, None, None, False
        try:
            await self._admit(request, source)
            admitted = True
            negotiate_request(request)
            check_media(request)
            body = await read_body(request)
            if dry_run:
                translated = self._translated(source, body, trace, request_id)
                status = 200
                return translated
            key = parse_key_header(request.headers.get("idempotency-key"))
            if change is not None:
                target = target_of(change or None, request.query_params.getall("identifier", []))
                answer = await self._booker.change(source, body, target, key, trace,
                                                   allowed=if_match(request.headers.get("if-match")))
            else:
                answer = await self._booker.book(source, body, key, trace,
                                                 condition=if_none_exist(request.headers.get("if-none-exist")))
            status = answer.status
            return respond(answer, request_id, self._public)
        except GatewayError as exc:
            status, error = exc.status, exc
            return error_response(exc, request_id)
        except HTTPException as exc:  # body over the size limit, raised while reading it
            status = exc.status_code
            return refused_while_reading(request, exc, request_id)
        finally:
            self._recorder.summarise(request_id, source, "translate" if dry_run else "change" if change is not None
                                     else "book", status, trace, started, error, body,
                                     request.headers.get("content-type"), key, admitted=admitted)

    def _translated(self, source: str, body: bytes, trace: Trace, request_id: str) -> Response[bytes]:
        prepared = self._booker.prepare(source, body, trace)
        headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
        if prepared.warnings:  # the body stays the Salesforce request: what was left out goes beside it
            headers["Warning"] = warning_header(prepared.warnings)
        return Response(_json.encode(prepared.mapped.request), status_code=200, headers=headers)

    async def batch(self, request: Request, source: str) -> Response[bytes]:
        """A FHIR batch Bundle (gateway/booking/batch.py): each entry booked or changed as if sent
        alone, each with its own request-log entry; the key of entry i is `<Idempotency-Key>#i` when
        the header is given, else derived from the entry as for a single request."""
        request_id = new_id()
        try:
            await self._admit(request, source, spend=False)
            negotiate_request(request)
            check_media(request)
            body = await read_body(request)
            if source not in self._booker.sources or self._sources[source].adapter == "hl7v2":
                raise NotFound("this source takes HL7 v2 over MLLP, not FHIR over HTTP")
            items = parse_batch(body)
            key = parse_key_header(request.headers.get("idempotency-key"))
            await self._admission.limiter.check(source, cost=max(1, len(items)))  # each entry is a request
        except GatewayError as exc:
            return error_response(exc, request_id)
        except HTTPException as exc:  # body over the size limit
            return refused_while_reading(request, exc, request_id)
        entries = []
        for item in items:
            if isinstance(item, GatewayError):
                entries.append(response_entry(item.status, error_body(item), None))
                continue
            entries.append(await self._entry(source, item, f"{key}#{item.index}" if key is not None else None))
        return Response(batch_response(entries), status_code=200,
                        headers={"Content-Type": FHIR_JSON, "X-Request-ID": request_id})

    async def _entry(self, source: str, item: Item, key: str | None) -> dict[str, Any]:
        started = time.perf_counter()
        request_id = new_id()
        trace = Trace(request_id=request_id)
        status, error, op = 500, None, "book" if item.kind == "book" else "change"
        try:
            if item.kind == "book":
                answer = await self._booker.book(source, item.body, key, trace,
                                                 condition=if_none_exist(item.if_none_exist))
            else:
                target = target_of(item.appointment_id, [item.identifier] if item.identifier else [])
                answer = await self._booker.change(source, item.body, target, key, trace,
                                                   allowed=if_match(item.if_match))
            status = answer.status
            return response_entry(status, answer.body, absolute(answer.headers, self._public).get("Location"),
                                  answer.headers.get("ETag"))
        except GatewayError as exc:
            status, error = exc.status, exc
            return response_entry(exc.status, error_body(exc), None)
        except Exception as exc:  # a bug in one entry must not lose the others' answers
            log.error("unhandled", error=type(exc).__name__, path="batch-entry")
            failure = GatewayError("internal error")
            return response_entry(failure.status, error_body(failure), None)
        finally:
            self._recorder.summarise(request_id, source, op, status, trace, started, error,
                                     item.body if status not in (401, 403) else None, "application/fhir+json", key)

    async def search(self, request: Request, source: str, *, by_post: bool) -> Response[bytes]:
        """Free slots, from Salesforce's Get Slots, as a FHIR searchset Bundle (gateway/booking/slots.py);
        by POST, the form body's parameters join the query's (FHIR search by POST: the same answer)."""
        started = time.perf_counter()
        request_id = new_id()
        trace = Trace()
        status, error = 500, None
        try:
            await self._admit(request, source)
            params = await _search_form(request) if by_post else request.query_params
            negotiate_request(request, params)
            offset, count = paging(params)
            found = await self._booker.find_slots(source, params, trace)
            status = 200
            base = f"{self._public}/fhir/{source}"
            return Response(slot_searchset(found, params, base, f"{base}/Slot", offset, count), status_code=200,
                            headers={"Content-Type": FHIR_JSON, "X-Request-ID": request_id})
        except GatewayError as exc:
            status, error = exc.status, exc
            return error_response(exc, request_id)
        except HTTPException as exc:  # a form body over the size limit
            status = exc.status_code
            return refused_while_reading(request, exc, request_id)
        finally:
            self._recorder.summarise(request_id, source, "search", status, trace, started, error, None, None, None)

    def _conformance(self, source: str, request: Request) -> SourceSettings:
        """The FHIR source whose conformance resources are asked for (no credentials: FHIR clients
        read them first; they hold no key and no patient data)."""
        found = self._sources.get(source)
        if found is None or found.adapter == "hl7v2":
            raise NotFound("no FHIR source of that name is configured")
        negotiate_request(request)
        return found

    def metadata(self, request: Request, source: str) -> Response[bytes]:
        """The source's CapabilityStatement (gateway/booking/capability.py)."""
        try:
            found = self._conformance(source, request)
        except GatewayError as exc:
            return error_response(exc)
        return Response(capability_statement(source, found, self._public, self._published), media_type=FHIR_JSON)

    def operation_definition(self, request: Request, source: str, name: str) -> Response[bytes]:
        """The definition the CapabilityStatement names for `$translate`, so that it resolves."""
        try:
            self._conformance(source, request)
            if name != TRANSLATE:
                raise NotFound(f"the one operation defined here is OperationDefinition/{TRANSLATE}")
        except GatewayError as exc:
            return error_response(exc)
        return Response(translate_definition(f"{self._public}/fhir/{source}", self._published), media_type=FHIR_JSON)


async def _search_form(request: Request) -> MultiDict[str]:
    if media(request) != _FORM:
        raise UnsupportedMediaType(f"a search by POST sends its parameters as {_FORM}")
    try:
        form = parse_qsl((await read_body(request)).decode(), keep_blank_values=True, max_num_fields=1000)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the search's form body cannot be read (UTF-8, at most 1,000 fields)") from None
    return MultiDict([*request.query_params.multi_items(), *form])


class FhirController(Controller):
    """A source's FHIR routes; `fhir` is the composition root's `FhirEdge`."""

    path = "/fhir/{source:str}"

    @post("/", status_code=200)
    async def batch(self, request: Request, source: FromPath[str], fhir: NamedDependency[FhirEdge]) -> Response[bytes]:
        return await fhir.batch(request, source)

    @post("/Appointment", status_code=201)
    async def book(self, request: Request, source: FromPath[str], fhir: NamedDependency[FhirEdge]) -> Response[bytes]:
        return await fhir.handle(request, source, dry_run=False)

    @post("/Appointment/$book", status_code=201)
    async def book_operation(self, request: Request, source: FromPath[str], fhir: NamedDependency[FhirEdge]) -> Response[bytes]:
        return await fhir.handle(request, source, dry_run=False)

    @post("/Appointment/$translate", status_code=200)
    async def translate(self, request: Request, source: FromPath[str], fhir: NamedDependency[FhirEdge]) -> Response[bytes]:
        return await fhir.handle(request, source, dry_run=True)

    @put("/Appointment/{appointment_id:str}", status_code=200)
    async def change_by_id(self, request: Request, source: FromPath[str], appointment_id: FromPath[str],
                           fhir: NamedDependency[FhirEdge]) -> Response[bytes]:
        return await fhir.handle(request, source, dry_run=False, change=appointment_id)

    @put("/Appointment", status_code=200)
    async def change_by_identifier(self, request: Request, source: FromPath[str], fhir: NamedDependency[FhirEdge]) -> Response[bytes]:
        return await fhir.handle(request, source, dry_run=False, change="")

    @get("/Slot")
    async def slot_search(self, request: Request, source: FromPath[str], fhir: NamedDependency[FhirEdge]) -> Response[bytes]:
        return await fhir.search(request, source, by_post=False)

    @post("/Slot/_search", status_code=200)
    async def slot_search_by_post(self, request: Request, source: FromPath[str], fhir: NamedDependency[FhirEdge]) -> Response[bytes]:
        return await fhir.search(request, source, by_post=True)

    @get("/metadata")
    async def metadata(self, request: Request, source: FromPath[str], fhir: NamedDependency[FhirEdge]) -> Response[bytes]:
        return fhir.metadata(request, source)

    @get("/OperationDefinition/{name:str}")
    async def operation_definition(self, request: Request, source: FromPath[str], name: FromPath[str],
                                   fhir: NamedDependency[FhirEdge]) -> Response[bytes]:
        return fhir.operation_definition(request, source, name)
