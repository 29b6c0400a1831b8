"""Prometheus metrics for the gateway: one scrape of an instance covers all its workers.

With `PROMETHEUS_MULTIPROC_DIR` set before the workers start (see `prepare_multiprocess_dir`), every
worker writes its values to mmap files in that directory and `render` merges them (prometheus_client's
multiprocess mode). Without it, each `Metrics` keeps its own registry in memory (tests, one process).

Label values never carry request content: sources, ops, outcomes, Salesforce operations and
idempotency results come from fixed vocabularies (anything else is `other`), error codes and map
versions must look like codes, and open-ended labels accept only a bounded number of distinct values,
so a hostile path segment or error body cannot grow the series count.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

__all__ = [
    "BUCKETS", "CONTENT_TYPE", "MULTIPROC_ENV", "Metrics", "mark_worker_dead", "prepare_multiprocess_dir",
    "render_multiprocess",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# prometheus_client asks os.getpid() (a system call) on every value it writes in multiprocess mode,
# to notice a fork; a request writes about seven. The pid is kept here instead and renewed in a
# forked child, which is the same guarantee for a fraction of the cost.
_pid = os.getpid()


def _renew_pid() -> None:
    global _pid
    _pid = os.getpid()


def _file_values() -> Any:
    return values.MultiProcessValue(process_identifier=lambda: _pid)


os.register_at_fork(after_in_child=_renew_pid)
if values.ValueClass is not values.MutexValue:  # a worker started with the directory set
    values.ValueClass = _file_values()
# 0.0.4 text: what every Prometheus version parses; the names here need none of 1.0.0's escaping
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# gateway work is tens of ms; Salesforce calls and timeouts reach seconds (the longest timeouts ~30 s)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

OTHER = "other"
OPS = frozenset({"book", "change", "search", "translate", "deliver", "replay", "release"})
# the request log's outcome words, plus success words and the FHIR issue codes GatewayError
# subclasses carry (`error.code`)
OUTCOMES = frozenset({
    "booked", "rescheduled", "cancelled", "queued", "refused", "unmapped", "throttled", "rejected", "failed",
    "ok", "replayed", "accepted", "proposed", "existing", "found", "partial", "held", "unmatched",
    "structure", "login", "forbidden", "not-found", "not-supported", "too-costly", "conflict",
    "business-rule", "processing", "exception", "transient", "error",
})
CALLOUT_OPS = frozenset({"find", "slot-status", "create", "cancel", "read"})
SALESFORCE_OPERATIONS = frozenset({"book", "lookup", "auth", "token"})
IDEMPOTENCY_RESULTS = frozenset({"new", "done", "busy", "mismatch", "takeover", "queued", "held"})
IDENTITY_KINDS = frozenset({"patient", "location", "practitioner", "role", "device", "participant"})
IDENTITY_RESULTS = frozenset({"cached", "looked_up", "waited"})
QUEUE_STATES = ("ready", "delayed", "dead")
MLLP_REFUSALS = frozenset({"max_connections", "max_connections_per_peer", "too_large", "empty"})
CIRCUIT_VALUES = {"closed": 0.0, "half_open": 0.5, "open": 1.0}

_SOURCE = re.compile(r"[a-z0-9_-]{1,64}")  # the config's rule for a source name
_ERROR_CODE = re.compile(r"[A-Z0-9_]{1,64}")
_VERSION = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MAX_OPEN_VALUES = 100  # per label, per process: a cap on values no fixed list names

CODEMAP_INFO = "ehrgw_codemap_info"


class _Bounded:
    """An open label vocabulary: values matching `pattern`, the first `cap` distinct ones only."""

    def __init__(self, pattern: re.Pattern[str], cap: int, fallback: str) -> None:
        self._pattern, self._cap, self._fallback = pattern, cap, fallback
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if not isinstance(value, str):
            return self._fallback
        if value in self._seen:
            return value
        if self._pattern.fullmatch(value) is None or len(self._seen) >= self._cap:
            return self._fallback
        self._seen.add(value)
        return value


def _word(value: object, vocabulary: frozenset[str]) -> str:
    return value if value in vocabulary else OTHER  # type: ignore[return-value]


def _status(status: object) -> str:
    return str(status) if type(status) is int and 100 <= status <= 599 else OTHER


def _multiprocess_values() -> bool:
    return values.ValueClass is not values.MutexValue


class Metrics:
    """The gateway's metrics. `sources`: the configured source names (others are counted as `other`);
    without it, any name that looks like a source is taken, up to a cap."""

    def __init__(self, *, registry: CollectorRegistry | None = None, sources: Iterable[str] | None = None) -> None:
        directory = os.environ.get(MULTIPROC_ENV)
        if bool(directory) != _multiprocess_values():
            # values are bound to mmap files or to memory when prometheus_client is imported; a mismatch
            # would lose every worker's numbers silently
            raise RuntimeError(
                f"{MULTIPROC_ENV} changed after prometheus_client was imported; "
                "call prepare_multiprocess_dir() before any metric is created"
            )
        if directory and registry is not None:
            raise ValueError("in multiprocess mode the registry is built from the worker files at each render")
        self.multiprocess_dir: str | None = directory or None
        # None in multiprocess mode: values live in the files, not in a registry
        self.registry = None if directory else (registry if registry is not None else CollectorRegistry())
        reg = self.registry
        if sources is None:
            self._source = _Bounded(_SOURCE, _MAX_OPEN_VALUES, OTHER)
        else:
            known = frozenset(sources)
            self._source = lambda value: value if value in known else OTHER
        self._error_code = _Bounded(_ERROR_CODE, _MAX_OPEN_VALUES, "OTHER")

        self._requests = Counter(
            "ehrgw_requests", "Requests answered, by source, operation, outcome and HTTP status.",
            ("source", "op", "outcome", "status"), registry=reg,
        )
        self._request_seconds = Histogram(
            "ehrgw_request_seconds", "Time to answer a request.", ("source", "op"), registry=reg, buckets=BUCKETS,
        )
        self._sf_seconds = Histogram(
            "ehrgw_salesforce_call_seconds", "Duration of Salesforce calls, by operation.", ("operation",),
            registry=reg, buckets=BUCKETS,
        )
        self._sf_errors = Counter(
            "ehrgw_salesforce_errors", "Salesforce calls that failed, by operation and error code.",
            ("operation", "code"), registry=reg,
        )
        self._idempotency = Counter(
            "ehrgw_idempotency", "Idempotency claims, by source and result.", ("source", "result"), registry=reg,
        )
        self._token_refreshes = Counter(
            "ehrgw_salesforce_token_refreshes", "Salesforce access tokens obtained.", registry=reg,
        )
        # org-wide numbers every worker reads off Sforce-Limit-Info: the latest reading wins, and it
        # may go down (rolling 24 h window), so not 'max'
        self._api_used = Gauge(
            "ehrgw_salesforce_api_used", "Salesforce API requests used in the org's 24 h window (last reading).",
            registry=reg, multiprocess_mode="mostrecent",
        )
        self._api_limit = Gauge(
            "ehrgw_salesforce_api_limit", "Salesforce API request limit of the org (last reading).",
            registry=reg, multiprocess_mode="mostrecent",
        )
        # one number, not a state label: `> 0` alerts on open or probing, and no stale state series to
        # clear; the breaker state is shared through Redis, so the latest worker's view is the freshest
        self._circuit = Gauge(
            "ehrgw_circuit_open", "Salesforce circuit: 0 closed, 0.5 half-open, 1 open (latest worker view).",
            registry=reg, multiprocess_mode="livemostrecent",
        )
        self._queue = Gauge(
            "ehrgw_queue_entries", "Queued bookings, by source and state (last reading).",
            ("source", "state"), registry=reg, multiprocess_mode="mostrecent",
        )
        self._mllp_refused = Counter(
            "ehrgw_mllp_refused", "MLLP connections closed over a cap, and blocks answered AE unread, by reason.",
            ("source", "reason"), registry=reg,
        )
        self._callouts = Counter(
            "ehrgw_callouts", "Health Cloud's callouts answered, by operation, outcome and HTTP status.",
            ("op", "outcome", "status"), registry=reg,
        )
        self._callout_seconds = Histogram(
            "ehrgw_callout_seconds", "Time to answer a Health Cloud callout.", ("op",), registry=reg, buckets=BUCKETS,
        )
        self._ehr_seconds = Histogram(
            "ehrgw_ehr_call_seconds", "Duration of calls to an EHR, by source.", ("source",), registry=reg,
            buckets=BUCKETS,
        )
        self._ehr_errors = Counter(
            "ehrgw_ehr_errors", "Calls to an EHR that failed, by source and error code.", ("source", "code"),
            registry=reg,
        )
        self._unmatched = Counter(
            "ehrgw_identity_unmatched", "Bookings refused because the org holds no record (or several) for a "
            "participant, by source and kind of participant.", ("source", "kind"), registry=reg,
        )
        self._identity_ids = Counter(
            "ehrgw_identity_ids", "Participants' ids found, by how: from the cache, looked up in the org, or "
            "waited for (another worker's look-up).", ("result",), registry=reg,
        )
        self._identity_calls = Counter(
            "ehrgw_identity_calls", "Salesforce API calls made to find participants' records.", registry=reg,
        )
        self._held = Gauge(
            "ehrgw_held_bookings", "Bookings held for their patient, by source and state (held, refused; last "
            "reading).", ("source", "state"), registry=reg, multiprocess_mode="mostrecent",
        )
        self._codemap_reloads = Counter(
            "ehrgw_codemap_reloads", "Code map reloads, by source and result.", ("source", "result"), registry=reg,
        )
        # 1 for each version a live worker has loaded: during a rolling reload both versions show
        self._codemap_info = Gauge(
            CODEMAP_INFO, "Code map version loaded, by source (value 1).", ("source", "version"),
            registry=reg, multiprocess_mode="livemax",
        )
        self._codemap_current: dict[str, str] = {}
        # children by clamped labels: skips prometheus_client's per-call label validation
        self._request_children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        self._children: dict[tuple[str, ...], Any] = {}  # the same, for the other per-request metrics

    def request(self, source: str, op: str, outcome: str, status: int, seconds: float) -> None:
        key = (self._source(source), _word(op, OPS), _word(outcome, OUTCOMES), _status(status))
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self._requests.labels(*key), self._request_seconds.labels(key[0], key[1]),
            )
        children[0].inc()
        children[1].observe(seconds)

    def salesforce_call(self, operation: str, seconds: float, error_code: str | None) -> None:
        operation = _word(operation, SALESFORCE_OPERATIONS)
        child = self._children.get(("sf", operation))
        if child is None:
            child = self._children[("sf", operation)] = self._sf_seconds.labels(operation)
        child.observe(seconds)
        if error_code is not None:
            # the client's own words ("timeout", "connection-lost") become TIMEOUT, CONNECTION_LOST
            code = error_code.upper().replace("-", "_") if isinstance(error_code, str) else ""
            self._sf_errors.labels(operation, self._error_code(code)).inc()

    def callout(self, op: str, outcome: str, status: int, seconds: float) -> None:
        key = ("callout", _word(op, CALLOUT_OPS), _word(outcome, OUTCOMES), _status(status))
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self._callouts.labels(*key[1:]), self._callout_seconds.labels(key[1]))
        children[0].inc()
        children[1].observe(seconds)

    def ehr_call(self, source: str, seconds: float, error_code: str | None) -> None:
        source = self._source(source)
        child = self._children.get(("ehr", source))
        if child is None:
            child = self._children[("ehr", source)] = self._ehr_seconds.labels(source)
        child.observe(seconds)
        if error_code is not None:
            self._ehr_errors.labels(source, self._error_code(error_code.upper().replace("-", "_"))).inc()

    def idempotency(self, source: str, result: str) -> None:
        key = ("idem", self._source(source), _word(result, IDEMPOTENCY_RESULTS))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._idempotency.labels(key[1], key[2])
        child.inc()

    def identity(self, source: str, cached: int, looked_up: int, waited: int, calls: int,
                 unmatched: tuple[str, ...]) -> None:
        """One request's identity step: how its participants' ids were found, and which kinds the org lacked."""
        for result, n in (("cached", cached), ("looked_up", looked_up), ("waited", waited)):
            if n:
                child = self._children.get(("ids", result))
                if child is None:
                    child = self._children[("ids", result)] = self._identity_ids.labels(result)
                child.inc(n)
        if calls:
            self._identity_calls.inc(calls)
        for kind in unmatched:
            self._unmatched.labels(self._source(source), _word(kind, IDENTITY_KINDS)).inc()

    def held(self, source: str, held: int, refused: int) -> None:
        source = self._source(source)
        self._held.labels(source, "held").set(held)
        self._held.labels(source, "refused").set(refused)

    def token_refresh(self) -> None:
        self._token_refreshes.inc()

    def api_usage(self, used: int, limit: int) -> None:
        self._api_used.set(used)
        self._api_limit.set(limit)

    def circuit(self, state: str) -> None:
        value = CIRCUIT_VALUES.get(state)
        if value is not None:  # an unknown word is a caller's bug: keep the last known state
            self._circuit.set(value)

    def queue_depth(self, source: str, ready: int, delayed: int, dead: int) -> None:
        source = self._source(source)
        for state, count in zip(QUEUE_STATES, (ready, delayed, dead), strict=True):
            self._queue.labels(source, state).set(count)

    def mllp_refused(self, source: str, reason: str) -> None:
        self._mllp_refused.labels(self._source(source), _word(reason, MLLP_REFUSALS)).inc()

    def codemap_reload(self, source: str, ok: bool) -> None:
        self._codemap_reloads.labels(self._source(source), "ok" if ok else "failed").inc()

    def codemap_version(self, source: str, version: str) -> None:
        # no cap: only the current version is exported, so reloads do not add series
        source = self._source(source)
        version = version if isinstance(version, str) and _VERSION.fullmatch(version) else OTHER
        old = self._codemap_current.get(source)
        if old == version:
            return
        if old is not None:
            if self.multiprocess_dir is None:
                self._codemap_info.remove(source, old)
            else:
                # a series cannot leave the mmap files: 0 marks it gone, and render drops zeros
                self._codemap_info.labels(source, old).set(0)
        self._codemap_info.labels(source, version).set(1)
        self._codemap_current[source] = version

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type; in multiprocess mode, all workers merged."""
        if self.multiprocess_dir is not None:
            return render_multiprocess(self.multiprocess_dir)
        assert self.registry is not None
        return generate_latest(self.registry), CONTENT_TYPE


