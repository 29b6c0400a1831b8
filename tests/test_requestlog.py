"""The request log's bounds: strangers and one source can neither flush it nor inflate it. Entries
an operator may act on outlive any number of other entries; refusals at the door are sampled; quoted
values, one entry and the whole log are bounded in bytes. Gateway on a real port, real Redis, the
sandbox over real HTTP; the script itself also on a three-master Cluster."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
import redis.asyncio as aredis
from prometheus_client.parser import text_string_to_metric_families

from gateway.state.requestlog import ENTRY_OVERHEAD, Entry, RequestLog, key_digest
from tests.conftest import KEYS, VIDEO_VISIT, auth, corpus, make_settings, serve_gateway
from tests.test_admin import admin, config_copy, state, wait_for_entries

SERVICE_TYPE_CODE = b'"2572307911"'  # the Video Visit's mapped serviceType code
HUGE = 500_000


def with_code(code: bytes) -> bytes:
    body = corpus(VIDEO_VISIT)
    assert body.count(SERVICE_TYPE_CODE) == 1
    return body.replace(SERVICE_TYPE_CODE, b'"' + code + b'"')


async def entries(gw, **params: str) -> list[dict]:
    r = await gw.get("/admin/api/requests", params={"limit": "1000", **params}, headers=admin())
    assert r.status_code == 200, r.text
    return r.json()["requests"]


async def settled(gw, expected_newest: str) -> list[dict]:
    """Every entry, once the newest request's own has been written (batches are asynchronous)."""
    for _ in range(200):
        found = await entries(gw)
        if any(e["id"] == expected_newest for e in found):
            return found
        await asyncio.sleep(0.05)
    raise AssertionError("the newest entry was never written")


async def failed_booking(gw, sandbox) -> dict:
    """A booking Salesforce cannot take (its allowance spent: certainly nothing stored, so the key is
    free for a replay at once): logged as failed, its input kept."""
    state(sandbox).faults.set(request_limit_exceeded=1)
    r = await gw.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth())
    assert r.status_code == 503, r.text
    [entry] = await wait_for_entries(gw, 1, outcome="failed")
    assert entry["id"] == r.headers["x-request-id"] and entry["replayable"]
    return entry


def rejected_401(text: str) -> float:
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "ehrgw_requests_total" and s.labels.get("status") == "401")


async def test_a_keyless_flood_neither_flushes_the_log_nor_fills_it(redis_url, prefix, sandbox, tmp_path):
    config = config_copy(tmp_path, prefix, request_log="max_entries = 50\nflush_seconds = 0.02")
    async with serve_gateway(make_settings(redis_url, prefix, sandbox.url, config_dir=config)) as gw:
        failed = await failed_booking(gw, sandbox)
        counted = rejected_401((await gw.get("/metrics")).text)
        started, sent = time.monotonic(), 0
        headers = [{"Content-Type": "application/fhir+json"},  # no key
                   {"Content-Type": "application/fhir+json", "Authorization": "Bearer not-a-key"},
                   {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {KEYS['epic']}"}]  # 403
        for _ in range(20):
            answers = await asyncio.gather(*(gw.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT),
                                                     headers=headers[i % 3]) for i in range(30)))
            assert {a.status_code for a in answers} == {401, 403}
            sent += len(answers)
        elapsed = time.monotonic() - started
        await asyncio.sleep(1.1)  # past the sampling window: the next refusal is stored, counting the rest
        last = await gw.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=headers[0])
        assert last.status_code == 401
        sent += 1
        found = await settled(gw, last.headers["x-request-id"])

        # the failed booking is still there, and its replay books it
        assert failed["id"] in [e["id"] for e in found]
        replay = await gw.post(f"/admin/api/requests/{failed['id']}/replay", headers=admin())
        assert replay.status_code == 200, replay.text
        assert replay.json()["replay"]["outcome"] == "booked" and len(state(sandbox).appointments()) == 1
        # strangers' refusals: at most one stored a second (this one worker), each saying how many
        # like it were not; every one counted by the metrics
        door = [e for e in found if e["status"] in (401, 403)]
        assert 2 <= len(door) <= elapsed + 3 and len(door) < sent / 4, (len(door), elapsed)
        assert all("input" not in e and not e["replayable"] and e["outcome"] == "rejected" for e in door)
        assert len(door) + sum(e.get("suppressed", 0) for e in door) == sent
        stats = (await gw.get("/admin/api/stats", headers=admin())).json()["series"]
        assert sum(p["count"] for p in stats if p["outcome"] == "rejected") == sent  # counted back in
        assert rejected_401((await gw.get("/metrics")).text) - counted == 1 + (sent - 1) * 2 // 3


async def test_other_entries_never_push_out_an_actionable_one(redis_url, prefix, sandbox, tmp_path):
    config = config_copy(tmp_path, prefix, request_log="max_entries = 20\nmax_actionable_entries = 3\n"
                                                        "flush_seconds = 0.02")
    async with serve_gateway(make_settings(redis_url, prefix, sandbox.url, config_dir=config)) as gw:
        failed = await failed_booking(gw, sandbox)
        for _ in range(4):  # a source's own bad requests: admitted, stored, other entries
            answers = await asyncio.gather(*(gw.post("/fhir/cerner/Appointment", content=b"{", headers=auth())
                                             for _ in range(25)))
            assert {a.status_code for a in answers} == {400}
        found = await settled(gw, answers[-1].headers["x-request-id"])
        assert [e["id"] for e in found if e["outcome"] == "failed"] == [failed["id"]]
        assert len([e for e in found if e["outcome"] == "rejected"]) == 20
        # actionable entries are bounded among themselves: the oldest goes
        unmapped = [await gw.post("/fhir/cerner/Appointment", content=with_code(b"0000"), headers=auth())
                    for _ in range(3)]
        assert {u.status_code for u in unmapped} == {422}
        found = await settled(gw, unmapped[-1].headers["x-request-id"])
        assert {e["id"] for e in found if e["outcome"] in ("failed", "unmapped")} == {u.headers["x-request-id"] for u in unmapped}
        # an evicted entry leaves the indexes with it: the failed one is gone from every search
        for params in ({"outcome": "failed"}, {"source": "cerner", "limit": "1000"}):
            assert failed["id"] not in [e["id"] for e in await entries(gw, **params)]


