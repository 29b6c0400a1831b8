"""Metrics: the exposition a scrape reads, label values kept to bounded vocabularies, and one scrape
covering every worker process in multiprocess mode.

Multiprocess recording happens only in child processes: prometheus_client binds values to mmap files
or to memory when it is imported, so this process stays in-memory and only merges the children's files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.operators.metrics import MULTIPROC_ENV, Metrics, render_multiprocess

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("cerner", "epic")


def samples(body: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition text, by name and labels; the text must parse."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def label_values(found: dict, prefix: str, label: str) -> set[str]:
    return {dict(labels)[label] for name, labels in found if name.startswith(prefix) and label in dict(labels)}


def run_child(directory: Path, code: str, **popen: object) -> Any:
    """Python in a child with the multiprocess directory set there only."""
    env = {**os.environ, MULTIPROC_ENV: str(directory)}
    args = [sys.executable, "-c", textwrap.dedent(code)]
    if popen:
        return subprocess.Popen(args, cwd=ROOT, env=env, text=True, **popen)  # type: ignore[call-overload]
    return subprocess.run(args, cwd=ROOT, env=env, text=True, capture_output=True, timeout=30, check=True)


def test_exposition_holds_every_metric_after_calls():
    m = Metrics(sources=SOURCES)
    m.request("cerner", "book", "ok", 201, 0.042)
    m.request("cerner", "book", "ok", 201, 0.3)
    m.request("epic", "translate", "structure", 400, 0.004)
    m.salesforce_call("book", 0.03, None)
    m.salesforce_call("lookup", 2.0, "REQUEST_LIMIT_EXCEEDED")
    m.idempotency("cerner", "new")
    m.idempotency("cerner", "done")
    m.idempotency("cerner", "done")
    m.token_refresh()
    m.api_usage(1200, 15000)
    m.circuit("open")
    m.queue_depth("epic", 3, 1, 2)
    m.codemap_reload("epic", True)
    m.codemap_reload("epic", False)

    body, content_type = m.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    found = samples(body)
    assert value(found, "ehrgw_requests_total", source="cerner", op="book", outcome="ok", status="201") == 2
    assert value(found, "ehrgw_requests_total",
                 source="epic", op="translate", outcome="structure", status="400") == 1
    assert value(found, "ehrgw_request_seconds_count", source="cerner", op="book") == 2
    assert value(found, "ehrgw_request_seconds_sum", source="cerner", op="book") == pytest.approx(0.342)
    # ms-scale buckets: 42 ms lands under 50 ms, not under 25 ms; 4 ms under the smallest bucket
    assert value(found, "ehrgw_request_seconds_bucket", source="cerner", op="book", le="0.025") == 0
    assert value(found, "ehrgw_request_seconds_bucket", source="cerner", op="book", le="0.05") == 1
    assert value(found, "ehrgw_request_seconds_bucket", source="cerner", op="book", le="0.5") == 2
    assert value(found, "ehrgw_request_seconds_bucket", source="epic", op="translate", le="0.005") == 1
    assert value(found, "ehrgw_request_seconds_bucket", source="cerner", op="book", le="30.0") == 2
    assert value(found, "ehrgw_salesforce_call_seconds_count", operation="book") == 1
    assert value(found, "ehrgw_salesforce_call_seconds_count", operation="lookup") == 1
    assert value(found, "ehrgw_salesforce_errors_total", operation="lookup", code="REQUEST_LIMIT_EXCEEDED") == 1
    assert label_values(found, "ehrgw_salesforce_errors_total", "operation") == {"lookup"}  # none when no code
    assert value(found, "ehrgw_idempotency_total", source="cerner", result="new") == 1
    assert value(found, "ehrgw_idempotency_total", source="cerner", result="done") == 2
    assert value(found, "ehrgw_salesforce_token_refreshes_total") == 1
    assert value(found, "ehrgw_salesforce_api_used") == 1200
    assert value(found, "ehrgw_salesforce_api_limit") == 15000
    assert value(found, "ehrgw_circuit_open") == 1
    assert value(found, "ehrgw_queue_entries", source="epic", state="ready") == 3
    assert value(found, "ehrgw_queue_entries", source="epic", state="delayed") == 1
    assert value(found, "ehrgw_queue_entries", source="epic", state="dead") == 2
    assert value(found, "ehrgw_codemap_reloads_total", source="epic", result="ok") == 1
    assert value(found, "ehrgw_codemap_reloads_total", source="epic", result="failed") == 1


def test_each_instance_has_its_own_registry():
    a, b = Metrics(sources=SOURCES), Metrics(sources=SOURCES)
    a.token_refresh()
    assert value(samples(b.render()[0]), "ehrgw_salesforce_token_refreshes_total") == 0
    assert value(samples(a.render()[0]), "ehrgw_salesforce_token_refreshes_total") == 1


def test_unknown_words_and_codes_are_clamped():
    m = Metrics(sources=SOURCES)
    m.request("MRN-998877", "book", "ok", 201, 0.01)  # a path segment that is no configured source
    m.request("cerner", "Appointment/12724066", "ok", 201, 0.01)
    m.request("cerner", "book", "Patient prefers mornings", 201, 0.01)
    m.request("cerner", "book", "ok", 999, 0.01)
    m.request("cerner", "book", "ok", "201", 0.01)  # type: ignore[arg-type]
    m.salesforce_call("delete everything", 0.01, "bad code: 12 Elm Street")
    m.salesforce_call("book", 0.01, "X" * 65)
    m.salesforce_call("book", 0.01, "connection-lost")  # the client's own word, made code-shaped
    m.salesforce_call("book", 0.01, "")
    m.idempotency("cerner", "maybe")
    m.queue_depth("unknown", 1, 0, 0)
    m.codemap_reload("nope", True)
    m.codemap_version("epic", "v1 with spaces")

    body, _ = m.render()
    found = samples(body)
    # label values only: sample values (the _created timestamps among them) hold any digits
    labels = " ".join(v for _, pairs in found for _, v in pairs)
    for leaked in ("MRN-998877", "12724066", "mornings", "Elm Street", "999", "XXXXX", "spaces"):
        assert leaked not in labels, leaked
    assert label_values(found, "ehrgw_requests_total", "source") == {"cerner", "other"}
    assert label_values(found, "ehrgw_requests_total", "op") == {"book", "other"}
    assert label_values(found, "ehrgw_requests_total", "outcome") == {"ok", "other"}
    assert label_values(found, "ehrgw_requests_total", "status") == {"201", "other"}
    assert value(found, "ehrgw_requests_total", source="cerner", op="book", outcome="ok", status="other") == 2
    assert value(found, "ehrgw_requests_total", source="other", op="book", outcome="ok", status="201") == 1
    assert label_values(found, "ehrgw_salesforce_call_seconds_count", "operation") == {"book", "other"}
    assert value(found, "ehrgw_salesforce_errors_total", operation="other", code="OTHER") == 1
    assert value(found, "ehrgw_salesforce_errors_total", operation="book", code="OTHER") == 2
    assert value(found, "ehrgw_salesforce_errors_total", operation="book", code="CONNECTION_LOST") == 1
    assert value(found, "ehrgw_idempotency_total", source="cerner", result="other") == 1
    assert label_values(found, "ehrgw_queue_entries", "source") == {"other"}
    assert label_values(found, "ehrgw_codemap_reloads_total", "source") == {"other"}
    assert label_values(found, "ehrgw_codemap_info", "version") == {"other"}


def test_open_vocabularies_are_capped():
    m = Metrics()  # no configured list: source-shaped names, up to a cap
    for i in range(150):
        m.idempotency(f"src{i}", "new")
        m.salesforce_call("book", 0.01, f"CODE_{i}")
    m.idempotency("Not A Source!", "new")
    found = samples(m.render()[0])
    sources = label_values(found, "ehrgw_idempotency_total", "source")
    assert "src0" in sources and "Not A Source!" not in sources
    assert len(sources) <= 101 and "other" in sources
    codes = label_values(found, "ehrgw_salesforce_errors_total", "code")
    assert "CODE_0" in codes and len(codes) <= 101 and "OTHER" in codes
    assert sum(v for (name, _), v in found.items() if name == "ehrgw_idempotency_total") == 151


def test_codemap_info_keeps_only_the_current_version():
    m = Metrics(sources=SOURCES)
    m.codemap_version("cerner", "a1b2c3d4e5f6")
    m.codemap_version("epic", "none")
    for i in range(150):  # a long-lived worker reloading often keeps naming its versions
        m.codemap_version("epic", f"{i:012x}")
    m.codemap_version("cerner", "0f0f0f0f0f0f")
    m.codemap_version("cerner", "0f0f0f0f0f0f")
    found = samples(m.render()[0])
    info = {dict(labels)["source"] + "@" + dict(labels)["version"]: v
            for (name, labels), v in found.items() if name == "ehrgw_codemap_info"}
    assert info == {"cerner@0f0f0f0f0f0f": 1, "epic@000000000095": 1}


def test_circuit_values_and_unknown_state():
    m = Metrics(sources=SOURCES)
    for state, expected in (("open", 1), ("half_open", 0.5), ("closed", 0)):
        m.circuit(state)
        assert value(samples(m.render()[0]), "ehrgw_circuit_open") == expected
    m.circuit("open")
    m.circuit("exploded")  # not a state: the last known one stays
    assert value(samples(m.render()[0]), "ehrgw_circuit_open") == 1


def test_env_set_after_import_is_refused(monkeypatch, tmp_path):
    # values would silently stay in this process's memory while render read the (empty) files
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="prepare_multiprocess_dir"):
        Metrics()


RECORD = """
    import sys
    from gateway.operators.metrics import Metrics
    n, used = int(sys.argv[1]), int(sys.argv[2])
    m = Metrics(sources=["cerner", "epic"])
    assert m.registry is None and m.multiprocess_dir
    for _ in range(n):
        m.request("cerner", "book", "ok", 201, 0.02)
    m.request("epic", "book", "transient", 503, 1.5)
    m.salesforce_call("book", 0.1, "UNABLE_TO_LOCK_ROW")
    m.api_usage(used, 15000)
    m.circuit("open")
