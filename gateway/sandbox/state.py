"""The sandbox's mutable state: issued sessions, stored appointments, faults and counters.

The sandbox is usually served from a background thread while a test reads or changes this state from
its own thread, so every access goes through a lock and readers get snapshots, never live objects.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import random
import secrets
import threading
import time
from datetime import datetime, timezone
from typing import Any, Literal

import msgspec

from gateway.sandbox import seed
from gateway.sandbox.iam import IamOrg
from gateway.sandbox.config import SandboxConfig
from gateway.sandbox.org import Org
from gateway.sandbox.rules import BookingRequest
from gateway.sandbox.values import salesforce_id, sf_datetime

ORG_ID = salesforce_id("00D", 1)
USER_ID = salesforce_id("005", 1)


class Counters(msgspec.Struct, kw_only=True):
    """What tests count: grants (did the client re-authenticate?) and calls (did it retry?)."""

    token_requests: int = 0
    token_grants: int = 0
    token_refusals: int = 0
    api_calls: int = 0  # calls counted against the daily limit, as in Sforce-Limit-Info
    book_calls: int = 0  # every POST …/appointment received, whatever the outcome
    update_calls: int = 0
    cancel_calls: int = 0
    slots_calls: int = 0
    query_calls: int = 0  # every query, alone or inside a Composite call
    appointment_queries: int = 0  # of those, the queries of ServiceAppointment (a booking looked up)
    composite_calls: int = 0  # Composite calls, each one API call whatever it holds
    sobject_calls: int = 0  # sObject create, read and upsert calls outside Composite
    resource_calls: int = 0  # Resources by Version: what readiness calls
    invalid_session: int = 0
    limit_refusals: int = 0
    server_errors: int = 0  # 5xx answers from a fault, counted or ratio
    dropped_connections: int = 0  # connections dropped after storing, counted or ratio
    faults_before_store: int = 0  # Book calls failed by fail_before_store_ratio
    faults_dropped_after_store: int = 0  # Book calls dropped by drop_after_store_ratio
    faults_answered_after_store: int = 0  # Book calls stored, then answered by answer_after_store_ratio
    answers_replaced: int = 0  # Book calls answered by the book_answer fault (before or after storing)


# the body of a replaced answer: Salesforce's own shape for the status, a proxy's HTML page, nothing,
# bytes that are not JSON, the connection dropped after the head, or no answer for seconds
AnswerBody = Literal["salesforce", "html", "empty", "garbage", "drop", "hang"]


class FaultsView(msgspec.Struct, kw_only=True):
    latency_ms: int = 0
    request_limit_exceeded: int = 0
    server_error: int = 0
    server_error_status: int = 503
    drop_after_store: int = 0
    fail_before_store_ratio: float = 0.0
    drop_after_store_ratio: float = 0.0
    answer_after_store_ratio: float = 0.0
    # what a ratio-drawn answer after storing is, one picked at random: "<status>:<body>"
    answer_after_store: tuple[str, ...] = ("503:salesforce", "503:html", "429:html", "401:salesforce")
    fault_seed: int | None = None
    tokens_expired: int = 0  # how many times expire_tokens was triggered
    # the next book_answer Book calls get this answer instead of Salesforce's, as from a proxy or a
    # load balancer in front of the org: before the booking reaches the org, or after it was stored
    book_answer: int = 0
    book_answer_status: int = 503
    book_answer_body: AnswerBody = "salesforce"
    book_answer_before_store: bool = False
    book_answer_id: str | None = None  # a 2xx that names this id instead of the stored one
    book_answer_pad_bytes: int = 0  # a 2xx made this much larger


class FaultsUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of `POST /sandbox/faults`; absent fields keep their value."""

    latency_ms: int | None = None
    expire_tokens: bool = False
    request_limit_exceeded: int | None = None
    server_error: int | None = None
    server_error_status: Literal[500, 503] | None = None
    drop_after_store: int | None = None
    fail_before_store_ratio: float | None = None
    drop_after_store_ratio: float | None = None
    answer_after_store_ratio: float | None = None
    answer_after_store: tuple[str, ...] | None = None
    fault_seed: int | None = None
    book_answer: int | None = None
    book_answer_status: int | None = None
    book_answer_body: AnswerBody | None = None
    book_answer_before_store: bool | None = None
    book_answer_id: str | None = None
    book_answer_pad_bytes: int | None = None


BookFault = Literal["fail_before_store", "drop_after_store", "answer_after_store"]
_RATIOS = ("fail_before_store_ratio", "drop_after_store_ratio", "answer_after_store_ratio")