class _MergedCollector:
    """The workers' files merged, less the info series a worker retired (value 0)."""

    def __init__(self, path: str) -> None:
        self._inner = MultiProcessCollector(None, path=path)

    def collect(self) -> Iterable[Any]:
        for metric in self._inner.collect():
            if metric.name == CODEMAP_INFO:
                metric.samples = [s for s in metric.samples if s.value]
            yield metric


def render_multiprocess(path: str | os.PathLike[str]) -> tuple[bytes, str]:
    """Merge the metric files of every worker that wrote to `path` (any process may call this)."""
    path = os.fspath(path)
    _forget_dead_workers(path)
    registry = CollectorRegistry()
    registry.register(_MergedCollector(path))
    return generate_latest(registry), CONTENT_TYPE


def prepare_multiprocess_dir(path: str | os.PathLike[str]) -> None:
    """Clear the metric files in `path` (created if missing) and switch this process, and the workers
    it starts, to multiprocess mode.

    Call it in `serve` before starting workers: the files of a previous run would otherwise be added to
    this run's counters.
    """
    directory = Path(path).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    # only the client's own files: a mistyped path must not cost anyone their data
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    # prometheus_client chose in-memory values at import; metrics made from here on use the files
    # (a single worker runs inside this process)
    values.ValueClass = _file_values()


def mark_worker_dead(pid: int, path: str | os.PathLike[str] | None = None) -> None:
    """Drop a dead worker's `live*` gauges (its circuit view, its loaded map versions); counters stay."""
    directory = os.fspath(path) if path is not None else os.environ.get(MULTIPROC_ENV)
    if directory:
        mark_process_dead(pid, directory)


_LIVE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def _forget_dead_workers(path: str) -> None:
    # uvicorn's supervisor replaces a dead worker without telling anyone, so a scrape checks the pids
    # (the directory belongs to this instance, so its pids are this host's)
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    for pid in {int(m.group(1)) for name in names if (m := _LIVE_FILE.fullmatch(name))}:
        if not _alive(pid):
            mark_process_dead(pid, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