"""


def test_multiprocess_render_sums_all_workers(tmp_path):
    # sequential, so the second worker's API reading is the most recent one (and the lower one)
    for n, used in ((3, 500), (5, 480)):
        run_child(tmp_path, RECORD.replace("int(sys.argv[1]), int(sys.argv[2])", f"{n}, {used}"))
    assert len(list(tmp_path.glob("*.db"))) >= 4  # both children wrote files, none in memory

    body, content_type = render_multiprocess(tmp_path)
    assert content_type.startswith("text/plain")
    found = samples(body)
    assert value(found, "ehrgw_requests_total", source="cerner", op="book", outcome="ok", status="201") == 8
    assert value(found, "ehrgw_requests_total", source="epic", op="book", outcome="transient", status="503") == 2
    assert value(found, "ehrgw_request_seconds_count", source="cerner", op="book") == 8
    assert value(found, "ehrgw_request_seconds_sum", source="cerner", op="book") == pytest.approx(0.16)
    assert value(found, "ehrgw_request_seconds_bucket", source="epic", op="book", le="1.0") == 0
    assert value(found, "ehrgw_request_seconds_bucket", source="epic", op="book", le="2.5") == 2
    assert value(found, "ehrgw_salesforce_errors_total", operation="book", code="UNABLE_TO_LOCK_ROW") == 2
    # the latest reading, though lower than the first: not a max, not a per-pid series, not a sum
    assert value(found, "ehrgw_salesforce_api_used") == 480
    assert value(found, "ehrgw_salesforce_api_limit") == 15000
    assert not any("pid" in dict(labels) for _, labels in found)
    # both workers are gone: their view of the circuit went with them
    assert value(found, "ehrgw_circuit_open") is None


LIVE = """
    import sys
    from gateway.operators.metrics import Metrics
    m = Metrics(sources=["cerner", "epic"])
    m.codemap_version("cerner", "v1")
    m.codemap_version("cerner", "v2")
    m.circuit("half_open")
    m.request("cerner", "book", "ok", 201, 0.01)
    print("ready", flush=True)
    sys.stdin.read()
