"""An independent FHIR R4 server for the tests, and helpers that seed it over HTTP.

The server is Medplum's FHIR router over its in-memory repository (the npm packages pinned in
tests/fhir_server/package.json; tests/fhir_server/server.mjs is the HTTP plumbing around them), run by
Node.js as a subprocess on a port of its own. Its FHIR base is its root: `http://127.0.0.1:<port>`.
Like many real servers it enforces nothing beyond the spec: booking a Slot does not make it busy, a
reference need not name anything, any resource may be PUT with the id the test chooses. Also worth
knowing when writing a test: it validates no resource (a Slot with status "nonsense" is stored), its
searchsets carry no links (`_count` cuts the matches, `total` counts them all, `_offset` pages), a
search parameter it does not know (a chained `schedule.actor`, a misspelt one) matches nothing,
`_include` is ignored, /metadata is an empty searchset Bundle, and a PUT that creates answers 200.

Its repository lives as long as the process (the session): every test seeds its own ids (`fresh_id`)
and its own day (`fresh_day`), so what one test finds never depends on another.

Node.js and the packages come from `scripts/setup --dev`; without them the fixture fails (it never
skips), saying so.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

SERVER_DIR = Path(__file__).resolve().with_name("fhir_server")
SCRIPT = SERVER_DIR / "server.mjs"
# loading the R4 definitions takes about a second on an idle machine; far more on a loaded 2-core one
STARTUP_SECONDS = 90.0
NODE = (20, 19)  # what Medplum 4.5 supports: ^20.19.0 || >=22.12.0
SETUP = ("run scripts/setup --dev (it runs `npm ci` in tests/fhir_server, after installing Debian's nodejs and npm "
         "when npm is missing; Medplum 4.5 needs Node.js 20.19+)")
SERVICE_TYPES = "http://terminology.hl7.org/CodeSystem/service-type"


class FhirServerMissing(RuntimeError):
    """Node.js or the server's npm packages are not installed as tests/fhir_server pins them."""


def _installed() -> str:
    """The `node` to run the server with, once Node.js and every pinned package are there."""
    node = shutil.which("node")
    if node is None:
        raise FhirServerMissing(f"the independent FHIR server needs Node.js (`node` is not on PATH): {SETUP}")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    numbers = tuple(int(n) for n in version.lstrip("v").split(".")[:2] if n.isdigit())
    if numbers < NODE or numbers[:1] == (21,) or (22, 0) <= numbers < (22, 12):
        raise FhirServerMissing(f"the independent FHIR server needs Node.js ^20.19 or 22.12+ (this is {version}): "
                                f"{SETUP}")
    pins = json.loads((SERVER_DIR / "package.json").read_text())["dependencies"]
    for name, pinned in pins.items():
        manifest = SERVER_DIR / "node_modules" / name / "package.json"
        installed = json.loads(manifest.read_text()).get("version") if manifest.exists() else None
        if installed != pinned:
            have = f"{installed} is installed" if installed else "it is not installed"
            raise FhirServerMissing(f"the independent FHIR server needs {name} {pinned} in "
                                    f"tests/fhir_server/node_modules ({have}): {SETUP}")
    return node


