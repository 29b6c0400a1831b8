"""The idempotency store's own semantics, on a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from gateway.canonical import CanonicalBooking, Identifier
from gateway.errors import InvalidRequest, Unavailable
from gateway.state.idempotency import IdempotencyStore, fingerprint, key_material, parse_key_header


@pytest.fixture
def client(any_redis):
    return any_redis  # every test here runs on a single Redis and on a three-master Cluster


def store(client, prefix, lease=0.3, retention=1.0):
    return IdempotencyStore(client, prefix, lease_seconds=lease, retention_hours=retention)


async def test_claim_complete_replay(client, prefix):
    s = store(client, prefix)
    key = s.record_key("cerner", "h:abc")
    first = await s.claim(key, "fp1")
    assert first.state == "new"
    assert (await s.claim(key, "fp1")).state == "busy"
    assert (await s.claim(key, "fp2")).state == "mismatch"
    assert await s.complete(first, 201, b'{"id":"x"}', "/fhir/cerner/Appointment/x")
    done = await s.claim(key, "fp1")
    assert (done.state, done.status, done.body, done.location) == ("done", 201, b'{"id":"x"}', "/fhir/cerner/Appointment/x")
    ttl = await client.pttl(key)
    assert 3_500_000 < ttl <= 3_600_000  # retention of one hour
    assert await client.memory_usage(key) < 1024


async def test_a_booking_is_stored_as_salesforce_id_alone(client, prefix):
    """A booked record keeps Salesforce's id and no body: small, nothing of the patient's to seal;
    its holder's token still guards the write."""
    s = store(client, prefix)
    key = s.record_key("cerner", "h:booked")
    first = await s.claim(key, "fp1")
    import dataclasses

    assert not await s.complete_booked(dataclasses.replace(first, token="not-the-holder"), "08pWRONG")
    assert await s.complete_booked(first, "08p5g000000bcdEAAQ")
    done = await s.claim(key, "fp1")
    assert (done.state, done.status, done.salesforce_id, done.body, done.location) == ("done", 201, "08p5g000000bcdEAAQ", b"", "")
    assert done.versioned  # answered as version 1
    assert (await client.hgetall(key))[b"a"] == b"\x04" + b"08p5g000000bcdEAAQ"
    assert await client.memory_usage(key) < 256
    assert (await s.claim(key, "fp2")).state == "mismatch"  # the fingerprint still guards the key
    # a record written before versions (format \x03) is replayed as it was answered: without one
    old = s.record_key("cerner", "h:booked-before-versions")
    await client.hset(old, mapping={"fp": "fp1", "st": "d", "code": 201, "a": b"\x03" + b"08p5g000000bcdEAAQ"})
    replay = await s.claim(old, "fp1")
    assert (replay.state, replay.salesforce_id, replay.versioned) == ("done", "08p5g000000bcdEAAQ", False)


async def test_expired_lease_is_taken_over_and_old_holder_cannot_write(client, prefix):
    s = store(client, prefix, lease=0.2)
    key = s.record_key("cerner", "h:slow")
    old = await s.claim(key, "fp")
    await asyncio.sleep(0.3)
    new = await s.claim(key, "fp")
    assert new.state == "takeover"
    assert not await s.complete(old, 201, b"old", "")  # the slow holder lost its lease
    assert await s.complete(new, 201, b"new", "")
    assert (await s.claim(key, "fp")).body == b"new"


async def test_park_only_by_holder(client, prefix):
    s = store(client, prefix, lease=5)
    key = s.record_key("cerner", "h:rel")
    holder = await s.claim(key, "fp")
    other = await s.claim(key, "fp")
    await s.park(other)  # not the holder: nothing happens
    assert (await s.claim(key, "fp")).state == "busy"
    await s.park(holder)  # certainly not sent: forgotten, the retry is a fresh attempt
    assert (await s.claim(key, "fp")).state == "new"


