"""The Health Cloud sandbox: the project's own stand-in for a Salesforce org, over real HTTP.

It answers the way salesforce.md says Salesforce answers (OAuth token endpoint, appointment
management, error bodies, `Sforce-Limit-Info`), enforces the booking rules, holds an org's records
(org.py) and answers SOQL, sObject calls and Composite over them (rest.py), and can be told to
misbehave (latency, expired sessions, spent limits, server errors, connections dropped after a booking
was stored) so the gateway's handling of each can be tested end to end.

Handlers return raw ASGI responses: the sandbox picks every status, header and byte itself, and one
fault needs to break the response half-way. Nothing here logs; no body or header is ever written out.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import jwt
import msgspec
from cryptography import x509
from litestar import Litestar, Request, Response, get, patch, post, put
from litestar.exceptions import HTTPException, MethodNotAllowedException, NotFoundException
from litestar.params import FromPath
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp, Receive, Scope, Send

from gateway.sandbox.config import SandboxConfig
from gateway.sandbox.rules import (
    AvailableSlot,
    BookingRequest,
    CancelRequest,
    ResourceSlotDetails,
    SfError,
    SlotsOutput,
    SlotsRequest,
    UpdateRequest,
    check_booking,
    decode_body,
    error,
    missing,
    parse_instant,
)
from gateway.sandbox import control, references, rest
from gateway.sandbox.answers import (
    api as _api,
    controlled as _controlled,
    errors as _errors,
    gate as _gate,
    json_answer as _json,
    limit_header as _limit_header,
    not_found as _not_found,
    sandbox_of as _sandbox,
    server_error as _server_error,
)
from gateway.sandbox.state import ORG_ID, USER_ID, FaultsUpdate, SandboxState, StoredAppointment

__all__ = ["create_sandbox_app", "SandboxConnectionDropped"]

JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
APPOINTMENTS = "/services/data/{version:str}/connect/health/appointment-management"
APPOINTMENT_API_MIN = (65, 0)
HANG_SECONDS = 3.0  # the "hang" fault: over the gateway's timeout in tests, under a test's patience
_JSON = "application/json"
_encoder = msgspec.json.Encoder()


class SandboxConnectionDropped(Exception):
    """Raised on purpose after the response head went out, so uvicorn closes the socket mid-answer."""


class _QuietDrops(logging.Filter):
    """Uvicorn reports an exception after the response started as an error; for the deliberate
    drop fault that report is noise, so it is dropped. Other errors still reach the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        seen = 0
        while exc is not None and seen < 10:
            if isinstance(exc, SandboxConnectionDropped):
                return False
            exc = exc.__cause__ or exc.__context__
            seen += 1
        return True


_QUIET_DROPS = _QuietDrops()


def _install_quiet_drops() -> None:
    logger = logging.getLogger("uvicorn.error")
    if _QUIET_DROPS not in logger.filters:
        logger.addFilter(_QUIET_DROPS)


# answers ---------------------------------------------------------------------------------------


def _oauth_error(status: int, code: str, description: str) -> ASGIResponse:
    return _json(status, {"error": code, "error_description": description})


def _outcome(sb: SandboxState, appt_id: str, status: str) -> Any:
    cfg = sb.config
    body = {"id": appt_id, "isSuccess": True, "status": status, cfg.error_key: []}
    return [body] if cfg.answer_shape == "array" else body