class ReplacedAnswer(msgspec.Struct, frozen=True):
    """One Book call's answer as a fault makes it (`gateway/sandbox/app.py` renders it)."""

    status: int
    body: AnswerBody
    before_store: bool = False
    id: str | None = None
    pad_bytes: int = 0


class SandboxFaults:
    """Switchable failures. Counted faults (`request_limit_exceeded`, `server_error`,
    `drop_after_store`) fire on the next N matching calls, then switch themselves off.

    Ratio faults (`fail_before_store_ratio`, `drop_after_store_ratio`) stay on: each Book call that
    passed the session, limit and rule checks takes one draw from a `random.Random(fault_seed)`,
    which picks at most one of them. Setting a ratio or the seed restarts that sequence."""

    def __init__(self, on_expire_tokens: Any) -> None:
        self._lock = threading.Lock()
        self._on_expire_tokens = on_expire_tokens
        self._view = FaultsView()
        self._rng = random.Random()

    def set(self, *, expire_tokens: bool = False, **changes: Any) -> FaultsView:
        """Change the named faults (the fields of `FaultsView`; None keeps a value); ValueError names
        the first bad one."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = set(changes) - set(FaultsView.__struct_fields__) | ({"tokens_expired"} & set(changes))
        if unknown:
            raise ValueError(f"unknown fault: {sorted(unknown)[0]}")
        for name in ("latency_ms", "request_limit_exceeded", "server_error", "drop_after_store", "book_answer",
                     "book_answer_pad_bytes"):
            value = changes.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a whole number, not negative")
        if changes.get("server_error_status", 500) not in (500, 503):
            raise ValueError("server_error_status must be 500 or 503")
        if not 200 <= changes.get("book_answer_status", 200) <= 599:
            raise ValueError("book_answer_status must be an HTTP status (200 to 599)")
        for kind in changes.get("answer_after_store", ()):
            status, _, body = kind.partition(":")
            if not (status.isdigit() and 200 <= int(status) <= 599 and body in AnswerBody.__args__):  # type: ignore[attr-defined]
                raise ValueError("answer_after_store entries are '<status>:<body>' (" + "|".join(AnswerBody.__args__) + ")")  # type: ignore[attr-defined]
        ratios = {k: v for k, v in changes.items() if k in _RATIOS}
        for name, value in ratios.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number from 0 to 1")
            changes[name] = float(value)
        if "fault_seed" in changes and (isinstance(changes["fault_seed"], bool) or not isinstance(changes["fault_seed"], int)):
            raise ValueError("fault_seed must be an integer")
        with self._lock:
            view = msgspec.structs.replace(self._view, **changes)
            # Checked against the merged view: a partial update must not push the sum past 1.
            total = sum(getattr(view, name) for name in _RATIOS)
            if total > 1.0 and not math.isclose(total, 1.0):
                raise ValueError(" + ".join(_RATIOS) + " must not exceed 1")
            self._view = view
            if ratios or "fault_seed" in changes:
                self._rng = random.Random(view.fault_seed)
        if expire_tokens:
            self.expire_tokens()
        return self.snapshot()

    def apply(self, update: FaultsUpdate) -> FaultsView:
        fields = {name: getattr(update, name) for name in update.__struct_fields__ if name != "expire_tokens"}
        return self.set(expire_tokens=update.expire_tokens, **fields)

    def expire_tokens(self) -> None:
        """Invalidate every token issued so far, as a revoked or timed-out session would be."""
        self._on_expire_tokens()
        with self._lock:
            self._view = msgspec.structs.replace(self._view, tokens_expired=self._view.tokens_expired + 1)

    @property
    def latency_ms(self) -> int:
        with self._lock:
            return self._view.latency_ms

    def server_error_status(self) -> int:
        with self._lock:
            return self._view.server_error_status

    def take(self, name: Literal["request_limit_exceeded", "server_error", "drop_after_store"]) -> bool:
        """Consume one occurrence of a counted fault; True if it fires for this call."""
        with self._lock:
            remaining = getattr(self._view, name)
            if remaining <= 0:
                return False
            self._view = msgspec.structs.replace(self._view, **{name: remaining - 1})
            return True

    def draw_book_fault(self) -> tuple[BookFault, ReplacedAnswer | None] | None:
        """One draw for one Book call: which ratio fault, if any, it meets (and for an answer after
        storing, which answer)."""
        with self._lock:
            view = self._view
            if not any(getattr(view, name) > 0.0 for name in _RATIOS):
                return None
            x = self._rng.random()  # in [0, 1): ratio 1.0 always fires, 0.0 never
            kind = self._rng.choice(view.answer_after_store) if view.answer_after_store else "503:html"
        if x < view.fail_before_store_ratio:
            return "fail_before_store", None
        if x < view.fail_before_store_ratio + view.drop_after_store_ratio:
            return "drop_after_store", None
        if x < sum(getattr(view, name) for name in _RATIOS):
            status, _, body = kind.partition(":")
            return "answer_after_store", ReplacedAnswer(int(status), body)  # type: ignore[arg-type]
        return None

    def take_book_answer(self) -> ReplacedAnswer | None:
        """Consume one occurrence of the book_answer fault: the answer to give instead, or None."""
        with self._lock:
            view = self._view
            if view.book_answer <= 0:
                return None
            self._view = msgspec.structs.replace(view, book_answer=view.book_answer - 1)
        return ReplacedAnswer(view.book_answer_status, view.book_answer_body, view.book_answer_before_store,
                              view.book_answer_id, view.book_answer_pad_bytes)

    def snapshot(self) -> FaultsView:
        with self._lock:
            return self._view

    def reset(self) -> None:
        with self._lock:
            self._view = FaultsView()
            self._rng = random.Random()


class StoredAppointment(msgspec.Struct, kw_only=True, frozen=True):
    """One booking as the sandbox holds it. Replaced, never mutated, so snapshots stay valid."""

    id: str
    number: int
    status: Literal["Scheduled", "Cancelled"]
    request: dict[str, Any]  # the last book/update body exactly as received
    booking: BookingRequest
    start: datetime
    end: datetime
    created_at: datetime
    updated_at: datetime
    cancellation_reason: str | None = None
    cancel_comment: str | None = None

    def participant_ids(self, kind: str) -> list[str]:
        prefix = kind + "/"
        return [p.reference[len(prefix) :] for p in self.booking.participants if p.reference.startswith(prefix)]

    def service_appointment(self) -> dict[str, Any]:
        """The ServiceAppointment record Health Cloud would keep for this booking. Fields ending
        in `__c` are the sandbox's own (a real org would need them as custom fields)."""
        b = self.booking
        return {
            "Id": self.id,
            "AppointmentNumber": f"SA-{self.number:04d}",
            # The ServiceAppointment picklist spells "Canceled"; the Connect answer "Cancelled".
            "Status": "Canceled" if self.status == "Cancelled" else "Scheduled",
            "SchedStartTime": sf_datetime(self.start),
            "SchedEndTime": sf_datetime(self.end),
            "Comments": b.comment,
            "WorkTypeId": b.workTypeId,
            "ParentRecordId": _first(self.participant_ids("Patient")),
            "ServiceTerritoryId": _first(self.participant_ids("Facility")),
            "AppointmentType": _first(b.appointmentTypes),
            "EngagementChannelTypeId": b.channelId,
            "CancellationReason": self.cancellation_reason,
            "CreatedDate": sf_datetime(self.created_at),
            "LastModifiedDate": sf_datetime(self.updated_at),
            "SourceSystem__c": b.sourceSystem,
            "PractitionerId__c": _first(self.participant_ids("Practitioner")),
            "DeviceId__c": _first(self.participant_ids("Device")),
            "ExternalSlotId__c": b.slots[0].id if b.slots else None,
            "TimeZone__c": b.timeZone,
        }

    def listing(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "request": self.request,
            "cancellationReason": self.cancellation_reason,
            "createdAt": sf_datetime(self.created_at),
            "updatedAt": sf_datetime(self.updated_at),
            "serviceAppointment": self.service_appointment(),
        }


