"""Which HTTP transport should the gateway's Salesforce client use?

One command, everything on 127.0.0.1, every load bounded in time:

    .venv/bin/python benchmarks/transport.py [--seconds 10] [--concurrency 32] [--rounds 3]

What it does:

* starts an upstream stand-in for Salesforce: a raw ASGI app answering a fixed
  small JSON 201 to POST (400 if the body is not the expected length, so a
  gateway that mangles the body shows up as wrk errors), served by uvicorn
  (httptools + uvloop) in a subprocess, on an ephemeral loopback port;
* for each variant starts a Litestar app (one uvicorn worker, httptools +
  uvloop, subprocess) whose POST handler forwards the request body to the
  stand-in through that variant's client and returns the upstream answer;
* drives it with wrk (2 threads, --concurrency connections, POST of a ~600-byte
  JSON body) for a short warm-up, then --seconds measured;
* does --rounds rounds (variants interleaved within a round, gateway started
  afresh for each run) and prints the median of each column per variant.

The wrk driver, the gateway and the stand-in all share the machine's cores;
the CPU columns show how much of one core each used during the measured window.

Listening sockets are bound by this process (port 0) and handed to the
servers as inherited file descriptors, so there is no port race.
"""

import argparse
import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

# --------------------------------------------------------------------------- payload

# A booking in the shape of gateway.salesforce.wire.BookingRequest, ~600 bytes.
BOOKING = {
    "participants": [
        {"reference": "0015g00000XyZaBAAV", "isReferenceRequired": True},
        {"reference": "0055g00000AbCdEAAZ", "isReferenceRequired": True},
    ],
    "startDate": "2025-03-14T09:30:00.000Z",
    "endDate": "2025-03-14T10:00:00.000Z",
    "workTypeId": "08q5g000000AbCdAAK",
    "channelId": "0eF5g000000XyZaEAK",
    "timeZone": "America/Chicago",
    "sourceSystem": "Epic",
    "appointmentTypes": ["Follow-up"],
    "serviceTypes": ["Cardiology consultation"],
    "specialties": ["Cardiology"],
    "slots": [{"id": "slot-7f3c2a", "reference": "Slot/7f3c2a91-0d4e-4b8a-9c11-3e5f6a7b8c9d"}],
    "comment": "Patient requests a morning slot; bring previous ECG results. EHR appt 4711-0815.",
}
BODY = json.dumps(BOOKING, separators=(",", ":")).encode()
UPSTREAM_ANSWER = b'{"id":"08p5g000000AbCdAAK","success":true,"errors":[]}'

# --------------------------------------------------------------------------- variants

VARIANTS: dict[str, str] = {
    "httpx-default": "httpx.AsyncClient() - defaults: Limits(max_connections=100, max_keepalive_connections=20), HTTP/1.1",
    "httpx-limits": "httpx.AsyncClient(http2=False, limits=Limits(max_connections=200, max_keepalive_connections=200, keepalive_expiry=30))",
    "httpx-aiohttp": "httpx.AsyncClient(transport=httpx_aiohttp.AiohttpTransport(limits=Limits(max_connections=100))) -> TCPConnector(limit=100)",
    "httpx-aiohttp-client": "httpx_aiohttp.HttpxAiohttpClient(limits=Limits(max_connections=100)) (same transport, via the subclass)",
    "aiohttp": "aiohttp.ClientSession(connector=TCPConnector(limit=100)) directly (ceiling)",
}
# "<variant>+log": the same client, but the "httpx" logger left as Litestar's default LoggingConfig
# sets it (root at INFO), so httpx writes one "HTTP Request: ..." INFO line per upstream call.
# Without the suffix the gateway sets logging.getLogger("httpx") to WARNING, as a service should.
for _v in list(VARIANTS):
    if _v.startswith("httpx"):
        VARIANTS[_v + "+log"] = VARIANTS[_v] + "; httpx INFO request log left on (Litestar default logging)"
DEFAULT_VARIANTS = [
    "httpx-default",
    "httpx-limits",
    "httpx-aiohttp",
    "httpx-aiohttp-client",
    "aiohttp",
    "httpx-default+log",
    "httpx-aiohttp+log",
]


