"""Issue 6's benchmark: the gateway against a minimal forwarder (the ceiling) and a typical
hand-rolled gateway (the peer), side by side in one run, everything on loopback.

    .venv/bin/python -m benchmarks.compare [--seconds 10] [--rounds 3] [--concurrency 32] [--soak 200000] [--quick]

A default run takes about 7 minutes on the 2-core development machine: ~20 s for set-up and the
stand-in's own measurement, ~3.5 minutes of rounds (4 systems x 3 rounds x (start + 2 s warm-up +
10 s)), ~1.5 minutes of gateway details (the paced runs at half the peak last 30 s each), and the
soak, whose length is 200,000 bookings at the gateway's own rate (~2.5 minutes at ~1,400 req/s). Before each run it waits
up to 30 s for other processes to quieten down (--quiet-wait), so a busy machine adds up to ~8
minutes. `--quick` (1 round, 5 s runs, a 20,000-booking soak) takes under 2 minutes.

What it does, in order:

1. Redis: REDIS_URL if set (every key under a prefix of this run's own, deleted at the end), else an
   embedded Redis (the project's `gateway.state.embedded_redis`, append-only file off) thrown away at the
   end.
2. The Salesforce stand-in (benchmarks/standin.py: fixed answers to the token and Book calls), then
   its own capacity alone: wrk straight at its Book endpoint with the body the gateway sends.
3. Rounds. In each round, each system is started afresh, warmed up for 2 s, then loaded by wrk for
   --seconds at --concurrency connections, every request with a unique Idempotency-Key:
   (a) `gateway`: `ehr-gateway serve` (1 worker) with a temporary copy of config/, the full
       booking path; (b) `forwarder`: benchmarks/baselines/forwarder.py; (c) `peer`:
       benchmarks/baselines/peer.py; and `gateway-2w`: `ehr-gateway serve --workers 2`. The order
       rotates from round to round. Each run records req/s, p50/p99, socket errors, non-2xx
       answers and the CPU each process used. The table shows each column's median; the ratios
       are computed within each round, and the median of those is judged.
4. Gateway details, each on a fresh gateway:
   (i) Redis round trips per new booking and per replay. The gateway's Redis traffic goes through
       a counting TCP relay (a round trip = the client speaking again after Redis answered; a
       pipeline or a Lua script is one), while exactly N bookings are sent one at a time (under load
       one round trip carries several bookings' commands, which would hide each one's), then N
       replays of one key. INFO commandstats deltas over the same windows are printed per command. They count
       the commands run inside Lua scripts too, so they show what Redis executes, not round trips.
   (ii) MEMORY USAGE of the idempotency records it wrote (`<prefix>:idem:*`).
   (iii) Gateway-added p99 at half its peak rate: wrk paced with a Lua `delay()` to about half the
       gateway's median req/s for --half-seconds (30), measuring the gateway's p99; then the
       stand-in's own p99 at the same rate, measured directly. The difference is what the gateway
       adds.
   (iv) 1 vs 2 workers: from the rounds (`gateway` vs `gateway-2w`).
   (v) A soak of --soak bookings at full speed, sampling the RSS of every gateway process every
       --sample-seconds from /proc. The baseline is the first sample after 10% of the bookings
       (the warm-up); the end is the last sample.
5. Output: the table, ratios and PASS/FAIL, benchmarks/results/latest.json (every figure, every
   run), benchmarks/results/compare.png (req/s and p99 of each system, per-round values as points),
   benchmarks/results/soak.png (RSS over the soak), and a markdown block for BENCHMARKS.md, also
   written to benchmarks/results/latest.md.

Every process it starts is stopped at the end, also on Ctrl-C or an error.
Needs wrk (Debian: apt-get install -y wrk) and the `bench` extra (fastapi, pydantic, matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from benchmarks.baselines.common import listening_socket

ROOT = Path(__file__).resolve().parents[1]
BODY_FILE = ROOT.parent / "shared" / "corpus" / "cerner-millennium-r4" / "r4_appointment_video_visit_entry.json"
BIN = Path(sys.executable).with_name("ehr-gateway")
RESULTS = ROOT / "benchmarks" / "results"
SOURCE = "cerner"
API_KEY = "bench-cerner-key"
SF_CLIENT_ID, SF_CLIENT_SECRET = "bench-client", "bench-secret"
BOOK_PATH = "/services/data/v66.0/connect/health/appointment-management/appointment"
SYSTEMS = ["gateway", "forwarder", "peer", "gateway-2w"]
LABELS = {
    "gateway": "(a) gateway",
    "forwarder": "(b) minimal forwarder",
    "peer": "(c) hand-rolled peer",
    "gateway-2w": "gateway, 2 workers",
}
TARGETS = {"vs_forwarder": 0.6, "vs_peer": 4.0, "added_p99_ms": 5.0, "rt_new": 2, "rt_replay": 1,
           "record_bytes": 1024, "soak_pct": 10.0}

# --------------------------------------------------------------------------- processes

_LIVE: list[Proc] = []


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_tree(root: int) -> list[int]:
    """root and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            children.setdefault(int(st[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        if (st := _stat(pid)) is not None:
            total += int(st[11]) + int(st[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all cores, every process), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pids: list[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out[pid] = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server subprocess: its process tree's CPU and RSS, and a stop that leaves nothing behind."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, *,
                 sock: socket.socket | None = None, port: int | None = None, stdout_to_log: bool = True):
        self.name = name
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")
        if sock is not None:
            argv = [*argv, "--fd", str(sock.fileno())]
            self.port = sock.getsockname()[1]
        else:
            assert port is not None
            self.port = port
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, pass_fds=[sock.fileno()] if sock is not None else (),
            stdout=self._log if stdout_to_log else subprocess.DEVNULL, stderr=self._log,
        )
        if sock is not None:
            sock.close()  # the child holds it now
        _LIVE.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        if self in _LIVE:
            _LIVE.remove(self)
        tree = [(pid, (_stat(pid) or [None] * 22)[19]) for pid in self.pids()]  # (pid, start time)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid, started in tree[1:]:  # workers the main process did not take down
            st = _stat(pid)
            if st is not None and st[19] == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 5) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def wait_until(proc: Proc, check, what: str, deadline_s: float = 60) -> None:
    end = time.monotonic() + deadline_s
    last: object = None
    while time.monotonic() < end:
        if not proc.alive():
            raise SystemExit(f"{proc.name} exited during start-up ({proc.proc.returncode}):\n{proc.log_tail()}")
        try:
            ok, last = check()
            if ok:
                return
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise SystemExit(f"{proc.name}: {what} not reached after {deadline_s:g}s (last: {last}):\n{proc.log_tail()}")


# --------------------------------------------------------------------------- wrk

WRK_LUA = r"""
-- env: BENCH_BODY (file), BENCH_CTYPE, BENCH_AUTH, BENCH_KEYS (unique|fixed|none), BENCH_FIXED_KEY,
--      BENCH_RUN, BENCH_DELAY_MS (mean pause between a response and the next request, per connection),
--      BENCH_FIRST_PATH + BENCH_CONNS_PER_THREAD (paced runs: each connection's first request is a
--      cheap GET of that path, so that the real requests start staggered instead of in one burst)
local counter = 0
local id = 0
function setup(thread) id = id + 1; thread:set("tid", id) end
wrk.method = "POST"
wrk.body = io.open(os.getenv("BENCH_BODY"), "rb"):read("*a")
wrk.headers["Content-Type"] = os.getenv("BENCH_CTYPE")
local auth = os.getenv("BENCH_AUTH") or ""
if auth ~= "" then wrk.headers["Authorization"] = auth end
local mode = os.getenv("BENCH_KEYS") or "none"
if mode == "fixed" then wrk.headers["Idempotency-Key"] = os.getenv("BENCH_FIXED_KEY") end
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "0") or 0
local first = os.getenv("BENCH_FIRST_PATH") or ""
local conns = tonumber(os.getenv("BENCH_CONNS_PER_THREAD") or "0") or 0
local sent = 0
if mode == "unique" or (pause > 0 and first ~= "") then
  local run = os.getenv("BENCH_RUN")
  function request()
    sent = sent + 1
    if pause > 0 and first ~= "" and sent <= conns then return wrk.format("GET", first, {}, "") end
    if mode == "unique" then
      counter = counter + 1
      wrk.headers["Idempotency-Key"] = run .. "-" .. tid .. "-" .. counter
    end
    return wrk.format()
  end
end
if pause > 0 then
  -- exponential pauses (mean `pause`), so the connections do not move in lock-step and send bursts;
  -- wrk takes whole milliseconds: dithered so the mean stays the fractional value asked for
  local seeded = false
  function delay()
    if not seeded then math.randomseed(os.time() * 100 + (tid or 0)); seeded = true end
    return math.floor(-pause * math.log(1 - math.random()) + math.random())
  end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT {\"requests\":%d,\"duration_us\":%d,\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d,\"max_us\":%d," ..
    "\"mean_us\":%.1f,\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d}\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass
class Load:
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    requests: int
    errors: int  # socket errors: connect, read, write, timeout
    non_2xx: int  # wrk's status errors: answers >= 400
    wrk_cpu_s: float = 0.0
    seconds: float = 0.0


class Driver:
    def __init__(self, tmp: Path, threads: int, concurrency: int):
        self.lua = tmp / "bench.lua"
        self.lua.write_text(WRK_LUA)
        self.threads, self.concurrency = threads, concurrency

    def run(self, url: str, seconds: float, *, body: Path, ctype: str, auth: str = "", keys: str = "none",
            fixed_key: str = "", run_id: str = "", delay_ms: float = 0.0, first_path: str = "",
            concurrency: int | None = None) -> Load:
        conc = concurrency or self.concurrency
        threads = min(self.threads, conc)
        env = {**os.environ, "BENCH_BODY": str(body), "BENCH_CTYPE": ctype, "BENCH_AUTH": auth, "BENCH_KEYS": keys,
               "BENCH_FIXED_KEY": fixed_key, "BENCH_RUN": run_id or uuid.uuid4().hex[:10],
               "BENCH_DELAY_MS": f"{delay_ms:.4f}", "BENCH_FIRST_PATH": first_path,
               "BENCH_CONNS_PER_THREAD": str(conc // threads)}
        seconds = max(1, round(seconds))  # wrk takes whole seconds
        argv = ["wrk", f"-t{threads}", f"-c{conc}", f"-d{seconds}s", "--timeout", "5s",
                "-s", str(self.lua), url]
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 60)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        m = re.search(r"^BENCH_RESULT (\{.*\})$", proc.stdout, re.M)
        if not m:
            raise SystemExit(f"wrk gave no result (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        r = json.loads(m[1])
        return Load(
            rps=r["requests"] / (r["duration_us"] / 1e6), p50_ms=r["p50_us"] / 1000, p90_ms=r["p90_us"] / 1000,
            p99_ms=r["p99_us"] / 1000, max_ms=r["max_us"] / 1000, mean_ms=r["mean_us"] / 1000,
            requests=r["requests"], errors=r["connect"] + r["read"] + r["write"] + r["timeout"], non_2xx=r["status"],
            wrk_cpu_s=(ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime), seconds=r["duration_us"] / 1e6,
        )


# --------------------------------------------------------------------------- Redis round-trip relay


class TurnRelay:
    """A TCP relay in front of Redis that counts round trips: each time a client starts sending
    again after Redis answered (or for the first time) is one. A pipeline or a script is one."""

    def __init__(self, upstream_url: str):
        u = urllib.parse.urlsplit(upstream_url)
        self._upstream = ("unix", u.path) if u.scheme == "unix" else ("tcp", u.hostname or "127.0.0.1", u.port or 6379)
        if u.scheme == "rediss":
            raise SystemExit("the round-trip relay cannot sit in front of TLS (rediss://); use a plain Redis URL")
        self._src = u
        self.turns = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-relay", daemon=True)
        self.port = 0

    def url(self) -> str:
        """The URL the gateway should use: the relay's address, with the original's credentials and db."""
        u = self._src
        db = (u.path or "/").lstrip("/") if u.scheme != "unix" else dict(urllib.parse.parse_qsl(u.query)).get("db", "")
        cred = ""
        if u.username or u.password:
            cred = f"{u.username or ''}{':' + u.password if u.password else ''}@"
        return f"redis://{cred}127.0.0.1:{self.port}/{db}"

    def start(self) -> TurnRelay:
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._upstream[0] == "unix":
            up_r, up_w = await asyncio.open_unix_connection(self._upstream[1])
        else:
            up_r, up_w = await asyncio.open_connection(self._upstream[1], self._upstream[2])
        answered = [True]

        async def client_to_redis() -> None:
            while data := await reader.read(65536):
                if answered[0]:
                    self.turns += 1
                    answered[0] = False
                up_w.write(data)
                await up_w.drain()
            up_w.close()

        async def redis_to_client() -> None:
            while data := await up_r.read(65536):
                answered[0] = True
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(client_to_redis(), redis_to_client(), return_exceptions=True)

    def stop(self) -> None:
        if self._thread.is_alive():
            def _close() -> None:
                self._server.close()
                self._loop.stop()
            self._loop.call_soon_threadsafe(_close)
            self._thread.join(5)


# --------------------------------------------------------------------------- the harness


@dataclass
class Run:
    system: str
    round: int
    load: Load
    server_cpu: float  # % of one core over the measured window
    standin_cpu: float
    redis_cpu: float
    wrk_cpu: float
    standin_books: int  # Book calls the stand-in answered during the window
    start_s: float  # how long the system took to become ready
    process_cpu: list[float] = field(default_factory=list)  # % of a core per server process, busiest first
    other_cpu: float = 0.0  # the rest of the machine's busy time: processes this benchmark did not start
    waited_s: float = 0.0  # how long it waited for the machine to be quiet before starting


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.args = args
        self.tmp = tmp
        self.run_id = f"ehrgw-bench-{uuid.uuid4().hex[:8]}"
        self.results: dict[str, Any] = {"run_id": self.run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self.driver = Driver(tmp, args.threads, args.concurrency)
        self.embedded = None
        self.redis_url = ""
        self.redis_kind = ""
        self.rc: redis.Redis | None = None
        self.standin: Proc | None = None
        self.fhir_body = tmp / "appointment.json"
        self.sf_body = tmp / "sf-booking.json"
        self.config = tmp / "config"

    # ----- set-up

    def setup(self) -> None:
        shutil.copyfile(BODY_FILE, self.fhir_body)
        url = os.environ.get("REDIS_URL")
        if url:
            self.redis_url, self.redis_kind = url, "external (REDIS_URL)"
        else:
            from gateway.state.embedded_redis import EmbeddedRedis

            self.embedded = EmbeddedRedis(self.tmp / "redis", appendonly=False).start()
            self.redis_url, self.redis_kind = self.embedded.url, "embedded (gateway.state.embedded_redis, append-only off)"
        self.rc = redis.Redis.from_url(self.redis_url)
        info = self.rc.info("server")
        self.redis_version = f"{info.get('redis_version')} ({info.get('mem_allocator', self.rc.info('memory').get('mem_allocator'))})"
        self._write_config()
        # the body the gateway sends Salesforce for this appointment, for the stand-in's own runs
        out = subprocess.run([str(BIN), "translate", "--source", SOURCE, "--config", str(self.config), str(self.fhir_body)],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        self.sf_body.write_bytes(json.dumps(json.loads(out.stdout), separators=(",", ":")).encode())
        self.standin = self._start_standin()

    def _write_config(self, source: Path = ROOT / "config", target: Path | None = None) -> None:
        """A copy of `source` (the project's config/) at `target` (self.config) with the bench's key and prefix."""
        target = target or self.config
        shutil.copytree(source, target)
        path = target / "gateway.toml"
        toml = path.read_text()
        digest = hashlib.sha256(API_KEY.encode()).hexdigest()
        head = f"[sources.{SOURCE}]"
        start = toml.index(head) + len(head)
        nxt = re.search(r"^\[", toml[start:], re.M)
        end = start + nxt.start() if nxt else len(toml)
        section = re.sub(r"^api_keys_sha256\s*=.*$\n?", "", toml[start:end], flags=re.M)
        toml = toml[:start] + f'\napi_keys_sha256 = ["{digest}"]' + section + toml[end:]
        toml = re.sub(r"^key_prefix\s*=.*$\n?", "", toml, flags=re.M)
        if re.search(r"^\[redis\]\s*$", toml, re.M):
            toml = re.sub(r"^\[redis\]\s*$", f'[redis]\nkey_prefix = "{self.run_id}"', toml, count=1, flags=re.M)
        else:
            toml += f'\n[redis]\nkey_prefix = "{self.run_id}"\n'
        path.write_text(toml)
        if target == self.config:
            from gateway.settings import load_file_settings

            load_file_settings(self.config)  # fails here, named, if the edit went wrong

    def _start_standin(self) -> Proc:
        p = Proc("standin", [sys.executable, "-m", "benchmarks.standin", "--server", self.args.standin],
                 dict(os.environ), self.tmp, sock=listening_socket())
        wait_until(p, lambda: ((s := http("GET", p.base + "/_standin/counters")[0]) == 200, s), "its counters")
        return p

    def standin_counters(self) -> dict[str, int]:
        assert self.standin is not None
        return json.loads(http("GET", self.standin.base + "/_standin/counters")[1])

    def _sf_env(self) -> dict[str, str]:
        assert self.standin is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SALESFORCE_", "EHR_GATEWAY_"))}
        env.update(SALESFORCE_LOGIN_URL=self.standin.base, SALESFORCE_CLIENT_ID=SF_CLIENT_ID,
                   SALESFORCE_CLIENT_SECRET=SF_CLIENT_SECRET, REDIS_URL=self.redis_url)
        return env

    def start_system(self, system: str, *, redis_url: str | None = None) -> Proc:
        env = self._sf_env()
        if redis_url:
            env["REDIS_URL"] = redis_url
        if system.startswith("gateway"):
            workers = 2 if system == "gateway-2w" else 1
            env["EHR_GATEWAY_DATA"] = str(self.tmp / f"gwdata-{uuid.uuid4().hex[:6]}")
            port = free_port()
            p = Proc(system, [str(BIN), "serve", "--port", str(port), "--workers", str(workers), "--config", str(self.config)],
                     env, self.tmp, port=port, stdout_to_log=False)  # stdout: one JSON line per request
            wait_until(p, lambda: ((s := http("GET", p.base + "/health/ready")[0]) == 200, s), "/health/ready 200")
        else:
            env.update(PEER_API_KEYS_SHA256=hashlib.sha256(API_KEY.encode()).hexdigest(),
                       PEER_KEY_PREFIX=f"{self.run_id}-peer", PEER_CODEMAPS=str(self.config / "codemaps"))
            p = Proc(system, [sys.executable, "-m", f"benchmarks.baselines.{system}"], env, self.tmp, sock=listening_socket())
        # ready when a booking goes through
        url = p.base + f"/fhir/{SOURCE}/Appointment"

        def booked() -> tuple[bool, object]:
            status, body, _ = http("POST", url, self.fhir_body.read_bytes(), self.booking_headers(f"{self.run_id}-ready-{uuid.uuid4().hex}"))
            return status == 201, (status, body[:300])

        wait_until(p, booked, "a 201 booking")
        return p

    def booking_headers(self, key: str | None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/fhir+json"}
        if key:
            h["Idempotency-Key"] = key
        return h

    def redis_cpu(self) -> float:
        assert self.rc is not None
        cpu = self.rc.info("cpu")
        return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])

    def book_load(self, base: str, seconds: float, run_id: str, **kw: Any) -> Load:
        return self.driver.run(base + f"/fhir/{SOURCE}/Appointment", seconds, body=self.fhir_body,
                               ctype="application/fhir+json", auth=f"Bearer {API_KEY}", keys=kw.pop("keys", "unique"),
                               run_id=run_id, **kw)

    def standin_load(self, seconds: float, **kw: Any) -> Load:
        from benchmarks.standin import TOKEN

        assert self.standin is not None
        return self.driver.run(self.standin.base + BOOK_PATH, seconds, body=self.sf_body, ctype="application/json",
                               auth=f"Bearer {TOKEN}", **kw)

    # ----- 2. the stand-in alone

    def measure_standin(self) -> None:
        a = self.args
        assert self.standin is not None
        if a.quiet_wait > 0:
            self.wait_quiet()
        self.standin_load(a.warmup)
        c0, r0 = cpu_seconds(self.standin.pids()), time.monotonic()
        load = self.standin_load(a.seconds)
        wall = time.monotonic() - r0
        cpu = 100 * (cpu_seconds(self.standin.pids()) - c0) / wall
        self.results["standin"] = {"server": a.standin, **asdict(load), "cpu_pct": cpu, "wrk_cpu_pct": 100 * load.wrk_cpu_s / wall}
        print(f"stand-in alone ({a.standin}): {load.rps:,.0f} req/s  p50 {load.p50_ms:.2f} ms  p99 {load.p99_ms:.2f} ms  "
              f"errors {load.errors}  non-2xx {load.non_2xx}  CPU stand-in {cpu:.0f}% wrk {100 * load.wrk_cpu_s / wall:.0f}%",
              flush=True)
        if load.non_2xx or load.errors:
            raise SystemExit("the stand-in refused its own benchmark requests")

    # ----- 3. rounds

    def wait_quiet(self) -> float:
        """Wait (up to --quiet-wait seconds) until the rest of the machine uses under 25% of a core:
        between runs nothing of this benchmark is busy, so what is busy is someone else."""
        t0 = time.monotonic()
        while True:
            m0 = machine_busy_seconds()
            time.sleep(1)
            busy = 100 * (machine_busy_seconds() - m0)
            waited = time.monotonic() - t0
            if busy < 25 or waited >= self.args.quiet_wait:
                if busy >= 25:
                    print(f"    (the machine is still busy: {busy:.0f}% of a core used by other processes; going on)", flush=True)
                return waited - 1

    def measure(self, system: str, rnd: int) -> Run:
        a = self.args
        assert self.standin is not None
        waited = self.wait_quiet() if a.quiet_wait > 0 else 0.0
        t0 = time.monotonic()
        p = self.start_system(system)
        start_s = time.monotonic() - t0
        try:
            self.book_load(p.base, a.warmup, f"{self.run_id}-{system}-{rnd}-warm")
            pids = p.pids()
            per0 = {pid: cpu_seconds([pid]) for pid in pids}
            s0, c0, sb0, rd0 = cpu_seconds(self.standin.pids()), cpu_seconds(pids), self.standin_counters()["book"], self.redis_cpu()
            m0, me0 = machine_busy_seconds(), resource.getrusage(resource.RUSAGE_SELF)
            w0 = time.monotonic()
            load = self.book_load(p.base, a.seconds, f"{self.run_id}-{system}-{rnd}")
            wall = time.monotonic() - w0
            s1, c1, sb1, rd1 = cpu_seconds(self.standin.pids()), cpu_seconds(pids), self.standin_counters()["book"], self.redis_cpu()
            per1 = {pid: cpu_seconds([pid]) for pid in pids}
            m1, me1 = machine_busy_seconds(), resource.getrusage(resource.RUSAGE_SELF)
            if not p.alive():
                raise SystemExit(f"{system} died under load:\n{p.log_tail()}")
        finally:
            p.stop()
        pct = lambda x: 100 * x / wall  # noqa: E731
        per = sorted((round(pct(per1[pid] - per0[pid]), 1) for pid in pids), reverse=True)
        me = (me1.ru_utime + me1.ru_stime) - (me0.ru_utime + me0.ru_stime)  # this script's own
        ours = (c1 - c0) + (s1 - s0) + load.wrk_cpu_s + me + (rd1 - rd0 if self.embedded is not None else 0)
        return Run(system, rnd, load, pct(c1 - c0), pct(s1 - s0), pct(rd1 - rd0), pct(load.wrk_cpu_s), sb1 - sb0, start_s, per,
                   max(0.0, pct((m1 - m0) - ours)), waited)

    def rounds(self) -> list[Run]:
        runs: list[Run] = []
        systems = [s for s in SYSTEMS if s != "gateway-2w" or self.args.workers_check]
        for rnd in range(1, self.args.rounds + 1):
            k = (rnd - 1) % len(systems)
            for system in systems[k:] + systems[:k]:
                r = self.measure(system, rnd)
                runs.append(r)
                L = r.load
                print(f"  round {rnd}  {system:<11} {L.rps:8,.0f} req/s  p50 {L.p50_ms:7.2f} ms  p99 {L.p99_ms:7.2f} ms  "
                      f"errors {L.errors}  non-2xx {L.non_2xx}  CPU server {r.server_cpu:3.0f}% stand-in {r.standin_cpu:3.0f}% "
                      f"redis {r.redis_cpu:3.0f}% wrk {r.wrk_cpu:3.0f}% other {r.other_cpu:3.0f}%  (started in {r.start_s:.1f}s"
                      + (f"; per process {' / '.join(f'{c:.0f}%' for c in r.process_cpu)})" if len(r.process_cpu) > 1 else ")"),
                      flush=True)
        self.results["runs"] = [asdict(r) for r in runs]
        return runs

    # ----- 4 (i, ii). round trips and record size

    def round_trips(self, n: int) -> None:
        assert self.rc is not None and self.standin is not None
        relay = TurnRelay(self.redis_url).start()
        p = None
        try:
            p = self.start_system("gateway", redis_url=relay.url())
            url = p.base + f"/fhir/{SOURCE}/Appointment"
            asyncio.run(self._post_many(url, [f"{self.run_id}-rtwarm-{i}" for i in range(200)]))
            time.sleep(2)
            idle0, t_idle = relay.turns, time.monotonic()
            time.sleep(2)
            idle_rate = (relay.turns - idle0) / (time.monotonic() - t_idle)

            def window(keys: list[str]) -> dict[str, Any]:
                cs0, t0, b0 = self._commandstats(), relay.turns, self.standin_counters()["book"]
                w0 = time.monotonic()
                # one at a time: each booking's own round trips are counted (under load the pipelined
                # link carries several bookings' commands in one round trip, which would hide them)
                statuses = asyncio.run(self._post_many(url, keys, concurrency=1))
                time.sleep(0.6)  # the request log's batch (flush_seconds 0.2) lands in the window
                wall = time.monotonic() - w0
                cs1, t1, b1 = self._commandstats(), relay.turns, self.standin_counters()["book"]
                per = {k.removeprefix("cmdstat_"): round((cs1.get(k, 0) - cs0.get(k, 0)) / len(keys), 3)
                       for k in cs1 if cs1.get(k, 0) - cs0.get(k, 0) and k != "cmdstat_info"}
                return {"requests": len(keys), "statuses": statuses, "round_trips": t1 - t0,
                        "per_request": (t1 - t0) / len(keys),
                        "background_estimate_per_request": idle_rate * wall / len(keys),
                        "commandstats_per_request": dict(sorted(per.items(), key=lambda kv: -kv[1])),
                        "commandstats_total_per_request": round(sum(per.values()), 3),
                        "standin_books": b1 - b0}

            new = window([f"{self.run_id}-rt-{i}" for i in range(n)])
            fixed = f"{self.run_id}-replayed"
            asyncio.run(self._post_many(url, [fixed]))
            time.sleep(0.5)
            replay = window([fixed] * n)
            # (ii) the size of the records just written
            keys = [k for _, k in zip(range(400), self.rc.scan_iter(match=f"{self.run_id}:idem:*", count=1000))]
            sizes = sorted(self.rc.memory_usage(k, samples=0) or 0 for k in keys[:100])
            sample = keys[0] if keys else None
            record = {
                "keys_sampled": len(sizes),
                "memory_usage_median": statistics.median(sizes) if sizes else None,
                "memory_usage_max": max(sizes) if sizes else None,
                "type": self.rc.type(sample).decode() if sample else None,
                "fields": {k.decode(): len(v) for k, v in self.rc.hgetall(sample).items()} if sample and self.rc.type(sample) == b"hash" else None,
                "redis": self.redis_version,
            }
        finally:
            if p is not None:
                p.stop()
            relay.stop()
        self.results["round_trips"] = {"new": new, "replay": replay, "idle_round_trips_per_s": idle_rate,
                                       "relay_connections": relay.connections}
        self.results["record"] = record
        print(f"  Redis round trips per new booking {new['per_request']:.3f} ({new['round_trips']} for {n}; background "
              f"~{new['background_estimate_per_request']:.3f}), per replay {replay['per_request']:.3f}; stand-in Book calls "
              f"{new['standin_books']} for {n} new, {replay['standin_books']} for {n} replays", flush=True)
        print(f"  commandstats per new booking: {new['commandstats_per_request']}")
        print(f"  commandstats per replay     : {replay['commandstats_per_request']}")
        print(f"  idempotency record: MEMORY USAGE median {record['memory_usage_median']} B, max {record['memory_usage_max']} B "
              f"({record['keys_sampled']} records, {record['type']}, fields {record['fields']})", flush=True)

    def _commandstats(self) -> dict[str, int]:
        assert self.rc is not None
        return {k: v["calls"] for k, v in self.rc.info("commandstats").items()}

    async def _post_many(self, url: str, keys: list[str], concurrency: int = 16) -> dict[str, int]:
        import aiohttp

        body = self.fhir_body.read_bytes()
        statuses: dict[str, int] = {}
        queue = list(reversed(keys))
        async with aiohttp.ClientSession() as s:
            async def worker() -> None:
                while queue:
                    key = queue.pop()
                    async with s.post(url, data=body, headers=self.booking_headers(key)) as r:
                        await r.read()
                        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return statuses

    # ----- 4 (iii). gateway-added p99 at half the peak rate

    def paced(self, run, target_rps: float, seconds: float) -> tuple[Load, float, float]:
        """run(delay_ms, seconds) -> Load; a short calibration run first, since the pause comes on
        top of each request's own latency."""
        conc = self.args.concurrency
        period = conc * 1000 / target_rps  # ms between two requests of one connection
        d = period
        for _ in range(3):  # calibration: the pause comes on top of each request's own latency
            cal = run(d, 3.0)
            if abs(cal.rps - target_rps) <= 0.03 * target_rps:
                break
            overhead = conc * 1000 / max(cal.rps, 1e-9) - d
            d = max(0.0, period - overhead)
        m0, t0 = machine_busy_seconds(), time.monotonic()
        load = run(d, seconds)
        return load, d, 100 * (machine_busy_seconds() - m0) / (time.monotonic() - t0)

    def half_rate(self, peak: float) -> None:
        a = self.args
        target = peak / 2
        if a.quiet_wait > 0:
            self.wait_quiet()
        p = self.start_system("gateway")
        try:
            self.book_load(p.base, a.warmup, f"{self.run_id}-half-warm")
            gw, gw_delay, gw_busy = self.paced(lambda d, s: self.book_load(p.base, s, f"{self.run_id}-half-{uuid.uuid4().hex[:6]}",
                                                                  delay_ms=d, first_path="/health/live"),
                                      target, a.half_seconds)
        finally:
            p.stop()
        if a.quiet_wait > 0:
            self.wait_quiet()
        sf, sf_delay, sf_busy = self.paced(lambda d, s: self.standin_load(s, delay_ms=d, first_path="/_standin/counters"), gw.rps, a.half_seconds)
        added = gw.p99_ms - sf.p99_ms
        self.results["half_rate"] = {"peak_rps": peak, "target_rps": target, "gateway": asdict(gw), "gateway_delay_ms": gw_delay,
                                     "standin": asdict(sf), "standin_delay_ms": sf_delay, "added_p99_ms": added,
                                     "machine_busy_pct": {"gateway_run": gw_busy, "standin_run": sf_busy},
                                     "added_p50_ms": gw.p50_ms - sf.p50_ms}
        print(f"  at half the peak ({target:,.0f} req/s asked): gateway {gw.rps:,.0f} req/s p50 {gw.p50_ms:.2f} p99 {gw.p99_ms:.2f} ms; "
              f"stand-in alone {sf.rps:,.0f} req/s p50 {sf.p50_ms:.2f} p99 {sf.p99_ms:.2f} ms -> gateway adds {added:.2f} ms at p99 "
              f"(machine busy {gw_busy:.0f}% / {sf_busy:.0f}% of one core)",
              flush=True)

    # ----- 4 (v). soak

    def soak(self, n: int, rate_hint: float) -> None:
        a = self.args
        p = self.start_system("gateway")
        samples: list[dict[str, Any]] = []
        stop = threading.Event()
        b_start = self.standin_counters()["book"]
        t_start = time.monotonic()

        def sample() -> None:
            assert self.rc is not None
            rss = rss_bytes(p.pids())
            samples.append({"t": round(time.monotonic() - t_start, 2), "bookings": self.standin_counters()["book"] - b_start,
                            "rss": sum(rss.values()), "processes": len(rss),
                            "redis_used_memory": int(self.rc.info("memory")["used_memory"])})

        def sampler() -> None:
            while not stop.wait(a.sample_seconds):
                with contextlib.suppress(Exception):
                    sample()

        th = threading.Thread(target=sampler, daemon=True)
        loads: list[Load] = []
        try:
            sample()
            th.start()
            done, rate = 0, max(rate_hint, 50.0)
            while done < n:
                seconds = min(30.0, max(1.0, (n - done) / rate))
                load = self.book_load(p.base, seconds, f"{self.run_id}-soak-{len(loads)}")
                loads.append(load)
                done = self.standin_counters()["book"] - b_start
                rate = max(load.rps, 50.0)
                print(f"    soak: {done:,} / {n:,} bookings, {load.rps:,.0f} req/s, RSS {samples[-1]['rss'] / 2**20:.1f} MiB",
                      flush=True)
                if not p.alive():
                    raise SystemExit(f"the gateway died during the soak:\n{p.log_tail()}")
            time.sleep(1)
            sample()
        finally:
            stop.set()
            th.join(5)
            p.stop()
        warm = next((s for s in samples if s["bookings"] >= 0.1 * n), samples[0])
        after = [s for s in samples if s["t"] >= warm["t"]]
        end = samples[-1]
        change = 100 * (end["rss"] - warm["rss"]) / warm["rss"]
        peak = max(s["rss"] for s in after)
        self.results["soak"] = {
            "bookings": done, "target": n, "seconds": round(samples[-1]["t"], 1),
            "rps": statistics.median(l.rps for l in loads), "errors": sum(l.errors for l in loads),
            "non_2xx": sum(l.non_2xx for l in loads), "rss_after_warmup": warm["rss"], "rss_end": end["rss"],
            "rss_max_after_warmup": peak, "change_pct": change, "max_change_pct": 100 * (peak - warm["rss"]) / warm["rss"],
            "warmup_bookings": warm["bookings"], "samples": samples,
        }
        print(f"  soak: {done:,} bookings in {samples[-1]['t']:.0f}s; RSS after warm-up ({warm['bookings']:,} bookings) "
              f"{warm['rss'] / 2**20:.1f} MiB, at the end {end['rss'] / 2**20:.1f} MiB ({change:+.1f}%), "
              f"max {peak / 2**20:.1f} MiB; errors {self.results['soak']['errors']}, non-2xx {self.results['soak']['non_2xx']}",
              flush=True)

    # ----- clean-up

    def cleanup(self) -> None:
        for p in list(reversed(_LIVE)):
            with contextlib.suppress(Exception):
                p.stop()
        if self.rc is not None and self.embedded is None:
            deleted = 0
            with contextlib.suppress(Exception):
                batch: list[bytes] = []
                for k in self.rc.scan_iter(match=f"{self.run_id}*", count=5000):
                    batch.append(k)
                    if len(batch) >= 1000:
                        deleted += self.rc.unlink(*batch)
                        batch = []
                if batch:
                    deleted += self.rc.unlink(*batch)
            print(f"deleted {deleted:,} Redis keys under {self.run_id}*")
        if self.embedded is not None:
            self.embedded.stop()


# --------------------------------------------------------------------------- report


def machine(b: Bench) -> dict[str, Any]:
    from importlib import metadata

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB"
    pkgs = {}
    for dist in ("litestar", "uvicorn", "uvloop", "httptools", "httpx", "httpx-aiohttp", "aiohttp", "msgspec", "redis",
                 "fastapi", "pydantic", "starlette", "matplotlib"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            pkgs[dist] = metadata.version(dist)
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "packages": pkgs,
            "wrk": wrk_v[0].split(" Copyright")[0].strip() if wrk_v else "?",
            "redis": f"{b.redis_kind}, Redis {b.redis_version}", "loadavg_start": b.results.get("loadavg_start")}


def med(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def summarize(b: Bench, runs: list[Run]) -> dict[str, Any]:
    by: dict[str, list[Run]] = {}
    for r in runs:
        by.setdefault(r.system, []).append(r)
    table = {}
    for s, rs in by.items():
        table[s] = {
            "rps": med(r.load.rps for r in rs), "p50_ms": med(r.load.p50_ms for r in rs), "p99_ms": med(r.load.p99_ms for r in rs),
            "errors": med(r.load.errors for r in rs), "non_2xx": med(r.load.non_2xx for r in rs),
            "server_cpu": med(r.server_cpu for r in rs), "standin_cpu": med(r.standin_cpu for r in rs),
            "redis_cpu": med(r.redis_cpu for r in rs), "wrk_cpu": med(r.wrk_cpu for r in rs),
            "other_cpu": med(r.other_cpu for r in rs),
            "rps_runs": [r.load.rps for r in rs], "p99_runs": [r.load.p99_ms for r in rs],
            "process_cpu_runs": [r.process_cpu for r in rs],
        }
    rounds = sorted({r.round for r in runs})

    def ratio(a: str, c: str) -> dict[str, Any] | None:
        if a not in by or c not in by:
            return None
        per = []
        for rnd in rounds:
            x = [r.load.rps for r in by[a] if r.round == rnd]
            y = [r.load.rps for r in by[c] if r.round == rnd]
            if x and y and y[0] > 0:
                per.append(x[0] / y[0])
        return {"median_of_rounds": med(per), "per_round": per, "of_medians": table[a]["rps"] / table[c]["rps"]}

    return {"table": table, "vs_forwarder": ratio("gateway", "forwarder"), "vs_peer": ratio("gateway", "peer"),
            "workers_2_vs_1": ratio("gateway-2w", "gateway")}


def verdicts(b: Bench, summary: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, figure, target, PASS/FAIL/INFO)."""
    R, T, out = b.results, TARGETS, []
    pf = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    if summary["vs_forwarder"]:
        v = summary["vs_forwarder"]["median_of_rounds"]
        out.append(("gateway / minimal forwarder, req/s", f"{v:.2f}x", f">= {T['vs_forwarder']}x", pf(v >= T["vs_forwarder"])))
    if summary["vs_peer"]:
        v = summary["vs_peer"]["median_of_rounds"]
        out.append(("gateway / hand-rolled peer, req/s", f"{v:.2f}x", f">= {T['vs_peer']:.0f}x", pf(v >= T["vs_peer"])))
    if "half_rate" in R:
        h = R["half_rate"]
        out.append((f"gateway-added p99 at half its peak ({h['gateway']['rps']:,.0f} req/s)", f"{h['added_p99_ms']:.2f} ms",
                    f"<= {T['added_p99_ms']:.0f} ms", pf(h["added_p99_ms"] <= T["added_p99_ms"])))
    if "round_trips" in R:
        n, r = R["round_trips"]["new"]["per_request"], R["round_trips"]["replay"]["per_request"]
        out.append(("Redis round trips per new booking", f"{n:.2f}", f"<= {T['rt_new']}", pf(n <= T["rt_new"] + 0.05)))
        out.append(("Redis round trips per replay", f"{r:.2f}", f"<= {T['rt_replay']}", pf(r <= T["rt_replay"] + 0.05)))
    if R.get("record", {}).get("memory_usage_max") is not None:
        m = R["record"]["memory_usage_max"]
        out.append(("idempotency record, MEMORY USAGE (max of sample)", f"{m} B", f"< {T['record_bytes']} B", pf(m < T["record_bytes"])))
    if "soak" in R:
        s = R["soak"]
        out.append((f"gateway RSS over a {s['bookings']:,}-booking soak", f"{s['change_pct']:+.1f}% (max {s['max_change_pct']:+.1f}%)",
                    f"within {T['soak_pct']:.0f}%", pf(abs(s["change_pct"]) <= T["soak_pct"] and s["max_change_pct"] <= T["soak_pct"])))
    if summary["workers_2_vs_1"]:
        v = summary["workers_2_vs_1"]["median_of_rounds"]
        cores = os.cpu_count() or 1
        verdict = "INFO" if cores < 4 else pf(v >= 1.8)
        out.append(("2 workers / 1 worker, req/s", f"{v:.2f}x", "near 2x where cores allow" + (f" (not judged: {cores} cores shared with wrk, stand-in, Redis)" if cores < 4 else ""), verdict))
    return out


def chart(b: Bench, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s in SYSTEMS if s in summary["table"]]
    colors = {"gateway": "#1f77b4", "forwarder": "#7f7f7f", "peer": "#d62728", "gateway-2w": "#aec7e8"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, runs_key, title in ((axes[0], "rps", "rps_runs", "requests/s (higher is better)"),
                                     (axes[1], "p99_ms", "p99_runs", "p99 latency, ms (lower is better)")):
        xs = range(len(systems))
        vals = [summary["table"][s][key] for s in systems]
        bars = ax.bar(xs, vals, color=[colors[s] for s in systems], alpha=0.85)
        for i, s in enumerate(systems):
            pts = summary["table"][s][runs_key]
            ax.scatter([i + (j - (len(pts) - 1) / 2) * 0.08 for j in range(len(pts))], pts, color="black", s=14, zorder=3)
        for bar, v in zip(bars, vals):
            ax.annotate(f"{v:,.0f}" if key == "rps" else f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(list(xs), [LABELS[s].replace(", ", ",\n").replace(") ", ")\n") for s in systems], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, max(max(vals), *(max(summary["table"][s][runs_key]) for s in systems)) * 1.12)
        ax.grid(axis="y", alpha=0.3)
    a = b.args
    fig.suptitle(f"ehr-gateway vs baselines: wrk -c{a.concurrency}, {a.seconds:g}s x {a.rounds} rounds (bars: median, "
                 f"dots: rounds), {os.cpu_count()} cores shared", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def soak_chart(b: Bench, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = b.results["soak"]
    xs = [p["bookings"] for p in s["samples"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(xs, [p["rss"] / 2**20 for p in s["samples"]], marker=".", label="gateway RSS (all processes)")
    ax.axvline(s["warmup_bookings"], color="grey", ls="--", lw=1, label="end of warm-up")
    ax.axhline(s["rss_after_warmup"] / 2**20 * 1.1, color="red", ls=":", lw=1, label="+10%")
    ax.set_xlabel("bookings")
    ax.set_ylabel("MiB")
    ax.set_ylim(0, max(p["rss"] for p in s["samples"]) / 2**20 * 1.2)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"gateway memory over a {s['bookings']:,}-booking soak ({s['change_pct']:+.1f}%)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(b: Bench, summary: dict[str, Any], checks: list[tuple[str, str, str, str]], command: str, out: Path) -> str:
    R, m, a = b.results, b.results["machine"], b.args
    with contextlib.suppress(ValueError):
        out = out.resolve().relative_to(ROOT)  # image links relative to the repository root
    t = summary["table"]
    lines = [
        "## Benchmark (issue 6)", "",
        "```", command, "```", "",
        f"- Machine: {m['nproc']} cores ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}; load average at start "
        f"{' '.join(m['loadavg_start'] or [])}. wrk, the system under test, the stand-in and Redis all share these cores.",
        f"- Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()) + f"; {m['wrk']}; {m['redis']}.",
        f"- Load: `wrk -t{a.threads} -c{a.concurrency} --timeout 5s`, POST of the Cerner video-visit Appointment "
        f"({BODY_FILE.stat().st_size:,} bytes), a unique Idempotency-Key per request; {a.warmup:g} s warm-up then "
        f"{a.seconds:g} s measured; each system started afresh for each run; {a.rounds} round(s), systems interleaved; "
        "medians shown.",
        f"- Salesforce stand-in (`benchmarks/standin.py`, {R['standin']['server']}): alone it answers "
        f"{R['standin']['rps']:,.0f} Book req/s (p99 {R['standin']['p99_ms']:.2f} ms) using {R['standin']['cpu_pct']:.0f}% of a core.",
        "",
        "| system | req/s | p50 ms | p99 ms | errors | non-2xx | server CPU | stand-in CPU | Redis CPU | wrk CPU | other CPU | req/s per round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in SYSTEMS:
        if s in t:
            x = t[s]
            lines.append(f"| {LABELS[s]} | {x['rps']:,.0f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {x['errors']:.0f} | "
                         f"{x['non_2xx']:.0f} | {x['server_cpu']:.0f}% | {x['standin_cpu']:.0f}% | {x['redis_cpu']:.0f}% | "
                         f"{x['wrk_cpu']:.0f}% | {x['other_cpu']:.0f}% | {' / '.join(f'{v:,.0f}' for v in x['rps_runs'])} |")
    lines += ["", "CPU: % of one core during the measured window (server = all its processes; other = the rest of the "
              "machine's busy time, i.e. processes this benchmark did not start: a high figure means the run was disturbed)."]
    if "gateway-2w" in t:
        lines.append("Gateway with 2 workers, CPU of each of its processes (busiest first), per round: "
                     + "; ".join(" / ".join(f"{c:.0f}%" for c in pc) for pc in t["gateway-2w"]["process_cpu_runs"]) + ".")
    lines += ["",
              "| target | figure | goal | verdict |", "|---|---:|---|---|"]
    lines += [f"| {w} | {f} | {g} | {v} |" for w, f, g, v in checks]
    if "round_trips" in R:
        rt = R["round_trips"]
        lines += ["", f"Redis, per new booking ({rt['new']['requests']:,} sent, {rt['new']['standin_books']:,} reached Salesforce): "
                      f"{rt['new']['per_request']:.3f} round trips (of which background ~{rt['new']['background_estimate_per_request']:.3f}); "
                      f"INFO commandstats {rt['new']['commandstats_total_per_request']:.2f} commands "
                      f"({', '.join(f'{k} {v:g}' for k, v in rt['new']['commandstats_per_request'].items())}).",
                  f"Per replay ({rt['replay']['requests']:,} sent, {rt['replay']['standin_books']} reached Salesforce): "
                  f"{rt['replay']['per_request']:.3f} round trips; commandstats {rt['replay']['commandstats_total_per_request']:.2f} "
                  f"({', '.join(f'{k} {v:g}' for k, v in rt['replay']['commandstats_per_request'].items())}). "
                  "Round trips are counted by a relay in front of Redis; commandstats also count commands run inside Lua scripts."]
    if R.get("record"):
        rec = R["record"]
        lines.append(f"Idempotency record: MEMORY USAGE median {rec['memory_usage_median']} B, max {rec['memory_usage_max']} B "
                     f"over {rec['keys_sampled']} records ({rec['type']}; field sizes {rec['fields']}), Redis {rec['redis']}.")
    if "half_rate" in R:
        h = R["half_rate"]
        lines.append(f"At half the gateway's peak ({h['peak_rps']:,.0f} / 2 = {h['target_rps']:,.0f} req/s asked): gateway "
                     f"{h['gateway']['rps']:,.0f} req/s, p50 {h['gateway']['p50_ms']:.2f} ms, p99 {h['gateway']['p99_ms']:.2f} ms; "
                     f"the stand-in alone at {h['standin']['rps']:,.0f} req/s: p50 {h['standin']['p50_ms']:.2f} ms, "
                     f"p99 {h['standin']['p99_ms']:.2f} ms. Gateway-added p99: {h['added_p99_ms']:.2f} ms (whole machine busy "
                     f"{h['machine_busy_pct']['gateway_run']:.0f}% of one core during the gateway's run, "
                     f"{h['machine_busy_pct']['standin_run']:.0f}% during the stand-in's; {a.half_seconds:g} s each). Pacing: wrk `delay()` with "
                     "exponential pauses per connection, each connection's first request a cheap GET so the load starts staggered.")
    if "soak" in R:
        s = R["soak"]
        lines.append(f"Soak: {s['bookings']:,} bookings in {s['seconds']:.0f} s ({s['rps']:,.0f} req/s median); gateway RSS "
                     f"{s['rss_after_warmup'] / 2**20:.1f} MiB after warm-up ({s['warmup_bookings']:,} bookings), "
                     f"{s['rss_end'] / 2**20:.1f} MiB at the end ({s['change_pct']:+.1f}%), max {s['rss_max_after_warmup'] / 2**20:.1f} MiB; "
                     f"errors {s['errors']}, non-2xx {s['non_2xx']}. ![soak]({out / 'soak.png'})")
    lines += ["", f"![throughput and p99]({out / 'compare.png'})", ""]
    return "\n".join(lines)


def print_table(summary: dict[str, Any]) -> None:
    t = summary["table"]
    hdr = f"| {'system':<22} | {'req/s':>7} | {'p50 ms':>7} | {'p99 ms':>7} | {'errors':>6} | {'non-2xx':>7} | {'srv CPU':>7} | {'SF CPU':>6} | {'Redis':>5} | {'wrk':>4} | {'other':>5} | req/s per round"
    print(hdr)
    print("|" + "-" * (len(hdr) - 1))
    for s in SYSTEMS:
        if s in t:
            x = t[s]
            print(f"| {LABELS[s]:<22} | {x['rps']:7,.0f} | {x['p50_ms']:7.2f} | {x['p99_ms']:7.2f} | {x['errors']:6.0f} | "
                  f"{x['non_2xx']:7.0f} | {x['server_cpu']:6.0f}% | {x['standin_cpu']:5.0f}% | {x['redis_cpu']:4.0f}% | "
                  f"{x['wrk_cpu']:3.0f}% | {x['other_cpu']:4.0f}% | {' / '.join(f'{v:,.0f}' for v in x['rps_runs'])}")


# --------------------------------------------------------------------------- main


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, help="measured seconds per run (default 10; --quick 5)")
    p.add_argument("--rounds", type=int, help="rounds, systems interleaved; medians are reported (default 3; --quick 1)")
    p.add_argument("--concurrency", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--soak", type=int, help="bookings in the soak, 0 to skip (default 200000; --quick 20000)")
    p.add_argument("--quick", action="store_true", help="a fast check: 1 round, 5 s runs, a 20,000-booking soak")
    p.add_argument("--warmup", type=float, default=2, help="warm-up seconds before each measured run (default 2)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--half-seconds", type=float,
                   help="measured seconds of each paced run at half the peak (default 30; --quick 10): p99 needs samples")
    p.add_argument("--rt-bookings", type=int, default=2000, help="bookings (and replays) sent for the round-trip count (default 2000)")
    p.add_argument("--sample-seconds", type=float, default=2, help="RSS sampling period in the soak (default 2)")
    p.add_argument("--quiet-wait", type=float, default=30,
                   help="before each run, wait up to this many seconds for other processes to use under 25%% of a core (default 30; 0: don't)")
    p.add_argument("--standin", choices=("raw", "asgi"), default="raw", help="the stand-in's server (default raw)")
    p.add_argument("--no-workers-check", dest="workers_check", action="store_false", help="skip the 2-worker gateway")
    p.add_argument("--out", default=str(RESULTS), help="where the JSON, PNGs and markdown go (default benchmarks/results)")
    a = p.parse_args()
    a.seconds = a.seconds if a.seconds is not None else (5 if a.quick else 10)
    a.rounds = a.rounds if a.rounds is not None else (1 if a.quick else 3)
    a.soak = a.soak if a.soak is not None else (20_000 if a.quick else 200_000)
    a.half_seconds = a.half_seconds if a.half_seconds is not None else (10 if a.quick else 30)
    if a.quick:
        a.rt_bookings = min(a.rt_bookings, 1000)
    if a.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian/Ubuntu: apt-get update && apt-get install -y wrk)")
    if not BODY_FILE.is_file():
        raise SystemExit(f"{BODY_FILE}: the request body (shared corpus) is missing")
    if not BIN.exists():
        raise SystemExit(f"{BIN}: not found; install the project into this venv (pip install -e .[bench])")
    command = " ".join([".venv/bin/python -m benchmarks.compare", *sys.argv[1:]])

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    t_begin = time.monotonic()
    out = Path(a.out)
    with tempfile.TemporaryDirectory(prefix="ehrgw-compare-") as tmp_name:
        b = Bench(a, Path(tmp_name))
        b.results["loadavg_start"] = open("/proc/loadavg").read().split()[:3]
        # the output folder relative to the project when it is inside it: results carry no machine's paths
        b.results["args"] = {k: (_relative(v) if k == "out" else v) for k, v in vars(a).items()}
        try:
            b.setup()
            b.results["machine"] = machine(b)
            m = b.results["machine"]
            print(f"{m['nproc']} cores ({m['cpu']}), Python {m['python']}, {m['wrk']}, {m['redis']}; "
                  f"load average {' '.join(m['loadavg_start'])}; run id {b.run_id}", flush=True)
            print(f"\n[1/5] Salesforce stand-in alone, wrk -c{a.concurrency}, {a.seconds:g}s", flush=True)
            b.measure_standin()
            print(f"\n[2/5] rounds: {a.rounds} x {', '.join(s for s in SYSTEMS if s != 'gateway-2w' or a.workers_check)}; "
                  f"{a.warmup:g}s warm-up + {a.seconds:g}s each, -c{a.concurrency}", flush=True)
            runs = b.rounds()
            summary = summarize(b, runs)
            peak = summary["table"]["gateway"]["rps"]
            print(f"\n[3/5] Redis round trips ({a.rt_bookings:,} new bookings, then {a.rt_bookings:,} replays) and record size", flush=True)
            b.round_trips(a.rt_bookings)
            print(f"\n[4/5] gateway-added latency at half the gateway's peak ({peak:,.0f} / 2 req/s), {a.half_seconds:g}s each", flush=True)
            b.half_rate(peak)
            if a.soak > 0:
                print(f"\n[5/5] soak: {a.soak:,} bookings at full speed", flush=True)
                b.soak(a.soak, peak)
        finally:
            b.cleanup()
        b.results["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        b.results["summary"] = summary
        checks = verdicts(b, summary)
        b.results["verdicts"] = [dict(zip(("what", "figure", "goal", "verdict"), c)) for c in checks]
        b.results["elapsed_s"] = round(time.monotonic() - t_begin, 1)
        out.mkdir(parents=True, exist_ok=True)
        (out / "latest.json").write_text(json.dumps(b.results, indent=1, default=str))
        try:
            chart(b, summary, out / "compare.png")
            if "soak" in b.results:
                soak_chart(b, out / "soak.png")
        except ImportError:
            print("matplotlib is not installed: no chart (pip install -e .[bench])")
        md = markdown(b, summary, checks, command, out)
        (out / "latest.md").write_text(md)

    print()
    print_table(summary)
    print()
    for w, f, g, v in checks:
        print(f"  {v:<4}  {w}: {f} (goal {g})")
    print(f"\nelapsed {b.results['elapsed_s'] / 60:.1f} min; load average at the end {' '.join(b.results['loadavg_end'])}")
    print(f"wrote {out / 'latest.json'}, {out / 'compare.png'}, {out / 'latest.md'}\n")
    print("----- markdown for BENCHMARKS.md -----")
    print(md)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped", file=sys.stderr)
        sys.exit(130)
