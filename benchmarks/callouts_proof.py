"""The exactly-once proof for Health Cloud's callouts: many Creates through failures, and a count of
what the EHRs hold.

Starts, all on loopback: the EHR twins (Cerner, Epic and, where this checkout has its client, FHIR;
each a real HTTP server in this process, Epic's token a signed RS384 assertion), a Redis of its own
(the embedded server, append-only file synced on every write, so it can be killed and started
again), the Salesforce stand-in (`serve` needs a Salesforce; no callout reaches it) and
`ehr-gateway serve --workers 2` with a source per twin. Health Cloud is played by
`gateway.sandbox.iam.Callouts` (its Find and Create, written from the spec).

Faults: each twin fails `fault_ratio` of the creates it gets (drawn per create from a seeded
generator, `Faults.create_fail_ratio`): half before storing (Cerner 503, Epic 429, FHIR 500), half
after storing (Cerner and FHIR drop the connection mid-answer, Epic answers 500). Midway, Redis is
killed outright and started again (at a third of the run), and one gateway worker is killed (at two
thirds).

Each simulated ServiceAppointment (its own `08p…` id and patient) searches its own slot with Find,
then creates it; a third of them send the Create twice (half at once, half again 0.5 s after the
first was answered). The spec documents no retries; this assumes Health Cloud's Apex retries a Create
answered `proposed`, 429, 5xx or not answered at all (a dropped or refused connection), after
Retry-After (at most 0.5 s here) or 0.2 s, until `deadline_seconds`; any other answer is final.

At the end, per ServiceAppointment, from the twins' `/twin/appointments`:

- duplicates: booked appointments of its patient beyond one, plus appointments of no
  ServiceAppointment's patient (made from nothing). Each patient belongs to one ServiceAppointment,
  so any second appointment of a patient is a second booking of one ServiceAppointment.
- lost: a ServiceAppointment some Create was answered `booked` for, whose answered id is not the
  booked appointment the twin holds for its patient on its slot (absent, or another one); or one the
  twin holds booked while no Create for it was ever answered `booked` (the EHR has it, Health Cloud
  was never told).
- unbooked: neither held nor answered booked after every retry (every fault is transient, so this
  is 0 too; counted apart because it is a refusal, not a loss).

    .venv/bin/python -m benchmarks.callouts_proof [--appointments 300] [--workers 2] [--concurrency 16]

The suite runs it small (tests/test_callouts_proof.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

from gateway.edges.server import ThreadedServer
from gateway.twins import TwinConfig, create_ehr_twin
from gateway.twins.app import base_path
from gateway.twins.config import TwinPatient, default_schedules, key_pair
from gateway.sandbox.iam import Callouts
from gateway.state.embedded_redis import EmbeddedRedis
from benchmarks.exactly_once import _children, _cmdline, _free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).with_name("ehr-gateway")
CONTROL, CLIENT, SECRET = "proof-twin-control-4e1b", "proof-gateway-client", "proof-twin-secret-8d20"
HC_USER, HC_PASSWORD = "healthcloud", "proof-hc-secret-27f9"
AUTH = "Basic " + base64.b64encode(f"{HC_USER}:{HC_PASSWORD}".encode()).decode()
# Health Cloud's work-type codes the shipped maps send back as each twin's service
SERVICE = {"cerner": "2572307911", "epic": "40111223", "fhir": "124"}
# how each twin fails: (status before storing, what comes after storing)
FAULTS = {"cerner": (503, "drop"), "epic": (429, "500"), "fhir": (500, "drop")}
RETRY = {429, 500, 502, 503, 504}


@dataclass
class ProofOptions:
    appointments: int = 300
    duplicate_share: float = 1 / 3  # of ServiceAppointments whose Create is sent twice
    fault_ratio: float = 0.2  # of each twin's creates failing, half of them after storing
    concurrency: int = 16
    workers: int = 2
    restart_redis: bool = True
    kill_worker: bool = True
    dialects: tuple[str, ...] = ()  # () = every dialect whose client this checkout has
    seed: int = 20261206
    deadline_seconds: float = 240.0


@dataclass
class Figures:
    appointments: int = 0  # ServiceAppointments simulated
    sent_twice: int = 0
    callouts: int = 0  # every Create Health Cloud sent, retries included
    retried: int = 0  # Creates sent again after a proposed, 429/5xx or unanswered Create
    answered_proposed: int = 0  # Creates answered proposed (the EHR failed before storing, or in doubt)
    answered_retry: int = 0  # Creates answered 429 or 5xx (Redis down, a booking in flight, ...)
    unanswered: int = 0  # Creates whose connection failed (a killed worker)
    finds_retried: int = 0  # Finds sent again: unanswered (a killed worker), not 200, or its EHR failing
    answered_booked: int = 0  # ServiceAppointments some Create was answered booked for
    held: int = 0  # booked appointments in the twins
    duplicates: int = 0
    lost: int = 0
    unbooked: int = 0
    mismatched_answers: int = 0  # one ServiceAppointment answered two different ids
    ehr_creates: int = 0  # creates the twins took past their gate (stored, or refused as taken)
    faults_before_store: int = 0
    faults_after_store: int = 0
    redis_restarts: int = 0
    workers_killed: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def table(self) -> str:
        return "\n".join(f"{k:<22}{v}" for k, v in asdict(self).items() if k != "problems")


@dataclass
class _Appointment:
    index: int
    dialect: str
    system: str
    service_appointment: str
    patient: str
    practitioner: str
    start: datetime
    sends: int = 1
    together: bool = False
    slot: str | None = None
    answers: list[str] = field(default_factory=list)  # ids answered booked
    finals: list[str] = field(default_factory=list)  # each send's last answer (status or error)


def available_dialects() -> tuple[str, ...]:
    return tuple(d for d in ("cerner", "epic", "fhir") if (ROOT / "gateway" / "ehr" / f"{d}.py").exists())


def _plan(opts: ProofOptions, dialects: tuple[str, ...], today: datetime) -> list[_Appointment]:
    """Each ServiceAppointment a slot of its own (a schedule and half hour no other one has), so a
    slot found taken can only be taken by its own earlier Create."""
    rng = random.Random(opts.seed)
    days = TwinConfig(dialect="cerner", control_key="-").days  # the twins' calendars, from today
    last = (opts.appointments - 1) // len(dialects) // 2  # the last half hour used, as below
    if 1 + last // 16 >= days:
        raise ValueError(f"at most {len(dialects) * 2 * 16 * (days - 1)} ServiceAppointments fit the twins' calendars")
    out = []
    for i in range(opts.appointments):
        dialect, k = dialects[i % len(dialects)], i // len(dialects)
        schedule = default_schedules(dialect)[k % 2]  # type: ignore[arg-type]
        n = k // 2  # 16 half hours a day from 09:00 UTC, from tomorrow
        start = today + timedelta(days=1 + n // 16, hours=9, minutes=30 * (n % 16))
        a = _Appointment(i, dialect, dialect, f"08p{i:012d}AAA", f"7{i:07d}", schedule.practitioner, start)
        if rng.random() < opts.duplicate_share:
            a.sends, a.together = 2, rng.random() < 0.5
        out.append(a)
    return out


def _write_config(target: Path, twins: dict[str, str], private_pem: str) -> Path:
    target.mkdir(parents=True)
    key = target / "epic-key.pem"
    key.write_text(private_pem)
    key.chmod(0o600)
    parts = []
    for dialect, url in twins.items():
        shutil.copytree(ROOT / "config" / "codemaps" / dialect, target / "codemaps" / dialect)
        auth = 'private_key_file = "epic-key.pem"' if dialect == "epic" else ""
        parts.append(f"""