class _DropAfterHeaders:
    """Send the status line and headers, announcing a body, then fail: the client sees a response
    begin and the connection close, exactly the uncertain outcome a real network can produce."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = [
            (b"content-type", _JSON.encode()),
            (b"content-length", str(len(body)).encode()),
            *((k.lower().encode(), v.encode()) for k, v in headers.items()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        raise SandboxConnectionDropped("connection dropped after the booking was stored (sandbox fault)")


# OAuth -----------------------------------------------------------------------------------------


@post("/services/oauth2/token")
async def token(request: Request[Any, Any, Any]) -> ASGIApp:
    """Client-credentials and JWT-bearer grants. Like Salesforce: no expires_in, no refresh token."""
    sb = _sandbox(request)
    cfg = sb.config
    sb.count("token_requests")
    form = await request.form()
    grant = form.get("grant_type")
    if grant == "client_credentials":
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        basic = request.headers.get("authorization", "")
        if basic.lower().startswith("basic ") and not client_id:
            try:
                client_id, _, client_secret = base64.b64decode(basic[6:].strip()).decode().partition(":")
            except (binascii.Error, ValueError):
                client_id = client_secret = None
        if not client_id or not hmac.compare_digest(str(client_id).encode(), cfg.client_id.encode()):
            sb.count("token_refusals")
            return _oauth_error(400, "invalid_client", "invalid client credentials")
        if cfg.client_secret is None or not client_secret or not hmac.compare_digest(
            str(client_secret).encode(), cfg.client_secret.encode()
        ):
            sb.count("token_refusals")
            return _oauth_error(400, "invalid_client", "invalid client credentials")
    elif grant == JWT_GRANT:
        refusal = _check_assertion(request, form.get("assertion"))
        if refusal is not None:
            sb.count("token_refusals")
            return refusal
    else:
        sb.count("token_refusals")
        return _oauth_error(400, "unsupported_grant_type", "grant type not supported")

    base = str(request.base_url).rstrip("/")
    issued_at = str(int(time.time() * 1000))
    identity = f"{base}/id/{ORG_ID}/{USER_ID}"
    access_token = sb.issue_token()
    sb.count("token_grants")
    return _json(
        200,
        {
            "access_token": access_token,
            "signature": SandboxState.token_signature(cfg.client_secret, identity, issued_at),
            "instance_url": cfg.instance_url or base,
            "id": identity,
            "token_type": "Bearer",
            "issued_at": issued_at,
        },
    )


def _check_assertion(request: Request[Any, Any, Any], assertion: Any) -> ASGIResponse | None:
    sb = _sandbox(request)
    cfg = sb.config
    key = request.app.state.sandbox_jwt_key
    if not assertion or not isinstance(assertion, str):
        return _oauth_error(400, "invalid_grant", "assertion missing")
    if key is None or cfg.username is None:
        return _oauth_error(400, "invalid_grant", "JWT bearer flow is not configured for this client")
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError:
        return _oauth_error(400, "invalid_grant", "invalid assertion")
    if header.get("alg") != "RS256":
        return _oauth_error(400, "invalid_grant", "invalid assertion")
    try:
        claims = jwt.decode(
            assertion,
            key=key,
            algorithms=["RS256"],
            audience=cfg.audience,
            options={"require": ["exp", "iss", "sub", "aud"]},
        )
    except jwt.ExpiredSignatureError:
        return _oauth_error(400, "invalid_grant", "expired assertion")
    except jwt.InvalidAudienceError:
        return _oauth_error(400, "invalid_grant", "audience is invalid")
    except jwt.InvalidSignatureError:
        return _oauth_error(400, "invalid_grant", "invalid assertion signature")
    except jwt.PyJWTError:
        return _oauth_error(400, "invalid_grant", "invalid assertion")
    if claims.get("iss") != cfg.client_id:
        return _oauth_error(400, "invalid_client", "client identifier invalid")
    if claims.get("sub") != cfg.username:
        return _oauth_error(400, "invalid_grant", "user hasn't approved this consumer")
    return None


# appointment management ------------------------------------------------------------------------


@post(APPOINTMENTS + "/appointment")
async def book(request: Request[Any, Any, Any], version: FromPath[str]) -> ASGIApp:
    sb = _sandbox(request)
    sb.count("book_calls")
    # the whole request is in before any work starts: like Salesforce, a caller that stops waiting
    # (a timeout during the latency fault) does not stop the booking from being stored
    body = await request.body()
    replaced = sb.faults.take_book_answer()
    if replaced is not None and replaced.before_store:  # a proxy's answer: the org never saw the call
        sb.count("answers_replaced")
        return await _replaced(sb, replaced, None)
    if (refusal := await _gate(request, sb, version, minimum=APPOINTMENT_API_MIN)) is not None:
        return refusal
    booking, raw, errors = decode_body(body, BookingRequest)
    start = end = None
    if not errors:
        errors, start, end = check_booking(booking, require_channel_id=sb.config.require_channel_id)
        errors, booking = _records_checked(sb, booking, errors)
    if errors or start is None or raw is None:
        return _errors(sb, 400, *errors)
    # Drawn only for calls that would store, so the ratios are shares of storable bookings.
    drawn, after = sb.faults.draw_book_fault() or (None, None)
    if drawn == "fail_before_store":
        sb.count("faults_before_store")
        sb.count("server_errors")
        return _server_error(sb, 500)
    appt = sb.store_new(raw, booking, start, end or start + timedelta(minutes=sb.config.slot_minutes))
    if sb.iam is not None:  # an org with IAM configured tells its scheduling system, after this answer
        sb.iam.after_booking(appt.id, booking)
    status, answer = sb.config.answer_status, _outcome(sb, appt.id, "Scheduled")
    if drawn == "drop_after_store":
        sb.count("faults_dropped_after_store")
    if drawn == "drop_after_store" or sb.faults.take("drop_after_store"):
        sb.count("dropped_connections")
        return _DropAfterHeaders(status, _encoder.encode(answer), _limit_header(sb))
    if after is not None:
        sb.count("faults_answered_after_store")
        return await _replaced(sb, after, appt.id)
    if replaced is not None:
        sb.count("answers_replaced")
        return await _replaced(sb, replaced, appt.id)
    return _api(sb, status, answer)


# what Salesforce's own error body says for a status, when a fault answers in Salesforce's shape
_CODES = {400: "JSON_PARSER_ERROR", 401: "INVALID_SESSION_ID", 403: "INSUFFICIENT_ACCESS", 404: "NOT_FOUND",
          405: "METHOD_NOT_ALLOWED", 409: "CONFLICT", 412: "PRECONDITION_FAILED", 415: "UNSUPPORTED_MEDIA_TYPE",
          429: "REQUEST_LIMIT_EXCEEDED", 503: "SERVER_UNAVAILABLE"}


async def _replaced(sb: SandboxState, fault: Any, stored_id: str | None) -> ASGIApp:
    """A Book answer as a fault makes it: `fault.status` with Salesforce's body for it (the Book
    output for a 2xx, naming `fault.id` or the stored id, padded by `fault.pad_bytes`; else its
    error list), a proxy's HTML page, an empty body, or bytes that are not JSON."""
    status, kind = fault.status, fault.body
    if kind == "drop":
        return _DropAfterHeaders(status, b"{}", _limit_header(sb))
    if kind == "hang":  # longer than any client waits; then a gateway timeout page
        await asyncio.sleep(HANG_SECONDS)
        kind, status = "html", 504
    if kind == "html":
        page = f"<html><head><title>{status}</title></head><body><h1>{status}</h1><p>upstream</p></body></html>"
        return ASGIResponse(body=page.encode(), status_code=status, media_type="text/html")
    if kind == "empty":
        return ASGIResponse(body=b"", status_code=status, media_type=_JSON)
    if kind == "garbage":
        return ASGIResponse(body=b"\x00\xff{not json", status_code=status, media_type=_JSON)
    if status < 300:
        answer = _outcome(sb, fault.id or stored_id or "", "Scheduled")
        if fault.pad_bytes:
            (answer[0] if isinstance(answer, list) else answer)["padding"] = "x" * fault.pad_bytes
        return _api(sb, status, answer)
    code = _CODES.get(status, "UNKNOWN_EXCEPTION")
    return _errors(sb, status, SfError(message=f"{code} (sandbox fault)", errorCode=code))