async def test_a_huge_unmapped_code_gets_a_small_answer_and_a_small_entry(redis_url, prefix, sandbox, tmp_path):
    config = config_copy(tmp_path, prefix, request_log="flush_seconds = 0.02")
    async with serve_gateway(make_settings(redis_url, prefix, sandbox.url, config_dir=config)) as gw:
        body = with_code(b"7" * HUGE)
        r = await gw.post("/fhir/cerner/Appointment", content=body, headers=auth())
        assert r.status_code == 422 and len(r.content) < 4096, len(r.content)
        quoting = [i for i in r.json()["issue"] if "7777" in i["details"]["text"]]
        assert quoting and all("7" * 127 + "…'" in i["details"]["text"] for i in quoting)
        [entry] = await wait_for_entries(gw, 1, outcome="unmapped")
        # the input is over max_input_bytes: not kept, its size said
        assert entry["input_too_large"] == len(body) and not entry["replayable"]
        raw = aredis.Redis.from_url(redis_url)
        stored = await raw.get(f"{prefix}:log:{{{prefix}:log}}:e:{entry['id']}")
        await raw.aclose()
        assert stored is not None and len(stored) < 4096, len(stored)
        # a huge status is outside its required binding: refused without being repeated
        change = msgspec.json.decode(corpus(VIDEO_VISIT)) | {"status": "x" * HUGE}
        r = await gw.put("/fhir/cerner/Appointment/08pxx0000000001AAA", content=msgspec.json.encode(change),
                         headers=auth())
        assert r.status_code == 400 and len(r.content) < 4096, len(r.content)
        # and a message that quotes a value without `cut` is bounded all the same (the backstop)
        from gateway.errors import Unprocessable
        from gateway.booking.fhir import error_body

        assert len(error_body(Unprocessable("an appointment " + "x" * HUGE + " cannot be sent"))) < 4096


async def test_the_byte_bound_holds_under_a_stream_of_huge_codes(redis_url, prefix, sandbox, tmp_path):
    max_bytes = 65_536
    config = config_copy(tmp_path, prefix, request_log=f"max_bytes = {max_bytes}\nflush_seconds = 0.02")
    async with serve_gateway(make_settings(redis_url, prefix, sandbox.url, config_dir=config)) as gw:
        for _ in range(10):  # other entries: they go first when bytes must be freed
            assert (await gw.post("/fhir/cerner/Appointment", content=b"{", headers=auth())).status_code == 400
        raw = aredis.Redis.from_url(redis_url)
        base = f"{prefix}:log:{{{prefix}:log}}"
        body = with_code(b"7" * HUGE)
        for _ in range(8):
            answers = await asyncio.gather(*(gw.post("/fhir/cerner/Appointment", content=body, headers=auth())
                                             for _ in range(10)))
            assert {a.status_code for a in answers} == {422}
            await settled(gw, answers[-1].headers["x-request-id"])
            values = [v for v in await raw.mget([k async for k in raw.scan_iter(match=f"{base}:e:*")]) if v]
            assert sum(len(v) + ENTRY_OVERHEAD for v in values) <= int(await raw.get(f"{base}:bytes")) <= max_bytes
        found = await entries(gw)
        await raw.aclose()
        assert not [e for e in found if e["outcome"] == "rejected"]  # the others went first
        newest = {a.headers["x-request-id"] for a in answers}
        assert 10 < len(found) < 80 and newest <= {e["id"] for e in found}


def _entry(i: int, outcome: str, *, sf_id: str | None = None, key: str | None = None) -> Entry:
    return Entry(id=f"{i:016x}", time_ms=int(time.time() * 1000) + i, source="cerner", op="book", outcome=outcome,
                 status=201 if outcome == "booked" else 502, sf_id=sf_id,
                 key_digest=key_digest("cerner", key) if key else None)


@pytest.mark.parametrize("writes", [1, 2])  # a batch written twice (a retried flush) counts once
async def test_eviction_takes_every_index_and_pointer_along(any_redis, prefix, writes):
    log = RequestLog(any_redis, prefix, sealer=None, max_entries=3, max_actionable_entries=2)
    base = f"{prefix}:log:{{{prefix}:log}}"
    for _ in range(writes):
        for i in range(6):
            log.record(_entry(i, "booked" if i % 2 else "failed", sf_id=f"08p{i:015d}", key=f"k{i}"))
        await log.flush()
    kept = {e.id for e in await log.search(limit=100)}
    assert kept == {f"{i:016x}" for i in (2, 4, 1, 3, 5)}  # the oldest failed one went, among failed ones
    for i in range(6):
        present = f"{i:016x}" in kept
        assert bool(await any_redis.get(f"{base}:sf:08p{i:015d}")) == present
        assert bool(await any_redis.exists(f"{base}:key:{key_digest('cerner', f'k{i}')}")) == present
    assert await any_redis.zcard(f"{base}:src:cerner") == await any_redis.zcard(f"{base}:all") == 5
    values = [await any_redis.get(f"{base}:e:{i}") for i in kept]
    assert int(await any_redis.get(f"{base}:bytes")) == sum(len(v) + ENTRY_OVERHEAD for v in values)
