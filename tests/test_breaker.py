"""The Salesforce circuit breaker against a real Redis: two breakers on one prefix stand for two
workers (or two gateways), each with its own client, as separate processes would have."""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from gateway.state.breaker import CircuitBreaker
from gateway.state.embedded_redis import EmbeddedRedis
from gateway.errors import Unavailable


class CountingRedis(aioredis.Redis):
    """A real client that counts the commands it sends (scripts included: they go through here)."""

    commands = 0

    async def execute_command(self, *args, **options):  # type: ignore[no-untyped-def]
        self.commands += 1
        return await super().execute_command(*args, **options)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[CountingRedis]:
    c = CountingRedis.from_url(redis_url)
    yield c
    await c.aclose()


@pytest.fixture
async def other(redis_url: str) -> AsyncIterator[CountingRedis]:
    c = CountingRedis.from_url(redis_url)
    yield c
    await c.aclose()


def breaker(client: aioredis.Redis, prefix: str, **options: float) -> CircuitBreaker:
    options.setdefault("probe_timeout_seconds", 5.0)
    return CircuitBreaker(client, prefix, **options)  # type: ignore[arg-type]


async def record(b: CircuitBreaker, successes: int = 0, failures: int = 0) -> None:
    for _ in range(successes):
        await b.record_success()
    for _ in range(failures):
        await b.record_failure()


async def trip(b: CircuitBreaker) -> None:
    await record(b, failures=25)
    assert await b.sync() == "open"


async def half_open_pair(client: CountingRedis, other: CountingRedis, prefix: str) -> tuple[CircuitBreaker, CircuitBreaker]:
    """Two workers' breakers on one Redis, tripped by the first, seen open by both, now past open_seconds."""
    a, b = breaker(client, prefix, open_seconds=0.3), breaker(other, prefix, open_seconds=0.3)
    await trip(a)
    assert await b.sync() == "open"
    await asyncio.sleep(0.35)
    return a, b


async def until(condition: Callable[[], object], timeout: float = 2.0) -> None:
    for _ in range(int(timeout / 0.01)):
        met = condition()
        if await met if inspect.isawaitable(met) else met:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def attempt(b: CircuitBreaker, gate: asyncio.Event, *, ok: bool) -> bool:
    """One Salesforce call as the client will make it; True if it went through (was the probe)."""
    try:
        await b.before_call()
    except Unavailable:
        return False
    await gate.wait()  # keep the probe in flight while the other callers try
    await (b.record_success() if ok else b.record_failure())
    return True


async def test_hot_path_does_no_redis_round_trip(client: CountingRedis, prefix: str) -> None:
    b = breaker(client, prefix)
    await b.sync()
    before = client.commands
    for i in range(1000):
        await b.before_call()
        await (b.record_failure() if i % 10 == 0 else b.record_success())
    assert client.commands == before
    assert b.snapshot().unsynced_successes == 900 and b.snapshot().unsynced_failures == 100
    assert await b.sync() == "closed"  # 10% failures
    assert client.commands == before + 1  # the counter does see the breaker's traffic: one round trip
    assert (b.snapshot().window_calls, b.snapshot().window_failures) == (1000, 100)
    assert b.snapshot().unsynced_successes == b.snapshot().unsynced_failures == 0


async def test_stays_closed_below_the_ratio(client: CountingRedis, prefix: str) -> None:
    b = breaker(client, prefix)
    await record(b, successes=80, failures=20)
    assert await b.sync() == "closed"
    await record(b, successes=40, failures=59)  # 79 of 199: still below half
    assert await b.sync() == "closed"
    await b.before_call()
    assert await client.exists(b.keys["state"], b.keys["tripped"]) == 0


async def test_needs_min_calls_then_opens_at_the_ratio(client: CountingRedis, prefix: str) -> None:
    # an hour-long bucket, so both syncs land in the same one
    b = breaker(client, prefix, window_seconds=3600)
    await record(b, failures=19)
    assert await b.sync() == "closed"
    await record(b, successes=1)  # 19 failures of 20 calls
    assert await b.sync() == "open"
    assert await client.pttl(b.keys["state"]) > 14_000
    assert await client.exists(b.keys["tripped"]) == 1


async def test_opens_at_exactly_the_ratio(client: CountingRedis, prefix: str) -> None:
    b = breaker(client, prefix, window_seconds=3600)
    await record(b, successes=10, failures=10)
    assert await b.sync() == "open"


async def test_open_refuses_at_once_with_retry_after(client: CountingRedis, prefix: str) -> None:
    b = breaker(client, prefix, open_seconds=15)
    await trip(b)
    before = client.commands
    with pytest.raises(Unavailable) as refused:
        await b.before_call()
    assert client.commands == before  # refused locally, no round trip
    err = refused.value
    assert err.status == 503
    assert 14 <= err.retry_after <= 15  # type: ignore[operator]
    assert err.headers == {"Retry-After": str(err.retry_after)}
    assert "circuit open" in str(err)