async def _existing(
    request: Request[Any, Any, Any], sb: SandboxState, counter: str, version: str, appointment_id: str
) -> StoredAppointment | ASGIApp:
    """Update and Cancel start alike: count the call, pass the gate, find the appointment."""
    sb.count(counter)
    if (refusal := await _gate(request, sb, version, minimum=APPOINTMENT_API_MIN)) is not None:
        return refusal
    current = sb.get(appointment_id)
    return current if current is not None else _not_found(sb)


@put(APPOINTMENTS + "/appointment/{appointment_id:str}")
async def update(request: Request[Any, Any, Any], version: FromPath[str], appointment_id: FromPath[str]) -> ASGIApp:
    sb = _sandbox(request)
    current = await _existing(request, sb, "update_calls", version, appointment_id)
    if not isinstance(current, StoredAppointment):
        return current
    booking, raw, errors = decode_body(await request.body(), UpdateRequest)
    start = end = None
    if not errors:
        errors, start, end = check_booking(booking, require_channel_id=sb.config.require_channel_id)
        errors, booking = _records_checked(sb, booking, errors + _id_errors(booking.id, current))
    if errors or start is None or raw is None:
        return _errors(sb, 400, *errors)
    sb.replace(
        current.id,
        request=raw,
        booking=booking,
        start=start,
        end=end or start + timedelta(minutes=sb.config.slot_minutes),
        status="Scheduled",
        cancellation_reason=None,
        cancel_comment=None,
    )
    return _api(sb, 200, _outcome(sb, current.id, "Scheduled"))


