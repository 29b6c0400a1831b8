"""The org's REST API over HTTP: query, sObject create, read and upsert, and Composite. Each call passes
the same gate as the appointment API (faults, session, allowance, version) and counts one API call; a
Composite call counts one however many subrequests it holds."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, get, patch, post
from litestar.params import FromPath
from litestar.types import ASGIApp

from gateway.sandbox import composite, soql, sobjects
from gateway.sandbox.answers import api, errors, gate, json_answer, limit_header, sandbox_of
from gateway.sandbox.rules import SfError
from gateway.sandbox.sobjects import Result
from gateway.sandbox.state import SandboxState

DATA = "/services/data/{version:str}"


def lenient(sb: SandboxState) -> frozenset[str]:
    """Bookings may hold EHR ids as references until `require_records` is on: their id filters then
    take any string (an org's never would)."""
    return frozenset() if sb.config.require_records else frozenset({"ServiceAppointment"})


def _answer(sb: SandboxState, result: Result) -> ASGIApp:
    return json_answer(result.status, result.body, {**result.headers, **limit_header(sb)})


def _body(raw: bytes) -> Any:
    """A JSON body, or the marker sobjects.py refuses as not an object."""
    try:
        return msgspec.json.decode(raw) if raw else None
    except msgspec.DecodeError:
        return None


@get(DATA + "/query")
async def query(request: Request[Any, Any, Any], version: FromPath[str]) -> ASGIApp:
    sb = sandbox_of(request)
    sb.count("query_calls")
    if (refusal := await gate(request, sb, version)) is not None:
        return refusal
    q = request.query_params.get("q")
    if not q:
        return errors(sb, 400, SfError(message="A query string (q) is required.", errorCode="MALFORMED_QUERY"))
    try:
        return api(sb, 200, soql.execute(q, sb, version, lenient(sb)))
    except soql.SoqlError as exc:
        return errors(sb, 400, SfError(message=exc.message, errorCode=exc.code))


@post(DATA + "/sobjects/{sobject:str}")
async def create(request: Request[Any, Any, Any], version: FromPath[str], sobject: FromPath[str]) -> ASGIApp:
    sb = sandbox_of(request)
    sb.count("sobject_calls")
    if (refusal := await gate(request, sb, version)) is not None:
        return refusal
    body = _body(await request.body())
    allow = sobjects.allow_save(request.headers)
    return _answer(sb, sobjects.create(sb.org, version, sobject, body, allow_duplicates=allow))


@get(DATA + "/sobjects/{sobject:str}/{record_id:str}")
async def read(request: Request[Any, Any, Any], version: FromPath[str], sobject: FromPath[str],
               record_id: FromPath[str]) -> ASGIApp:
    sb = sandbox_of(request)
    sb.count("sobject_calls")
    if (refusal := await gate(request, sb, version)) is not None:
        return refusal
    return _answer(sb, sobjects.read(sb, version, sobject, record_id, request.query_params.get("fields")))


@patch(DATA + "/sobjects/{sobject:str}/{field:str}/{value:str}")
async def upsert(request: Request[Any, Any, Any], version: FromPath[str], sobject: FromPath[str],
                 field: FromPath[str], value: FromPath[str]) -> ASGIApp:
    sb = sandbox_of(request)
    sb.count("sobject_calls")
    if (refusal := await gate(request, sb, version)) is not None:
        return refusal
    body = _body(await request.body())
    allow = sobjects.allow_save(request.headers)
    return _answer(sb, sobjects.upsert(sb.org, version, sobject, field, value, body, allow_duplicates=allow))


@post(DATA + "/composite")
async def composite_call(request: Request[Any, Any, Any], version: FromPath[str]) -> ASGIApp:
    """One API call for the whole series (the gate runs once); each query inside counts a query."""
    sb = sandbox_of(request)
    sb.count("composite_calls")
    if (refusal := await gate(request, sb, version)) is not None:
        return refusal
    decoded = composite.decode(await request.body(), version)
    if isinstance(decoded, Result):
        return _answer(sb, decoded)
    return _answer(sb, composite.run(sb, version, decoded, request.headers, lenient(sb)))


ROUTES = [query, create, read, upsert, composite_call]