async def test_lapsed_lease_is_taken_over_in_doubt(client, prefix):
    s = store(client, prefix, lease=0.2)
    key = s.record_key("cerner", "h:lapse")
    first = await s.claim(key, "fp")
    assert (first.state, first.doubt) == ("new", False) and first.since_ms == first.now_ms > 0
    await asyncio.sleep(0.3)
    second = await s.claim(key, "fp")
    # the lapsed holder may have sent: the new one must look first; its call ended by the lease end
    assert (second.state, second.doubt) == ("takeover", True)
    assert second.since_ms == first.since_ms
    assert first.since_ms + 200 <= second.sent_ms <= second.now_ms


async def test_in_doubt_record_waits_for_the_next_holder(client, prefix):
    s = store(client, prefix, lease=5)
    key = s.record_key("cerner", "h:doubt")
    first = await s.claim(key, "fp")
    await s.park(first, in_doubt=True)
    assert await client.hget(key, "st") == b"u"
    second = await s.claim(key, "fp")
    assert (second.state, second.doubt, second.since_ms) == ("takeover", True, first.since_ms)
    assert first.now_ms <= second.sent_ms <= second.now_ms
    await s.park(second)  # a look-up that could not run keeps the doubt
    third = await s.claim(key, "fp")
    assert (third.state, third.doubt) == ("takeover", True)
    assert await s.complete(third, 201, b"adopted", "/x")
    assert (await s.claim(key, "fp")).state == "done"
    assert not {b"dbt", b"sent", b"q", b"tok", b"lease"} & set(await client.hkeys(key))


async def test_queued_record_answers_202_until_the_queue_delivers(client, prefix):
    s = store(client, prefix, lease=5)
    key = s.record_key("epic", "h:q")
    first = await s.claim(key, "fp")
    await s.park(first, queued=True)
    assert (await s.claim(key, "fp")).state == "queued"
    worker = await s.claim(key, "fp", by_queue=True)
    assert (worker.state, worker.doubt) == ("takeover", False)
    assert (await s.claim(key, "fp")).state == "queued"  # the EHR's retry while the worker holds it
    assert (await s.claim(key, "fp", by_queue=True)).state == "busy"  # a second worker waits
    assert (await s.claim(key, "other")).state == "mismatch"
    await s.park(worker, in_doubt=True)  # still queued, now in doubt
    again = await s.claim(key, "fp", by_queue=True)
    assert (again.state, again.doubt) == ("takeover", True)
    assert await s.complete(again, 201, b"booked", "/y")
    assert (await s.claim(key, "fp")).state == "done"


async def test_queue_worker_recreates_a_lost_record_in_doubt(client, prefix):
    s = store(client, prefix, lease=5)
    key = s.record_key("epic", "h:gone")
    claim = await s.claim(key, "fp", by_queue=True, since_ms=12345)
    assert (claim.state, claim.doubt, claim.since_ms) == ("takeover", True, 12345)
    assert (await s.claim(key, "fp")).state == "queued"


async def test_unqueue_only_an_idle_queued_record(client, prefix):
    s = store(client, prefix, lease=5)
    key = s.record_key("epic", "h:drop")
    first = await s.claim(key, "fp")
    assert not await s.unqueue(key)  # leased, not queued
    await s.park(first, queued=True)
    assert await s.unqueue(key)
    assert (await s.claim(key, "fp")).state == "new"
    doubtful = s.record_key("epic", "h:drop2")
    claim = await s.claim(doubtful, "fp")
    await s.park(claim, in_doubt=True, queued=True)
    assert await s.unqueue(doubtful)
    assert (await s.claim(doubtful, "fp")).doubt  # dropped from the queue, still looked up first


async def test_concurrent_claims_have_one_winner(client, prefix):
    s = store(client, prefix, lease=5)
    key = s.record_key("epic", "h:race")
    results = await asyncio.gather(*(s.claim(key, "fp") for _ in range(50)), return_exceptions=True)
    # a claim may meet a connection redis-py tore down (see REDIS_FAILURES): that is a 503, never a
    # second winner
    assert all(isinstance(r, Unavailable) for r in results if isinstance(r, BaseException))
    assert [r.state for r in results if not isinstance(r, BaseException)].count("new") == 1


