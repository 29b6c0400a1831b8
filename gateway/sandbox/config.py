"""The sandbox's settings: which credentials it accepts and which of Salesforce's documented
variations (status code, answer shape, error-list name) it answers with, so the gateway can be
tested against each variation the samples show."""

from __future__ import annotations

from typing import Literal

import msgspec


class SandboxConfig(msgspec.Struct, kw_only=True, frozen=True):
    client_id: str = "sandbox-client-id"
    # `Authorization: Bearer <control_key>` opens the sandbox's own endpoints (appointments, faults,
    # counters, reset); without one they are closed (401): nothing of the demo's org is open to anyone
    control_key: str | None = None
    client_secret: str | None = "sandbox-client-secret"
    # JWT bearer flow: enabled only when a certificate is given. PEM text of an X.509 certificate.
    username: str | None = "integration@sandbox.example"
    certificate_pem: str | None = None
    audience: str = "https://login.salesforce.com"
    # The org's newest API version; the sandbox serves this one and older (appointment API: 65.0+).
    api_version: str = "66.0"
    daily_limit: int = 15000
    answer_status: Literal[200, 201] = 201
    answer_shape: Literal["object", "array"] = "object"
    error_key: Literal["error", "errorMessages"] = "error"
    # the instance its tokens name; None: its own address. A real org's login host and instance differ
    instance_url: str | None = None
    # Salesforce sessions time out after idleness, not at a fixed expiry; None disables it.
    session_timeout_s: float | None = 7200.0
    # One doc page requires channelId; off by default because the other does not.
    require_channel_id: bool = False
    # Get Slots: free slots of this length inside these UTC working hours.
    slot_minutes: int = 30
    workday_start_hour: int = 9
    workday_end_hour: int = 17
    # its ServiceAppointments are numbered from this: `serve` starts it from the clock, so that an id
    # never repeats across starts on the same data (the gateway's records outlive the sandbox's)
    first_number: int = 1
    max_slot_range_days: int = 62
    # Get Slots' times: with their zone, or without one, as one of Salesforce's samples writes them
    slot_times: Literal["utc", "zoneless"] = "utc"
    # An org with Intelligent Appointment Management configured: its Appointment_Management named
    # credential's URL and the Authorization header it sends. A Book for an external resource is then
    # followed by the org's slot status and Create callouts there (gateway/sandbox/iam.py).
    iam_url: str | None = None
    iam_authorization: str | None = None
    # The org's records (org.py): "demo" holds the corpus's and the demo's EHR ids (seed.py), "empty"
    # only the person-account record type. A reset brings the seeded org back.
    org_seed: Literal["demo", "empty"] = "demo"
    # Book, Update and Get Slots refuse references that are not records of the org, as an org does
    # (INVALID_ID_FIELD). Off only for the sandbox's own tests of the shapes themselves: with it off the
    # sandbox takes EHR ids where record ids belong, which no org does.
    require_records: bool = True

    def __post_init__(self) -> None:
        # Structs are not validated on construction; a typo here would make every test lie quietly.
        if self.answer_status not in (200, 201):
            raise ValueError("answer_status must be 200 or 201")
        if self.answer_shape not in ("object", "array"):
            raise ValueError("answer_shape must be 'object' or 'array'")
        if self.slot_times not in ("utc", "zoneless"):
            raise ValueError("slot_times must be 'utc' or 'zoneless'")
        if self.org_seed not in ("demo", "empty"):
            raise ValueError("org_seed must be 'demo' or 'empty'")
        if self.error_key not in ("error", "errorMessages"):
            raise ValueError("error_key must be 'error' or 'errorMessages'")
        if not self.api_version.replace(".", "", 1).isdigit() or "." not in self.api_version:
            raise ValueError("api_version must look like '66.0'")
        if self.daily_limit < 0 or self.slot_minutes <= 0:
            raise ValueError("daily_limit must be >= 0 and slot_minutes > 0")
        if not 0 <= self.workday_start_hour < self.workday_end_hour <= 24:
            raise ValueError("working hours must satisfy 0 <= start < end <= 24")