@patch(APPOINTMENTS + "/appointment/{appointment_id:str}")
async def cancel(request: Request[Any, Any, Any], version: FromPath[str], appointment_id: FromPath[str]) -> ASGIApp:
    sb = _sandbox(request)
    current = await _existing(request, sb, "cancel_calls", version, appointment_id)
    if not isinstance(current, StoredAppointment):
        return current
    body, _, errors = decode_body(await request.body(), CancelRequest)
    if not errors:
        errors = _id_errors(body.id, current)
        if not body.status:
            errors.append(missing("status"))
        elif body.status.lower() not in ("cancelled", "canceled"):
            errors.append(error("INVALID_INPUT", "status must be Cancelled.", "status"))
        if body.comment is not None and len(body.comment) > 256:
            errors.append(error("STRING_TOO_LONG", "comment: data value too large (max length=256)", "comment"))
    if errors:
        return _errors(sb, 400, *errors)
    sb.replace(current.id, status="Cancelled", cancellation_reason=body.cancellationReason, cancel_comment=body.comment)
    return _api(sb, 200, _outcome(sb, current.id, "Cancelled"))


def _records_checked(sb: SandboxState, booking: Any, errors: list[SfError]) -> tuple[list[SfError], Any]:
    """With `require_records`, the booking's references must be records of the org (references.py);
    the booking is then kept with their 18-character ids, as an org keeps a reference."""
    if not sb.config.require_records:
        return errors, booking
    refused, booking = references.check_booking(sb.org, booking)
    return errors + refused, booking


def _id_errors(body_id: str | None, current: StoredAppointment) -> list[SfError]:
    if not body_id:
        return [missing("id")]
    if body_id != current.id and body_id != current.id[:15]:
        return [error("INVALID_INPUT", "The id in the body does not match the id in the URL.", "id")]
    return []


@post(APPOINTMENTS + "/slots")
async def slots(request: Request[Any, Any, Any], version: FromPath[str]) -> ASGIApp:
    """Deterministic free slots: every `slot_minutes` inside the UTC working day, per resource,
    minus what is already booked for that resource, so search-then-book behaves like an org."""
    sb = _sandbox(request)
    cfg = sb.config
    sb.count("slots_calls")
    if (refusal := await _gate(request, sb, version, minimum=APPOINTMENT_API_MIN)) is not None:
        return refusal
    body, _, errors = decode_body(await request.body(), SlotsRequest)
    start = end = None
    if not errors:
        if not body.resources:
            errors.append(missing("resources"))
        elif any(not r.resourceId for r in body.resources):
            errors.append(missing("resourceId"))
        for name in ("startDate", "endDate"):
            value = getattr(body, name)
            if not value:
                errors.append(missing(name))
            elif parse_instant(value) is None:
                errors.append(error("INVALID_INPUT", f"{name} must be an ISO-8601 date-time with a time zone.", name))
        if not errors:
            start, end = parse_instant(body.startDate), parse_instant(body.endDate)
            if start is None or end is None or end <= start:
                errors.append(error("INVALID_INPUT", "endDate must be after startDate.", "endDate"))
            elif end - start > timedelta(days=cfg.max_slot_range_days):
                errors.append(
                    error("INVALID_INPUT", f"The date range must not exceed {cfg.max_slot_range_days} days.", "endDate")
                )
    full: dict[str, str] = {}
    if not errors and cfg.require_records:
        errors, full = references.check_slots(sb.org, body)
    if errors or start is None or end is None:
        return _errors(sb, 400, *errors)
    output = SlotsOutput(resourceSlotDetails=[
        ResourceSlotDetails(resourceId=r.resourceId, availableSlots=_free_slots(
            sb, r, full.get(r.resourceId, r.resourceId), start, end, body.sourceSystem))
        for r in body.resources])
    return _api(sb, 200, [output] if cfg.answer_shape == "array" else output)


def _slot_time(sb: SandboxState, value: datetime) -> str:
    if sb.config.slot_times == "zoneless":  # as one of Salesforce's samples writes it
        return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.0000")
    return _iso_z(value)