[sources.{dialect}]
adapter = "{dialect}"
source_system = "{dialect}"

[sources.{dialect}.ehr]
base_url = "{url}{base_path(dialect)}"
token_url = "{url}/oauth2/token"
client_id = "{CLIENT}"
{auth}
connect_timeout_seconds = 1
timeout_seconds = 2
unavailable_retry_after_seconds = 1
""")
    digest = hashlib.sha256(f"{HC_USER}:{HC_PASSWORD}".encode()).hexdigest()
    parts.append(f"""
[healthcloud]
basic_sha256 = ["{digest}"]

[idempotency]
lease_seconds = 3
in_doubt_settle_seconds = 0.5
in_flight_retry_after_seconds = 1

[salesforce]
connect_timeout_seconds = 1
timeout_seconds = 2

[redis]
key_prefix = "callouts-proof"
""")
    (target / "gateway.toml").write_text("".join(parts))
    return target


class _Run:
    def __init__(self, opts: ProofOptions, deadline: float) -> None:
        self.opts, self.deadline = opts, deadline
        self.figures = Figures(appointments=opts.appointments)
        self.done = 0

    async def find(self, hc: Callouts, a: _Appointment) -> None:
        """Find its slot: the one free slot of its practitioner in its half hour."""
        end = a.start + timedelta(minutes=29)
        while time.monotonic() < self.deadline:
            try:
                r = await hc.find(a.start.strftime("%Y-%m-%dT%H:%M:%SZ"), end.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                  practitioners=[f"{a.system}|{a.practitioner}"],
                                  service_types=[f"{a.system}|{SERVICE[a.dialect]}"])
            except httpx.TransportError:
                self.figures.finds_retried += 1
                await asyncio.sleep(0.2)
                continue
            if r.status_code == 200:
                slots = [e["resource"]["id"] for e in r.json().get("entry", []) if e["search"]["mode"] == "match"]
                if len(slots) == 1:
                    a.slot = slots[0]
                    return
            self.figures.finds_retried += 1
            await asyncio.sleep(0.2)  # an EHR not answering now (an outcome entry), or the gateway
        raise RuntimeError(f"ServiceAppointment {a.index}: its slot was never found")

    async def create(self, hc: Callouts, a: _Appointment) -> None:
        """One Create as Health Cloud sends it, retried as assumed in the module's docstring."""
        assert a.slot is not None
        first = True
        while time.monotonic() < self.deadline:
            self.figures.callouts += 1
            self.figures.retried += not first
            first = False
            try:
                r = await hc.create(a.system, a.slot, service_appointment=a.service_appointment,
                                    account="001xx000003DGb2AAG", patient=a.patient, practitioner=a.practitioner)
            except httpx.TransportError:
                self.figures.unanswered += 1
                await asyncio.sleep(0.2)  # a killed worker, a refused connection
                continue
            if r.status_code == 200:
                answer = r.json()
                if answer.get("status") == "booked":
                    a.answers.append(answer["id"])
                    a.finals.append("booked")
                    return
                self.figures.answered_proposed += 1
                await asyncio.sleep(0.2)  # proposed: not booked (yet)
                continue
            if r.status_code in RETRY:
                self.figures.answered_retry += 1
                await asyncio.sleep(min(float(r.headers.get("retry-after", "0.2")), 0.5))
                continue
            a.finals.append(f"HTTP {r.status_code}")
            self.figures.problems.append(f"ServiceAppointment {a.index}: {r.status_code} {r.text[:200]}")
            return
        a.finals.append("deadline")

    async def one(self, hc: Callouts, a: _Appointment, gate: asyncio.Semaphore) -> None:
        async with gate:
            await self.find(hc, a)
            if a.sends == 2 and a.together:
                await asyncio.gather(self.create(hc, a), self.create(hc, a))
            else:
                await self.create(hc, a)
            self.done += 1
        if a.sends == 2 and not a.together:
            await asyncio.sleep(0.5)  # the org's later, unprompted second Create
            async with gate:
                await self.create(hc, a)