def _make_forwarder(variant: str, url: str):
    """Return (forward(body) -> (status, bytes), aclose()) for a variant. Runs in the gateway process."""
    headers = {"content-type": "application/json"}
    if variant == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100),
            timeout=aiohttp.ClientTimeout(total=10, sock_connect=2),
        )

        async def forward(body: bytes) -> tuple[int, bytes]:
            async with session.post(url, data=body, headers=headers) as r:
                return r.status, await r.read()

        return forward, session.close

    import httpx

    timeout = httpx.Timeout(10.0, connect=2.0)
    if variant == "httpx-default":
        client = httpx.AsyncClient(timeout=timeout)
    elif variant == "httpx-limits":
        client = httpx.AsyncClient(
            timeout=timeout,
            http2=False,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=200, keepalive_expiry=30),
        )
    elif variant == "httpx-aiohttp":
        from httpx_aiohttp import AiohttpTransport

        client = httpx.AsyncClient(
            timeout=timeout, transport=AiohttpTransport(limits=httpx.Limits(max_connections=100))
        )
    elif variant == "httpx-aiohttp-client":
        from httpx_aiohttp import HttpxAiohttpClient

        client = HttpxAiohttpClient(timeout=timeout, limits=httpx.Limits(max_connections=100))
    else:
        raise SystemExit(f"unknown variant {variant!r}")

    async def forward(body: bytes) -> tuple[int, bytes]:
        r = await client.post(url, content=body, headers=headers)
        return r.status_code, r.content

    return forward, client.aclose


# --------------------------------------------------------------------------- server processes


def _uvicorn_run(app, fd: int) -> None:
    import uvicorn

    sock = socket.socket(fileno=fd)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="auto",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=30,
        backlog=2048,
    )
    uvicorn.Server(config).run(sockets=[sock])


def serve_upstream(fd: int, expected_len: int) -> None:
    answer_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(UPSTREAM_ANSWER)).encode())]
    bad = b'{"error":"unexpected body length"}'

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        size, more = 0, True
        while more:
            msg = await receive()
            size += len(msg.get("body", b""))
            more = msg.get("more_body", False)
        if scope["method"] == "POST" and size == expected_len:
            await send({"type": "http.response.start", "status": 201, "headers": answer_headers})
            await send({"type": "http.response.body", "body": UPSTREAM_ANSWER})
        else:
            status = 400 if scope["method"] == "POST" else 405
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", str(len(bad)).encode())]})
            await send({"type": "http.response.body", "body": bad})

    _uvicorn_run(app, fd)


def serve_gateway(fd: int, variant: str, upstream_url: str) -> None:
    from litestar import Litestar, Request, Response, post

    state: dict = {}

    log_on = variant.endswith("+log")
    variant = variant.removesuffix("+log")

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar):
        if not log_on:
            # Litestar's default LoggingConfig puts the root logger at INFO; httpx logs every request at INFO.
            logging.getLogger("httpx").setLevel(logging.WARNING)
        forward, aclose = _make_forwarder(variant, upstream_url)
        state["forward"] = forward
        try:
            yield
        finally:
            await aclose()

    @post("/appointments")
    async def forward_booking(request: Request) -> Response[bytes]:
        status, content = await state["forward"](await request.body())
        return Response(content=content, status_code=status, media_type="application/json")

    _uvicorn_run(Litestar(route_handlers=[forward_booking], lifespan=[lifespan]), fd)


def _listen() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Server:
    """A server subprocess listening on a socket bound here."""

    def __init__(self, name: str, argv_tail: list[str], path: str, log_dir: str):
        self.name = name
        self.log_path = os.path.join(log_dir, name.replace("[", "-").replace("]", "").replace("+", "_") + ".log")
        self.log = open(self.log_path, "wb")  # server output (incl. the httpx request log) goes here, not to the terminal
        self.sock = _listen()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}{path}"
        argv = [sys.executable, os.path.abspath(__file__), *argv_tail[:1], "--fd", str(self.sock.fileno()), *argv_tail[1:]]
        self.proc = subprocess.Popen(argv, pass_fds=[self.sock.fileno()], stdout=self.log, stderr=subprocess.STDOUT)
        self.sock.close()  # the child holds the listening socket now

    def wait_ready(self, deadline_s: float = 30.0) -> None:
        end = time.monotonic() + deadline_s
        last: object = None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name}: server exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            req = urllib.request.Request(self.url, data=BODY, method="POST", headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 201:
                        return
                    last = r.status
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:200]!r}"
            except OSError as e:
                last = e
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"{self.name}: not ready after {deadline_s}s (last: {last}):\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --------------------------------------------------------------------------- wrk

