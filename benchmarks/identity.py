"""What identity costs (issue 20): booking throughput with the people cached, against the gateway as
it was before identity (a git revision, run from a worktree of it) in the same run, and Salesforce
API calls per booking, cold and warm.

    .venv/bin/python -m benchmarks.identity [--baseline REV] [--rounds 3] [--seconds 10] [--concurrency 32]

Everything on loopback, as `benchmarks/compare.py` sets it up (Redis, the fast Salesforce stand-in,
wrk with a unique Idempotency-Key per booking of the corpus's Cerner video visit):

1. Rounds: `gateway@base` (REV, default the last commit before identity) and `gateway` (this tree),
   each started afresh with one worker, warmed up, then loaded; the order alternates from round to
   round. The people of the booking are looked up once (its first booking: the stand-in answers the
   identity Composite with their records), so the measured bookings are the cached path. The ratio
   of the two req/s is taken within each round; its median is judged (goal: at least 0.95).
2. API calls per booking: on a fresh gateway (its own key prefix, so nothing is cached), the stand-in's
   counters around the first booking (cold: the look-up and the Book) and then around 200 more
   bookings of the same people (warm: the Book alone).

Needs git (the baseline's worktree is made in a temporary folder and removed at the end) and wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.compare import (
    BIN,
    ROOT,
    SOURCE,
    Bench,
    Proc,
    free_port,
    http,
    machine,
    wait_until,
)

BASELINE = "c73e850"  # main before issue 20: participants sent with the EHR's ids
SYSTEMS = ["gateway@base", "gateway"]
GOAL = 0.95


class IdentityBench(Bench):
    def __init__(self, args: argparse.Namespace, tmp: Path, baseline: Path) -> None:
        super().__init__(args, tmp)
        self.baseline = baseline
        self.base_config = tmp / "config-base"

    def setup(self) -> None:
        super().setup()
        self._write_config(self.baseline / "config", self.base_config)  # the baseline reads its own config's keys

    def start_system(self, system: str, *, redis_url: str | None = None) -> Proc:
        if system != "gateway@base":
            return super().start_system("gateway", redis_url=redis_url)
        env = self._sf_env()
        # the baseline's packages first: -P keeps the working folder (this tree) off sys.path
        env.update(PYTHONPATH=str(self.baseline), EHR_GATEWAY_DATA=str(self.tmp / f"gwdata-{uuid.uuid4().hex[:6]}"))
        port = free_port()
        argv = [sys.executable, "-P", "-c", "import sys; from gateway.cli import main; sys.exit(main())",
                "serve", "--port", str(port), "--workers", "1", "--config", str(self.base_config)]
        p = Proc(system, argv, env, self.tmp, port=port, stdout_to_log=False)
        wait_until(p, lambda: ((s := http("GET", p.base + "/health/ready")[0]) == 200, s), "/health/ready 200")
        url = p.base + f"/fhir/{SOURCE}/Appointment"
        wait_until(p, lambda: ((s := http("POST", url, self.fhir_body.read_bytes(),
                                          self.booking_headers(f"{self.run_id}-ready-{uuid.uuid4().hex}"))[0]) == 201, s),
                   "a 201 booking")
        return p

    def rounds(self) -> list[Any]:
        runs = []
        for rnd in range(1, self.args.rounds + 1):
            order = SYSTEMS if rnd % 2 else SYSTEMS[::-1]
            for system in order:
                r = self.measure(system, rnd)
                runs.append(r)
                L = r.load
                print(f"  round {rnd}  {system:<13} {L.rps:8,.0f} req/s  p50 {L.p50_ms:6.2f} ms  p99 {L.p99_ms:6.2f} ms  "
                      f"errors {L.errors}  non-2xx {L.non_2xx}  CPU server {r.server_cpu:3.0f}%", flush=True)
        return runs

    def api_calls(self, warm: int) -> dict[str, Any]:
        """The stand-in's counters around a cold booking, then around `warm` bookings of the same people."""
        p = self.start_system("gateway")  # its ready check booked once: the people are cached now
        try:
            url = p.base + f"/fhir/{SOURCE}/Appointment"
            before = self.standin_counters()
            asyncio.run(self._post_many(url, [f"{self.run_id}-calls-{i}" for i in range(warm)]))
            after = self.standin_counters()
        finally:
            p.stop()
        # cold: a gateway on a prefix of its own (nothing cached), one booking
        cold_before = self.standin_counters()
        q = self._fresh_gateway()
        try:
            status = http("POST", q.base + f"/fhir/{SOURCE}/Appointment", self.fhir_body.read_bytes(),
                          self.booking_headers(f"{self.run_id}-cold"))[0]
            cold_after = self.standin_counters()
        finally:
            q.stop()
        calls = lambda a, b: {k: b[k] - a[k] for k in ("book", "composite", "query") if b[k] - a[k]}  # noqa: E731
        cold, hot = calls(cold_before, cold_after), calls(before, after)
        return {"cold": {"status": status, "calls": cold, "per_booking": sum(cold.values())},
                "warm": {"bookings": warm, "calls": hot, "per_booking": round(sum(hot.values()) / warm, 3)}}

    def _fresh_gateway(self) -> Proc:
        """The gateway with a key prefix no run has used: nothing cached, and no ready-check booking."""
        config = self.tmp / f"config-{uuid.uuid4().hex[:6]}"
        shutil.copytree(self.config, config)
        toml = (config / "gateway.toml").read_text().replace(f'key_prefix = "{self.run_id}"',
                                                              f'key_prefix = "{self.run_id}-cold"')
        (config / "gateway.toml").write_text(toml)
        env = self._sf_env()
        env["EHR_GATEWAY_DATA"] = str(self.tmp / f"gwdata-{uuid.uuid4().hex[:6]}")
        port = free_port()
        p = Proc("gateway-cold", [str(BIN), "serve", "--port", str(port), "--workers", "1", "--config", str(config)],
                 env, self.tmp, port=port, stdout_to_log=False)
        wait_until(p, lambda: ((s := http("GET", p.base + "/health/ready")[0]) == 200, s), "/health/ready 200")
        return p


