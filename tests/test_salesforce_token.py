"""The Salesforce token is cached per connection, a cached token whose instance cannot be reached is
renewed, and readiness reaches the instance: over real HTTP, against sandboxes started and stopped
here, on the shared Redis."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import redis.asyncio as aredis

from gateway.errors import Unavailable
from gateway.outbound.http import HttpClient
from gateway.salesforce.auth import Token, TokenProvider, token_key
from gateway.sandbox import SandboxConfig, create_sandbox_app
from gateway.edges.server import ThreadedServer
from gateway.settings import SalesforceConnection, SalesforceTuning
from tests.conftest import (
    CLIENT_ID, CLIENT_SECRET, CONTROL_KEY, VIDEO_VISIT, auth, corpus, free_port, make_settings, serve_gateway,
)


def new_sandbox(client_id: str = CLIENT_ID) -> ThreadedServer:
    config = SandboxConfig(client_id=client_id, client_secret=CLIENT_SECRET, control_key=CONTROL_KEY)
    return ThreadedServer(create_sandbox_app(config)).start()


def counters(server: ThreadedServer):
    return server.app.state.sandbox.counters()


def visit(n: int) -> bytes:
    data = msgspec.json.decode(corpus(VIDEO_VISIT))
    data.update(start=f"2026-12-04T1{n}:00:00Z", end=f"2026-12-04T1{n}:15:00Z")
    return msgspec.json.encode(data)


async def book(gateway, key: str, n: int):
    return await gateway.post("/fhir/cerner/Appointment", content=visit(n), headers=auth(**{"Idempotency-Key": key}))


def connection(login_url: str, client_id: str = CLIENT_ID) -> SalesforceConnection:
    return SalesforceConnection(login_url=login_url, client_id=client_id, client_secret=CLIENT_SECRET)


async def test_a_restarted_serve_books_at_once_against_its_new_sandbox(redis_url, prefix):
    """`serve` restarted: the same Redis (and its cached token), the sandbox on another port. The
    first booking is booked at once, with a token of the new sandbox's (before: 503 "cannot be
    reached" for as long as the old token stayed cached)."""
    first = new_sandbox()
    try:
        async with serve_gateway(make_settings(redis_url, prefix, first.url)) as gateway:
            assert (await book(gateway, "before-restart", 1)).status_code == 201
    finally:
        first.stop()
    second = new_sandbox()
    try:
        async with serve_gateway(make_settings(redis_url, prefix, second.url)) as gateway:
            r = await book(gateway, "after-restart", 2)
            assert r.status_code == 201, r.text
            ready = await gateway.get("/health/ready")
            assert ready.status_code == 200, ready.text
        c = counters(second)
        assert (c.token_grants, c.book_calls) == (1, 1)
        assert [a.id for a in second.app.state.sandbox.appointments()] == [r.json()["id"]]
    finally:
        second.stop()


async def cache_a_token_for_a_gone_instance(client, prefix: str, settings) -> str:
    """A token cached for the connection whose instance refuses connections (nothing listens
    there), as when an org moved or the sandbox restarted; its Redis key."""
    key = token_key(prefix, settings.salesforce)
    gone = f"http://127.0.0.1:{free_port()}"
    await client.set(key, msgspec.json.encode(Token(access_token="stale", instance_url=gone)), px=60_000)
    return key


async def test_a_cached_token_whose_instance_is_gone_is_renewed_and_the_booking_sent_once(redis_url, prefix, sandbox):
    """The same connection, but the cached token names an instance that refuses connections (an
    org moved to another instance): the token is dropped, a new one minted, and the Book, which was
    never sent, goes to the new instance once."""
    settings = make_settings(redis_url, prefix, sandbox.url)
    client = aredis.Redis.from_url(redis_url)
    try:
        key = await cache_a_token_for_a_gone_instance(client, prefix, settings)
        async with serve_gateway(settings) as gateway:
            r = await book(gateway, "moved", 3)
            assert r.status_code == 201, r.text
            c = counters(sandbox)
            assert (c.token_grants, c.book_calls, c.appointment_queries) == (1, 1, 0)  # not in doubt: nothing was sent
            cached = msgspec.json.decode(await client.get(key), type=Token)
            assert cached.instance_url == sandbox.url and cached.access_token != "stale"
            assert (await book(gateway, "moved", 3)).json()["id"] == r.json()["id"]  # replayed, not re-sent
        assert len(sandbox.app.state.sandbox.appointments()) == 1
    finally:
        await client.aclose()


async def test_a_burst_on_a_cached_token_whose_instance_is_gone_is_booked_with_one_new_token(redis_url, prefix, sandbox):
    """Many bookings at once meet the dead instance: one renewal among them, each booked once."""
    settings = make_settings(redis_url, prefix, sandbox.url)
    client = aredis.Redis.from_url(redis_url)
    try:
        await cache_a_token_for_a_gone_instance(client, prefix, settings)
        async with serve_gateway(settings) as gateway:
            answers = await asyncio.gather(*(book(gateway, f"burst-{n}", n) for n in range(8)))
        assert [a.status_code for a in answers] == [201] * 8, [a.text for a in answers if a.status_code != 201]
        c = counters(sandbox)
        assert (c.token_grants, c.book_calls) == (1, 8)
    finally:
        await client.aclose()


