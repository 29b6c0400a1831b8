"""One appointment per booking through lost answers, lapsed leases, the durable queue and Redis
restarts: gateway on a real port, real Redis, the Health Cloud sandbox over real HTTP."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import redis.asyncio as aredis

from gateway.booking import codemaps
from gateway.booking.booker import Booker
from gateway.cli import main as cli
from gateway.state.embedded_redis import EmbeddedRedis
from gateway.state.idempotency import IdempotencyStore, fingerprint
from gateway.state.queue import BookingQueue
from tests.conftest import CLIENT_ID, CLIENT_SECRET, CONFIG, VIDEO_VISIT, auth, corpus, make_settings, serve_gateway
from tests.conftest import visit_records, warm


def state(sandbox):
    return sandbox.app.state.sandbox


def config_dir(tmp_path: Path, prefix: str, *, queue_source: str | None = None, settle: float = 0.3,
               lease: float = 1.0, max_attempts: int = 3) -> Path:
    """The shipped config with this test's Redis prefix and quick timings; `queue_source` delivers
    through the durable queue."""
    target = tmp_path / "config"
    shutil.copytree(CONFIG, target)
    toml = (target / "gateway.toml").read_text()
    if queue_source:
        toml = toml.replace(f'adapter = "{queue_source}"', f'adapter = "{queue_source}"\ndelivery = "queue"', 1)
    toml = toml.replace("[idempotency]", f"[idempotency]\nin_doubt_settle_seconds = {settle}")
    toml = toml.replace("lease_seconds = 60", f"lease_seconds = {lease}")
    toml = toml.replace("timeout_seconds = 20", "timeout_seconds = 0.8")
    toml += (f'\n[redis]\nkey_prefix = "{prefix}"\n\n[queue]\nmax_attempts = {max_attempts}\n'
             "backoff_base_seconds = 0.05\nbackoff_max_seconds = 0.2\npoll_seconds = 0.05\n")
    (target / "gateway.toml").write_text(toml)
    return target


async def book(client: httpx.AsyncClient, key: str, body: bytes | None = None) -> httpx.Response:
    return await client.post("/fhir/cerner/Appointment", content=body or corpus(VIDEO_VISIT),
                             headers=auth(**{"Idempotency-Key": key}))


async def until(predicate, timeout: float = 10.0, step: float = 0.05):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(step)


async def test_in_doubt_booking_is_sent_again_only_after_the_settle_window(redis_url, prefix, sandbox, tmp_path):
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=config_dir(tmp_path, prefix, settle=0.5))
    async with serve_gateway(settings) as gw:
        await warm(gw)  # the people looked up first: the faults below meet the Book
        # a proxy's 502 page before the org stored anything: not Salesforce's word, so Salesforce may
        # still be working on it for all the gateway knows
        state(sandbox).faults.set(book_answer=1, book_answer_status=502, book_answer_body="html",
                                  book_answer_before_store=True)
        first = await book(gw, "doubt-1")
        assert first.status_code == 502 and first.headers["retry-after"] == "1"
        soon = await book(gw, "doubt-1")
        assert soon.status_code == 503 and int(soon.headers["retry-after"]) >= 1
        assert state(sandbox).counters().book_calls == 1  # looked up, not re-sent
        await asyncio.sleep(0.6)
        settled = await book(gw, "doubt-1")
        assert settled.status_code == 201
        assert state(sandbox).counters().book_calls == 2
        assert [a.id for a in state(sandbox).appointments()] == [settled.json()["id"]]


@pytest.mark.parametrize("status", [503, 500])
async def test_after_salesforces_own_error_the_look_up_is_final_and_the_retry_is_sent_at_once(
        redis_url, prefix, sandbox, tmp_path, status):
    """Salesforce answered in full, in its own error shape (SERVER_UNAVAILABLE, UNKNOWN_EXCEPTION): it
    is done with the request, so the look-up that finds nothing is final; no settle window (60 s
    here) holds the EHR's retry back."""
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=config_dir(tmp_path, prefix, settle=60))
    async with serve_gateway(settings) as gw:
        await warm(gw)
        state(sandbox).faults.set(server_error=1, server_error_status=status)
        first = await book(gw, f"blip-{status}")
        assert first.status_code in (502, 503) and first.headers["retry-after"]
        again = await book(gw, f"blip-{status}")  # at once, as soon as the EHR retries
        assert again.status_code == 201, again.text
        assert state(sandbox).counters().book_calls == 2
        assert [a.id for a in state(sandbox).appointments()] == [again.json()["id"]]


