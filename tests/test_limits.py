"""Limits that protect the gateway and Salesforce: the per-source rate limit (shared by every
worker through Redis), answered 429 with Retry-After."""

from __future__ import annotations

import asyncio

import msgspec

from gateway.state.ratelimit import RateLimiter
from gateway.errors import TooManyRequests
from tests.conftest import auth, make_settings, serve_gateway


async def test_rate_limit_is_per_source_and_shared_by_gateways(redis_url, prefix, sandbox):
    settings = make_settings(redis_url, prefix, sandbox.url)
    sources = dict(settings.file.sources)
    sources["cerner"] = msgspec.structs.replace(sources["cerner"], rate_limit_per_minute=6)
    settings = msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, sources=sources))
    async with serve_gateway(settings) as a, serve_gateway(settings) as b:
        answers = [await gw.post("/fhir/cerner/Appointment/$translate", content=b"{", headers=auth())
                   for gw in (a, b, a, b, a, b, a, b)]
        statuses = [r.status_code for r in answers]
        assert statuses[:6] == [400] * 6  # the minute's allowance, spent across both gateways
        assert statuses[6:] == [429, 429]
        throttled = answers[6]
        assert throttled.headers["content-type"].startswith("application/fhir+json")
        assert throttled.json()["issue"][0]["code"] == "throttled"
        assert 1 <= int(throttled.headers["retry-after"]) <= 10  # one request's worth of a minute
        # another source is not limited by cerner's use
        assert (await a.post("/fhir/epic/Appointment/$translate", content=b"{", headers=auth("epic"))).status_code == 400
        # a stranger's requests do not spend the source's allowance: they are refused before it
        assert (await a.post("/fhir/cerner/Appointment", content=b"{", headers={"Authorization": "Bearer x"})).status_code == 401


async def test_the_allowance_comes_back_with_time(redis_url, prefix):
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(redis_url)
    limiter = RateLimiter(client, prefix, {"cerner": 120})  # one every 500 ms, 120 at once
    for _ in range(120):
        await limiter.check("cerner")
    try:
        await limiter.check("cerner")
        raise AssertionError("the 121st request within the same moment passed")
    except TooManyRequests as exc:
        assert exc.retry_after == 1
    await asyncio.sleep(0.6)
    await limiter.check("cerner")  # 500 ms per request: room for one again
    try:
        await limiter.check("cerner")
        raise AssertionError("room for one, not two")
    except TooManyRequests:
        pass
    await limiter.check("epic")  # no limit configured: never refused
    await client.aclose()


async def test_each_batch_entry_spends_the_allowance(redis_url, prefix, sandbox):
    """A batch of n entries is n requests: 7 batches of 100 on a 600-a-minute source do not all pass
    (the seventh is over), nothing of a refused batch is done, and a batch larger than a whole
    minute's allowance is 413 (sending it again cannot pass)."""
    settings = make_settings(redis_url, prefix, sandbox.url)
    sources = dict(settings.file.sources)
    sources["cerner"] = msgspec.structs.replace(sources["cerner"], rate_limit_per_minute=600)
    sources["epic"] = msgspec.structs.replace(sources["epic"], rate_limit_per_minute=50)
    settings = msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, sources=sources))
    # entries that are refused at once (not Appointments): the allowance, not Salesforce, is measured
    batch = msgspec.json.encode({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Appointment"}}] * 100})
    async with serve_gateway(settings) as gw:
        statuses = [(await gw.post("/fhir/cerner", content=batch, headers=auth())).status_code for _ in range(7)]
        assert statuses == [200] * 6 + [429], statuses
        refused = (await gw.post("/fhir/cerner", content=batch, headers=auth()))
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        over = await gw.post("/fhir/epic", content=batch, headers=auth("epic"))
        assert over.status_code == 413 and over.json()["issue"][0]["code"] == "too-costly"
        assert (await gw.post("/fhir/epic/Appointment/$translate", content=b"{", headers=auth("epic"))).status_code == 400
