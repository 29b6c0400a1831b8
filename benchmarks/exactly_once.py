"""The exactly-once proof: many bookings through failures, and a count of what Salesforce holds.

Starts, all on loopback: a Redis of its own (the embedded server, append-only file synced on every
write, so that it can be killed and started again), the Health Cloud sandbox (`ehr-gateway sandbox`)
failing a share of Book calls (a third before storing; a third by dropping the answer after storing;
a third stored and then answered 503, 429 or 401, with Salesforce's body or a proxy's page), and
`ehr-gateway serve --workers N` with two Cerner sources, one answering synchronously and one through
the durable queue. Each booking is for a patient of its own, registered in the sandbox's org first,
but for a share of them (`late_share`) whose patients the org comes to know only during the run, in
three waves (before Redis is killed, between that and a worker's kill, after it): those are held
(202) and must be booked once each when their patient arrives. Simulated EHRs then post every
booking, a share of them twice (at once, or again later), retrying as a real interface would (on 202,
409, 502, 503 and broken connections; a held booking is asked after again later). Midway, Redis is
killed outright and started again, and one gateway worker is killed.

At the end it counts, per booking, the appointments the sandbox holds and the ids the EHRs were
answered: duplicates and lost bookings must both be 0.

    .venv/bin/python benchmarks/exactly_once.py [--bookings 3000] [--workers 2] [--concurrency 48]

The test suite runs the same harness with a few hundred bookings (tests/test_proof.py).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import msgspec

from gateway.state.embedded_redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
CORPUS_BODY = ROOT.parent / "shared" / "corpus" / "cerner-millennium-r4" / "r4_appointment_video_visit_entry.json"
BIN = Path(sys.executable).with_name("ehr-gateway")
SOURCES = {"cerner": "proof-cerner-key", "cernerq": "proof-cernerq-key"}  # sync, queue
CLIENT_ID, CLIENT_SECRET, CONTROL_KEY = "proof-client", "proof-secret-7a1e", "proof-control-5c2d"
# what the org's front answers after it stored a booking: statuses that once made duplicates
AFTER_STORE = ("503:salesforce", "503:html", "429:html", "401:salesforce")
RETRY_STATUSES = {202, 409, 502, 503}


@dataclass
class ProofOptions:
    bookings: int = 300
    duplicate_share: float = 1 / 3  # of bookings sent twice (half at once, half again later)
    concurrency: int = 32
    workers: int = 2
    fault_ratio: float = 0.2  # of Book calls failing: a third before storing, two thirds after
    restart_redis: bool = True
    kill_worker: bool = True
    seed: int = 20261124
    deadline_seconds: float = 240.0
    late_share: float = 0.2  # of bookings whose patient the org knows only later: held, then booked
    settle_seconds: float = 0.5  # [idempotency] in_doubt_settle_seconds (the shipped default is 60)
    retry_after_cap: float = 0.3  # the EHRs honour Retry-After up to this (a real interface: in full)


@dataclass
class Figures:
    bookings: int = 0
    posts: int = 0  # every HTTP request the EHRs made, retries included
    acknowledged: int = 0  # bookings answered 201
    appointments: int = 0  # what the sandbox holds
    duplicates: int = 0  # appointments beyond one per booking
    lost: int = 0  # bookings with no appointment, or answered with an id the sandbox lacks
    refused: int = 0  # bookings given a final error (none should be: every fault is transient)
    mismatched_answers: int = 0  # bookings whose duplicates were answered different ids
    sends: int = 0  # Book calls Salesforce received
    faults_before_store: int = 0
    faults_dropped_after_store: int = 0
    faults_answered_after_store: int = 0  # stored, then answered 503, 429 or 401
    lookups: int = 0  # ServiceAppointment queries the gateway made
    in_doubt: int = 0  # attempts whose answer was lost (timeout, dropped, 5xx), from the gateway's log
    adopted: int = 0  # attempts that adopted the appointment an earlier attempt had made
    queued: int = 0  # 202 answers
    late: int = 0  # bookings whose patient arrived in the org during the run
    held: int = 0  # 202 answers saying a booking is held for its patient (they name its log entry)
    released: int = 0  # late bookings booked (held, then booked when their patient arrived)
    identity_calls: int = 0  # Salesforce calls made to find participants (Composite and lone queries)
    redis_restarts: int = 0
    workers_killed: int = 0
    seconds: float = 0.0
    # from a booking's first send to its 201, over the bookings answered 201 (held ones left out: their
    # patient's arrival sets their pace)
    resolve_median_s: float = 0.0
    resolve_worst_s: float = 0.0
    refusals: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [(k, v) for k, v in asdict(self).items() if k != "refusals"]
        return "\n".join(f"{k:<28}{v}" for k, v in rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(target: Path, settle: float = 0.5) -> Path:
    shutil.copytree(ROOT / "config" / "codemaps" / "cerner", target / "codemaps" / "cerner")
    shutil.copytree(ROOT / "config" / "codemaps" / "cerner", target / "codemaps" / "cernerq")
    digest = {s: hashlib.sha256(k.encode()).hexdigest() for s, k in SOURCES.items()}
    (target / "gateway.toml").write_text(f"""
