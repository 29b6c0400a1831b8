"""How the HTTP edge answers: a booking's answer, an error as an OperationOutcome (Litestar's own
refusals and the unexpected too), the request id every answer carries, and the checks every FHIR
route makes of a request before reading it (its media type, what it accepts)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, InternalServerException

from gateway.booking.booker import Answer
from gateway.booking.fhir import FHIR_JSON, error_body, negotiate
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from gateway.ids import new_id
from gateway.logs import log

ACCEPTED_MEDIA = ("application/fhir+json", "application/json")


def media(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def check_media(request: Request) -> None:
    if media(request) not in ACCEPTED_MEDIA:
        raise UnsupportedMediaType("send application/fhir+json or application/json")


def negotiate_request(request: Request, params: Any = None) -> None:
    """FHIR's content negotiation on every FHIR route: `_format` (from `params`, else the query)
    overrides `Accept`. The query is parsed only when it may hold `_format`."""
    if params is None and b"_format" in request.scope.get("query_string", b""):
        params = request.query_params
    formats = params.getall("_format", []) if params is not None else []
    negotiate(formats[0] if formats else None, request.headers.get("accept"))


async def read_body(request: Request) -> bytes:
    try:
        return await request.body()
    except InternalServerException:  # Litestar's word for a client gone mid-body
        raise RequestTimeout("the client stopped sending the body") from None


def absolute(headers: dict[str, str], public: str) -> dict[str, str]:
    """`Location` as FHIR wants it, `[base]/Appointment/<id>`: the Booker (and the idempotency
    records, old and new) name the path; the gateway's published address is prefixed on the way out."""
    location = headers.get("Location")
    if location is not None and location.startswith("/"):
        return {**headers, "Location": public + location}
    return headers


def respond(answer: Answer, request_id: str, public: str) -> Response[bytes]:
    return Response(answer.body, status_code=answer.status,
                    headers={**absolute(answer.headers, public), "X-Request-ID": request_id})


def error_response(error: GatewayError, request_id: str | None = None) -> Response[bytes]:
    headers = {"Content-Type": FHIR_JSON, **error.headers, "X-Request-ID": request_id or new_id()}
    return Response(error_body(error), status_code=error.status, headers=headers)


async def with_request_id(response: Response[Any]) -> Response[Any]:
    """Every answer names its request (`X-Request-ID`): a request that is logged keeps its log line's
    id, any other (metadata, health, admin, ...) gets one here."""
    response.headers.setdefault("X-Request-ID", new_id())
    return response


_LITESTAR_REFUSALS: dict[int, tuple[type[GatewayError], str]] = {
    404: (NotFound, "no such endpoint"),
    405: (MethodNotAllowed, "method not allowed"),
    413: (PayloadTooLarge, "the body is too large"),
    415: (UnsupportedMediaType, "send application/fhir+json or application/json"),
}


def litestar_error(request: Request, exc: HTTPException) -> Response[bytes]:
    """Litestar's own refusals (no route, wrong method, body too large) as OperationOutcomes."""
    fallback = (InvalidRequest, "bad request") if exc.status_code < 500 else (GatewayError, "internal error")
    cls, message = _LITESTAR_REFUSALS.get(exc.status_code, fallback)
    response = error_response(cls(message))
    allow = (exc.headers or {}).get("allow")
    if allow:  # RFC 9110: a 405 names the methods the resource serves
        response.headers["Allow"] = allow
    return response


def refused_while_reading(request: Request, exc: HTTPException, request_id: str) -> Response[bytes]:
    """A refusal Litestar raised while a handler read the body (over the size limit), for the request
    the handler already named."""
    response = litestar_error(request, exc)
    response.headers["X-Request-ID"] = request_id
    return response


def unexpected(request: Request, exc: Exception) -> Response[bytes]:
    # a bug: say so without a trace or any request data; log only the exception type
    log.error("unhandled", error=type(exc).__name__, path=request.url.path)
    return error_response(GatewayError("internal error"))
