"""Full booking path under load: wrk -> gateway (`ehr-gateway serve`) -> Redis -> the Health Cloud
sandbox (`ehr-gateway sandbox`), all on loopback. Prints requests/s and latency for new bookings
(a unique Idempotency-Key per request) and for replays (one key), and the Redis commands per booking
from INFO commandstats.

    .venv/bin/python benchmarks/booking.py [--seconds 10] [--concurrency 32] [--workers 1]

Needs wrk (Debian: apt-get install -y wrk). Uses REDIS_URL if set (keys under a prefix of its own,
deleted afterwards), else an embedded Redis. The sandbox runs on the same cores and is a Litestar
app itself, so it bounds what the gateway can show here; issue 6's benchmark replaces it with a
fixed-answer stand-in.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
BODY = ROOT.parent / "shared" / "corpus" / "cerner-millennium-r4" / "r4_appointment_video_visit_entry.json"
BIN = Path(sys.executable).with_name("ehr-gateway")
KEY = "bench-cerner-key"

LUA = """
local counter = 0
local id = 0
-- setup runs once per thread in the main state; thread:set makes `tid` a global of that thread
function setup(thread) id = id + 1; thread:set("tid", id) end
wrk.method = "POST"
wrk.body = io.open(os.getenv("BENCH_BODY"), "rb"):read("*a")
wrk.headers["Content-Type"] = "application/fhir+json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
function request()
  counter = counter + 1
  local key = os.getenv("BENCH_FIXED_KEY")
  if key == "" then key = os.getenv("BENCH_RUN") .. "-" .. tostring(tid) .. "-" .. counter end
  wrk.headers["Idempotency-Key"] = key
  return wrk.format()