async def _chaos(run: _Run, redis_server: EmbeddedRedis, gateway: subprocess.Popen[bytes]) -> None:
    n = run.opts.appointments
    if run.opts.restart_redis:
        while run.done < n // 3:
            await asyncio.sleep(0.05)
        redis_server.kill()
        await asyncio.sleep(0.5)
        redis_server.start()
        run.figures.redis_restarts += 1
    if run.opts.kill_worker:
        while run.done < 2 * n // 3:
            await asyncio.sleep(0.05)
        # the busiest worker: the other may hold none of Health Cloud's kept-alive connections
        workers = sorted((p for p in _children(gateway.pid) if b"spawn_main" in _cmdline(p)), key=_cpu, reverse=True)
        if workers:
            os.kill(workers[0], signal.SIGKILL)
            run.figures.workers_killed += 1


def _cpu(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _count(fig: Figures, planned: list[_Appointment], held: dict[str, list[dict]], counters: dict[str, dict]) -> None:
    booked = [(d, x) for d, listing in held.items() for x in listing if x["status"] == "booked"]
    fig.held = len(booked)
    by_patient: Counter[str] = Counter(x["patient"] for _, x in booked)
    ours = {a.patient for a in planned}
    fig.duplicates = sum(n - 1 for n in by_patient.values() if n > 1) + sum(n for p, n in by_patient.items() if p not in ours)
    for a in planned:
        fig.sent_twice += a.sends == 2
        mine = [x for d, x in booked if d == a.dialect and x["patient"] == a.patient and x["slot"] == a.slot]
        if len(set(a.answers)) > 1:
            fig.mismatched_answers += 1
        if a.answers:
            fig.answered_booked += 1
            if not mine or any(i != mine[0]["id"] for i in a.answers):
                fig.lost += 1
                fig.problems.append(f"ServiceAppointment {a.index}: answered {a.answers}, the twin holds "
                                    f"{[x['id'] for x in mine]}")
        elif mine:
            fig.lost += 1
            fig.problems.append(f"ServiceAppointment {a.index}: held {mine[0]['id']} but answered {a.finals}")
        else:
            fig.unbooked += 1
            fig.problems.append(f"ServiceAppointment {a.index}: not booked; answered {a.finals}")
    for c in counters.values():
        fig.ehr_creates += c.get("creates", 0)
        fig.faults_before_store += c.get("create_faults_before", 0)
        fig.faults_after_store += c.get("create_faults_after_store", 0)


def _control(url: str, method: str, path: str, **kw: object) -> dict:
    r = httpx.request(method, url + path, headers={"Authorization": f"Bearer {CONTROL}"}, timeout=10, **kw)  # type: ignore[arg-type]
    r.raise_for_status()
    return r.json()


async def run_proof(opts: ProofOptions, workdir: Path | None = None) -> Figures:
    own = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ehr-gateway-callouts-proof-"))
    dialects = opts.dialects or available_dialects()
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    with ExitStack() as stack:
        private, twins = _start_twins(stack, opts, dialects, today)
        redis_server = EmbeddedRedis(workdir / "redis").start()
        stack.callback(redis_server.stop)
        gateway, base = _start_gateway(stack, opts, workdir, twins, private, redis_server.url)
        await _wait_ready(base, gateway, workdir / "gateway.log")
        hc = Callouts(base + "/iam", AUTH, timeout=15)
        try:
            planned = _plan(opts, dialects, today)
            started = time.monotonic()
            run = _Run(opts, started + opts.deadline_seconds)
            gate = asyncio.Semaphore(opts.concurrency)
            chaos = asyncio.create_task(_chaos(run, redis_server, gateway))
            await asyncio.gather(*(run.one(hc, a, gate) for a in planned))
            chaos.cancel()
            await asyncio.gather(chaos, return_exceptions=True)
            run.figures.seconds = round(time.monotonic() - started, 1)
        finally:
            await hc.aclose()
        held = {d: _control(url, "GET", "/twin/appointments")["appointments"] for d, url in twins.items()}
        counters = {d: _control(url, "GET", "/twin/counters") for d, url in twins.items()}
        _count(run.figures, planned, held, counters)
    if own:
        shutil.rmtree(workdir, ignore_errors=True)
    return run.figures


def _start_twins(stack: ExitStack, opts: ProofOptions, dialects: tuple[str, ...],
                 today: datetime) -> tuple[str, dict[str, str]]:
    """Each dialect's twin on a port of its own, failing its creates as FAULTS says: (the private
    key Epic's assertions are signed with, dialect -> the twin's URL)."""
    # the twins' deliberate mid-answer drops are not errors worth a traceback each
    server_log = logging.getLogger("uvicorn.error")
    stack.callback(server_log.setLevel, server_log.level)
    server_log.setLevel(logging.CRITICAL)
    private, public = key_pair()
    twins = {}
    # every ServiceAppointment's patient (`_plan`), held by each EHR: a create for one it lacks is 404
    patients = tuple(TwinPatient(id=f"7{i:07d}", family="Proof", given=("Patient",), birthDate="1970-01-01",
                                 gender="unknown", mrn=f"9{i:07d}") for i in range(opts.appointments))
    for i, d in enumerate(dialects):
        config = TwinConfig(dialect=d, control_key=CONTROL, client_id=CLIENT,  # type: ignore[arg-type]
                            client_secret=None if d == "epic" else SECRET, patients=patients,
                            public_key_pem=public if d == "epic" else None, start_date=today.date().isoformat())
        twins[d] = stack.enter_context(ThreadedServer(create_ehr_twin(config))).url
        before, after = FAULTS[d]
        _control(twins[d], "POST", "/twin/faults", json={
            "create_fail_ratio": opts.fault_ratio, "after_store_share": 0.5, "fault_seed": opts.seed + i,
            "fail_status": before, "after_store": after})
    return private, twins


def _start_gateway(stack: ExitStack, opts: ProofOptions, workdir: Path, twins: dict[str, str], private: str,
                   redis_url: str) -> tuple[subprocess.Popen[bytes], str]:
    """The Salesforce stand-in, and `ehr-gateway serve` in front of the twins: (its process, its URL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SALESFORCE_", "REDIS_URL", "EHR_"))}
    sf_port, port = _free_port(), _free_port()
    sf = subprocess.Popen([sys.executable, "-m", "benchmarks.standin", "--port", str(sf_port)], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    stack.callback(_stop, sf)
    log = stack.enter_context((workdir / "gateway.log").open("w"))
    gateway = subprocess.Popen(
        [str(BIN), "serve", "--port", str(port), "--workers", str(opts.workers),
         "--config", str(_write_config(workdir / "config", twins, private))],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
        env={**env, "REDIS_URL": redis_url, "SALESFORCE_LOGIN_URL": f"http://127.0.0.1:{sf_port}",
             "SALESFORCE_CLIENT_ID": "proof-client", "SALESFORCE_CLIENT_SECRET": "proof-secret",
             "EHR_GATEWAY_DATA": str(workdir / "data"),
             **{f"EHR_{d.upper()}_CLIENT_SECRET": SECRET for d in twins if d != "epic"}})
    stack.callback(_stop, gateway)
    return gateway, f"http://127.0.0.1:{port}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def _wait_ready(base: str, gateway: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            try:
                if (await client.get(base + "/health/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if gateway.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appointments", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--fault-ratio", type=float, default=0.2)
    parser.add_argument("--deadline", type=float, default=600)
    parser.add_argument("--dialects", default="", help="comma-separated (default: every dialect with a client)")
    args = parser.parse_args()
    opts = ProofOptions(appointments=args.appointments, workers=args.workers, concurrency=args.concurrency,
                        fault_ratio=args.fault_ratio, deadline_seconds=args.deadline,
                        dialects=tuple(args.dialects.split(",")) if args.dialects else ())
    figures = asyncio.run(run_proof(opts))
    print(figures.table())
    print(f"duplicates {figures.duplicates} lost {figures.lost} unbooked {figures.unbooked}")
    for line in figures.problems[:10]:
        print(line)
    return 0 if figures.duplicates == figures.lost == figures.unbooked == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