async def test_timeout_while_salesforce_still_works_is_found_not_resent(redis_url, prefix, sandbox, tmp_path):
    """Salesforce stores the booking after the gateway gave up waiting: the look-up after the
    settle window finds it, and it is adopted instead of booked twice."""
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=config_dir(tmp_path, prefix, settle=1.5))
    async with serve_gateway(settings) as gw:
        await warm(gw)
        state(sandbox).faults.set(latency_ms=1200)  # longer than the gateway's 0.8 s timeout
        first = await book(gw, "slow-1")
        assert first.status_code == 502 and "may or may not" in first.text
        state(sandbox).faults.set(latency_ms=0)
        await until(lambda: asyncio.sleep(0, len(state(sandbox).appointments()) == 1))
        await asyncio.sleep(1.6)
        settled = await book(gw, "slow-1")
        assert settled.status_code == 201
        stored = state(sandbox).appointments()
        assert len(stored) == 1 and settled.json()["id"] == stored[0].id
        assert state(sandbox).counters().book_calls == 1


async def _send_as_a_dead_worker(sandbox, settings, key: str) -> tuple[str, str]:
    """What a worker killed mid-booking leaves: the record's lease, and maybe a stored booking.
    Returns the record key and the Salesforce request body it sent."""
    maps = codemaps.load_all(settings.config_dir, list(settings.sources))
    prepared = Booker(settings.sources, maps).prepare("cerner", corpus(VIDEO_VISIT))
    store = IdempotencyStore(aredis.Redis.from_url(settings.redis_url), settings.file.redis.key_prefix,
                             lease_seconds=0.5, retention_hours=1)
    record = store.record_key("cerner", "h:" + key)
    assert (await store.claim(record, fingerprint(prepared.booking))).state == "new"
    # what it sent named the org's records, as the gateway sends them
    sent = msgspec.to_builtins(prepared.mapped.request)
    records = visit_records(sandbox)
    sent["participants"] = [{"reference": records[p["reference"].partition("/")[0]]} for p in sent["participants"]]
    sent["slots"] = [{**slot, "reference": records["Practitioner"]} for slot in sent["slots"]]
    return record, msgspec.json.encode(sent).decode()


