"""An EHR twin's app: what every dialect shares (its token endpoint, its own control endpoints, the
gate every API call passes, answers in FHIR's shapes, the faults), and the dialect's own routes from
`gateway.twins.<dialect>` (`route_handlers()`).

Written from `scheduling-out.md`, never from the gateway's EHR clients: it imports nothing of
`gateway.ehr`, so a client that names a field or a path wrongly is refused here, as by the EHR.

- `POST /oauth2/token`: `client_credentials`, the client authenticated by HTTP Basic or the form's
  `client_id` / `client_secret` (Cerner's system account), or by a signed JWT assertion (RS384,
  `iss` = `sub` = the client id, `aud` = this endpoint's URL, `exp` at most 5 minutes ahead: Epic's
  backend services). Answers `{access_token, token_type, expires_in, scope}`; OAuth errors otherwise.
- `/twin/appointments`, `/twin/patients` (GET; POST adds one: 201, 409 for an id already held),
  `/twin/counters`, `/twin/faults` (GET, POST), `/twin/reset`: with `Authorization: Bearer <control key>`.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import importlib
import time
from typing import Any

import jwt
import msgspec
from litestar import Litestar, Request, get, post
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp, Receive, Scope, Send

from gateway.twins.calendar import Appointment
from gateway.twins.config import TwinConfig
from gateway.twins.patients import listing as patient_listing
from gateway.twins.patients import read_patient
from gateway.twins.state import TwinState

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FHIR_JSON = "application/fhir+json"
_encoder = msgspec.json.Encoder()


class Dropped(Exception):
    """Raised on purpose after the answer's head went out, so the server closes the connection."""


class _DropAfterHead:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", FHIR_JSON.encode())]})
        raise Dropped("connection dropped after the appointment was stored (twin fault)")


def twin(request: Request[Any, Any, Any]) -> TwinState:
    return request.app.state.twin


def answer(status: int, body: Any = None, headers: dict[str, str] | None = None,
           media_type: str = FHIR_JSON) -> ASGIResponse:
    """An answer as the dialect's handlers return it (an ASGI app, so a fault can drop the connection
    instead). `body`: a structure to encode as JSON, bytes as they are, or None for no body."""
    content = b"" if body is None else body if isinstance(body, bytes) else _encoder.encode(body)
    return ASGIResponse(body=content, status_code=status, media_type=media_type, headers=headers)


def outcome(status: int, code: str, text: str, severity: str = "error",
            coding: tuple[str, str, str] | None = None) -> ASGIApp:
    """An OperationOutcome: how every FHIR dialect refuses. `coding`: the EHR's own code for the issue
    (system, code, display: Epic's error codes)."""
    details: dict[str, Any] = {"text": text}
    if coding is not None:
        details = {"coding": [dict(zip(("system", "code", "display"), coding))], "text": text}
    return answer(status, {"resourceType": "OperationOutcome",
                           "issue": [{"severity": severity, "code": code, "details": details}]})


_AFTER_STORE = "ehr_twin.fail_after_store"  # a create drawn to fail once stored (the request's scope)


async def gate(request: Request[Any, Any, Any], *kinds: str) -> ASGIApp | None:
    """What every API call passes: counted, delayed and failed as the faults say, and its bearer
    token checked. None: go on, the call then counted in each of `kinds` (`Counters` fields);
    "creates" (a booking) is also drawn against `create_fail_ratio`."""
    create = "creates" in kinds
    state = twin(request)
    state.count("api_calls")
    faults = state.faults()
    if faults.latency_ms:
        await asyncio.sleep(faults.latency_ms / 1000)
    if create:
        state.expire_at_create()
    if state.config.require_auth:
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not state.token_ok(token.strip()):
            state.count("refused_auth")
            return outcome(401, "login", "the bearer token is missing, unknown or expired")
    failed = state.take("fail_before")
    drawn = state.draw_create_fault() if create and not failed else None
    if failed or drawn == "before":
        status = faults.fail_status
        return outcome(status, "throttled" if status == 429 else "transient", f"the EHR answered {status} (twin fault)")
    if drawn == "after_store":
        request.scope[_AFTER_STORE] = True  # type: ignore[literal-required]
    for kind in kinds:
        state.count(kind)
    return None


def stored_then_failed(request: Request[Any, Any, Any]) -> ASGIApp | None:
    """After a create was stored: the fault's answer instead of the real one (a dropped connection
    or a 5xx), or None."""
    state = twin(request)
    if not request.scope.get(_AFTER_STORE) and not state.take("fail_after_store"):
        return None
    state.count("create_faults_after_store")
    kind = state.faults().after_store
    return _DropAfterHead() if kind == "drop" else outcome(int(kind), "transient", f"the EHR answered {kind} (twin fault)")


def utc(moment: Any) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def listing(a: Appointment) -> dict[str, Any]:
    """An appointment as the twin's control endpoint lists it."""
    return {"id": a.id, "slot": a.slot, "schedule": a.schedule.id, "practitioner": a.schedule.practitioner,
            "location": a.schedule.location, "start": utc(a.start), "end": utc(a.end), "patient": a.patient,
            "status": a.status, "version": a.version, "identifiers": [list(i) for i in a.identifiers],
            "comment": a.comment, "cancelReason": a.cancel_reason}


# -- the token endpoint -------------------------------------------------------------------------------

def _oauth_error(status: int, error: str, description: str) -> ASGIApp:
    return answer(status, {"error": error, "error_description": description}, media_type="application/json",
                  headers={"Cache-Control": "no-store"})


