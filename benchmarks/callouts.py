"""Health Cloud's Find, fanned out to three EHRs: what the gateway adds over the EHRs' own delay, and
how many searches one worker serves.

    .venv/bin/python -m benchmarks.callouts [--delays 0,20,50] [--rounds 3] [--seconds 10] [--concurrency 50]

Goal (issue 15, item 8): a search fanned out to three EHRs that each answer after a fixed delay d
adds at most 5 ms at p99 over d at 50 concurrent searches; one worker serves at least 1,000
searches/s with d = 0.

What runs, all on loopback:

1. The EHR stand-in (`benchmarks/ehr_standin.py`): one process, three listening sockets (Cerner,
   Epic, FHIR), each slot search answered with a fixed pre-encoded body of its dialect's shape after
   d ms (`call_later`: the stand-in never blocks, so the EHRs do not set the pace). The delay is
   changed between runs through its control path; nothing else is restarted.
2. The Salesforce stand-in (`benchmarks/standin.py`): `serve` needs a Salesforce; Find never calls it.
3. Redis: `REDIS_URL`, else the embedded one (append-only off).
4. `ehr-gateway serve --workers 1` (as the product runs) with a config dir of three sources whose
   `[sources.<name>.ehr]` point at the stand-in, `[healthcloud] basic_sha256`, and the EHR secrets in
   `EHR_<SOURCE>_CLIENT_SECRET`. `max_concurrent_calls = 64` per EHR: the default 10 would queue 50
   concurrent searches behind 10 calls per EHR (the bound, not the gateway, would set the latency).
5. wrk, 2 threads, `--concurrency` connections, POSTing Find's form (one line, Health Cloud's
   parameters naming each EHR's practitioner and service) with Health Cloud's Basic credential.

Each run: warm-up, then `--seconds` under load; rps, p50/p99 (wrk's), CPU per process over the
window (gateway, EHR stand-in, Redis, wrk; % of one core). Checked in every run: wrk's non-2xx and
socket errors are 0, each EHR was asked once per search (the stand-in's counters against wrk's
requests), no search was answered partial (the gateway's `ehrgw_callouts_total` for find), and a
sampled answer holds 4 slots from each EHR. The tables give medians over the rounds.

A second, paced series (`--paced`) loads the gateway at about half its d = 0 peak (wrk's `delay()`),
so that the added latency is the gateway's own work and not a queue in front of a busy worker.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.baselines.common import listening_socket
from benchmarks.compare import (BIN, ROOT, SF_CLIENT_ID, SF_CLIENT_SECRET, Driver, Load, Proc, cpu_seconds,
                                free_port, http, machine_busy_seconds, wait_until)

RESULTS = ROOT / "benchmarks" / "results"
HC_USER, HC_PASSWORD = "healthcloud", "bench-hc-secret-51c2"
AUTH = "Basic " + base64.b64encode(f"{HC_USER}:{HC_PASSWORD}".encode()).decode()
FORM = "application/x-www-form-urlencoded"
EHR_SECRET = "bench-ehr-secret"
# each dialect: its base path on the stand-in, Health Cloud's work-type code the shipped maps send
# back as the stand-in's service, and a practitioner of its answer
DIALECTS = {
    "cerner": ("/r4/ec2458f2-1e24-41c8-b71b-0e701af7583d", "2572307911", "593923"),
    "epic": ("/api/FHIR/STU3", "40111223", "eM5CWtq15N0WJeuCet5bJlQ3"),
    "fhir": ("/fhir", "124", "example"),
}
DAY = "2027-03-01"


def available_dialects() -> list[str]:
    """The dialects whose EHR client this checkout has (the FHIR one lands separately)."""
    return [d for d in DIALECTS if (ROOT / "gateway" / "ehr" / f"{d}.py").exists()]


def search_line(dialects: list[str]) -> bytes:
    """Find's form as Health Cloud writes it: `<sourceSystem>|<value>`, the window, the fixed parts."""
    doctors = ",".join(f"{d}|{DIALECTS[d][2]}" for d in dialects)
    codes = ",".join(f"{d}|{DIALECTS[d][1]}" for d in dialects)
    return (f"schedule:Schedule.actor:Practitioner._id={doctors}&service-type={codes}"
            f"&start=ge{DAY}T08:00:00Z&start=le{DAY}T18:00:00Z&status=free&_include=Slot:schedule&_sort=start").encode()