class FhirServer:
    """`with FhirServer() as server:` Medplum's FHIR R4 server on 127.0.0.1, at `server.url`.

    `startup_seconds`: how long it took to listen. `requests()`: the requests it answered, as
    `<method> <path?query> <status>` lines, oldest first (`requests(since=n)`: from the n-th on).
    """

    def __init__(self, *, timeout: float = STARTUP_SECONDS) -> None:
        self.timeout = timeout
        self.port: int | None = None
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        assert self.port is not None, "the server is not started"
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        assert self._dir is not None, "the server is not started"
        return self._dir / "requests.log"

    def start(self) -> FhirServer:
        node = _installed()
        self._dir = Path(tempfile.mkdtemp(prefix="ehrgw-fhir-server-"))
        started = time.monotonic()
        with self.log.open("wb") as log:  # the child writes to its own copy of the descriptor
            self._process = subprocess.Popen([node, str(SCRIPT)], cwd=SERVER_DIR, env={**os.environ, "PORT": "0"},
                                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        lines: queue.Queue[bytes] = queue.Queue()
        stdout = self._process.stdout
        assert stdout is not None
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            first = lines.get(timeout=self.timeout)
        except queue.Empty:
            self.stop()
            raise TimeoutError(f"the FHIR server (node {SCRIPT.name}) did not listen within {self.timeout:g} s"
                               ) from None
        words = first.decode(errors="replace").split()
        if len(words) != 2 or words[0] != "listening" or not words[1].isdigit():
            try:
                self._process.wait(timeout=10)  # it printed nothing: it exited, and said why on stderr
            except subprocess.TimeoutExpired:
                pass
            said = self.log.read_text(errors="replace")[-3000:]
            self.stop()
            raise RuntimeError(f"the FHIR server did not start (exit status {self._process.returncode}):\n{said}")
        self.port = int(words[1])
        self.startup_seconds = time.monotonic() - started
        return self

    def requests(self, since: int = 0) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()[since:]

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> FhirServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[FhirServer]:
    """The server, one for the session (each test seeds its own ids and day)."""
    try:
        server = FhirServer().start()
    except FhirServerMissing as missing:
        why = str(missing)
    else:
        why = ""
    if why:
        pytest.fail(why, pytrace=False)  # never a skip: the suite must run against it
    try:
        yield server
    finally:
        server.stop()
        if client.cache_info().currsize:
            client().close()
            client.cache_clear()


# -- seeding, over plain HTTP ----------------------------------------------------------------------------

_days = itertools.count()
FIRST_DAY = date(2031, 3, 3)


def fresh_id(kind: str) -> str:
    """An id no other test uses (FHIR's id type: letters, digits, `-`, `.`; up to 64)."""
    return f"{kind}-{uuid.uuid4().hex[:16]}"


def fresh_day() -> date:
    """A day of its own (no other test in the session seeds a slot on it): a search over it finds
    only what its test seeded."""
    return FIRST_DAY + timedelta(days=next(_days))


def at(day: date, hhmm: str) -> str:
    """`day` at `hhmm` UTC, as FHIR's instant: 2031-03-03T09:30:00Z."""
    hours, minutes = (int(part) for part in hhmm.split(":"))
    return datetime(day.year, day.month, day.day, hours, minutes, tzinfo=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@functools.cache
def client() -> httpx.Client:
    """One HTTP client for the seeding and the tests' own requests (a new one per request would cost an
    SSL context each); its idle connections dropped before Node.js closes them (after 5 s)."""
    return httpx.Client(timeout=30, limits=httpx.Limits(keepalive_expiry=2))


def put(base: str, resource: dict[str, Any]) -> dict[str, Any]:
    """`resource` stored under its own id (an update that creates), as the server answers it."""
    r = client().put(f"{base}/{resource['resourceType']}/{resource['id']}", json=resource,
                  headers={"Content-Type": "application/fhir+json"})
    assert r.status_code in (200, 201), f"PUT {resource['resourceType']}/{resource['id']}: {r.status_code} {r.text}"
    return r.json()


def service_type(code: str, system: str = SERVICE_TYPES) -> dict[str, Any]:
    """A Slot's serviceType: one coding."""
    return {"coding": [{"system": system, "code": code}]}


MRN = "urn:oid:2.16.840.1.113883.19.5"  # the identifier system of the patients seeded


def seed_patient(base: str, patient_id: str | None = None, *, family: str = "Testperson",
                 given: str = "Alex") -> str:
    """A Patient (its MRN, of system MRN: `mrn-<id>`); its id."""
    patient_id = patient_id or fresh_id("pat")
    put(base, {"resourceType": "Patient", "id": patient_id,
               "identifier": [{"system": MRN, "value": f"mrn-{patient_id}"}],
               "name": [{"family": family, "given": [given]}], "gender": "female", "birthDate": "1980-02-29",
               "telecom": [{"system": "phone", "value": "+1 555 0100"}]})
    return patient_id


def seed_schedule(base: str, *, practitioner: str | None = None, location: str | None = None,
                  schedule_id: str | None = None) -> dict[str, Any]:
    """A Schedule whose actors are Practitioner/<practitioner> and Location/<location> (each made, with
    a fresh id unless given); the Schedule as stored."""
    practitioner = practitioner or fresh_id("prac")
    location = location or fresh_id("loc")
    put(base, {"resourceType": "Practitioner", "id": practitioner, "name": [{"family": "Doctor"}]})
    put(base, {"resourceType": "Location", "id": location, "name": f"Clinic {location}"})
    return put(base, {"resourceType": "Schedule", "id": schedule_id or fresh_id("sch"), "active": True,
                      "actor": [{"reference": f"Practitioner/{practitioner}"},
                                {"reference": f"Location/{location}"}]})


def actors(schedule: dict[str, Any]) -> tuple[str, str]:
    """The (practitioner id, location id) of a Schedule `seed_schedule` made."""
    references = [a["reference"] for a in schedule["actor"]]
    practitioner = next(r for r in references if r.startswith("Practitioner/"))
    location = next(r for r in references if r.startswith("Location/"))
    return practitioner.split("/", 1)[1], location.split("/", 1)[1]


def seed_slot(base: str, schedule: dict[str, Any], start: str, end: str, *, status: str = "free",
              service: str | None = "124", slot_id: str | None = None) -> dict[str, Any]:
    """A Slot of `schedule` from `start` to `end` (instants), offering service-type `service` (none:
    no serviceType); the Slot as stored."""
    slot: dict[str, Any] = {"resourceType": "Slot", "id": slot_id or fresh_id("slot"),
                            "schedule": {"reference": f"Schedule/{schedule['id']}"}, "status": status,
                            "start": start, "end": end}
    if service is not None:
        slot["serviceType"] = [service_type(service)]
    return put(base, slot)


def seed_slots(base: str, schedule: dict[str, Any], day: date, times: list[str], *, minutes: int = 30,
               **options: Any) -> list[dict[str, Any]]:
    """One Slot of `schedule` at each of `times` (HH:MM, UTC) on `day`, `minutes` long."""
    made = []
    for hhmm in times:
        start = at(day, hhmm)
        end = (datetime.fromisoformat(start) + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")
        made.append(seed_slot(base, schedule, start, end, **options))
    return made


def search(base: str, kind: str, **params: str | list[str]) -> list[dict[str, Any]]:
    """The resources a plain search finds (the server's own answer, not the client's)."""
    r = client().get(f"{base}/{kind}", params=params)
    assert r.status_code == 200, f"GET {kind}: {r.status_code} {r.text}"
    return [e["resource"] for e in r.json().get("entry", [])]