@pytest.mark.parametrize("reached_salesforce", [True, False])
async def test_a_killed_workers_lease_lapses_and_the_retry_looks_first(
    redis_url, prefix, sandbox, tmp_path, reached_salesforce
):
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=config_dir(tmp_path, prefix, settle=0.2))
    _, request = await _send_as_a_dead_worker(sandbox, settings, "killed-1")
    claimed = time.monotonic()
    if reached_salesforce:
        async with httpx.AsyncClient(base_url=sandbox.url) as sf:
            token = (await sf.post("/services/oauth2/token", data={
                "grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})).json()
            sent = await sf.post("/services/data/v66.0/connect/health/appointment-management/appointment",
                                 content=request, headers={"Authorization": f"Bearer {token['access_token']}",
                                                           "Content-Type": "application/json"})
        assert sent.status_code in (200, 201)
    async with serve_gateway(settings) as gw:
        busy = await book(gw, "killed-1")
        if time.monotonic() - claimed < 0.4:  # on a loaded machine the 0.5 s lease may be over already
            assert busy.status_code == 409 and "retry-after" in busy.headers  # the lease still runs
        await asyncio.sleep(0.6)
        taken = busy if busy.status_code == 201 else await book(gw, "killed-1")
        if not reached_salesforce and taken.status_code == 503:  # lease end + settle not yet past
            await asyncio.sleep(0.3)
            taken = await book(gw, "killed-1")
        assert taken.status_code == 201, taken.text
        stored = state(sandbox).appointments()
        assert len(stored) == 1 and taken.json()["id"] == stored[0].id
        assert state(sandbox).counters().book_calls == 1
        assert state(sandbox).counters().appointment_queries >= 1


async def test_queue_source_answers_202_then_the_booking(redis_url, prefix, sandbox, tmp_path):
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=config_dir(tmp_path, prefix, queue_source="cerner"))
    async with serve_gateway(settings) as gw:
        await warm(gw)  # the people looked up first: the spent allowance meets the Book
        state(sandbox).faults.set(request_limit_exceeded=2)  # the org's allowance is spent, twice
        first = await book(gw, "queued-1")
        assert first.status_code == 202, first.text
        outcome = first.json()
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["severity"] == "information"

        async def booked():
            r = await book(gw, "queued-1")
            assert r.status_code in (202, 201)
            return r if r.status_code == 201 else None

        done = await until(booked)
        stored = state(sandbox).appointments()
        assert len(stored) == 1 and done.json()["id"] == stored[0].id
        assert state(sandbox).counters().book_calls == 3  # the refused one, one retry refused, one booked
        depth = await BookingQueue(aredis.Redis.from_url(redis_url), prefix).depth("cerner")
        assert depth == {"ready": 0, "delayed": 0, "dead": 0}


async def test_dead_letter_then_replay_and_drop_from_the_command_line(redis_url, prefix, sandbox, tmp_path, monkeypatch, capsys):
    cfg = config_dir(tmp_path, prefix, queue_source="cerner", max_attempts=2)
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=cfg)
    monkeypatch.setenv("REDIS_URL", redis_url)
    queue = BookingQueue(aredis.Redis.from_url(redis_url), prefix)
    other = msgspec.json.decode(corpus(VIDEO_VISIT))
    other["start"], other["end"] = "2026-12-01T13:00:00Z", "2026-12-01T13:15:00Z"
    async with serve_gateway(settings) as gw:
        await warm(gw)
        state(sandbox).faults.set(request_limit_exceeded=1000)
        assert (await book(gw, "dead-1")).status_code == 202
        assert (await book(gw, "dead-2", msgspec.json.encode(other))).status_code == 202

        async def both_dead():
            return (await queue.depth("cerner"))["dead"] == 2

        await until(both_dead)
        assert (await book(gw, "dead-1")).status_code == 202  # still held, for an operator

        capsys.readouterr()
        assert await asyncio.to_thread(cli, ["queue", "--config", str(cfg), "list"]) == 0
        listing = capsys.readouterr().out
        assert listing.count("dead") == 2 and "REQUEST_LIMIT_EXCEEDED" in listing
        assert "12724066" not in listing  # the patient's id is never shown
        dead = [e for e in await queue.list("cerner") if e.where == "dead"]
        assert all(e.item.attempts == 2 for e in dead)
        first_id, second_id = (e.id for e in sorted(dead, key=lambda e: e.item.accepted_ms))

        state(sandbox).faults.set(request_limit_exceeded=0)
        assert await asyncio.to_thread(cli, ["queue", "--config", str(cfg), "replay", "cerner", first_id]) == 0
        assert await asyncio.to_thread(cli, ["queue", "--config", str(cfg), "replay", "cerner", first_id]) == 1

        async def booked():
            r = await book(gw, "dead-1")
            return r if r.status_code == 201 else None

        done = await until(booked)
        assert [a.id for a in state(sandbox).appointments()] == [done.json()["id"]]

        assert await asyncio.to_thread(cli, ["queue", "--config", str(cfg), "drop", "cerner", second_id]) == 0
        assert (await queue.depth("cerner")) == {"ready": 0, "delayed": 0, "dead": 0}
        # dropped: the EHR's next retry is a fresh attempt, and Salesforce takes it now
        again = await book(gw, "dead-2", msgspec.json.encode(other))
        assert again.status_code == 201
        assert len(state(sandbox).appointments()) == 2


async def test_queue_entry_of_a_dead_consumer_is_reclaimed(redis_url, prefix, sandbox, tmp_path):
    """A worker read the entry and died before settling it: after a lease of idleness another
    worker takes it over (XAUTOCLAIM) and books it, once."""
    cfg = config_dir(tmp_path, prefix, queue_source="cerner", lease=1.0)
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=cfg)
    client = aredis.Redis.from_url(redis_url)
    queue = BookingQueue(client, prefix)
    state(sandbox).faults.set(request_limit_exceeded=1)
    # the gateway accepts it into the queue, but its own worker is off: a consumer that then dies
    async with serve_gateway(settings, run_queue_workers=False) as gw:
        assert (await book(gw, "orphan-1")).status_code == 202
        taken = await queue.read("cerner", "doomed-consumer", count=5, block_ms=10, reclaim_idle_ms=60_000)
        assert len(taken) == 1  # read, never acknowledged
    async with serve_gateway(settings) as gw:
        async def booked():
            r = await book(gw, "orphan-1")
            return r if r.status_code == 201 else None

        done = await until(booked)
        assert [a.id for a in state(sandbox).appointments()] == [done.json()["id"]]
        assert await client.xpending(queue.keys("cerner")[0], "delivery") == {
            "pending": 0, "min": None, "max": None, "consumers": []}
    await client.aclose()