def write_config(target: Path, ehr_bases: dict[str, str], run_id: str) -> Path:
    for d in ehr_bases:
        shutil.copytree(ROOT / "config" / "codemaps" / d, target / "codemaps" / d)
    parts = []
    for d, base in ehr_bases.items():
        parts.append(f"""
[sources.{d}]
adapter = "{d}"
source_system = "{d}"

[sources.{d}.ehr]
base_url = "{base}{DIALECTS[d][0]}"
token_url = "{base}/oauth2/token"
client_id = "bench-{d}"
max_concurrent_calls = 64
timeout_seconds = 10
""")
    digest = hashlib.sha256(f"{HC_USER}:{HC_PASSWORD}".encode()).hexdigest()
    parts.append(f"""
[healthcloud]
basic_sha256 = ["{digest}"]

[redis]
key_prefix = "{run_id}"
""")
    (target / "gateway.toml").write_text("".join(parts))
    return target


@dataclass
class Run:
    delay_ms: float
    paced: bool
    round: int
    load: Load
    gateway_cpu: float
    ehr_cpu: float
    redis_cpu: float
    wrk_cpu: float
    asked: dict[str, int]  # calls each EHR answered in the window
    partial: int  # searches answered with an outcome entry (an EHR missing)
    concurrency: int = 50
    other_cpu: float = 0.0  # % of a core the rest of the machine used (not this benchmark's processes)


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.run_id = f"ehrgw-callouts-{uuid.uuid4().hex[:8]}"
        self.dialects = args.dialects.split(",") if args.dialects else available_dialects()
        self.driver = Driver(tmp, 2, args.concurrency)
        self.body = tmp / "find.form"
        self.body.write_bytes(search_line(self.dialects))
        self.embedded: Any = None
        self.procs: list[Proc] = []

    def start(self) -> None:
        import redis

        url = os.environ.get("REDIS_URL")
        if not url:
            from gateway.state.embedded_redis import EmbeddedRedis

            self.embedded = EmbeddedRedis(self.tmp / "redis", appendonly=False).start()
            url = self.embedded.url
        self.redis_url, self.rc = url, redis.Redis.from_url(url)
        ports = {d: free_port() for d in self.dialects}
        bases = {d: f"http://127.0.0.1:{port}" for d, port in ports.items()}
        argv = [sys.executable, "-m", "benchmarks.ehr_standin", "--port", ",".join(map(str, ports.values()))]
        self.ehr = Proc("ehr-standin", argv, dict(os.environ), self.tmp, port=next(iter(ports.values())))
        self.procs.append(self.ehr)
        wait_until(self.ehr, lambda: ((s := http("GET", self.ehr.base + "/_standin/counters")[0]) == 200, s), "counters")
        self.sf = Proc("sf-standin", [sys.executable, "-m", "benchmarks.standin"], dict(os.environ), self.tmp,
                       sock=listening_socket())
        self.procs.append(self.sf)
        wait_until(self.sf, lambda: ((s := http("GET", self.sf.base + "/_standin/counters")[0]) == 200, s), "counters")
        config = write_config(self.tmp / "config", bases, self.run_id)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SALESFORCE_", "EHR_"))}
        env.update(SALESFORCE_LOGIN_URL=self.sf.base, SALESFORCE_CLIENT_ID=SF_CLIENT_ID,
                   SALESFORCE_CLIENT_SECRET=SF_CLIENT_SECRET, REDIS_URL=self.redis_url,
                   EHR_GATEWAY_DATA=str(self.tmp / "gwdata"),
                   **{f"EHR_{d.upper()}_CLIENT_SECRET": EHR_SECRET for d in self.dialects})
        port = free_port()
        profile = ["-m", "cProfile", "-o", self.args.profile] if self.args.profile else []
        # diagnostic: the same command with the cyclic garbage collector off from the start
        no_gc = ["-c", "import gc, sys; gc.disable(); from gateway.cli import main; sys.argv[0] = 'ehr-gateway'; "
                       "sys.exit(main())"] if self.args.no_gc else [str(BIN)]
        argv = [sys.executable, *profile, *no_gc, "serve", "--port", str(port), "--workers", str(self.args.workers),
                "--config", str(config)]
        self.gateway = Proc("gateway", argv,
                            env, self.tmp, port=port, stdout_to_log=False)
        self.procs.append(self.gateway)
        wait_until(self.gateway, lambda: ((s := http("GET", self.gateway.base + "/health/ready")[0]) == 200, s),
                   "/health/ready 200")
        self.check_answer()

    def check_answer(self) -> None:
        """One Find by hand: 200, and 4 slots from each EHR with no outcome entry."""
        status, body, _ = http("POST", self.gateway.base + "/iam/Slot/_search", self.body.read_bytes(),
                               {"Content-Type": FORM, "Authorization": AUTH})
        if status != 200:
            raise SystemExit(f"Find answered {status}: {body[:500]!r}\n{self.gateway.log_tail()}")
        entries = json.loads(body)["entry"]
        outcomes = [e for e in entries if e["search"]["mode"] == "outcome"]
        per = {d: 0 for d in self.dialects}
        for e in entries:
            if e["search"]["mode"] == "match":
                per[e["resource"]["extension"][0]["valueString"]] += 1
        if outcomes or set(per.values()) != {4}:
            raise SystemExit(f"Find's answer is not 4 slots from each EHR: {per}, outcomes {outcomes}")
        self.sample = {"status": status, "bytes": len(body), "slots_per_ehr": per}

    def set_delay(self, ms: float) -> None:
        status, _, _ = http("POST", f"{self.ehr.base}/_standin/delay?ms={ms:g}")
        assert status == 200

    def counters(self) -> dict[str, int]:
        return json.loads(http("GET", self.ehr.base + "/_standin/counters")[1])

    def find_outcomes(self) -> dict[str, float]:
        """ehrgw_callouts_total for op find, by outcome."""
        text = http("GET", self.gateway.base + "/metrics")[1].decode()
        found: dict[str, float] = {}
        for m in re.finditer(r'^ehrgw_callouts_total\{([^}]*)\} ([0-9.e+]+)$', text, re.M):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m[1]))
            if labels.get("op") == "find":
                found[labels.get("outcome", "")] = found.get(labels.get("outcome", ""), 0) + float(m[2])
        return found

    def redis_cpu(self) -> float:
        cpu = self.rc.info("cpu")
        return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])

    def load(self, seconds: float, pace_ms: float = 0.0) -> Load:
        return self.driver.run(self.gateway.base + "/iam/Slot/_search", seconds, body=self.body, ctype=FORM,
                               auth=AUTH, delay_ms=pace_ms, first_path="/health/live" if pace_ms else "")

    def measure(self, delay_ms: float, rnd: int, pace_ms: float = 0.0) -> Run:
        self.set_delay(delay_ms)
        self.load(self.args.warmup, pace_ms)
        # wrk closes its connections at the end of the warm-up, but the gateway finishes the searches
        # they left in flight, their EHR calls still holding slots of max_concurrent_calls: measured
        # at once, the first searches would queue behind them (at d = 300 ms, p99 − d was 140-210 ms
        # from that alone, a waiting EHR-call slot, with the worker 20% busy)
        time.sleep(2 * delay_ms / 1000 + 0.5)
        gw, ehr = self.gateway.pids(), self.ehr.pids()
        g0, e0, r0, k0, o0 = cpu_seconds(gw), cpu_seconds(ehr), self.redis_cpu(), self.counters(), self.find_outcomes()
        m0, w0 = machine_busy_seconds(), time.monotonic()
        load = self.load(self.args.seconds, pace_ms)
        wall = time.monotonic() - w0
        g1, e1, r1, k1, o1 = cpu_seconds(gw), cpu_seconds(ehr), self.redis_cpu(), self.counters(), self.find_outcomes()
        # the machine's busy time beyond what this benchmark runs: someone else's work disturbing the run
        other = machine_busy_seconds() - m0 - ((g1 - g0) + (e1 - e0) + (r1 - r0) + load.wrk_cpu_s)
        if not self.gateway.alive():
            raise SystemExit(f"the gateway died under load:\n{self.gateway.log_tail()}")
        pct = lambda x: round(100 * x / wall, 1)  # noqa: E731
        # an EHR's share failed; not the searches wrk leaves in flight when it closes its connections at
        # the window's end (abandoned, 499 "rejected": nobody waits for them)
        partial = int(sum(v - o0.get(k, 0) for k, v in o1.items() if k not in ("found", "rejected")))
        return Run(delay_ms, bool(pace_ms), rnd, load, pct(g1 - g0), pct(e1 - e0), pct(r1 - r0), pct(load.wrk_cpu_s),
                   {d: k1[d] - k0[d] for d in self.dialects}, partial, self.args.concurrency, max(0.0, pct(other)))

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        if self.embedded is not None:
            self.embedded.stop()


