"""What the scheduling core's operations give back to the edge: the EHR calls a callout made (for its
log line), a search's share per source system, a create's outcome."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from gateway.ehr.model import EhrAppointment, EhrSlot
from gateway.errors import GatewayError
from gateway.outbound.calls import CallRecord


@dataclass(slots=True)
class Calls:
    """The EHR calls one callout made, for its log line (no patient data)."""

    ehr: list[tuple[str, CallRecord]] = field(default_factory=list)  # (source system, call)
    op: str = ""  # what the callout turned out to be (a POST to an appointment: create or cancel)
    source: str = "healthcloud"  # the source whose EHR it went to; "healthcloud" when several or none
    outcome: str = ""  # the request log's word for what it did, once it did it
    patient: str | None = None  # the patient it named (sealed in the request log, never logged)
    sources: dict[str, str] = field(default_factory=dict)  # source system -> source name, for metrics

    def record(self, system: str) -> CallRecord:
        call = CallRecord()
        self.ehr.append((system, call))
        return call


@dataclass(slots=True)
class Found:
    """One source system's share of a search: its slots, or why it has none."""

    system: str
    slots: list[EhrSlot] = field(default_factory=list)
    error: GatewayError | None = None


@dataclass(slots=True)
class Booked:
    """What a create did: the EHR's appointment, or (`reason`) why nothing was booked; `answer` once
    it is rendered (as stored in its record)."""

    system: str
    appointment: EhrAppointment | None
    reason: str | None = None
    in_doubt: bool = False  # the EHR may hold it: the next create looks before booking
    came_from_ehr: bool = False  # booked through the first direction: nothing was booked now
    answer: bytes | None = None  # the answer as given (a repeated create answers it again)
    replayed: bool = False  # answered from the record of an earlier create


@dataclass(slots=True)
class Kept:
    """An appointment read or cancelled: as its EHR has it now, and the answer its create gave
    (None when the callouts did not book it), which a read and a cancel answer again."""

    system: str
    appointment: EhrAppointment
    answer: bytes | None = None

    def slot(self) -> str | None:
        """The slot its create booked, as the kept answer names it."""
        if self.answer is None:
            return None
        refs = msgspec.json.decode(self.answer).get("slot") or [{}]
        reference = refs[0].get("reference") or ""
        return reference.rpartition("/")[2] or None