async def test_redis_restart_keeps_every_record(prefix, sandbox, tmp_path):
    """Redis killed outright and started again on its append-only file: the booking is replayed,
    not made twice, and while Redis is down the gateway fails closed."""
    data = tmp_path / "redis"
    server = EmbeddedRedis(data).start()
    try:
        settings = make_settings(server.url, prefix, sandbox.url)
        async with serve_gateway(settings) as gw:
            first = await book(gw, "restart-1")
            assert first.status_code == 201
            server.kill()
            down = await book(gw, "restart-1")
            assert down.status_code == 503 and "retry-after" in down.headers
            assert state(sandbox).counters().book_calls == 1  # nothing forwarded without its record
            server.start()
            again = await until(lambda: _ok(book(gw, "restart-1")))
            assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
            assert len(state(sandbox).appointments()) == 1
    finally:
        server.stop()


async def _ok(pending):
    r = await pending
    return r if r.status_code != 503 else None


async def test_the_gateway_on_a_redis_cluster(redis_cluster_url, prefix, sandbox, tmp_path):
    """The whole path on three masters: records, tokens and the queue, each script in one slot."""
    cfg = config_dir(tmp_path, prefix, queue_source="cerner")
    (cfg / "gateway.toml").write_text((cfg / "gateway.toml").read_text().replace(
        "[redis]\n", "[redis]\ncluster = true\n"))
    settings = make_settings(redis_cluster_url, prefix, sandbox.url, config_dir=cfg)
    assert settings.file.redis.cluster
    state(sandbox).faults.set(request_limit_exceeded=1, drop_after_store=1)
    async with serve_gateway(settings) as gw:
        first = await book(gw, "cluster-1")
        assert first.status_code == 202  # the allowance was spent: queued
        done = await until(lambda: _booked(book(gw, "cluster-1")))
        other = msgspec.json.decode(corpus(VIDEO_VISIT))
        other["start"], other["end"] = "2026-12-02T13:00:00Z", "2026-12-02T13:15:00Z"
        other["identifier"] = [{"system": "urn:oid:1.2.3", "value": "cluster-appt-2"}]
        second = await book(gw, "cluster-2", msgspec.json.encode(other))
        assert second.status_code == 201
        replay = await book(gw, "cluster-2", msgspec.json.encode(other))
        assert replay.content == second.content and replay.headers["idempotent-replayed"] == "true"
        stored = {a.id for a in state(sandbox).appointments()}
        assert stored == {done.json()["id"], second.json()["id"]}
        assert state(sandbox).counters().dropped_connections == 1  # one answer lost, adopted
        # its links live in other slots than its record: written just after the answer, and found
        del other["id"]  # Cerner's own id: a conditional update's body may carry only the appointment's
        cancelled = await gw.put("/fhir/cerner/Appointment?identifier=urn:oid:1.2.3|cluster-appt-2",
                                 content=msgspec.json.encode({**other, "status": "cancelled"}), headers=auth())
        assert cancelled.status_code == 200 and cancelled.json()["id"] == second.json()["id"], cancelled.text
        assert state(sandbox).get(second.json()["id"]).status == "Cancelled"
        assert state(sandbox).counters().appointment_queries == 1  # the lost answer's look-up only: the link was there