def _client_by_secret(request: Request[Any, Any, Any], form: dict[str, str], config: TwinConfig) -> bool:
    scheme, _, encoded = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "basic":
        try:
            client_id, _, secret = base64.b64decode(encoded.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
    else:
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
    return bool(config.client_secret) and hmac.compare_digest(client_id, config.client_id) \
        and hmac.compare_digest(secret, config.client_secret or "")


def _client_by_assertion(request: Request[Any, Any, Any], form: dict[str, str], config: TwinConfig) -> bool:
    if form.get("client_assertion_type") != ASSERTION_TYPE or not config.public_key_pem:
        return False
    audience = str(request.url).split("?", 1)[0]
    try:
        claims = jwt.decode(form.get("client_assertion", ""), config.public_key_pem, algorithms=["RS384"],
                            audience=audience, options={"require": ["iss", "sub", "aud", "exp", "jti"]})
    except jwt.PyJWTError:
        return False
    return claims["iss"] == claims["sub"] == config.client_id and claims["exp"] <= time.time() + 300


@post("/oauth2/token", status_code=200)
async def token_endpoint(request: Request[Any, Any, Any]) -> ASGIApp:
    state = twin(request)
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    if form.get("grant_type") != "client_credentials":
        return _oauth_error(400, "unsupported_grant_type", "client_credentials only")
    if not (_client_by_secret(request, form, state.config) or _client_by_assertion(request, form, state.config)):
        return _oauth_error(401, "invalid_client", "the client could not be authenticated")
    return answer(200, {"access_token": state.issue_token(), "token_type": "Bearer",
                        "expires_in": state.config.token_seconds, "scope": form.get("scope", "")},
                  media_type="application/json", headers={"Cache-Control": "no-store"})


# -- the twin's own endpoints ---------------------------------------------------------------------------

def _controlled(request: Request[Any, Any, Any]) -> bool:
    scheme, _, key = (request.headers.get("authorization") or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(key.strip(), twin(request).config.control_key)


_NOT_CONTROL = {"error": "the twin's own endpoints need Authorization: Bearer <control key>"}


@get("/twin/appointments")
async def twin_appointments(request: Request[Any, Any, Any]) -> ASGIApp:
    if not _controlled(request):
        return answer(401, _NOT_CONTROL, media_type="application/json")
    return answer(200, {"appointments": [listing(a) for a in twin(request).calendar.appointments()]},
                  media_type="application/json")


@get("/twin/patients")
async def twin_patients(request: Request[Any, Any, Any]) -> ASGIApp:
    if not _controlled(request):
        return answer(401, _NOT_CONTROL, media_type="application/json")
    state = twin(request)
    return answer(200, {"patients": [patient_listing(p, state.config.dialect) for p in state.patients.all()]},
                  media_type="application/json")


@post("/twin/patients", status_code=201)
async def twin_add_patient(request: Request[Any, Any, Any]) -> ASGIApp:
    if not _controlled(request):
        return answer(401, _NOT_CONTROL, media_type="application/json")
    state = twin(request)
    try:
        patient = read_patient(await request.body())
    except ValueError as exc:  # its text names the field, never what was sent in it
        return answer(400, {"error": str(exc)}, media_type="application/json")
    if not state.patients.add(patient):
        return answer(409, {"error": "patients: the id is already another patient's"}, media_type="application/json")
    return answer(201, patient_listing(patient, state.config.dialect), media_type="application/json")


@get("/twin/counters")
async def twin_counters(request: Request[Any, Any, Any]) -> ASGIApp:
    if not _controlled(request):
        return answer(401, _NOT_CONTROL, media_type="application/json")
    return answer(200, twin(request).counters(), media_type="application/json")


@get("/twin/faults")
async def twin_faults(request: Request[Any, Any, Any]) -> ASGIApp:
    if not _controlled(request):
        return answer(401, _NOT_CONTROL, media_type="application/json")
    return answer(200, twin(request).faults(), media_type="application/json")


@post("/twin/faults", status_code=200)
async def twin_set_faults(request: Request[Any, Any, Any]) -> ASGIApp:
    if not _controlled(request):
        return answer(401, _NOT_CONTROL, media_type="application/json")
    try:
        changes = msgspec.json.decode(await request.body())
        assert isinstance(changes, dict)
        return answer(200, twin(request).set_faults(**changes), media_type="application/json")
    except (msgspec.DecodeError, msgspec.ValidationError, AssertionError, TypeError) as exc:
        return answer(400, {"error": f"faults: {exc}"}, media_type="application/json")


@post("/twin/reset", status_code=200)
async def twin_reset(request: Request[Any, Any, Any]) -> ASGIApp:
    if not _controlled(request):
        return answer(401, _NOT_CONTROL, media_type="application/json")
    twin(request).reset()
    return answer(200, {"reset": True}, media_type="application/json")


def base_path(dialect: str) -> str:
    """The twin's FHIR base below its address (`BASE_PATH` of the dialect's module)."""
    return str(importlib.import_module(f"gateway.twins.{dialect}").BASE_PATH)


def create_ehr_twin(config: TwinConfig) -> Litestar:
    """The twin of `config.dialect`: its routes (`gateway.twins.<dialect>.route_handlers()`) and
    its lifespan hooks (`on_startup`/`on_shutdown`, when the dialect has a listener of its own) beside
    the shared ones; its state at `app.state.twin`."""
    dialect = importlib.import_module(f"gateway.twins.{config.dialect}")
    state = TwinState(config)
    app = Litestar(
        route_handlers=[token_endpoint, twin_appointments, twin_patients, twin_add_patient, twin_counters, twin_faults,
                        twin_set_faults, twin_reset, *dialect.route_handlers()],
        on_startup=list(getattr(dialect, "on_startup", lambda _state: [])(state)),
        on_shutdown=list(getattr(dialect, "on_shutdown", lambda _state: [])(state)),
        logging_config=None, openapi_config=None, debug=False,
    )
    app.state.twin = state
    return app