async def test_two_workers_share_the_state(client: CountingRedis, other: CountingRedis, prefix: str) -> None:
    a, b = breaker(client, prefix), breaker(other, prefix)
    # failures are spread over both workers: neither alone reaches min_calls
    await record(a, successes=2, failures=10)
    await record(b, failures=10)
    assert await a.sync() == "closed"
    await b.before_call()  # b has not synced yet: its view is still closed
    assert await b.sync() == "open"
    with pytest.raises(Unavailable):
        await b.before_call()
    assert await a.sync() == "open"
    with pytest.raises(Unavailable):
        await a.before_call()
    # a breaker under another prefix (another gateway deployment) is not affected
    c = breaker(client, prefix + "-other")
    assert await c.sync() == "closed"


async def test_half_open_lets_exactly_one_probe_through(
    client: CountingRedis, other: CountingRedis, prefix: str
) -> None:
    a, b = breaker(client, prefix, open_seconds=0.3), breaker(other, prefix, open_seconds=0.3)
    await trip(a)
    assert await b.sync() == "open"
    await asyncio.sleep(0.35)
    assert a.state == b.state == "half_open"
    gate = asyncio.Event()
    calls = [asyncio.create_task(attempt(w, gate, ok=True)) for w in (a, b) * 5]
    await until(lambda: sum(t.done() for t in calls) == 9)  # every caller tried while the probe is in flight
    refused = [t for t in calls if t.done()]
    assert len(refused) == 9 and not any(t.result() for t in refused)
    gate.set()
    assert sum(await asyncio.gather(*calls)) == 1
    assert await client.exists(b.keys["state"], b.keys["tripped"], b.keys["probe"]) == 0
    # the prober's worker knows at once; the other after its next sync
    prober, follower = (a, b) if a.state == "closed" else (b, a)
    assert prober.state == "closed" and follower.state == "half_open"
    assert await follower.sync() == "closed"
    await follower.before_call()


async def test_half_open_refusal_has_a_short_retry_after(
    client: CountingRedis, other: CountingRedis, prefix: str
) -> None:
    a, b = await half_open_pair(client, other, prefix)
    await a.before_call()  # a is the probe (its result never comes in this test)
    with pytest.raises(Unavailable) as refused:
        await b.before_call()
    assert 1 <= refused.value.retry_after <= 2  # type: ignore[operator]
    # b holds its refusal locally for a while: no round trip per refused call
    before = other.commands
    for _ in range(100):
        with pytest.raises(Unavailable):
            await b.before_call()
    assert other.commands == before


async def test_probe_failure_reopens_for_everyone(client: CountingRedis, other: CountingRedis, prefix: str) -> None:
    a, b = await half_open_pair(client, other, prefix)
    gate = asyncio.Event()
    gate.set()
    results = await asyncio.gather(attempt(a, gate, ok=False), attempt(b, gate, ok=False))
    assert sorted(results) == [False, True]
    assert await client.pttl(a.keys["state"]) > 200
    assert await client.exists(a.keys["tripped"]) == 1
    assert await a.sync() == "open" and await b.sync() == "open"
    for w in (a, b):
        with pytest.raises(Unavailable):
            await w.before_call()
    # and the next open period ends in half-open again, with a new probe allowed
    await asyncio.sleep(0.35)
    assert await attempt(b, gate, ok=True)
    assert await a.sync() == "closed"


async def test_an_ordinary_call_ending_during_the_probe_is_not_the_probe(
    client: CountingRedis, other: CountingRedis, prefix: str
) -> None:
    a, b = breaker(client, prefix, open_seconds=0.3), breaker(other, prefix, open_seconds=0.3)
    old_gate, probe_gate = asyncio.Event(), asyncio.Event()
    old = asyncio.create_task(attempt(a, old_gate, ok=False))  # admitted while closed, still running
    await asyncio.sleep(0)
    await trip(b)
    assert await a.sync() == "open"
    await asyncio.sleep(0.35)
    probe = asyncio.create_task(attempt(a, probe_gate, ok=True))
    await until(lambda: client.exists(a.keys["probe"]))  # the probe is elected
    old_gate.set()
    assert await old  # its failure is a plain failure: it must not reopen the circuit
    assert await client.exists(a.keys["state"]) == 0
    assert await client.exists(a.keys["probe"]) == 1  # the probe is still in flight
    probe_gate.set()
    assert await probe
    assert await client.exists(a.keys["state"], a.keys["tripped"]) == 0
    assert a.state == "closed"


async def test_a_stale_half_open_view_does_not_make_a_probe(
    client: CountingRedis, other: CountingRedis, prefix: str
) -> None:
    a, b = await half_open_pair(client, other, prefix)
    gate = asyncio.Event()
    gate.set()
    assert await attempt(b, gate, ok=True)  # b's probe closes the circuit
    assert a.state == "half_open"  # a has not synced since
    await a.before_call()  # Redis says closed: an ordinary call, not a second probe
    assert a.state == "closed"
    await a.record_failure()
    assert await client.exists(a.keys["state"], a.keys["tripped"]) == 0
    assert a.snapshot().unsynced_failures == 1