WRK_LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = io.open(os.getenv("BENCH_BODY_FILE"), "rb"):read("*a")

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT {\"requests\":%d,\"duration_us\":%d,\"p50_us\":%d,\"p99_us\":%d,\"max_us\":%d," ..
    "\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d}\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def run_wrk(url: str, seconds: float, concurrency: int, threads: int, lua: str, env: dict) -> dict:
    argv = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds:g}s", "--timeout", "5s", "-s", lua, url]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 30)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise SystemExit(f"wrk gave no result (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    gw_cpu: float  # % of one core
    up_cpu: float
    wrk_cpu: float


def measure(variant: str, upstream: Server, args, lua: str, env: dict, log_dir: str) -> Run:
    gw = Server(f"gateway[{variant}]", ["_serve-gateway", "--variant", variant, "--upstream", upstream.url], "/appointments", log_dir)
    try:
        gw.wait_ready()
        run_wrk(gw.url, args.warmup, args.concurrency, args.threads, lua, env)
        gw0, up0 = gw.cpu_seconds(), upstream.cpu_seconds()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        res = run_wrk(gw.url, args.seconds, args.concurrency, args.threads, lua, env)
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        gw1, up1 = gw.cpu_seconds(), upstream.cpu_seconds()
        if gw.proc.poll() is not None:
            raise SystemExit(f"{gw.name}: died during the load:\n{gw.log_tail()}")
    finally:
        gw.stop()
    errors = sum(res[k] for k in ("connect", "read", "write", "status", "timeout"))
    wrk_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    return Run(
        rps=res["requests"] / (res["duration_us"] / 1e6),
        p50_ms=res["p50_us"] / 1000,
        p99_ms=res["p99_us"] / 1000,
        errors=errors,
        gw_cpu=100 * (gw1 - gw0) / wall,
        up_cpu=100 * (up1 - up0) / wall,
        wrk_cpu=100 * wrk_cpu / wall,
    )


def versions() -> str:
    from importlib import metadata

    out = [f"Python {sys.version.split()[0]}"]
    for dist in ("litestar", "uvicorn", "uvloop", "httptools", "httpx", "httpcore", "anyio", "httpx-aiohttp", "aiohttp"):
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist} (absent)")
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()
    if wrk_v:
        out.append(wrk_v[0].split(" Copyright")[0].strip())
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"nproc {os.cpu_count()}, CPU {cpu}; " + ", ".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10, help="measured seconds per run (default 10)")
    p.add_argument("--warmup", type=float, default=2, help="warm-up seconds per run, discarded (default 2)")
    p.add_argument("--concurrency", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="runs per variant; the median is reported (default 3)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--json", metavar="FILE", help="also write every run's figures to FILE")
    args = p.parse_args()

    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed. On Debian/Ubuntu: apt-get update && apt-get install -y wrk")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")

    print(versions())
    print(
        f"wrk -t{args.threads} -c{args.concurrency}, POST {len(BODY)}-byte JSON, {args.warmup:g}s warm-up + "
        f"{args.seconds:g}s measured, {args.rounds} rounds (median); driver, gateway and stand-in share the cores",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="transport-bench-") as tmp:
        body_file = os.path.join(tmp, "body.json")
        with open(body_file, "wb") as f:
            f.write(BODY)
        lua = os.path.join(tmp, "post.lua")
        with open(lua, "w") as f:
            f.write(WRK_LUA)
        env = dict(os.environ, BENCH_BODY_FILE=body_file)

        upstream = Server("upstream", ["_serve-upstream", "--expected-len", str(len(BODY))], "/services/data/appointment", tmp)
        runs: dict[str, list[Run]] = {v: [] for v in variants}
        try:
            upstream.wait_ready()
            for rnd in range(1, args.rounds + 1):
                for v in variants:
                    r = measure(v, upstream, args, lua, env, tmp)
                    runs[v].append(r)
                    print(
                        f"  round {rnd} {v:<22} {r.rps:8.0f} req/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  "
                        f"errors {r.errors}  cpu gw {r.gw_cpu:3.0f}% up {r.up_cpu:3.0f}% wrk {r.wrk_cpu:3.0f}%",
                        flush=True,
                    )
        finally:
            upstream.stop()

    med = statistics.median
    print()
    header = f"| {'variant':<22} | {'req/s':>7} | {'p50 ms':>6} | {'p99 ms':>6} | {'errors':>6} | {'gw CPU':>6} | {'up CPU':>6} | {'wrk CPU':>7} | {'req/s runs':<20} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for v in variants:
        rs = runs[v]
        print(
            f"| {v:<22} | {med(r.rps for r in rs):7.0f} | {med(r.p50_ms for r in rs):6.2f} | {med(r.p99_ms for r in rs):6.2f} | "
            f"{med(r.errors for r in rs):6.0f} | {med(r.gw_cpu for r in rs):5.0f}% | {med(r.up_cpu for r in rs):5.0f}% | "
            f"{med(r.wrk_cpu for r in rs):6.0f}% | {' / '.join(f'{r.rps:.0f}' for r in rs):<20} |"
        )
    print("\nCPU columns: % of one core during the measured window (gateway, upstream stand-in, wrk).")
    for v in variants:
        print(f"  {v}: {VARIANTS[v]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({v: [r.__dict__ for r in rs] for v, rs in runs.items()}, f, indent=1)


def _child() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--expected-len", type=int)
    p.add_argument("--variant")
    p.add_argument("--upstream")
    a = p.parse_args()
    if a.role == "_serve-upstream":
        serve_upstream(a.fd, a.expected_len)
    else:
        serve_gateway(a.fd, a.variant, a.upstream)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_serve-"):
        _child()
    else:
        main()
