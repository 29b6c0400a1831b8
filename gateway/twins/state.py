"""An EHR twin's mutable state beside its calendar: its patients, the tokens it issued, its faults and its
counters."""

from __future__ import annotations

import random
import secrets
import threading
import time
from typing import Any, Literal

import msgspec

from gateway.twins.calendar import Calendar
from gateway.twins.config import TwinConfig
from gateway.twins.patients import Patients


class Counters(msgspec.Struct, kw_only=True):
    token_grants: int = 0
    api_calls: int = 0  # every call past the token endpoint
    refused_auth: int = 0
    creates: int = 0  # bookings asked for (stored or not)
    cancels: int = 0
    searches: int = 0
    reads: int = 0
    patient_reads: int = 0  # Patient reads and searches (each counted in reads or searches too)
    mllp_messages: int = 0
    create_faults_before: int = 0  # creates failed before storing by create_fail_ratio's draw
    create_faults_after_store: int = 0  # creates stored, then failed (the draw or fail_after_store)


class Faults(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Switchable faults, as an EHR or the way to it fails. Counts are spent one call at a time."""

    latency_ms: int = 0  # every API call waits this long first
    fail_before: int = 0  # the next n API calls are answered `fail_status` before anything is done
    fail_status: int = 503  # 500, 502, 503 or 429
    fail_after_store: int = 0  # the next n creates are stored, then answered as `after_store` says
    after_store: Literal["drop", "500", "503", "504"] = "drop"  # drop: the connection closes mid-answer
    expire_tokens: bool = False  # every token issued so far is refused (401) from now on
    expire_tokens_at_create: bool = False  # ... from the next create on (the calls before it still pass)
    stale_writes: int = 0  # the next n conditional updates find the record changed by someone else first
    # a share of creates failing, drawn per create from a seeded generator (a run can be repeated):
    # of those, `after_store_share` are stored first and answered as `after_store`, the rest are
    # answered `fail_status` before anything is done
    create_fail_ratio: float = 0.0
    after_store_share: float = 0.5
    fault_seed: int = 0  # setting it restarts the draws


class TwinState:
    def __init__(self, config: TwinConfig) -> None:
        self.config = config
        self.calendar = Calendar(config)
        self.patients = Patients(config.all_patients())
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self._counters = Counters()
        self._faults = Faults()
        self._draws = random.Random(0)
        # a dialect's own listener (Epic's MLLP): its server, and the port it bound
        self.mllp_server: Any = None
        self.mllp_port: int | None = None

    def count(self, name: str, by: int = 1) -> None:
        with self._lock:
            setattr(self._counters, name, getattr(self._counters, name) + by)

    def counters(self) -> Counters:
        with self._lock:
            return msgspec.structs.replace(self._counters)

    def issue_token(self) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = time.monotonic() + self.config.token_seconds
            self._counters.token_grants += 1
        return token

    def token_ok(self, token: str) -> bool:
        with self._lock:
            expiry = self._tokens.get(token)
            return expiry is not None and expiry > time.monotonic()

    def faults(self) -> Faults:
        with self._lock:
            return msgspec.structs.replace(self._faults)

    def set_faults(self, **changes: object) -> Faults:
        with self._lock:
            self._faults = msgspec.convert({**msgspec.to_builtins(self._faults), **changes}, Faults)
            if "fault_seed" in changes:
                self._draws.seed(self._faults.fault_seed)
            if self._faults.expire_tokens:
                self._tokens.clear()
                self._faults = msgspec.structs.replace(self._faults, expire_tokens=False)
            return msgspec.structs.replace(self._faults)

    def expire_at_create(self) -> None:
        """A create arrived: the tokens issued so far expire now, if the fault says so."""
        with self._lock:
            if self._faults.expire_tokens_at_create:
                self._tokens.clear()
                self._faults = msgspec.structs.replace(self._faults, expire_tokens_at_create=False)

    def take(self, name: Literal["fail_before", "fail_after_store", "stale_writes"]) -> bool:
        """Spend one of a counted fault: True when this call is to fail."""
        with self._lock:
            left = getattr(self._faults, name)
            if left <= 0:
                return False
            self._faults = msgspec.structs.replace(self._faults, **{name: left - 1})
            return True

    def draw_create_fault(self) -> Literal["before", "after_store"] | None:
        """Whether this create fails by `create_fail_ratio`, and when (counted)."""
        with self._lock:
            f = self._faults
            if f.create_fail_ratio <= 0 or self._draws.random() >= f.create_fail_ratio:
                return None
            if self._draws.random() < f.after_store_share:
                return "after_store"  # counted when it happens, in stored_then_failed
            self._counters.create_faults_before += 1
            return "before"

    def reset(self) -> None:
        with self._lock:
            self._tokens.clear()
            self._counters = Counters()
            self._faults = Faults()
        self.calendar.reset()
        self.patients.reset()
