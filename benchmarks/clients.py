"""CPU per call of the clients the booking path could use: HTTP toward Salesforce, and Redis.

    .venv/bin/python -m benchmarks.clients [--seconds 4] [--rounds 3] [--concurrency 32]

Why: the gateway's own HTTP client (gateway/outbound/http.py) and Redis link
(gateway/state/redis_mux.py) replace libraries; this is the measurement that justifies it, and it can be
rerun when the libraries change. Each case runs in a fresh process: `--concurrency` tasks, each
calling in a loop, one shared client; after a 1 s warm-up, calls/s and the process's CPU time per
call (all threads, so clients that work in threads of their own are counted whole) over `--seconds`.
Rounds interleave the cases; medians are printed.

HTTP: POST of an 800-byte JSON to the Book endpoint of the Salesforce stand-in
(benchmarks/standin.py), answer read whole. Clients not installed are skipped (the `bench` extra
has aiohttp, httpx and httpx-aiohttp; pyreqwest, rnet, aiosonic and niquests were measured by
installing them by hand: see benchmarks/README.md). Redis: a Lua script like the idempotency
claim (HSET + PEXPIRE, a two-item reply) through redis-py (with hiredis) and through the
pipelined link; on `REDIS_URL` when set (keys under a unique prefix, expiring in 10 s), else an
embedded Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.baselines.common import listening_socket
from benchmarks.standin import TOKEN

BOOK = "/services/data/v66.0/connect/health/appointment-management/appointment"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", "Accept": "application/json"}
BODY = json.dumps({"workTypeId": "08qxx0000000001AAA", "comments": "x" * 700}).encode()
LUA = "redis.call('HSET', KEYS[1], 'a', ARGV[1]) redis.call('PEXPIRE', KEYS[1], 10000) return {'new', ARGV[1]}"

HTTP_CASES = ["gateway", "aiohttp", "httpx", "httpx-aiohttp", "pyreqwest", "rnet", "aiosonic", "niquests"]
REDIS_CASES = ["redis-py", "gateway-link"]


# ----------------------------------------------------------------------------- one case, in a child

async def _http_client(name: str, base: str, n: int):
    """(call, close) for one HTTP client; ImportError when it is not installed."""
    url = base + BOOK
    if name == "gateway":
        from gateway.outbound.http import HttpClient
        from gateway.settings import SalesforceTuning

        c = HttpClient(SalesforceTuning(max_concurrent_calls=n))

        async def call() -> int:
            return (await c.request("POST", url, body=BODY, headers=HEADERS)).status
        return call, c.aclose
    if name == "aiohttp":
        import aiohttp

        s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n), cookie_jar=aiohttp.DummyCookieJar())

        async def call() -> int:
            async with s.post(url, data=BODY, headers=HEADERS) as r:
                await r.read()
                return r.status
        return call, s.close
    if name in ("httpx", "httpx-aiohttp"):
        import httpx

        kw = {}
        if name == "httpx-aiohttp":
            from httpx_aiohttp import AiohttpTransport

            kw["transport"] = AiohttpTransport()
        h = httpx.AsyncClient(limits=httpx.Limits(max_connections=n, max_keepalive_connections=n), **kw)

        async def call() -> int:
            return (await h.post(url, content=BODY, headers=HEADERS)).status_code
        return call, h.aclose
    if name == "pyreqwest":
        from pyreqwest.client import ClientBuilder

        p = ClientBuilder().default_headers(HEADERS).pool_max_idle_per_host(n).build()

        async def call() -> int:
            r = await p.post(url).body_bytes(BODY).build().send()
            await r.bytes()
            return r.status
        return call, p.close
    if name == "rnet":
        import rnet

        r_ = rnet.Client(default_headers=HEADERS, pool_max_idle_per_host=n, http1_only=True)

        async def call() -> int:
            r = await r_.post(url, body=BODY)
            await r.bytes()
            return r.status

        async def close() -> None:
            pass
        return call, close
    if name == "aiosonic":
        import aiosonic
        from aiosonic.connectors import TCPConnector
        from aiosonic.pools import PoolConfig

        # max_conn_requests=None: aiosonic 1.3.3 otherwise reconnects for every call after 1,000
        a = aiosonic.HTTPClient(connector=TCPConnector(pool_configs={":default": PoolConfig(size=n, max_conn_requests=None)}))

        async def call() -> int:
            r = await a.post(url, data=BODY, headers=HEADERS)
            await r.content()
            return r.status_code
        return call, a.aclose
    if name == "niquests":
        import niquests

        q = niquests.AsyncSession(pool_maxsize=n, disable_http2=True, disable_http3=True)

        async def call() -> int:
            return (await q.post(url, data=BODY, headers=HEADERS)).status_code
        return call, q.close
    raise ValueError(name)


async def _redis_client(name: str, url: str):
    prefix = f"ehrgw-clients-{uuid.uuid4().hex[:8]}"
    if name == "redis-py":
        import redis.asyncio as redis

        client = redis.Redis.from_url(url, socket_timeout=2)
        close = client.aclose
    else:
        from gateway.state.redis_mux import MultiplexedRedis

        client = MultiplexedRedis(url)
        close = client.aclose
    script = client.register_script(LUA)
    counter = iter(range(10**9))

    async def call() -> bytes:
        reply = await script(keys=[f"{prefix}:{next(counter)}"], args=["x" * 100])
        return reply[0]
    return call, close


async def _measure(kind: str, name: str, target: str, n: int, seconds: float) -> dict[str, float]:
    if kind == "http":
        call, close = await _http_client(name, target, n)
        expect: object = 201
    else:
        call, close = await _redis_client(name, target)
        expect = b"new"
    calls = 0
    stop_at = 0.0

    async def worker() -> None:
        nonlocal calls
        while time.perf_counter() < stop_at:
            got = await call()
            if got != expect:
                raise SystemExit(f"{name}: unexpected answer {got!r}")
            calls += 1

    stop_at = time.perf_counter() + 1.0  # warm-up: connections made, code paths warm
    await asyncio.gather(*(worker() for _ in range(n)))
    calls = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    stop_at = t0 + seconds
    await asyncio.gather(*(worker() for _ in range(n)))
    cpu1, t1 = time.process_time(), time.perf_counter()
    await close()
    return {"calls_per_s": calls / (t1 - t0), "cpu_us": (cpu1 - cpu0) / calls * 1e6}


def _child(argv: list[str]) -> None:
    import uvloop

    kind, name, target, n, seconds = argv[0], argv[1], argv[2], int(argv[3]), float(argv[4])
    try:
        result = uvloop.run(_measure(kind, name, target, n, seconds))
    except ImportError:
        result = {"skipped": "not installed"}
    print(json.dumps(result))


# ----------------------------------------------------------------------------- the run


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return _child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=32)
    a = p.parse_args()

    sock = listening_socket()
    port = sock.getsockname()[1]
    standin = subprocess.Popen([sys.executable, "-m", "benchmarks.standin", "--fd", str(sock.fileno())],
                               pass_fds=[sock.fileno()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock.close()
    embedded = None
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        from gateway.state.embedded_redis import EmbeddedRedis

        embedded = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="clients-redis-")), appendonly=False).start()
        redis_url = embedded.url
    base = f"http://127.0.0.1:{port}"
    time.sleep(0.5)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for _ in range(a.rounds):
            for kind, names, target in (("http", HTTP_CASES, base), ("redis", REDIS_CASES, redis_url)):
                for name in names:
                    out = subprocess.run([sys.executable, "-m", "benchmarks.clients", "--child", kind, name, target,
                                          str(a.concurrency), str(a.seconds)], capture_output=True, text=True)
                    if out.returncode != 0:
                        raise SystemExit(f"{kind} {name} failed:\n{out.stderr[-2000:]}")
                    results.setdefault((kind, name), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        standin.terminate()
        if embedded is not None:
            embedded.stop()
    print(f"{a.concurrency} concurrent callers, {a.seconds:g} s per run, median of {a.rounds} rounds")
    print(f"{'':6} {'client':16} {'calls/s':>9} {'CPU µs/call':>12}")
    for (kind, name), runs in results.items():
        if "skipped" in runs[0]:
            print(f"{kind:6} {name:16} {'not installed':>22}")
            continue
        rate = statistics.median(r["calls_per_s"] for r in runs)
        cpu = statistics.median(r["cpu_us"] for r in runs)
        print(f"{kind:6} {name:16} {rate:9,.0f} {cpu:12.1f}")


if __name__ == "__main__":
    main()