async def test_a_token_just_minted_is_not_minted_again_when_its_instance_refuses(redis_url, prefix):
    """Renewal is for a token read from the cache: when the instance a token minted for this very
    call names refuses connections (the org's instance down, its login up), the call is 503 at once,
    after one grant, not two."""
    server = ThreadedServer(create_sandbox_app(SandboxConfig(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, instance_url=f"http://127.0.0.1:{free_port()}"))).start()
    try:
        async with serve_gateway(make_settings(redis_url, prefix, server.url)) as gateway:
            r = await book(gateway, "instance-down", 4)
            assert r.status_code == 503 and "nothing was sent" in r.text
            assert (counters(server).token_grants, counters(server).book_calls) == (1, 0)
            # the next call's token comes from the cache: renewed once, the new one names the same
            # instance, so it is not tried again
            assert (await book(gateway, "instance-down", 4)).status_code == 503
            assert counters(server).token_grants == 2
    finally:
        server.stop()


def every_time(redis_url: str, prefix: str, login_url: str):
    """Settings whose readiness calls the instance on every check (no call stands in for one)."""
    return make_settings(redis_url, prefix, login_url, salesforce=SalesforceTuning(ready_check_seconds=0))


async def test_readiness_passes_only_while_the_instance_answers(redis_url, prefix):
    server = new_sandbox()
    try:
        async with serve_gateway(every_time(redis_url, prefix, server.url)) as gateway:
            ready = await gateway.get("/health/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"]["salesforce_instance"] == "pass"
            c = counters(server)
            assert c.resource_calls == 1 and ready.json()["salesforce_api_usage"]["used"] == c.api_calls
            server.app.state.sandbox.faults.set(expire_tokens=True)  # a revoked session: renewed, passes
            assert (await gateway.get("/health/ready")).status_code == 200
            assert counters(server).token_grants == 2
            server.stop()
            # before: 200, the token being cached, though nothing could be booked
            down = await gateway.get("/health/ready")
            assert down.status_code == 503 and "retry-after" in down.headers
            assert down.json()["checks"] == {"redis": "pass", "salesforce_auth": "pass", "salesforce_instance": "fail"}
    finally:
        server.stop()


async def test_readiness_renews_a_cached_token_whose_instance_is_gone(redis_url, prefix, sandbox):
    settings = every_time(redis_url, prefix, sandbox.url)
    client = aredis.Redis.from_url(redis_url)
    try:
        await cache_a_token_for_a_gone_instance(client, prefix, settings)
        async with serve_gateway(settings) as gateway:
            ready = await gateway.get("/health/ready")
            assert ready.status_code == 200, ready.text
        assert counters(sandbox).token_grants == 1
    finally:
        await client.aclose()


async def test_readiness_spends_the_orgs_allowance_sparingly(redis_url, prefix, sandbox):
    """Readiness needs no key, and each call to Salesforce counts against the org's daily allowance:
    within `ready_check_seconds` (10 s by default) a call that worked stands in for a new one."""
    async with serve_gateway(make_settings(redis_url, prefix, sandbox.url)) as gateway:
        for _ in range(20):
            assert (await gateway.get("/health/ready")).status_code == 200
        assert counters(sandbox).resource_calls == 1
    async with serve_gateway(make_settings(redis_url, f"{prefix}:b", sandbox.url)) as gateway:
        assert (await book(gateway, "recent", 5)).status_code == 201  # a call that worked
        assert (await gateway.get("/health/ready")).status_code == 200
        assert counters(sandbox).resource_calls == 1


async def test_two_connections_never_share_a_cached_token(redis_url, prefix):
    """Two logins (two sandboxes), and two apps on one login: each has its token, under its own key,
    on the same Redis and prefix; the key names neither the secret nor the client id."""
    a, b = new_sandbox(), new_sandbox()
    client = aredis.Redis.from_url(redis_url)
    https = [HttpClient(SalesforceTuning()) for _ in range(3)]
    try:
        def provider(conn: SalesforceConnection, http: HttpClient) -> TokenProvider:
            return TokenProvider(conn, http, client, prefix, cache_seconds=60, retry_after=5)

        ta = await provider(connection(a.url), https[0]).token()
        tb = await provider(connection(b.url), https[1]).token()
        assert ta.access_token != tb.access_token
        assert (ta.instance_url, tb.instance_url) == (a.url, b.url)
        assert (counters(a).token_grants, counters(b).token_grants) == (1, 1)
        # another app on the first login: its own key, so it mints (and is refused: the sandbox
        # knows one app), never reading the first app's token (before: it got it from the cache)
        with pytest.raises(Unavailable, match="invalid_client"):
            await provider(connection(a.url, client_id="another-app"), https[2]).token()
        keys = sorted(k.decode() for k in await client.keys(f"{prefix}:sf:*"))
        assert keys == sorted({token_key(prefix, connection(a.url)), token_key(prefix, connection(b.url))})
        assert token_key(prefix, connection(a.url)) != token_key(prefix, connection(a.url, client_id="another-app"))
        for key in keys:
            assert CLIENT_SECRET not in key and CLIENT_ID not in key and "127.0.0.1" not in key
            assert key.count("{") == key.count("}") == 1  # one hash tag: one Redis Cluster slot
    finally:
        for http in https:
            await http.aclose()
        await client.aclose()
        a.stop()
        b.stop()
