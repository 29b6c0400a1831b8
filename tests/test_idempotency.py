"""The idempotency store's own semantics, on a real Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aredis

from gateway.canonical import CanonicalBooking, Identifier
from gateway.errors import InvalidRequest
from gateway.idempotency import IdempotencyStore, fingerprint, key_material, parse_key_header


@pytest.fixture
async def client(redis_url):
    c = aredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


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


async def test_release_only_by_holder(client, prefix):
    s = store(client, prefix, lease=5)
    key = s.record_key("cerner", "h:rel")
    holder = await s.claim(key, "fp")
    other = await s.claim(key, "fp")
    await s.release(other)  # not the holder: nothing happens
    assert (await s.claim(key, "fp")).state == "busy"
    await s.release(holder)
    assert (await s.claim(key, "fp")).state == "new"


async def test_concurrent_claims_have_one_winner(client, prefix):
    s = store(client, prefix, lease=5)
    key = s.record_key("epic", "h:race")
    claims = await asyncio.gather(*(s.claim(key, "fp") for _ in range(50)))
    assert [c.state for c in claims].count("new") == 1


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
