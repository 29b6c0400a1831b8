"""Code maps picked up without a restart: changes swapped in, broken edits refused, quiet folders left alone."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import pytest

import gateway.booking.livemaps as livemaps
from gateway.booking.booker import Booker
from gateway.booking.codemaps import CodeMapError, load_source_maps
from gateway.booking.livemaps import LiveMaps
from gateway.settings import load_file_settings
from tests.conftest import CONFIG, VIDEO_VISIT, corpus

SOURCES = ["cerner", "epic", "fhir", "athena"]
OLD_WORK_TYPE, NEW_WORK_TYPE = "08qxx0000000002AAA", "08qxx0000000009AAA"  # same length: same file size
TICK = 0.05


@pytest.fixture
def config(tmp_path: Path) -> Path:
    # copytree keeps the repository files' old mtimes, so the start is not "racily" fresh
    shutil.copytree(CONFIG, tmp_path / "config")
    return tmp_path / "config"


@pytest.fixture
def events() -> list[tuple[str, bool, str | None]]:
    return []


@pytest.fixture
def live(config: Path, events: list) -> LiveMaps:
    return LiveMaps(config, SOURCES, interval_seconds=TICK, on_reload=lambda *e: events.append(e))


def types_file(config: Path) -> Path:
    return config / "codemaps" / "cerner" / "appointment-types.json"


def video_visit_target(data: dict) -> dict:
    """The workTypeId target of the Video Visit code (Millennium code set 14249)."""
    group = next(g for g in data["group"] if g["target"].endswith(":workTypeId"))
    return next(e for e in group["element"] if e["code"] == "2572307911")["target"][0]


def edit_work_type(config: Path, code: str) -> None:
    data = json.loads(types_file(config).read_text())
    video_visit_target(data)["code"] = code
    types_file(config).write_text(json.dumps(data, indent=2))


def sent(config: Path, maps: object) -> tuple[str | None, str]:
    """The workTypeId the Salesforce request carries for the corpus video visit, and the maps version used."""
    prepared = Booker(load_file_settings(config).sources, maps).prepare("cerner", corpus(VIDEO_VISIT))  # type: ignore[arg-type]
    return prepared.mapped.request.workTypeId, prepared.mapped.maps_version


def log_mark(log_file: Path) -> int:
    return log_file.stat().st_size


def logged(log_file: Path, mark: int, event: str) -> list[dict]:
    with log_file.open("rb") as f:
        f.seek(mark)
        lines = [json.loads(line) for line in f.read().splitlines() if line.strip()]
    return [line for line in lines if line.get("event") == event]


async def wait_for(predicate, timeout: float = 2.0) -> float:
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout:
            raise AssertionError("timed out")
        await asyncio.sleep(0.005)
    return time.perf_counter() - started


@pytest.fixture
async def running(live: LiveMaps):
    task = asyncio.create_task(live.run())
    yield task
    assert not task.done(), "the loop must keep running"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_changed_map_is_picked_up(config, live, events, log_file):
    mark = log_mark(log_file)
    before = live.versions()
    epic = live.get("epic")
    assert sent(config, live) == (OLD_WORK_TYPE, before["cerner"])

    edit_work_type(config, NEW_WORK_TYPE)
    assert live.check_now() == {"cerner": True}

    new = load_source_maps(config / "codemaps" / "cerner", config).version
    assert new != before["cerner"]
    assert live.versions() == {**before, "cerner": new}
    assert live.get("cerner").version == new and live["cerner"].version == new
    assert live.get("epic") is epic  # other sources untouched
    assert sent(config, live) == (NEW_WORK_TYPE, new)
    assert events == [("cerner", True, new)]
    [line] = logged(log_file, mark, "codemaps_reloaded")
    assert (line["source"], line["version"], line["previous"], line["level"]) == ("cerner", new, before["cerner"], "info")
    assert live.check_now() == {} and events == [("cerner", True, new)]  # once per change


async def test_the_loop_picks_a_change_up_within_an_interval(config, live, events, running):
    await asyncio.sleep(3 * TICK)
    assert events == []
    edit_work_type(config, NEW_WORK_TYPE)
    took = await wait_for(lambda: events)
    assert took < 1.0, took
    assert events == [("cerner", True, live.versions()["cerner"])]
    assert sent(config, live)[0] == NEW_WORK_TYPE


def test_half_written_json_is_refused_then_the_fix_is_picked_up(config, live, events, log_file):
    mark = log_mark(log_file)
    old = live.versions()["cerner"]
    whole = types_file(config).read_bytes()
    edited = whole.replace(OLD_WORK_TYPE.encode(), NEW_WORK_TYPE.encode())
    types_file(config).write_bytes(edited[: len(edited) // 2])  # a writer caught mid-file

    assert live.check_now() == {"cerner": False}
    assert live.versions()["cerner"] == old
    assert sent(config, live) == (OLD_WORK_TYPE, old)  # the old maps still serve
    assert events == [("cerner", False, None)]
    [line] = logged(log_file, mark, "codemaps_refused")
    assert line["level"] == "warning" and line["source"] == "cerner" and line["serving"] == old
    assert any(p.startswith("codemaps/cerner/appointment-types.json: not valid JSON") for p in line["problems"])
    assert live.problems("cerner") == line["problems"]

    for _ in range(3):  # the same broken state is not tried again
        assert live.check_now() == {}
    assert len(events) == 1 and len(logged(log_file, mark, "codemaps_refused")) == 1

    types_file(config).write_bytes(edited)  # the writer finishes
    assert live.check_now() == {"cerner": True}
    assert sent(config, live)[0] == NEW_WORK_TYPE
    assert events[-1] == ("cerner", True, live.versions()["cerner"]) and live.problems("cerner") == []


def test_reverting_a_refused_edit_clears_the_refusal(config, live, events):
    old = live.versions()["cerner"]
    whole = types_file(config).read_bytes()
    types_file(config).write_bytes(whole[:100])
    assert live.check_now() == {"cerner": False} and live.problems("cerner")
    types_file(config).write_bytes(whole)  # back to what is serving: same version, but healthy again
    assert live.check_now() == {"cerner": True}
    assert events[-1] == ("cerner", True, old) and live.problems("cerner") == []


async def test_an_invalid_concept_map_is_refused_by_the_loop(config, live, events, log_file, running):
    mark = log_mark(log_file)
    old = live.versions()["cerner"]
    data = json.loads(types_file(config).read_text())
    target = video_visit_target(data)
    target["code"] = NEW_WORK_TYPE
    del target["equivalence"]
    types_file(config).write_text(json.dumps(data))

    await wait_for(lambda: events)
    await asyncio.sleep(5 * TICK)  # more ticks: refused once, not every tick
    assert events == [("cerner", False, None)]
    assert live.versions()["cerner"] == old and sent(config, live) == (OLD_WORK_TYPE, old)
    [line] = logged(log_file, mark, "codemaps_refused")
    assert any(p.startswith("codemaps/cerner/appointment-types.json: $.group[1].element[1].target[0].equivalence")
               for p in line["problems"]), line["problems"]

    target["equivalence"] = "equivalent"
    types_file(config).write_text(json.dumps(data))
    await wait_for(lambda: len(events) == 2)
    assert events[1] == ("cerner", True, live.versions()["cerner"]) != ("cerner", True, old)
    assert sent(config, live)[0] == NEW_WORK_TYPE


async def test_quiet_folders_are_only_stat(config, live, events, running, monkeypatch):
    reads: list[str] = []
    monkeypatch.setattr(livemaps, "_digest", lambda folder: reads.append(folder.name))
    monkeypatch.setattr(livemaps, "load_source_maps", lambda *a: reads.append("load"))
    (config / "codemaps" / "cerner" / "NOTES.md").write_text("not a map")  # other files do not count
    await asyncio.sleep(8 * TICK)
    assert reads == [] and events == []


def test_a_file_rewritten_with_the_same_content_is_no_reload(config, live, events):
    path = types_file(config)
    path.write_bytes(path.read_bytes())
    assert live.check_now() == {} and events == []


def test_added_and_deleted_files_count(config, live, events):
    folder = config / "codemaps" / "cerner"
    start = live.versions()["cerner"]
    assert "extra.json" not in live.files("cerner")
    (folder / "extra.json").write_text(json.dumps({"resourceType": "ConceptMap", "group": [{
        "source": "urn:test:extra", "target": "urn:ehr-gateway:salesforce:specialties",
        "element": [{"code": "x", "target": [{"code": "X", "equivalence": "equivalent"}]}]}]}))
    assert live.check_now() == {"cerner": True}
    assert "extra.json" in live.files("cerner")
    assert live.get("cerner").group("specialties", "urn:test:extra").lookup("x") == ("X",)

    (folder / "extra.json").unlink()
    assert live.check_now() == {"cerner": True}
    assert "extra.json" not in live.files("cerner")
    assert live.versions()["cerner"] == start  # the same files again: the same version

    (folder / "service-categories.json").unlink()
    assert live.check_now() == {"cerner": True}
    assert live.files("cerner") == ["appointment-types.json", "cancellation-reasons.json", "v2-0276.json"]
    assert live.get("cerner").group("serviceCategories", "http://snomed.info/sct") is None
    assert [e[:2] for e in events] == [("cerner", True)] * 3


def test_a_racily_fresh_file_is_hashed_again(config, live, monkeypatch):
    # timestamps too coarse to show a second write: the stat stays the same, the mtime is recent
    monkeypatch.setattr(livemaps, "_snapshot", lambda folder: ((), time.time_ns()))
    assert live.check_now() == {}
    edit_work_type(config, NEW_WORK_TYPE)
    assert live.check_now() == {"cerner": True}


def test_errors_are_logged_once_and_the_source_heals(config, live, events, log_file, monkeypatch):
    mark = log_mark(log_file)
    real = livemaps.load_source_maps

    def broken(*args):
        raise PermissionError("denied")

    monkeypatch.setattr(livemaps, "load_source_maps", broken)
    edit_work_type(config, NEW_WORK_TYPE)
    assert live.check_now() == {"cerner": False}
    assert live.check_now() == {}  # still failing: retried, not logged again
    assert [(line["source"], line["error"]) for line in logged(log_file, mark, "codemaps_check_failed")] == [
        ("cerner", "PermissionError")]
    assert sent(config, live)[0] == OLD_WORK_TYPE

    monkeypatch.setattr(livemaps, "load_source_maps", real)
    assert live.check_now() == {"cerner": True}
    assert sent(config, live)[0] == NEW_WORK_TYPE


def test_a_failing_hook_does_not_stop_reloads(config, log_file):
    mark = log_mark(log_file)

    def hook(*_):
        raise RuntimeError("metrics down")

    live = LiveMaps(config, SOURCES, on_reload=hook)
    edit_work_type(config, NEW_WORK_TYPE)
    assert live.check_now() == {"cerner": True} and sent(config, live)[0] == NEW_WORK_TYPE
    assert logged(log_file, mark, "codemaps_hook_failed")[0]["error"] == "RuntimeError"


def test_workers_converge_on_the_same_version(config):
    workers = [LiveMaps(config, SOURCES) for _ in range(3)]
    edit_work_type(config, NEW_WORK_TYPE)
    for w in workers:
        w.check_now()
    assert len({w.versions()["cerner"] for w in workers}) == 1
    assert workers[0].versions()["cerner"] == load_source_maps(config / "codemaps" / "cerner", config).version


def test_a_bad_map_at_start_still_stops_the_start(config):
    (config / "codemaps" / "epic" / "broken.json").write_text('{"resourceType": "ValueSet"}')
    with pytest.raises(CodeMapError, match=r"codemaps/epic/broken.json: \$.resourceType"):
        LiveMaps(config, SOURCES)


def test_a_deleted_source_folder_is_a_change(config, live):
    shutil.rmtree(config / "codemaps" / "fhir")
    assert live.check_now() == {"fhir": True}
    assert live.files("fhir") == [] and live.versions()["fhir"] != "none"
    os.makedirs(config / "codemaps" / "fhir")
    assert live.check_now() == {}  # an empty folder holds what a missing one does