end
done = function(summary, latency, requests)
  io.write(string.format("ERRORS status=%d connect=%d read=%d write=%d timeout=%d\\n", summary.errors.status,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
  io.write(string.format("RESULT %d %d %.3f %.3f %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.requests))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: process exited")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url}: not ready")


def wrk(url: str, seconds: float, concurrency: int, lua: str, env: dict) -> dict:
    out = subprocess.run(["wrk", "-t2", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "10s", "-s", lua, url],
                         capture_output=True, text=True, env=env, check=False)
    m = re.search(r"RESULT (\d+) (\d+) ([\d.]+) ([\d.]+) (\d+)", out.stdout)
    if not m:
        raise SystemExit(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")
    n, us, p50, p99, errors = int(m[1]), int(m[2]), float(m[3]), float(m[4]), int(m[5])
    detail = re.search(r"ERRORS (.*)", out.stdout)
    return {"rps": n / (us / 1e6), "p50": p50, "p99": p99, "errors": errors, "requests": n,
            "detail": detail[1] if detail else ""}


def commandstats(client: redis.Redis) -> dict[str, int]:
    return {k: v["calls"] for k, v in client.info("commandstats").items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")

    tmp = Path(tempfile.mkdtemp(prefix="ehr-bench-"))
    procs: list[subprocess.Popen] = []
    client: redis.Redis | None = None
    embedded = None
    prefix = f"ehrgw-bench-{uuid.uuid4().hex[:8]}"
    try:
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            from gateway.state.embedded_redis import EmbeddedRedis

            embedded = EmbeddedRedis(tmp / "redis", appendonly=False).start()
            redis_url = embedded.url
        config = tmp / "config"
        shutil.copytree(ROOT / "config", config)
        toml = (config / "gateway.toml").read_text()
        digest = hashlib.sha256(KEY.encode()).hexdigest()
        toml = re.sub(r"(\[sources\.cerner\]\n(?:[^\n\[]*\n)*?)api_keys_sha256 = \[\]",
                      rf'\1api_keys_sha256 = ["{digest}"]', toml, count=1)
        toml += f'\n[redis]\nkey_prefix = "{prefix}"\n'
        (config / "gateway.toml").write_text(toml)

        sandbox_port, gateway_port = free_port(), free_port()
        secret = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if not k.startswith("SALESFORCE_")}
        procs.append(subprocess.Popen([str(BIN), "sandbox", "--port", str(sandbox_port)], stdout=subprocess.DEVNULL,
                                      env={**env, "SANDBOX_CLIENT_ID": "bench", "SANDBOX_CLIENT_SECRET": secret,
                                           "SANDBOX_CONTROL_KEY": secret}))
        wait_ready(f"http://127.0.0.1:{sandbox_port}/sandbox/counters", procs[-1])
        genv = {**env, "REDIS_URL": redis_url, "SALESFORCE_LOGIN_URL": f"http://127.0.0.1:{sandbox_port}",
                "SALESFORCE_CLIENT_ID": "bench", "SALESFORCE_CLIENT_SECRET": secret}
        procs.append(subprocess.Popen([str(BIN), "serve", "--port", str(gateway_port), "--workers", str(args.workers),
                                       "--config", str(config)], stdout=subprocess.DEVNULL, env=genv))
        wait_ready(f"http://127.0.0.1:{gateway_port}/health/ready", procs[-1])

        lua = tmp / "booking.lua"
        lua.write_text(LUA)
        url = f"http://127.0.0.1:{gateway_port}/fhir/cerner/Appointment"
        wenv = {**os.environ, "BENCH_BODY": str(BODY), "BENCH_KEY": KEY, "BENCH_FIXED_KEY": ""}
        client = redis.Redis.from_url(redis_url)

        wrk(url, 2, args.concurrency, str(lua), {**wenv, "BENCH_RUN": "warm"})
        before = commandstats(client)
        new = wrk(url, args.seconds, args.concurrency, str(lua), {**wenv, "BENCH_RUN": uuid.uuid4().hex[:8]})
        after = commandstats(client)
        first = httpx.post(url, content=BODY.read_bytes(), timeout=10, headers={
            "Authorization": f"Bearer {KEY}", "Content-Type": "application/fhir+json", "Idempotency-Key": "replayed"})
        assert first.status_code == 201, first.text
        after = commandstats(client)
        replay = wrk(url, args.seconds, args.concurrency, str(lua), {**wenv, "BENCH_FIXED_KEY": "replayed"})
        after_replay = commandstats(client)
        counters = httpx.get(f"http://127.0.0.1:{sandbox_port}/sandbox/counters",
                             headers={"Authorization": f"Bearer {secret}"}).json()

        def per(a: dict, b: dict, n: int) -> str:
            diff = {k: b.get(k, 0) - a.get(k, 0) for k in b}
            return ", ".join(f"{k.removeprefix('cmdstat_')} {v / n:.2f}" for k, v in sorted(diff.items()) if v and k != "cmdstat_info")

        print(f"full booking path, {args.workers} worker(s), {args.concurrency} connections, {args.seconds:g}s each, "
              f"{os.cpu_count()} cores shared by wrk, gateway, sandbox and Redis")
        print(f"  new bookings : {new['rps']:8.0f} req/s  p50 {new['p50']:6.1f} ms  p99 {new['p99']:6.1f} ms  "
              f"non-2xx/errors {new['errors']} ({new['detail']})")
        print(f"  replays      : {replay['rps']:8.0f} req/s  p50 {replay['p50']:6.1f} ms  p99 {replay['p99']:6.1f} ms  "
              f"non-2xx/errors {replay['errors']} ({replay['detail']})")
        print(f"  Redis commands per new booking: {per(before, after, new['requests'])}")
        print(f"  Redis commands per replay     : {per(after, after_replay, replay['requests'])}")
        print(f"  sandbox: {counters.get('book_calls')} book calls, {counters.get('token_grants')} token grants")
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        sample = next((k for k in keys if b":idem:" in k), None)
        if sample:
            print(f"  one idempotency record: {client.memory_usage(sample)} bytes (MEMORY USAGE)")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        # only now: a stopping gateway writes its last request-log batch
        if client is not None:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i:i + 1000])
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