def test_keys_are_per_source_and_hashed(client, prefix):
    s = store(client, prefix)
    a, b = s.record_key("cerner", "i:urn:x|MRN-123"), s.record_key("epic", "i:urn:x|MRN-123")
    assert a != b and "MRN-123" not in a
    assert a.count("{") == 1 and a.endswith("}")  # one hash tag: one cluster slot per record


def test_key_header_rules():
    assert parse_key_header('"abc"') == "abc"
    assert parse_key_header(None) is None
    for bad in ("", "x" * 256, "naïve", "tab\there"):
        with pytest.raises(InvalidRequest):
            parse_key_header(bad)


def test_key_material_prefers_header_then_identifiers_then_fingerprint():
    b = CanonicalBooking(identifiers=(Identifier(value="2", system="s"), Identifier(value="1", system="s")))
    fp = fingerprint(b)
    assert key_material("k", b, fp) == "h:k"
    assert key_material(None, b, fp) == "i:s|1\ns|2"
    assert key_material(None, CanonicalBooking(), fp) == "f:" + fp
    assert fingerprint(b) == fp and fingerprint(CanonicalBooking(status="booked")) != fp


async def test_a_real_answer_is_stored_packed_and_sealed_under_1_kib(client, prefix):
    """The answer a Cerner booking gets, as the gateway stores it: deflated, then sealed (it names
    the patient), bound to its record: under 1 KiB, unreadable in Redis, opened on replay."""
    import os

    from adapters import get_adapter
    from gateway.booking.fhir import booked_appointment
    from gateway.state.sealing import Sealer
    from tests.conftest import corpus

    booking = get_adapter("cerner").parse(corpus("cerner-millennium-r4/r4_appointment_video_visit_entry.json"))
    answer = booked_appointment(booking, "08p5g000000bcdEAAQ")
    patient = next(p.reference.partition("/")[2] for p in booking.participants if p.kind == "Patient")
    assert patient.encode() in answer and len(answer) > 400
    sealed = IdempotencyStore(client, prefix, lease_seconds=5, retention_hours=1, sealer=Sealer([os.urandom(32)]))
    key = sealed.record_key("cerner", "h:real")
    claim = await sealed.claim(key, "fp")
    assert await sealed.complete(claim, 201, answer, "/fhir/cerner/Appointment/08p5g000000bcdEAAQ")
    raw = await client.hgetall(key)
    assert patient.encode() not in b"".join(raw.values()) and b"Appointment" not in b"".join(raw.values())
    assert await client.memory_usage(key) < 1024
    replay = await sealed.claim(key, "fp")
    assert (replay.state, replay.body, replay.location) == ("done", answer, "/fhir/cerner/Appointment/08p5g000000bcdEAAQ")
    # the blob is bound to its record: moved to another key, it does not open
    other = sealed.record_key("cerner", "h:moved")
    await client.hset(other, mapping={**raw})
    with pytest.raises(Unavailable, match="cannot be read"):
        await sealed.claim(other, "fp")
    # and without the data key it cannot be read either (a 503, never a wrong answer)
    with pytest.raises(Unavailable):
        await store(client, prefix).claim(key, "fp")
    await client.delete(other)


async def test_records_written_before_packing_are_still_answered(client, prefix):
    s = store(client, prefix)
    key = s.record_key("cerner", "h:old-format")
    await client.hset(key, mapping={"fp": "fp", "st": "d", "code": "201", "body": b'{"id":"old"}', "loc": "/x"})
    done = await s.claim(key, "fp")
    assert (done.state, done.status, done.body, done.location) == ("done", 201, b'{"id":"old"}', "/x")
    await client.delete(key)