def _line(r: Run) -> str:
    L = r.load
    return (f"d={r.delay_ms:g} ms{' paced' if r.paced else ''} round {r.round}: {L.rps:,.0f} searches/s  p50 {L.p50_ms:.2f}  "
            f"p99 {L.p99_ms:.2f} ms (p99-d {L.p99_ms - r.delay_ms:.2f})  non-2xx {L.non_2xx} errors {L.errors}  "
            f"partial {r.partial}  asked {r.asked}  CPU gateway {r.gateway_cpu:.0f}% EHR stand-in {r.ehr_cpu:.0f}% "
            f"redis {r.redis_cpu:.0f}% wrk {r.wrk_cpu:.0f}% other {r.other_cpu:.0f}%")


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for key in sorted({(r.delay_ms, r.paced) for r in runs}):
        rs = [r for r in runs if (r.delay_ms, r.paced) == key]
        med = lambda f: round(statistics.median(f(r) for r in rs), 2)  # noqa: E731
        rows.append({"delay_ms": key[0], "paced": key[1], "rounds": len(rs), "rps": med(lambda r: r.load.rps),
                     "p50_ms": med(lambda r: r.load.p50_ms), "p99_ms": med(lambda r: r.load.p99_ms),
                     "p99_minus_d_ms": med(lambda r: r.load.p99_ms - r.delay_ms),
                     "gateway_cpu": med(lambda r: r.gateway_cpu), "ehr_cpu": med(lambda r: r.ehr_cpu),
                     # the gateway's CPU per search: steadier than searches/s on a shared machine
                     "gateway_us_per_search": med(lambda r: 1e4 * r.gateway_cpu / r.load.rps),
                     "redis_cpu": med(lambda r: r.redis_cpu), "wrk_cpu": med(lambda r: r.wrk_cpu),
                     "other_cpu": med(lambda r: r.other_cpu),
                     "non_2xx": sum(r.load.non_2xx for r in rs), "errors": sum(r.load.errors for r in rs),
                     "partial": sum(r.partial for r in rs),
                     # searches in flight at either edge of the window are counted by one side only
                     "unasked": sum(max(0, abs(n - r.load.requests) - 2 * r.concurrency) for r in rs
                                    for n in r.asked.values())})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| d (ms) | load | searches/s | p50 ms | p99 ms | p99 − d | CPU gateway | gateway µs / search | EHR stand-in | Redis | wrk | other | non-2xx / errors / partial |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['delay_ms']:g} | {'paced' if r['paced'] else 'closed, 50 conns'} | {r['rps']:,.0f} | "
                   f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p99_minus_d_ms']:.2f} | {r['gateway_cpu']:.0f}% | "
                   f"{r['gateway_us_per_search']:.0f} | "
                   f"{r['ehr_cpu']:.0f}% | {r['redis_cpu']:.0f}% | {r['wrk_cpu']:.0f}% | {r['other_cpu']:.0f}% | "
                   f"{r['non_2xx']} / {r['errors']} / {r['partial']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delays", default="0,20,50", help="the EHRs' delays, ms")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--workers", type=int, default=1, help="the gateway's workers (the goal is for one)")
    p.add_argument("--paced", action="store_true", help="also a series at about half the d=0 peak")
    p.add_argument("--pace-share", type=float, default=0.5, help="the paced series' rate, as a share of the peak")
    p.add_argument("--dialects", default="", help="comma-separated (default: every dialect with a client)")
    p.add_argument("--out", default=str(RESULTS / "callouts.json"))
    p.add_argument("--no-gc", action="store_true", help="diagnostic: the gateway with Python's cyclic GC off")
    p.add_argument("--profile", default="", help="run the gateway under cProfile, its stats written here at the end")
    args = p.parse_args(argv)
    delays = [float(d) for d in args.delays.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="ehrgw-callouts-"))
    bench = Bench(args, tmp)
    runs: list[Run] = []
    try:
        bench.start()
        print(f"dialects {bench.dialects}; sample answer {bench.sample}", flush=True)
        for rnd in range(1, args.rounds + 1):
            for d in delays:
                runs.append(bench.measure(d, rnd))
                print(_line(runs[-1]), flush=True)
        if args.paced:
            peak = statistics.median(r.load.rps for r in runs if r.delay_ms == 0) if 0 in delays else 1000.0
            for rnd in range(1, args.rounds + 1):
                for d in delays:
                    # per connection: one search every 50/(peak × share) s, of which d + the gateway's time is the search
                    pace = 1000 * args.concurrency / (peak * args.pace_share) - d
                    if pace <= 0:  # the connections cannot ask even half the peak at this delay
                        continue
                    runs.append(bench.measure(d, rnd, pace_ms=pace))
                    print(_line(runs[-1]), flush=True)
    finally:
        bench.stop()
    rows = summarize(runs)
    print(table(rows))
    Path(args.out).write_text(json.dumps({"machine": machine_info(), "dialects": bench.dialects, "args": {k: v for k, v in vars(args).items() if k not in ("out", "profile")},
                                          "sample": getattr(bench, "sample", None), "summary": rows,
                                          "runs": [asdict(r) for r in runs]}, indent=1, default=str))
    shutil.rmtree(tmp, ignore_errors=True)
    bad = [r for r in rows if r["non_2xx"] or r["errors"] or r["partial"] or r["unasked"]]
    return 1 if bad else 0


def machine_info() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "loadavg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "python": sys.version.split()[0]}


if __name__ == "__main__":
    sys.exit(main())
