"""The end of every request the gateway acts on (FHIR, HL7 v2, a replay): its one log line, its
metrics, and its request-log entry, whose patient part is sealed. Outcomes are the operators' words."""

from __future__ import annotations

import os
import time

import msgspec

from gateway.booking.booker import Trace
from gateway.errors import GatewayError, IdempotencyKeyReused, SalesforceRefused, Unmatched
from gateway.logs import log
from gateway.operators.metrics import Metrics
from gateway.scheduling.results import Calls
from gateway.settings import SourceSettings
from gateway.state.requestlog import KEEP_INPUT, Entry, RequestLog, logged_issues, logged_maps
from gateway.state.requestlog import key_digest as log_key_digest


def _refused(status: int) -> str:
    if status == 429:
        return "throttled"
    if status == 409:
        return "conflict"
    return "failed" if status >= 500 else "rejected"


def outcome(status: int, trace: Trace, error: GatewayError | None) -> str:
    if status in (200, 201):
        if trace.idempotency == "done":
            return "replayed"
        return trace.result or "booked"
    if status == 202:
        return "held" if trace.parked == "held" or trace.idempotency == "held" else "queued"
    if isinstance(error, Unmatched) or trace.unmatched is not None:
        return "unmatched"
    if trace.refusal is not None or isinstance(error, SalesforceRefused) or (status == 422 and trace.idempotency == "done"):
        return "refused"
    if isinstance(error, IdempotencyKeyReused) or status == 409:
        return "conflict"
    if status == 422:
        return "unmapped"
    if status == 429:
        return "throttled"
    return "failed" if status >= 500 else "rejected"


class Recorder:
    def __init__(self, sources: dict[str, SourceSettings], metrics: Metrics, request_log: RequestLog) -> None:
        self._sources, self._metrics, self._log = sources, metrics, request_log
        self._pid = os.getpid()

    def callout(self, request_id: str, calls: Calls, status: int, started: float, error: GatewayError | None) -> Entry:
        """A Health Cloud callout's log line, metrics and request-log entry: the EHR's status, time and
        error beside the gateway's answer; the patient, when it named one, sealed."""
        ms = round((time.perf_counter() - started) * 1000, 2)
        outcome = calls.outcome if status == 200 and calls.outcome else _refused(status)
        last = calls.ehr[-1][1] if calls.ehr else None
        ehr_ms = round(sum(c.latency_ms for _, c in calls.ehr), 2) if calls.ehr else None
        log.info("callout", request_id=request_id, op=calls.op, source=calls.source, status=status, outcome=outcome,
                 ehr=[{"system": s, "status": c.status, "ms": round(c.latency_ms, 2), "error": c.error_code,
                       "in_doubt": c.in_doubt or None} for s, c in calls.ehr] or None, ms=ms, pid=self._pid)
        self._metrics.callout(calls.op, outcome, status, ms / 1000)
        for system, call in calls.ehr:
            self._metrics.ehr_call(calls.sources.get(system, system), call.latency_ms / 1000, call.error_code)
        entry = Entry(id=request_id, time_ms=int(time.time() * 1000), source=calls.source, op=calls.op,
                      outcome=outcome, status=status, ms=ms, ehr_status=last.status if last else None,
                      ehr_ms=ehr_ms, ehr_error=next((c.error_code for _, c in reversed(calls.ehr) if c.error_code), None),
                      issues=logged_issues(error.issues) if error is not None else ())
        if calls.patient:
            entry = self._log.with_sealed(entry, calls.patient, None, None, None)
        self._log.record(entry)
        return entry

    def summarise(self, request_id: str, source: str, op: str, status: int, trace: Trace, started: float,
                  error: GatewayError | None, body: bytes | None, media_type: str | None, key: str | None,
                  replay_of: str | None = None, admitted: bool = True) -> Entry:
        """The request's one log line and its request-log entry. `admitted`: false for a request
        refused at the door (`Admission`), whose entries the request log samples."""
        sf = trace.salesforce
        ms = round((time.perf_counter() - started) * 1000, 2)
        log.info(
            "request", request_id=request_id, source=source, op=op,
            status=status, idempotency=trace.idempotency, sf_status=sf.status,
            sf_ms=round(sf.latency_ms, 2) if sf.status or sf.latency_ms else None,
            sf_error=sf.error_code, sf_in_doubt=sf.in_doubt or None, sf_reauth=sf.retried_auth or None,
            looked_up=trace.looked_up, adopted=trace.adopted or None, parked=trace.parked,
            id_calls=trace.identity.calls or None, unmatched=list(trace.identity.unmatched) or None,
            # more than one ServiceAppointment matched the look-up: worth an operator's look
            lookup_matches=trace.lookup.matches if (trace.lookup.matches or 0) > 1 else None,
            maps=trace.maps_version, warnings=len(trace.warnings) or None, ms=ms, pid=self._pid,
        )
        result = outcome(status, trace, error)
        self._metrics.request(source if source in self._sources else "other", op, result, status, ms / 1000)
        ident = trace.identity
        self._metrics.identity(source, ident.cached, ident.looked_up, ident.waited, ident.calls, ident.unmatched)
        problem = error or trace.refusal or trace.unmatched
        if trace.idempotency != "none":
            self._metrics.idempotency(source, trace.idempotency)
        for operation, call in (("book", sf), ("lookup", trace.lookup)):
            if call.status is not None or call.error_code is not None:
                self._metrics.salesforce_call(operation, call.latency_ms / 1000, call.error_code)
        entry = Entry(
            id=request_id, time_ms=int(time.time() * 1000), source=source, op=op, outcome=result, status=status,
            idempotency=trace.idempotency if trace.idempotency != "none" else None,
            sf_status=sf.status, sf_id=trace.salesforce_id, sf_error=sf.error_code,
            ms=ms, sf_ms=round(sf.latency_ms, 2) if sf.status else None,
            maps_version=trace.maps_version, maps_used=logged_maps(trace.maps_used),
            issues=logged_issues(problem.issues if problem else trace.warnings),
            key_digest=log_key_digest(source, trace.key_material) if trace.key_material else None,
            replay_of=replay_of,
        )
        if op not in ("translate", "search") and source in self._sources:  # bookings and changes only
            if not admitted:  # refused at the door: counted above, sampled here, nothing sealed
                if (suppressed := self._log.at_the_door(source)) is None:
                    return entry
                entry = msgspec.structs.replace(entry, suppressed=suppressed or None)
            else:
                # a failed change keeps no input: the replay path books, and the EHR resends its PUT
                keep = result in KEEP_INPUT and op != "change"
                entry = self._log.with_sealed(entry, trace.patient, body if keep else None, media_type, key)
            self._log.record(entry)
        return entry