def _first(values: Any) -> Any:
    return values[0] if values else None


class _Session(msgspec.Struct):
    last_used: float


class SandboxState:
    """Everything the sandbox remembers; `app.state.sandbox` is one of these."""

    def __init__(self, config: SandboxConfig) -> None:
        self._lock = threading.RLock()
        self.config = config
        self._session_timeout_s = config.session_timeout_s
        self.daily_limit = config.daily_limit
        self._sessions: dict[str, _Session] = {}
        self._appointments: dict[str, StoredAppointment] = {}
        self._records: dict[str, tuple[StoredAppointment, dict[str, Any]]] = {}  # see service_appointments
        self._first_number = self._next_number = config.first_number
        self._counters = Counters()
        self.faults = SandboxFaults(on_expire_tokens=self._expire_sessions)
        self.org = Org(seed.plant if config.org_seed == "demo" else None)
        self.iam = IamOrg(config.iam_url, config.iam_authorization or "", self.org) if config.iam_url else None

    # sessions ---------------------------------------------------------------------------------
    def issue_token(self) -> str:
        token = f"{ORG_ID[:15]}!{secrets.token_urlsafe(48)}"  # Salesforce's shape: org id, '!', opaque
        with self._lock:
            self._sessions[token] = _Session(last_used=time.monotonic())
        return token

    def check_token(self, token: str) -> bool:
        """Valid if issued here, not expired by the fault, and not idle past the session timeout."""
        now = time.monotonic()
        with self._lock:
            session = self._sessions.get(token)
            if session is None:
                return False
            if self._session_timeout_s is not None and now - session.last_used > self._session_timeout_s:
                del self._sessions[token]
                return False
            session.last_used = now
            return True

    def _expire_sessions(self) -> None:
        with self._lock:
            self._sessions.clear()

    @staticmethod
    def token_signature(secret: str | None, identity_url: str, issued_at: str) -> str:
        key = (secret or "").encode()
        digest = hmac.new(key, (identity_url + issued_at).encode(), hashlib.sha256).digest()
        return base64.b64encode(digest).decode()

    # counters ---------------------------------------------------------------------------------
    def count(self, name: str, by: int = 1) -> int:
        with self._lock:
            value = getattr(self._counters, name) + by
            setattr(self._counters, name, value)
            return value

    def counters(self) -> Counters:
        with self._lock:
            return msgspec.structs.replace(self._counters)

    def api_usage(self) -> int:
        with self._lock:
            return self._counters.api_calls

    def try_consume_api_call(self) -> bool:
        """Count one call against the daily limit; False once the allowance is spent."""
        with self._lock:
            if self._counters.api_calls >= self.daily_limit:
                return False
            self._counters.api_calls += 1
            return True

    # appointments -----------------------------------------------------------------------------
    def store_new(self, request: dict[str, Any], booking: BookingRequest, start: datetime, end: datetime) -> StoredAppointment:
        now = datetime.now(timezone.utc)
        with self._lock:
            number = self._next_number
            self._next_number += 1
            appt = StoredAppointment(
                id=salesforce_id("08p", number),
                number=number,
                status="Scheduled",
                request=request,
                booking=booking,
                start=start,
                end=end,
                created_at=now,
                updated_at=now,
            )
            self._appointments[appt.id] = appt
            return appt

    def replace(self, appt_id: str, **changes: Any) -> StoredAppointment | None:
        with self._lock:
            current = self._appointments.get(appt_id)
            if current is None:
                return None
            updated = msgspec.structs.replace(current, updated_at=datetime.now(timezone.utc), **changes)
            self._appointments[appt_id] = updated
            return updated

    def get(self, appt_id: str) -> StoredAppointment | None:
        with self._lock:
            if len(appt_id) == 15:  # Salesforce accepts the case-sensitive 15-char form too
                return next((a for a in self._appointments.values() if a.id[:15] == appt_id), None)
            return self._appointments.get(appt_id)

    def appointments(self) -> list[StoredAppointment]:
        with self._lock:
            return list(self._appointments.values())

    def service_appointments(self) -> list[dict[str, Any]]:
        """Every appointment as its ServiceAppointment record, for queries. Records are built once
        per stored version (appointments are replaced, never mutated), so a query over thousands
        of bookings stays cheap."""
        with self._lock:
            current = list(self._appointments.values())
        out = []
        for appt in current:
            cached = self._records.get(appt.id)
            if cached is None or cached[0] is not appt:
                cached = (appt, appt.service_appointment())
                self._records[appt.id] = cached
            out.append(cached[1])
        return out

    # records, as SOQL and the sObject calls read them (soql.Source) -----------------------------
    def queried(self, sobject: str) -> None:
        if sobject == "ServiceAppointment":  # what tests of a booking's look-up count
            self.count("appointment_queries")

    def rows(self, sobject: str) -> list[dict[str, Any]]:
        return self.service_appointments() if sobject == "ServiceAppointment" else self.org.rows(sobject)

    def find(self, record_id: str) -> tuple[str, dict[str, Any]] | None:
        found = self.org.resolve(record_id)
        if found is None and record_id.startswith("08p") and (appt := self.get(record_id)) is not None:
            return "ServiceAppointment", appt.service_appointment()
        return found

    def reset(self) -> None:
        """Forget bookings, sessions, counters, faults and the records added to the org: a fresh
        (seeded) org for the next scenario."""
        with self._lock:
            self._appointments.clear()
            self._records.clear()
            self._sessions.clear()
            self._next_number = self._first_number
            self._counters = Counters()
        self.faults.reset()
        self.org.reset()
        if self.iam is not None:
            self.iam.reset()
