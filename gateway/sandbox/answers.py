"""What every answer of the sandbox shares: Salesforce's error list, the `Sforce-Limit-Info` header,
the gate each API call passes (faults, session, allowance, version), and the control key that opens the
sandbox's own endpoints. Used by the appointment API (app.py) and the REST API (rest.py) alike."""

from __future__ import annotations

import asyncio
import hmac
import re
from typing import Any

import msgspec
from litestar import Request
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp

from gateway.sandbox.rules import SfError
from gateway.sandbox.state import SandboxState

_JSON = "application/json"
_encoder = msgspec.json.Encoder()


def json_answer(status: int, body: Any, headers: dict[str, str] | None = None) -> ASGIResponse:
    return ASGIResponse(body=_encoder.encode(body), status_code=status, media_type=_JSON, headers=headers)


def limit_header(sb: SandboxState) -> dict[str, str]:
    return {"Sforce-Limit-Info": f"api-usage={sb.api_usage()}/{sb.daily_limit}"}


def api(sb: SandboxState, status: int, body: Any) -> ASGIResponse:
    """Every answer under /services/data carries the org's API usage, errors included."""
    return json_answer(status, body, limit_header(sb))


def errors(sb: SandboxState, status: int, *items: SfError) -> ASGIResponse:
    return api(sb, status, list(items))


def not_found(sb: SandboxState) -> ASGIResponse:
    return errors(sb, 404, SfError(message="The requested resource does not exist", errorCode="NOT_FOUND"))


def server_error(sb: SandboxState, status: int) -> ASGIResponse:
    if status == 503:
        err = SfError(message="Server is temporarily unavailable. Try again later.", errorCode="SERVER_UNAVAILABLE")
    else:
        err = SfError(
            message="An unexpected error occurred. Please include this ErrorId if you contact support: 1234567890-12345 (-1234567890)",
            errorCode="UNKNOWN_EXCEPTION",
        )
    return errors(sb, status, err)


# the gate every API call passes ----------------------------------------------------------------

_VERSION = re.compile(r"v(\d+)\.(\d+)")


def parse_version(text: str) -> tuple[int, int] | None:
    m = _VERSION.fullmatch(text)
    return (int(m.group(1)), int(m.group(2))) if m else None


async def gate(
    request: Request[Any, Any, Any], sb: SandboxState, version: str, *, minimum: tuple[int, int] | None = None
) -> ASGIResponse | None:
    """Faults, session, limits and version, in the order a client would meet them in Salesforce:
    an outage before anything, then the session, then the allowance."""
    faults = sb.faults
    latency = faults.latency_ms
    if latency > 0:
        await asyncio.sleep(latency / 1000)
    if faults.take("server_error"):
        sb.count("server_errors")
        return server_error(sb, faults.server_error_status())
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip() or not sb.check_token(token.strip()):
        sb.count("invalid_session")
        return errors(sb, 401, SfError(message="Session expired or invalid", errorCode="INVALID_SESSION_ID"))
    if faults.take("request_limit_exceeded") or not sb.try_consume_api_call():
        sb.count("limit_refusals")
        return errors(sb, 403, SfError(message="TotalRequests Limit exceeded.", errorCode="REQUEST_LIMIT_EXCEEDED"))
    wanted = parse_version(version)
    newest = parse_version("v" + sb.config.api_version)
    if wanted is None or newest is None or wanted > newest or (minimum is not None and wanted < minimum):
        return not_found(sb)
    return None


def sandbox_of(request: Request[Any, Any, Any]) -> SandboxState:
    return request.app.state.sandbox  # type: ignore[no-any-return]


def controlled(handler: Any) -> Any:
    """The sandbox's own endpoint, open only with `Authorization: Bearer <control_key>`."""

    async def guarded(request: Request[Any, Any, Any]) -> ASGIApp:
        key = sandbox_of(request).config.control_key
        scheme, _, sent = request.headers.get("authorization", "").partition(" ")
        if not key or scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), key.encode()):
            return json_answer(401, {"error": "the sandbox's own endpoints need Authorization: Bearer <control key>"})
        return await handler(request)

    guarded.__name__, guarded.__doc__ = handler.__name__, handler.__doc__
    return guarded