async def _booked(pending):
    r = await pending
    return r if r.status_code == 201 else None


def breaker_config(tmp_path: Path, prefix: str, *, window: float = 5, open_for: float = 0.6, **kw) -> Path:
    cfg = config_dir(tmp_path, prefix, **kw)
    (cfg / "gateway.toml").write_text((cfg / "gateway.toml").read_text() + (
        f"\n[breaker]\nmin_calls = 4\nfailure_ratio = 0.5\nwindow_seconds = {window}\nopen_seconds = {open_for}\n"
        "sync_interval_seconds = 0.05\n"))
    return cfg


def variant(n: int) -> bytes:
    data = msgspec.json.decode(corpus(VIDEO_VISIT))
    data["start"], data["end"] = f"2026-12-03T0{n // 6}:{n % 6}0:00Z", f"2026-12-03T0{n // 6}:{n % 6}5:00Z"
    return msgspec.json.encode(data)


async def test_circuit_opens_for_every_worker_then_a_probe_closes_it(redis_url, prefix, sandbox, tmp_path):
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=breaker_config(tmp_path, prefix))
    # two gateways on one Redis: two workers, one breaker
    async with serve_gateway(settings) as gw, serve_gateway(settings) as other:
        await warm(gw)  # cached for both: one Redis
        # Salesforce in maintenance: each Book's 503 (in doubt) and the look-up that follows it
        state(sandbox).faults.set(server_error=8, server_error_status=503)
        for n in range(4):
            assert (await book(gw, f"cb-{n}", variant(n))).status_code == 503
        assert state(sandbox).counters().book_calls == 4
        await asyncio.sleep(0.2)  # a sync or two
        refused = await book(other, "cb-9", variant(9))  # the other gateway never saw a failure
        assert refused.status_code == 503 and "circuit open" in refused.text
        assert 1 <= int(refused.headers["retry-after"]) <= 1
        assert state(sandbox).counters().book_calls == 4  # refused at once, nothing sent
        assert (await other.get("/health/ready")).json()["circuit"] == "open"
        await asyncio.sleep(0.7)  # open_seconds: half-open, one probe may go
        probe = await book(other, "cb-9", variant(9))
        assert probe.status_code == 201
        await asyncio.sleep(0.2)
        assert (await book(gw, "cb-10", variant(10))).status_code == 201
        assert (await gw.get("/health/ready")).json()["circuit"] == "closed"


async def test_look_ups_that_work_do_not_keep_the_circuit_closed_while_book_fails(redis_url, prefix, sandbox, tmp_path):
    """Every Book fails (a proxy's 502) while every in-doubt look-up works, the EHRs' retries within
    the settle window adding more: only Book's health counts, so the circuit opens all the same."""
    # a window and an open spell long enough for a loaded machine: the sixteen calls below may take
    # seconds, and a poll of readiness must not miss a spell that ends in 0.6 s
    cfg = breaker_config(tmp_path, prefix, settle=30, window=30, open_for=10)
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=cfg)
    async with serve_gateway(settings) as gw:
        state(sandbox).faults.set(book_answer=1000, book_answer_status=502, book_answer_body="html",
                                  book_answer_before_store=True)
        for n in range(4):
            assert (await book(gw, f"out-{n}", variant(n))).status_code == 502
            for _ in range(3):  # retried: looked up (found nothing, healthy), not re-sent
                assert (await book(gw, f"out-{n}", variant(n))).status_code == 503
        counters = state(sandbox).counters()
        # each failure looked up at once (more on the retries, until the circuit refuses them too)
        assert counters.book_calls == 4 and counters.appointment_queries >= 4
        await until(lambda: _circuit(gw, "open"), timeout=5)
        refused = await book(gw, "out-9", variant(9))
        assert refused.status_code == 503 and "circuit open" in refused.text
        assert state(sandbox).counters().book_calls == 4  # refused at once, nothing sent