def _worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True,
                   capture_output=True)
    return where


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default=BASELINE, help=f"the git revision to compare with (default {BASELINE})")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--warm-bookings", type=int, default=200)
    p.add_argument("--quiet-wait", type=float, default=30)
    p.add_argument("--standin", choices=("raw", "asgi"), default="raw")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian/Ubuntu: apt-get install -y wrk)")

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    with tempfile.TemporaryDirectory(prefix="ehrgw-identity-") as tmp_name:
        tmp = Path(tmp_name)
        baseline = _worktree(a.baseline, tmp / "baseline")
        b = IdentityBench(a, tmp, baseline)
        try:
            b.setup()
            m = machine(b)
            print(f"{m['nproc']} cores, Python {m['python']}, {m['wrk']}, {m['redis']}; baseline {a.baseline}", flush=True)
            print(f"\n[1/2] rounds: {a.rounds} x {', '.join(SYSTEMS)}; {a.warmup:g}s warm-up + {a.seconds:g}s, "
                  f"-c{a.concurrency}", flush=True)
            runs = b.rounds()
            print(f"\n[2/2] Salesforce API calls per booking, cold and warm ({a.warm_bookings} bookings)", flush=True)
            calls = b.api_calls(a.warm_bookings)
        finally:
            b.cleanup()
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], capture_output=True)
    results = summarize(runs, calls, a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "identity.json").write_text(json.dumps(results, indent=1))
    print(markdown(results))


def summarize(runs: list[Any], calls: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    by = {s: [r for r in runs if r.system == s] for s in SYSTEMS}
    ratios = []
    for rnd in sorted({r.round for r in runs}):
        base = next(r for r in runs if r.round == rnd and r.system == "gateway@base")
        new = next(r for r in runs if r.round == rnd and r.system == "gateway")
        ratios.append(new.load.rps / base.load.rps)
    table = {s: {"rps": statistics.median(r.load.rps for r in rs), "p50_ms": statistics.median(r.load.p50_ms for r in rs),
                 "p99_ms": statistics.median(r.load.p99_ms for r in rs),
                 "server_cpu_pct": statistics.median(r.server_cpu for r in rs),
                 "errors": sum(r.load.errors + r.load.non_2xx for r in rs)} for s, rs in by.items()}
    ratio = statistics.median(ratios)
    return {"baseline": a.baseline, "rounds": a.rounds, "seconds": a.seconds, "concurrency": a.concurrency,
            "table": table, "ratios": [round(x, 3) for x in ratios], "ratio": round(ratio, 3),
            "verdict": "PASS" if ratio >= GOAL and not any(t["errors"] for t in table.values()) else "FAIL",
            "api_calls": calls, "date": time.strftime("%Y-%m-%d")}


def markdown(r: dict[str, Any]) -> str:
    t = r["table"]
    lines = [f"Identity's cost, {r['date']}: {r['rounds']} rounds × {r['seconds']:g} s, -c{r['concurrency']}, "
             f"one worker each, the people cached; baseline `{r['baseline']}`.", "",
             "| | req/s | p50 | p99 | gateway CPU | errors |", "|---|---:|---:|---:|---:|---:|"]
    for s in SYSTEMS:
        x = t[s]
        lines.append(f"| {s} | {x['rps']:,.0f} | {x['p50_ms']:.2f} ms | {x['p99_ms']:.2f} ms | {x['server_cpu_pct']:.0f}% | "
                     f"{x['errors']} |")
    c = r["api_calls"]
    lines += ["", f"Throughput with identity / without, per round: {', '.join(f'{x:.3f}' for x in r['ratios'])}; "
                  f"median {r['ratio']:.3f} (goal ≥ {GOAL}): **{r['verdict']}**.",
              f"Salesforce API calls per booking: cold {c['cold']['per_booking']} ({c['cold']['calls']}), "
              f"warm {c['warm']['per_booking']} ({c['warm']['calls']} for {c['warm']['bookings']} bookings)."]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped", file=sys.stderr)
        sys.exit(130)