async def test_sliding_window_forgets_old_failures(client: CountingRedis, prefix: str) -> None:
    b = breaker(client, prefix, window_seconds=0.2)
    await record(b, failures=15)
    assert await b.sync() == "closed"
    await asyncio.sleep(0.45)  # two buckets later: the 15 failures are out of the window
    await record(b, failures=10)
    assert await b.sync() == "closed"
    assert b.snapshot().window_calls == 10
    assert len(await client.hkeys(b.keys["win"])) == 1  # old buckets were dropped


async def test_previous_bucket_counts_for_what_is_left_of_it(client: CountingRedis, prefix: str) -> None:
    window = 0.2
    b = breaker(client, prefix, window_seconds=window)

    async def into_next_bucket(fraction: float) -> None:
        sec, usec = await client.time()  # buckets follow Redis' clock
        await asyncio.sleep(window - (sec + usec / 1e6) % window + fraction * window)

    await into_next_bucket(0.1)
    await record(b, failures=15)
    assert await b.sync() == "closed"
    await into_next_bucket(0.6)  # the 15 now weigh about 0.4
    await record(b, failures=10)
    assert await b.sync() == "closed"  # about 16 calls, not 25
    assert 10 < b.snapshot().window_calls < 20


async def test_redis_errors_in_sync_do_not_raise(prefix: str) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = aioredis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    try:
        b = breaker(dead, prefix)
        await record(b, successes=5, failures=30)
        assert await b.sync() == "closed"
        snap = b.snapshot()
        assert not snap.redis_ok
        assert (snap.unsynced_successes, snap.unsynced_failures) == (5, 30)  # kept for the next sync
        await b.before_call()
    finally:
        await dead.aclose()


async def test_redis_lost_keeps_the_last_view(prefix: str) -> None:
    server = EmbeddedRedis(appendonly=False).start()
    c = aioredis.Redis.from_url(server.url, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    try:
        # open long enough that a slow machine's failed reconnects cannot carry it past the window
        b = breaker(c, prefix, open_seconds=1.5)
        await trip(b)
        server.stop()
        await record(b, failures=3)
        assert await b.sync() == "open"
        assert not b.snapshot().redis_ok and b.snapshot().unsynced_failures == 3
        with pytest.raises(Unavailable):
            await b.before_call()
        await asyncio.sleep(1.55)
        # half-open but Redis cannot elect a probe: refuse (briefly), never leak a Redis error
        with pytest.raises(Unavailable) as refused:
            await b.before_call()
        assert refused.value.retry_after == 1
    finally:
        server.stop()
        await c.aclose()


async def test_run_syncs_in_the_background(client: CountingRedis, other: CountingRedis, prefix: str) -> None:
    a = breaker(client, prefix, sync_interval_seconds=0.05)
    b = breaker(other, prefix, sync_interval_seconds=0.05)
    tasks = [asyncio.create_task(w.run()) for w in (a, b)]
    try:
        await asyncio.sleep(0.02)
        await record(a, failures=20)
        for _ in range(40):
            if b.state == "open":
                break
            await asyncio.sleep(0.01)
        assert a.state == b.state == "open"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert all(t.cancelled() for t in tasks)


def test_keys_share_one_cluster_slot_and_the_prefix(prefix: str) -> None:
    keys = breaker(aioredis.Redis(), prefix).keys.values()
    assert all(k.startswith(prefix + ":") for k in keys)  # the test run's clean-up finds them
    assert len({key_slot(k.encode()) for k in keys}) == 1
    other = breaker(aioredis.Redis(), prefix + "x").keys["state"]
    assert key_slot(other.encode()) != key_slot(next(iter(keys)).encode())  # not one slot for all gateways


async def test_works_on_a_redis_cluster(redis_cluster_url: str, prefix: str) -> None:
    a, b = RedisCluster.from_url(redis_cluster_url), RedisCluster.from_url(redis_cluster_url)
    try:
        wa = breaker(a, prefix, open_seconds=0.3)  # type: ignore[arg-type]
        wb = breaker(b, prefix, open_seconds=0.3)  # type: ignore[arg-type]
        await trip(wa)
        assert wa.snapshot().redis_ok
        assert await wb.sync() == "open"
        await asyncio.sleep(0.35)
        gate = asyncio.Event()  # the probe stays in flight until both workers have tried
        calls = [asyncio.create_task(attempt(w, gate, ok=True)) for w in (wa, wb)]
        await until(lambda: any(t.done() for t in calls))
        gate.set()
        assert sorted(await asyncio.gather(*calls)) == [False, True]
        assert await wa.sync() == "closed" and await wb.sync() == "closed"
    finally:
        await a.aclose()
        await b.aclose()


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(None, "p", failure_ratio=0, probe_timeout_seconds=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CircuitBreaker(None, "p", open_seconds=0, probe_timeout_seconds=1)  # type: ignore[arg-type]