"""

DEAD = """
    from gateway.operators.metrics import Metrics
    m = Metrics(sources=["cerner", "epic"])
    m.codemap_version("cerner", "v0")
    m.circuit("open")
    m.request("cerner", "book", "ok", 201, 0.01)
"""


def test_multiprocess_live_gauges_follow_live_workers(tmp_path):
    run_child(tmp_path, DEAD)
    live = run_child(tmp_path, LIVE, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert live.stdout.readline().strip() == "ready"
        found = samples(render_multiprocess(tmp_path)[0])
        # the dead worker's v0 and the live worker's retired v1 are gone; its current v2 shows
        assert {dict(labels)["version"]: v for (name, labels), v in found.items()
                if name == "ehrgw_codemap_info"} == {"v2": 1}
        assert value(found, "ehrgw_circuit_open") == 0.5
        assert value(found, "ehrgw_requests_total", source="cerner", op="book", outcome="ok", status="201") == 2
    finally:
        live.stdin.close()
        assert live.wait(timeout=30) == 0
    found = samples(render_multiprocess(tmp_path)[0])
    assert not [name for name, _ in found if name in ("ehrgw_codemap_info", "ehrgw_circuit_open")]
    # counters outlive their workers: totals never go back
    assert value(found, "ehrgw_requests_total", source="cerner", op="book", outcome="ok", status="201") == 2


def test_prepare_multiprocess_dir_switches_a_process_that_already_imported_the_client(tmp_path):
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"left by an earlier run")
    code = f"""
        import os, sys
        os.environ.pop("{MULTIPROC_ENV}")
        import prometheus_client  # imported before the directory is known, as `serve` would
        from gateway.operators.metrics import Metrics, prepare_multiprocess_dir
        prepare_multiprocess_dir({str(directory)!r})
        m = Metrics(sources=["epic"])
        m.idempotency("epic", "takeover")
        sys.stdout.write(m.render()[0].decode())
    """
    out = run_child(tmp_path, code).stdout
    assert not (directory / "counter_1.db").exists()
    assert list(directory.glob("counter_*.db"))  # the values went to files
    assert value(samples(out.encode()), "ehrgw_idempotency_total", source="epic", result="takeover") == 1