def _iso_z(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _free_slots(sb: SandboxState, resource: Any, ident: str, start: datetime, end: datetime,
                source_system: str | None) -> list[AvailableSlot]:
    """`ident`: the resource's id as bookings hold it (its 18-character id, when it is a record)."""
    cfg = sb.config
    kind = "Device" if resource.resourceType == "Device" else "Practitioner"  # a Provider books as a Practitioner
    busy = [
        (a.start, a.end)
        for a in sb.appointments()
        if a.status == "Scheduled" and ident in a.participant_ids(kind)
    ]
    step = timedelta(minutes=cfg.slot_minutes)
    found: list[AvailableSlot] = []
    day = start.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    while day < end:
        t = day + timedelta(hours=cfg.workday_start_hour)
        closing = day + timedelta(hours=cfg.workday_end_hour)
        while t + step <= closing:
            if t >= start and t + step <= end and not any(b0 < t + step and t < b1 for b0, b1 in busy):
                found.append(AvailableSlot(slotId=f"{resource.resourceId}-{t:%Y%m%d%H%M}",
                                           slotStartDate=_slot_time(sb, t), slotEndDate=_slot_time(sb, t + step),
                                           sourceSystem=source_system))
            t += step
        day += timedelta(days=1)
    return found


# Resources by Version --------------------------------------------------------------------------


@get("/services/data/{version:str}")
async def resources(request: Request[Any, Any, Any], version: FromPath[str]) -> ASGIApp:
    """Resources by Version: what this API version offers, by name (the cheapest authenticated call)."""
    sb = _sandbox(request)
    sb.count("resource_calls")
    if (refusal := await _gate(request, sb, version)) is not None:
        return refusal
    base = f"/services/data/{version}"
    return _api(sb, 200, {name: f"{base}/{name}" for name in ("composite", "connect", "limits", "query", "sobjects")})


# sandbox-only fixtures (a test and demo aid, never part of Salesforce), behind the control key ------


@get("/sandbox/appointments")
@_controlled
async def list_appointments(request: Request[Any, Any, Any]) -> ASGIApp:
    return _json(200, [a.listing() for a in _sandbox(request).appointments()])


@get("/sandbox/faults")
@_controlled
async def get_faults(request: Request[Any, Any, Any]) -> ASGIApp:
    return _json(200, _sandbox(request).faults.snapshot())


@post("/sandbox/faults")
@_controlled
async def set_faults(request: Request[Any, Any, Any]) -> ASGIApp:
    sb = _sandbox(request)
    try:
        update = msgspec.json.decode(await request.body() or b"{}", type=FaultsUpdate)
        view = sb.faults.apply(update)
    except (msgspec.DecodeError, ValueError) as exc:
        return _json(400, {"error": str(exc)})
    return _json(200, view)


@get("/sandbox/counters")
@_controlled
async def get_counters(request: Request[Any, Any, Any]) -> ASGIApp:
    return _json(200, _sandbox(request).counters())


@get("/sandbox/iam-callouts")
@_controlled
async def iam_callouts(request: Request[Any, Any, Any]) -> ASGIApp:
    """What the org's IAM callouts answered, one entry per ServiceAppointment they were made for."""
    iam = _sandbox(request).iam
    return _json(200, [msgspec.to_builtins(c) for c in (iam.called() if iam is not None else [])])


@post("/sandbox/reset")
@_controlled
async def reset(request: Request[Any, Any, Any]) -> ASGIApp:
    _sandbox(request).reset()
    return _json(200, {"reset": True})


# errors Litestar itself raises (unknown path, wrong method), in Salesforce's shape ------------------


def _http_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    if isinstance(exc, NotFoundException):
        status, code, message = 404, "NOT_FOUND", "The requested resource does not exist"
    elif isinstance(exc, MethodNotAllowedException):
        status, code, message = 405, "METHOD_NOT_ALLOWED", f"HTTP Method '{request.method}' not allowed."
    elif isinstance(exc, HTTPException):
        status, code, message = exc.status_code, "INVALID_INPUT", "The request could not be processed."
    else:
        status, code, message = 500, "UNKNOWN_EXCEPTION", "An unexpected error occurred."
    headers = _limit_header(request.app.state.sandbox) if request.url.path.startswith("/services/data") else {}
    return Response(
        content=_encoder.encode([{"message": message, "errorCode": code}]),
        status_code=status,
        media_type=_JSON,
        headers=headers,
    )


def create_sandbox_app(config: SandboxConfig | None = None) -> Litestar:
    """A fresh org: its state is `app.state.sandbox` (a `SandboxState`), faults at `.faults`."""
    config = config or SandboxConfig()
    jwt_key = None
    if config.certificate_pem:
        pem = config.certificate_pem
        cert = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
        jwt_key = cert.public_key()
    _install_quiet_drops()
    app = Litestar(
        route_handlers=[
            token,
            book,
            update,
            cancel,
            slots,
            resources,
            *rest.ROUTES,
            list_appointments,
            get_faults,
            set_faults,
            get_counters,
            iam_callouts,
            reset,
            *control.ROUTES,
        ],
        exception_handlers={HTTPException: _http_error, Exception: _http_error},
        logging_config=None,
        openapi_config=None,
        debug=False,
    )
    app.state.sandbox = SandboxState(config)
    app.state.sandbox_jwt_key = jwt_key
    return app
