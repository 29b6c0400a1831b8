"""The gateway's one error hierarchy. Each error carries what its OperationOutcome needs; the
rendering happens in one place (`gateway.booking.fhir.operation_outcome`).

A leaf module, importable by adapters. Messages must never carry patient data: they name FHIR paths
and codes, never values taken from the patient's record.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Severity = Literal["fatal", "error", "warning", "information"]

# A value from the request that a message repeats (a code, a system, a status) is cut to this many
# characters: a 500 KB code must not make a 500 KB answer, log line or request-log entry. Room for a
# code system URI (Cerner's tenant code sets run to about 80).
QUOTE_LIMIT = 128
# Every diagnostics is cut to this, whoever wrote it: the backstop for a message that quotes a value
# without `cut` (and for Salesforce's own messages).
DIAGNOSTICS_LIMIT = 1024


def cut(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`value` as a message may quote it: at most `limit` characters, an ellipsis marking a cut."""
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Issue(msgspec.Struct, frozen=True, omit_defaults=True):
    """One OperationOutcome.issue. `code` is from http://hl7.org/fhir/issue-type. `expression` holds
    FHIRPaths into the resource; `location` names the HTTP parts (`http.` + a header's or query
    parameter's name, as R4 says), which are no FHIRPath."""

    code: str
    diagnostics: str
    expression: tuple[str, ...] = ()
    severity: Severity = "error"
    details_code: str | None = None  # e.g. Salesforce's errorCode, shown in issue.details.coding
    location: tuple[str, ...] = ()


def http(name: str) -> tuple[str, ...]:
    """The `location` of a request's header or query parameter (`http.Idempotency-Key`)."""
    return (f"http.{name}",)


class GatewayError(Exception):
    status: int = 500
    code: str = "exception"

    def __init__(
        self,
        diagnostics: str | None = None,
        *,
        expression: tuple[str, ...] | list[str] = (),
        location: tuple[str, ...] = (),
        issues: list[Issue] | None = None,
        retry_after: int | None = None,
        details_code: str | None = None,
    ) -> None:
        if issues is None:
            issues = [
                Issue(
                    code=self.code,
                    diagnostics=diagnostics or self.__class__.__doc__ or "error",
                    expression=tuple(expression),
                    details_code=details_code,
                    location=location,
                )
            ]
        if any(len(i.diagnostics) > DIAGNOSTICS_LIMIT for i in issues):
            issues = [msgspec.structs.replace(i, diagnostics=cut(i.diagnostics, DIAGNOSTICS_LIMIT))
                      if len(i.diagnostics) > DIAGNOSTICS_LIMIT else i for i in issues]
        self.issues = issues
        self.retry_after = retry_after
        super().__init__(issues[0].diagnostics)

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class InvalidRequest(GatewayError):
    """The body is not JSON, not FHIR, or not the resource expected."""

    status, code = 400, "structure"


class Unauthorized(GatewayError):
    """No inbound key, or an unknown one."""

    status, code = 401, "login"


class Forbidden(GatewayError):
    """The key belongs to another source."""

    status, code = 403, "forbidden"


class NotFound(GatewayError):
    status, code = 404, "not-found"


class MethodNotAllowed(GatewayError):
    status, code = 405, "not-supported"


class RequestTimeout(GatewayError):
    """The request's head or body did not arrive in time."""

    status, code = 408, "timeout"


class CallerGone(GatewayError):
    """The caller closed its connection before the answer: a search is abandoned (nothing to answer).
    499 is the status proxies log for it; no client ever reads it."""

    status, code = 499, "incomplete"


class NotAcceptable(GatewayError):
    """The client accepts no format the gateway answers in (`_format` or `Accept`)."""

    status, code = 406, "not-supported"


class PayloadTooLarge(GatewayError):
    status, code = 413, "too-costly"


class UnsupportedMediaType(GatewayError):
    status, code = 415, "not-supported"


class HeadersTooLarge(GatewayError):
    """The request line and headers are over the server's limit."""

    status, code = 431, "too-costly"


class Conflict(GatewayError):
    status, code = 409, "conflict"


class InFlight(Conflict):
    """The same idempotency key is still being processed."""


class PreconditionFailed(GatewayError):
    """A condition of the request does not hold (If-Match names another version, or a conditional
    update or create matches more than one appointment); nothing was changed."""

    status, code = 412, "conflict"


class Unprocessable(GatewayError):
    """A Salesforce rule is broken or a code has no mapping."""

    status, code = 422, "business-rule"


class Unmatched(Unprocessable):
    """A participant names no record of the org (`not-found`), or several (`multiple-matches`): a gap
    in the org's records or the source's identity settings, refused at once (a retry cannot help)."""

    code = "not-found"


class PatientUnknown(Unmatched):
    """The org holds no patient for the booking's patient id (yet): the source's `unknown_patient`
    policy decides (hold, refuse, create); raised as a 422 where it refuses."""


class IdempotencyKeyReused(Unprocessable):
    """The idempotency key was used before with another booking."""

    code = "conflict"


class SalesforceRefused(Unprocessable):
    """Salesforce refused the booking (a 4xx, or isSuccess false)."""

    code = "processing"


class EhrRefused(Unprocessable):
    """The EHR refused the request in its own error shape (a slot already taken, a rule broken)."""

    code = "processing"


class TooManyRequests(GatewayError):
    """The source is over its rate limit."""

    status, code = 429, "throttled"


class SalesforceFailed(GatewayError):
    """Salesforce failed: a 5xx, or an answer that cannot be read."""

    status, code = 502, "exception"


class EhrFailed(GatewayError):
    """The EHR failed: a 5xx, or an answer that cannot be read (or that never arrived)."""

    status, code = 502, "exception"


class Unavailable(GatewayError):
    """Redis or Salesforce is unavailable, or Salesforce's request limit is reached."""

    status, code = 503, "transient"


class CircuitOpen(Unavailable):
    """Salesforce calls are paused after repeated failures; nothing was sent."""