async def _circuit(gw, wanted: str) -> bool:
    return (await gw.get("/health/ready")).json()["circuit"] == wanted


@pytest.mark.parametrize("sandbox_config", [{"require_channel_id": True}], indirect=True)
async def test_refusals_are_answers_not_failures(redis_url, prefix, sandbox, tmp_path):
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=breaker_config(tmp_path, prefix))
    async with serve_gateway(settings) as gw:
        for n in range(8):  # Salesforce refuses each (no channelId): a client mistake, 422
            assert (await book(gw, f"ref-{n}", variant(n))).status_code == 422
        for n in range(3):
            assert (await book(gw, "ref-0", variant(0))).status_code == 422  # replayed, not sent
        await asyncio.sleep(0.2)
        assert (await gw.get("/health/ready")).json()["circuit"] == "closed"
        assert state(sandbox).counters().book_calls == 8


async def test_open_circuit_sends_queue_sources_to_the_queue(redis_url, prefix, sandbox, tmp_path):
    # attempts made before the circuit opens (within a sync) do count: leave room for them
    cfg = breaker_config(tmp_path, prefix, queue_source="cerner", max_attempts=8)
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=cfg)
    async with serve_gateway(settings) as gw:
        await warm(gw)
        state(sandbox).faults.set(server_error=1000, server_error_status=503)
        for n in range(4):
            assert (await book(gw, f"cq-{n}", variant(n))).status_code == 202
        await asyncio.sleep(0.2)
        calls = state(sandbox).counters().book_calls
        assert (await gw.get("/health/ready")).json()["circuit"] == "open"
        accepted = await book(gw, "cq-9", variant(9))  # queued at once, Salesforce not tried
        assert accepted.status_code == 202
        await asyncio.sleep(0.3)
        # while the circuit is open, deliveries pause without spending attempts
        assert state(sandbox).counters().book_calls <= calls + 1  # at most a half-open probe
        state(sandbox).faults.set(server_error=0)
        for n in [*range(4), 9]:  # the queue delivers everything once a probe has closed the circuit
            await until(lambda n=n: _booked(book(gw, f"cq-{n}", variant(n))), timeout=15)
        assert len(state(sandbox).appointments()) == 5
        depth = await BookingQueue(aredis.Redis.from_url(redis_url), prefix).depth("cerner")
        assert depth == {"ready": 0, "delayed": 0, "dead": 0}


async def test_two_gateways_on_one_redis_make_one_appointment(redis_url, prefix, sandbox, tmp_path):
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=config_dir(tmp_path, prefix))
    state(sandbox).faults.set(latency_ms=150)  # the first call is still in flight when the others arrive
    async with serve_gateway(settings) as a, serve_gateway(settings) as b:
        answers = await asyncio.gather(*(book(gw, "both-1") for gw in [a, b] * 10))
        assert sorted({r.status_code for r in answers}) == [201, 409]
        assert [r.status_code for r in answers].count(201) == 1
        later = await asyncio.gather(book(a, "both-1"), book(b, "both-1"))
        ids = {r.json()["id"] for r in [*later, *(r for r in answers if r.status_code == 201)]}
        assert len(ids) == 1 and [x.id for x in state(sandbox).appointments()] == list(ids)
        assert state(sandbox).counters().book_calls == 1