[sources.cerner]
adapter = "cerner"
source_system = "cerner"
api_keys_sha256 = ["{digest['cerner']}"]
time_zone = "America/Chicago"

[sources.cernerq]
adapter = "cerner"
source_system = "cerner"
api_keys_sha256 = ["{digest['cernerq']}"]
time_zone = "America/Chicago"
delivery = "queue"

[idempotency]
lease_seconds = 3
in_doubt_settle_seconds = {settle}
in_flight_retry_after_seconds = 1

[salesforce]
connect_timeout_seconds = 1
timeout_seconds = 2
unavailable_retry_after_seconds = 1

[queue]
max_attempts = 1000
backoff_base_seconds = 0.1
backoff_max_seconds = 1
poll_seconds = 0.1

[identity]
hold_retry_seconds = 0.2
hold_retry_max_seconds = 1
hold_poll_seconds = 0.1
miss_cache_seconds = 0.5

[redis]
key_prefix = "proof"
""")
    return target


@dataclass
class _Booking:
    index: int
    source: str
    key: str
    body: bytes
    patient: str
    start: str
    sends: int = 1
    together: bool = False
    late: bool = False  # the org knows the patient only from a wave during the run
    account: str | None = None  # the patient's record in the org, once registered
    held: bool = False  # answered 202: held for its patient
    answers: list[str] = field(default_factory=list)
    refusal: str | None = None
    first_sent: float | None = None
    resolved_s: float | None = None  # first send to first 201


def _bookings(opts: ProofOptions) -> list[_Booking]:
    template = CORPUS_BODY.read_text()
    rng = random.Random(opts.seed)
    base = datetime(2027, 1, 4, 8, 0, tzinfo=timezone.utc)
    out = []
    for i in range(opts.bookings):
        patient = f"9{i:07d}"
        start = base + timedelta(minutes=15 * i)
        data = msgspec.json.decode(template.replace("Patient/12724066", f"Patient/{patient}"))
        data["start"] = start.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        data["end"] = (start + timedelta(minutes=15)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        b = _Booking(i, "cerner" if i % 2 == 0 else "cernerq", f"proof-{opts.seed}-{i}", msgspec.json.encode(data),
                     patient, start.strftime("%Y-%m-%dT%H:%M:%S"))
        if rng.random() < opts.duplicate_share:
            b.sends, b.together = 2, rng.random() < 0.5
        b.late = rng.random() < opts.late_share
        out.append(b)
    return out


async def _register(sf: httpx.AsyncClient, bookings: list[_Booking]) -> None:
    """The patients made known to the org (its data load: the sandbox's control key), a few at once."""
    gate = asyncio.Semaphore(16)

    async def one(b: _Booking) -> None:
        async with gate:
            r = await sf.post("/sandbox/org/patients", json={"sourceSystem": "cerner", "idValue": b.patient,
                                                            "firstName": "Proof", "lastName": f"Patient{b.index}"})
            r.raise_for_status()
            b.account = r.json()["account"]

    await asyncio.gather(*(one(b) for b in bookings))


class _Run:
    def __init__(self, opts: ProofOptions, workdir: Path) -> None:
        self.opts = opts
        self.workdir = workdir
        self.figures = Figures(bookings=opts.bookings)
        self.acked = 0
        self.log_path = workdir / "gateway.log"

    async def post(self, client: httpx.AsyncClient, b: _Booking, deadline: float) -> None:
        headers = {"Authorization": f"Bearer {SOURCES[b.source]}", "Content-Type": "application/fhir+json",
                   "Idempotency-Key": b.key}
        if b.first_sent is None:
            b.first_sent = time.monotonic()
        while time.monotonic() < deadline:
            self.figures.posts += 1
            try:
                r = await client.post(f"/fhir/{b.source}/Appointment", content=b.body, headers=headers)
            except httpx.TransportError:
                await asyncio.sleep(0.1)  # a killed worker or a refused connection: try again
                continue
            if r.status_code == 201:
                b.answers.append(r.json()["id"])
                if b.resolved_s is None and not b.held:
                    b.resolved_s = time.monotonic() - b.first_sent
                return
            if r.status_code == 202 and "/admin/api/requests/" in r.headers.get("location", ""):
                self.figures.held += 1
                b.held = True
                return  # asked after again later, as an interface does with an accepted message
            if r.status_code in RETRY_STATUSES:
                self.figures.queued += r.status_code == 202
                await asyncio.sleep(min(float(r.headers.get("retry-after", "1")), self.opts.retry_after_cap))
                continue
            b.refusal = f"{r.status_code} {r.text[:200]}"
            return
        b.refusal = "deadline"

    async def ehr(self, client: httpx.AsyncClient, b: _Booking, gate: asyncio.Semaphore, deadline: float) -> None:
        async with gate:
            if b.sends == 2 and b.together:
                await asyncio.gather(self.post(client, b, deadline), self.post(client, b, deadline))
            else:
                await self.post(client, b, deadline)
        while b.held and not b.answers and not b.refusal and time.monotonic() < deadline:
            await asyncio.sleep(0.5)  # held: the EHR asks after it now and then, holding no connection
            await self.post(client, b, deadline)
        self.acked += 1
        if b.sends == 2 and not b.together:
            await asyncio.sleep(0.5)  # the EHR's later, unprompted retry
            async with gate:
                await self.post(client, b, deadline)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


async def run_proof(opts: ProofOptions, workdir: Path | None = None) -> Figures:
    own = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ehr-gateway-proof-"))
    run = _Run(opts, workdir)
    redis_server = EmbeddedRedis(workdir / "redis").start()
    sandbox_port, gateway_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SALESFORCE_", "REDIS_URL", "EHR_GATEWAY"))}
    sandbox = subprocess.Popen(
        [str(BIN), "sandbox", "--port", str(sandbox_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**env, "SANDBOX_CLIENT_ID": CLIENT_ID, "SANDBOX_CLIENT_SECRET": CLIENT_SECRET,
             "SANDBOX_CONTROL_KEY": CONTROL_KEY}, start_new_session=True,
    )
    log = run.log_path.open("w")
    gateway = subprocess.Popen(
        [str(BIN), "serve", "--port", str(gateway_port), "--workers", str(opts.workers),
         "--config", str(_write_config(workdir / "config", opts.settle_seconds))],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**env, "REDIS_URL": redis_server.url, "SALESFORCE_LOGIN_URL": f"http://127.0.0.1:{sandbox_port}",
             "SALESFORCE_CLIENT_ID": CLIENT_ID, "SALESFORCE_CLIENT_SECRET": CLIENT_SECRET},
    )
    sandbox_url, gateway_url = f"http://127.0.0.1:{sandbox_port}", f"http://127.0.0.1:{gateway_port}"
    try:
        async with httpx.AsyncClient(base_url=sandbox_url, timeout=10,
                                     headers={"Authorization": f"Bearer {CONTROL_KEY}"}) as sf, \
                httpx.AsyncClient(base_url=gateway_url, timeout=30,
                                  limits=httpx.Limits(max_connections=opts.concurrency * 2)) as gw:
            await _wait_ready(gw, gateway, sf)
            third = opts.fault_ratio / 3
            r = await sf.post("/sandbox/faults", json={
                "fail_before_store_ratio": third, "drop_after_store_ratio": third, "answer_after_store_ratio": third,
                "answer_after_store": list(AFTER_STORE), "fault_seed": opts.seed})
            r.raise_for_status()
            bookings = _bookings(opts)
            await _register(sf, [b for b in bookings if not b.late])
            started = time.monotonic()
            deadline = started + opts.deadline_seconds
            gate = asyncio.Semaphore(opts.concurrency)
            chaos = asyncio.create_task(_chaos(run, redis_server, gateway))
            arrivals = asyncio.create_task(_arrivals(run, sf, bookings))
            await asyncio.gather(*(run.ehr(gw, b, gate, deadline) for b in bookings))
            for task in (chaos, arrivals):
                task.cancel()
            await asyncio.gather(chaos, arrivals, return_exceptions=True)
            run.figures.seconds = round(time.monotonic() - started, 1)
            await sf.post("/sandbox/faults", json={"fail_before_store_ratio": 0, "drop_after_store_ratio": 0,
                                                   "answer_after_store_ratio": 0})
            listing = (await sf.get("/sandbox/appointments")).json()
            counters = (await sf.get("/sandbox/counters")).json()
        _count(run.figures, bookings, listing, counters, run.log_path)
        return run.figures
    finally:
        for proc in (gateway, sandbox):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        redis_server.stop()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


async def _wait_ready(gw: httpx.AsyncClient, gateway: subprocess.Popen[bytes], sf: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if (await gw.get("/health/ready")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if gateway.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start; see its log")
        await asyncio.sleep(0.2)


async def _chaos(run: _Run, redis_server: EmbeddedRedis, gateway: subprocess.Popen[bytes]) -> None:
    """Redis killed and restarted at a third of the run, a gateway worker killed at two thirds."""
    opts = run.opts
    if opts.restart_redis:
        while run.acked < opts.bookings // 3:
            await asyncio.sleep(0.05)
        redis_server.kill()
        await asyncio.sleep(0.5)
        redis_server.start()
        run.figures.redis_restarts += 1
    if opts.kill_worker:
        while run.acked < 2 * opts.bookings // 3:
            await asyncio.sleep(0.05)
        workers = [pid for pid in _children(gateway.pid) if b"spawn_main" in _cmdline(pid)] or _children(gateway.pid)
        if workers:
            os.kill(workers[0], signal.SIGKILL)
            run.figures.workers_killed += 1


async def _arrivals(run: _Run, sf: httpx.AsyncClient, bookings: list[_Booking]) -> None:
    """The late patients reach the org in three waves: before Redis is killed (at a sixth of the
    others' bookings), between that and the worker's kill (at a half), and after it (five sixths)."""
    late = [b for b in bookings if b.late]
    others = len(bookings) - len(late)
    for wave, share in enumerate((1 / 6, 1 / 2, 5 / 6)):
        while run.acked < others * share:
            await asyncio.sleep(0.05)
        await _register(sf, late[wave::3])
    run.figures.late = len(late)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _count(fig: Figures, bookings: list[_Booking], listing: list[dict], counters: dict, log_path: Path) -> None:
    held: Counter[tuple[str, str]] = Counter()
    ids_at: dict[tuple[str, str], set[str]] = {}
    for appt in listing:
        sa = appt["serviceAppointment"]
        slot = (sa["ParentRecordId"], sa["SchedStartTime"][:19])
        held[slot] += 1
        ids_at.setdefault(slot, set()).add(appt["id"])
    fig.appointments = len(listing)
    fig.sends = counters.get("book_calls", 0)
    resolved = sorted(b.resolved_s for b in bookings if b.resolved_s is not None)
    if resolved:
        fig.resolve_median_s = round(resolved[len(resolved) // 2], 2)
        fig.resolve_worst_s = round(resolved[-1], 2)
    fig.faults_before_store = counters.get("faults_before_store", 0)
    fig.faults_dropped_after_store = counters.get("faults_dropped_after_store", 0)
    fig.faults_answered_after_store = counters.get("faults_answered_after_store", 0)
    fig.lookups = counters.get("appointment_queries", 0)
    for b in bookings:
        slot = (b.account or "", b.start)
        fig.released += b.late and bool(b.answers)
        if b.refusal:
            fig.refused += 1
            fig.refusals.append(f"booking {b.index}: {b.refusal}")
        if b.answers:
            fig.acknowledged += 1
        if len(set(b.answers)) > 1:
            fig.mismatched_answers += 1
        fig.duplicates += max(0, held[slot] - 1)
        if held[slot] == 0 or not set(b.answers) <= ids_at.get(slot, set()):
            fig.lost += 1
    expected = {(b.account or "", b.start) for b in bookings}
    fig.duplicates += sum(n for slot, n in held.items() if slot not in expected)  # made from nothing
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = msgspec.json.decode(line)
        except msgspec.DecodeError:
            continue
        fig.adopted += entry.get("adopted") is True
        fig.in_doubt += entry.get("sf_in_doubt") is True
        fig.identity_calls += entry.get("id_calls") or 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bookings", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--fault-ratio", type=float, default=0.2)
    parser.add_argument("--deadline", type=float, default=900)
    parser.add_argument("--settle", type=float, default=0.5, help="in_doubt_settle_seconds (shipped: 60)")
    parser.add_argument("--retry-after-cap", type=float, default=0.3,
                        help="the EHRs wait at most this of a Retry-After (a real interface: all of it)")
    parser.add_argument("--calm", action="store_true",
                        help="no Redis kill, no worker kill, no late patients: the time a blip costs, alone")
    args = parser.parse_args()
    calm = {"restart_redis": False, "kill_worker": False, "late_share": 0.0} if args.calm else {}
    opts = ProofOptions(bookings=args.bookings, workers=args.workers, concurrency=args.concurrency,
                        fault_ratio=args.fault_ratio, deadline_seconds=args.deadline, settle_seconds=args.settle,
                        retry_after_cap=args.retry_after_cap, **calm)
    figures = asyncio.run(run_proof(opts))
    print(figures.table())
    for line in figures.refusals[:10]:
        print(line)
    return 0 if figures.duplicates == figures.lost == figures.refused == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
