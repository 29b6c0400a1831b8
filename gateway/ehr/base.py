"""What every EHR client shares: its token (client credentials with a secret, HTTP Basic as Cerner's
system accounts use; or a signed JWT assertion, RS384, as Epic's backend services and SMART's use),
and its calls, through the same machinery as Salesforce's (`gateway/outbound`): a breaker per EHR,
a concurrency bound, one token renewal, "never sent" told from "lost".

A dialect's client (cerner.py, epic.py, fhir.py) subclasses `EhrClient` and turns the neutral shapes of
`model.py` into its EHR's requests; `refusal` and `read_json` are how it reads what comes back.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from typing import Any
from urllib.parse import quote

import jwt
import msgspec
import redis.asyncio as redis

from gateway.canonical import Person
from gateway.ehr.model import BookRequest, EhrAppointment, EhrSlot, SlotQuery
from gateway.errors import EhrFailed, EhrRefused, InvalidRequest, NotFound, Unavailable, http
from gateway.outbound.calls import Caller, CallRecord
from gateway.outbound.http import Answer, HttpClient, Lost, NeverSent, Params
from gateway.outbound.tokens import SharedToken, Token, connection_key
from gateway.settings import EhrCredentials, EhrSettings
from gateway.state.breaker import CircuitBreaker

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FHIR_JSON = "application/fhir+json"
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}  # one per answer shape, made at first use
R4_ID_LENGTH = 64  # R4's id type: [A-Za-z0-9\-.]{1,64}
_ID = re.compile(r"(?!\.*\Z)[A-Za-z0-9\-.]+")  # the id type's alphabet, and not only dots


def ehr_id(value: str, element: str, longest: int = R4_ID_LENGTH, *, parameter: bool = False) -> str:
    """`value` as an id an EHR may be asked about: FHIR's id type (letters, digits, `-` and `.`), at
    most `longest` characters (the EHR's own limit: `EhrClient.longest_id`), and not only dots (`.` and
    `..` are path segments of their own, which a URL resolves away). Else InvalidRequest naming
    `element` (a FHIRPath; a query or form parameter's name when `parameter`) and never the value:
    nothing outside the grammar can steer the EHR's URL or query, or an HL7 field."""
    if len(value) > longest or not _ID.fullmatch(value):
        where = {"location": http(element)} if parameter else {"expression": (element,)}
        raise InvalidRequest(f"{element}: not an id the EHR takes (1 to {longest} letters, digits, '-' and '.', "
                             "not only dots)", **where)  # type: ignore[arg-type]
    return value


def segment(value: str) -> str:
    """`value` as one segment of a path a client builds: percent-encoded whole (`/`, `?`, `#` and `%`
    too), so it names one resource and never another path or a query. A value that is empty or only
    dots is refused (InvalidRequest): encoding does not stop a server resolving `%2E%2E` as `..`."""
    if not value.strip("."):
        raise InvalidRequest("an id is empty or only dots: no EHR's id")
    return quote(value, safe="")


class _TokenAnswer(msgspec.Struct):
    access_token: str
    expires_in: float | None = None


class EhrToken(SharedToken):
    """The EHR's bearer token, shared by every worker in Redis under `<prefix>:ehr:{token:<digest>}`."""

    def __init__(self, source: str, settings: EhrSettings, credentials: EhrCredentials, http: HttpClient,
                 client: redis.Redis, prefix: str) -> None:
        assert settings.token_url is not None and settings.client_id is not None
        flow = "assertion" if credentials.private_key_pem else "secret"
        super().__init__(client, connection_key(prefix, "ehr", (source, settings.token_url, settings.client_id, flow)),
                         name=f"the {source} EHR", cache_seconds=settings.token_cache_seconds,
                         retry_after=settings.unavailable_retry_after_seconds)
        self._source, self._settings, self._credentials, self._http = source, settings, credentials, http

    def _grant(self) -> tuple[dict[str, str], dict[str, str]]:
        """The form and headers of a client-credentials request."""
        s, c = self._settings, self._credentials
        form = {"grant_type": "client_credentials", "scope": s.scopes}
        if c.private_key_pem:
            now = int(time.time())
            claims = {"iss": s.client_id, "sub": s.client_id, "aud": s.token_url, "jti": secrets.token_urlsafe(16),
                      "iat": now, "exp": now + 240}
            form |= {"client_assertion_type": ASSERTION_TYPE,
                     "client_assertion": jwt.encode(claims, c.private_key_pem, algorithm="RS384")}
            return form, {}
        basic = base64.b64encode(f"{s.client_id}:{c.client_secret}".encode()).decode()
        return form, {"Authorization": f"Basic {basic}", "Accept": "application/json"}

    async def _mint(self) -> tuple[Token, float | None]:
        form, headers = self._grant()
        retry_after = self._settings.unavailable_retry_after_seconds
        try:
            answer = await self._http.request("POST", self._settings.token_url or "", form=form, headers=headers)
        except (NeverSent, Lost):
            raise Unavailable(f"the {self._source} EHR's token endpoint cannot be reached",
                              retry_after=retry_after) from None
        if answer.status != 200:
            try:  # OAuth errors name a code only: safe to say
                code = str(msgspec.json.decode(answer.content).get("error", "unknown"))[:64]
            except (msgspec.DecodeError, AttributeError):
                code = "unreadable answer"
            raise Unavailable(f"the {self._source} EHR refused the gateway's credentials ({code})",
                              retry_after=retry_after)
        try:
            parsed = msgspec.json.decode(answer.content, type=_TokenAnswer)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise Unavailable(f"the {self._source} EHR's token answer cannot be read", retry_after=retry_after) from None
        # renewed a little before the EHR would refuse it
        lives = max(1.0, parsed.expires_in - 30) if parsed.expires_in else None
        return Token(access_token=parsed.access_token), lives


def _unhealthy(response: Answer) -> bool:
    """The EHR (or the way to it) cannot serve: a 5xx, 401, 408, 429 or a redirect. A 4xx about the
    request itself (a slot taken, a rule broken, not found) is an answer."""
    status = response.status
    return status >= 500 or 300 <= status < 400 or status in (401, 408, 429)


class EhrClient:
    """The calls to one source's EHR. `dialect` is the source's adapter."""

    dialect = ""
    # the EHR's own slot search leaves out a slot once booked (Cerner, Epic); a plain FHIR server may not
    keeps_slot_status = True
    longest_id = R4_ID_LENGTH  # the longest id the EHR gives (`ehr_id`'s limit for what is sent to it)

    def __init__(self, source: str, settings: EhrSettings, credentials: EhrCredentials | None, http: HttpClient,
                 client: redis.Redis, prefix: str, *, workers: int = 1, breaker: CircuitBreaker | None = None) -> None:
        self.source, self.settings = source, settings
        tokens = (EhrToken(source, settings, credentials, http, client, prefix)
                  if settings.token_url is not None and credentials is not None else None)
        self.tokens = tokens
        base = settings.base_url.rstrip("/")
        self.caller = Caller(
            http, tokens, breaker, limit=max(1, settings.max_concurrent_calls // max(1, workers)),
            name=f"the {source} EHR", retry_after=settings.unavailable_retry_after_seconds,
            base=lambda _token: base, unhealthy=_unhealthy, auth_refused=lambda r: r.status == 401,
            lost=lambda: EhrFailed(f"the {source} EHR's answer did not arrive; the request may or may not have been applied"),
            headers={"Accept": FHIR_JSON},
        )

    async def call(self, method: str, path: str, record: CallRecord, *, body: Any = None,
                   params: Params | None = None, headers: dict[str, str] | None = None,
                   resend: bool = True, counted: bool = True, media_type: str = FHIR_JSON) -> Answer:
        """`path` below the EHR's base (or a whole URL on it, as a Bundle's `next` link gives);
        `body` encoded as JSON unless it is bytes."""
        payload = b"" if body is None else body if isinstance(body, bytes) else msgspec.json.encode(body)
        sent = {"Content-Type": media_type, **(headers or {})} if payload else dict(headers or {})
        base = self.settings.base_url.rstrip("/")
        if path.startswith(base):
            path = path[len(base):]
        return await self.caller.call(method, path, payload, record, params, resend=resend, counted=counted,
                                      headers=sent)

    def decoded(self, content: bytes | msgspec.Raw | Answer, shape: Any, record: CallRecord, what: str) -> Any:
        """An answer (or a part of one) read into `shape` (a msgspec type, its decoder made once), or
        EhrFailed naming what could not be read (marked UNREADABLE on the call)."""
        decoder = _decoders.get(shape) or _decoders.setdefault(shape, msgspec.json.Decoder(shape))
        try:
            return decoder.decode(content.content if isinstance(content, Answer) else content)
        except (msgspec.DecodeError, msgspec.ValidationError):
            record.error_code = "UNREADABLE"
            raise EhrFailed(f"the {self.source} EHR's answer to {what} cannot be read") from None

    def retry_after(self) -> int:
        return self.settings.unavailable_retry_after_seconds

    def path_id(self, value: str, element: str) -> str:
        """An id as it goes into this EHR's URL: in its grammar (else 400, and nothing is sent: no id of
        its own looks so), and one percent-encoded path segment."""
        return segment(ehr_id(value, element, self.longest_id))

    def failure(self, response: Answer, record: CallRecord, what: str) -> Exception:
        """The error for an answer that is not the one expected: the EHR's refusal in its own shape
        (an OperationOutcome with a 4xx: EhrRefused, or NotFound for a 404), it being unavailable
        (429, 503, 401 after renewal: Unavailable), or a failure (anything else: EhrFailed)."""
        status = response.status
        record.error_code = f"HTTP_{status}"
        if status in (401, 429, 503):
            return Unavailable(f"the {self.source} EHR cannot take {what} now (HTTP {status})",
                               retry_after=self.retry_after())
        issue = refusal(response)
        if 400 <= status < 500 and status not in (408,) and issue is not None:
            if status == 404:
                return NotFound(f"the {self.source} EHR has no such {what.split()[-1]}")
            return EhrRefused(f"the {self.source} EHR refused {what}: {issue}", details_code=f"HTTP_{status}")
        return EhrFailed(f"the {self.source} EHR failed {what} (HTTP {status})")

    # what every dialect offers (each raises GatewayError subclasses) ------------------------------

    async def find_slots(self, query: SlotQuery, record: CallRecord) -> list[EhrSlot]:
        raise NotImplementedError

    async def read_slot(self, slot_id: str, record: CallRecord) -> EhrSlot:
        raise NotImplementedError

    async def book(self, request: BookRequest, record: CallRecord) -> EhrAppointment:
        raise NotImplementedError

    async def read(self, appointment_id: str, record: CallRecord) -> EhrAppointment:
        raise NotImplementedError

    async def cancel(self, appointment_id: str, reason: str | None, record: CallRecord) -> EhrAppointment:
        raise NotImplementedError

    patient_base = ""  # where the EHR serves Patient reads, below `base_url` ("" : there)

    async def patient(self, value: str, system: str | None, record: CallRecord) -> Person:
        """The EHR's own record of a patient (a FHIR Patient: read by its id, or searched by an
        identifier of `system`), as much of it as creating the patient in the org needs. NotFound when
        the EHR has none (or several: that is no one patient), else as any call fails."""
        if system is None:
            answer = await self.call("GET", f"{self.patient_base}/Patient/{segment(value)}", record,
                                     counted=False)
            if answer.status != 200:
                raise self.failure(answer, record, "the patient read")
            return _person(self.decoded(answer, _Patient, record, "the patient read"))
        answer = await self.call("GET", f"{self.patient_base}/Patient", record, params={"identifier": f"{system}|{value}"},
                                 counted=False)
        if answer.status != 200:
            raise self.failure(answer, record, "the patient search")
        found = [e.resource for e in self.decoded(answer, _Patients, record, "the patient search").entry
                 if e.resource is not None]
        if len(found) != 1:
            raise NotFound(f"the {self.source} EHR has {'no' if not found else 'more than one'} patient with that "
                           "identifier")
        return _person(found[0])

    async def find_booked(self, request: BookRequest, record: CallRecord) -> EhrAppointment | None:
        """The appointment a booking whose answer was lost may have made (by its identifier, else its
        patient, slot and time), or None: looked up before anything is sent again."""
        raise NotImplementedError


class _Name(msgspec.Struct, kw_only=True):
    family: str | None = None
    given: list[str] = []
    use: str | None = None


class _Telecom(msgspec.Struct, kw_only=True):
    system: str | None = None
    value: str | None = None


class _Patient(msgspec.Struct, kw_only=True):
    """The elements of a FHIR Patient (R4; STU3 alike) that creating the patient in the org needs."""

    resourceType: str
    name: list[_Name] = []
    birthDate: str | None = None
    gender: str | None = None
    telecom: list[_Telecom] = []


class _Entry(msgspec.Struct, kw_only=True):
    resource: _Patient | None = None


class _Patients(msgspec.Struct, kw_only=True):
    entry: list[_Entry] = []


def _person(patient: _Patient) -> Person:
    """The patient's official name (else its first), birth date, gender and first phone."""
    name = next((n for n in patient.name if n.use == "official"), patient.name[0] if patient.name else _Name())
    phone = next((t.value for t in patient.telecom if t.system == "phone" and t.value), None)
    birth = patient.birthDate if patient.birthDate and len(patient.birthDate) == 10 else None
    return Person(family=name.family or None, given=" ".join(name.given) or None, birth_date=birth,
                  gender=patient.gender, phone=phone)


def read_json(response: Answer) -> Any:
    """The answer's JSON, or None when it has none or it cannot be read."""
    try:
        return msgspec.json.decode(response.content) if response.content else None
    except msgspec.DecodeError:
        return None


def refusal(response: Answer) -> str | None:
    """An OperationOutcome's first issue code (its text may quote the patient's record, so it is
    never passed on), or None when the answer is no OperationOutcome (a proxy's page, an empty body):
    then it did not come from the EHR."""
    payload = read_json(response)
    if not isinstance(payload, dict) or payload.get("resourceType") != "OperationOutcome":
        return None
    issues = payload.get("issue") if isinstance(payload.get("issue"), list) else []
    first = issues[0] if issues and isinstance(issues[0], dict) else {}
    code = first.get("code")
    return code[:64] if isinstance(code, str) and code else "unknown"
