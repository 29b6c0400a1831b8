"""The Salesforce client against the sandbox's faults and answer variations, through the gateway."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import redis.asyncio as aredis

from gateway.salesforce.auth import TokenProvider
from gateway.outbound.http import HttpClient
from gateway.settings import SalesforceConnection, SalesforceTuning
from tests.conftest import CLIENT_ID, CLIENT_SECRET, VIDEO_VISIT, auth, corpus, warm


def state(sandbox):
    return sandbox.app.state.sandbox


async def book(gateway, key: str, body: bytes | None = None):
    return await gateway.post("/fhir/cerner/Appointment", content=body or corpus(VIDEO_VISIT),
                              headers=auth(**{"Idempotency-Key": key}))


def another_visit(start: str = "2026-12-02T10:00:00Z", end: str = "2026-12-02T10:15:00Z") -> bytes:
    """The corpus visit at other times: a booking of its own, which no look-up takes for the first."""
    data = msgspec.json.decode(corpus(VIDEO_VISIT))
    data.update(start=start, end=end)
    return msgspec.json.encode(data)


@pytest.mark.parametrize(
    "sandbox_config",
    [
        {"answer_shape": "array", "answer_status": 200, "error_key": "errorMessages"},
        {"answer_shape": "object", "answer_status": 200, "error_key": "error"},
        {"answer_shape": "array", "answer_status": 201, "error_key": "error"},
    ],
    indirect=True,
)
async def test_every_documented_answer_shape_is_read(gateway, sandbox):
    r = await book(gateway, "shape")
    assert r.status_code == 201, r.text
    assert r.json()["id"] == state(sandbox).appointments()[0].id


async def test_expired_token_is_refreshed_once_then_retried(gateway, sandbox):
    assert (await book(gateway, "t-1")).status_code == 201
    grants = state(sandbox).counters().token_grants
    state(sandbox).faults.set(expire_tokens=True)
    r = await book(gateway, "t-2", another_visit())
    assert r.status_code == 201
    c = state(sandbox).counters()
    assert c.token_grants == grants + 1
    assert c.invalid_session == 1
    # a Book is not re-sent blind after its 401: looked up first (with the new token), then sent
    assert (c.book_calls, c.appointment_queries) == (3, 1)
    assert len(state(sandbox).appointments()) == 2


async def test_request_limit_is_503_not_an_auth_failure(gateway, sandbox):
    assert (await book(gateway, "warm")).status_code == 201
    grants = state(sandbox).counters().token_grants
    state(sandbox).faults.set(request_limit_exceeded=1)
    r = await book(gateway, "limited")
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) > 0
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "REQUEST_LIMIT_EXCEEDED"
    assert state(sandbox).counters().token_grants == grants  # no re-authentication
    # nothing was stored, so the retry is a fresh attempt that books
    retry = await book(gateway, "limited")
    assert retry.status_code == 201 and "idempotent-replayed" not in retry.headers
    assert len(state(sandbox).appointments()) == 2


async def test_salesforce_5xx_is_502_looked_up_and_sent_again_at_once(gateway, sandbox):
    await warm(gateway)  # the people looked up first: the fault meets the Book
    state(sandbox).faults.set(server_error=1, server_error_status=500)
    r = await book(gateway, "five")
    assert r.status_code == 502 and r.json()["resourceType"] == "OperationOutcome"
    assert int(r.headers["retry-after"]) == 1  # Salesforce's own answer: no settle window to wait out
    assert state(sandbox).appointments() == []
    assert state(sandbox).counters().appointment_queries == 1  # looked for it at once: not there, final
    again = await book(gateway, "five")
    assert again.status_code == 201 and "idempotent-replayed" not in again.headers
    assert state(sandbox).counters().book_calls == 2 and len(state(sandbox).appointments()) == 1


async def test_salesforce_503_is_503_with_retry_after(gateway, sandbox):
    await warm(gateway)
    state(sandbox).faults.set(server_error=1, server_error_status=503)
    r = await book(gateway, "maint")
    assert r.status_code == 503 and "retry-after" in r.headers


async def test_dropped_answer_after_store_is_found_and_adopted(gateway, sandbox):
    state(sandbox).faults.set(drop_after_store=1)
    r = await book(gateway, "dropped")
    stored = state(sandbox).appointments()
    assert len(stored) == 1  # stored, answer lost: the in-doubt case
    assert r.status_code == 201 and r.json()["id"] == stored[0].id  # found by the look-up, adopted
    assert state(sandbox).counters().book_calls == 1
    replay = await book(gateway, "dropped")
    assert replay.status_code == 201 and replay.json()["id"] == stored[0].id
    assert len(state(sandbox).appointments()) == 1


async def test_limit_info_is_read_and_exposed(gateway, sandbox):
    assert (await book(gateway, "lim")).status_code == 201
    ready = await gateway.get("/health/ready")
    assert ready.status_code == 200
    usage = ready.json()["salesforce_api_usage"]
    assert usage["limit"] == 15000 and usage["used"] == state(sandbox).counters().api_calls


async def test_unreachable_salesforce_is_503_and_nothing_kept(redis_url, prefix):
    from tests.conftest import make_settings, serve_gateway

    settings = make_settings(redis_url, prefix, "http://127.0.0.1:9")  # discard port: refused
    async with serve_gateway(settings) as client:
        r = await book(client, "nowhere")
        assert r.status_code == 503 and "retry-after" in r.headers
        ready = await client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["checks"]["salesforce_auth"] == "fail"


async def test_one_refresh_in_flight_across_workers(redis_url, prefix, sandbox):
    """Four token providers (as four workers) on one Redis: one grant between them."""
    conn = SalesforceConnection(login_url=sandbox.url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    client = aredis.Redis.from_url(redis_url)
    https = [HttpClient(SalesforceTuning()) for _ in range(4)]
    try:
        providers = [TokenProvider(conn, h, client, prefix, cache_seconds=60, retry_after=5) for h in https]
        before = state(sandbox).counters().token_grants
        tokens = await asyncio.gather(*(p.token() for p in providers for _ in range(5)))
        assert len({t.access_token for t in tokens}) == 1
        assert state(sandbox).counters().token_grants == before + 1
        # a refused token: every worker drops it, one mints the next
        old = tokens[0]
        await asyncio.gather(*(p.invalidate(old) for p in providers))
        fresh = await asyncio.gather(*(p.token() for p in providers))
        assert len({t.access_token for t in fresh}) == 1 and fresh[0] != old
        assert state(sandbox).counters().token_grants == before + 2
        assert "access_token" not in repr(fresh[0]) and fresh[0].access_token not in repr(fresh[0])
    finally:
        for h in https:
            await h.aclose()
        await client.aclose()


def _rsa_and_certificate():
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ehr-gateway-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return key_pem.decode(), cert.public_bytes(serialization.Encoding.PEM).decode()


async def test_jwt_bearer_flow_books(redis_url, prefix, tmp_path, monkeypatch):
    from gateway.sandbox import SandboxConfig, create_sandbox_app
    from gateway.edges.server import ThreadedServer
    from gateway.settings import salesforce_from_env
    from tests.conftest import make_settings, serve_gateway

    key_pem, cert_pem = _rsa_and_certificate()
    key_file = tmp_path / "sf.key"
    key_file.write_text(key_pem)
    key_file.chmod(0o600)
    config = SandboxConfig(client_id=CLIENT_ID, client_secret=None, username="int@example.org", certificate_pem=cert_pem)
    with ThreadedServer(create_sandbox_app(config)) as server:
        env = {"SALESFORCE_LOGIN_URL": server.url, "SALESFORCE_CLIENT_ID": CLIENT_ID,
               "SALESFORCE_USERNAME": "int@example.org", "SALESFORCE_PRIVATE_KEY_FILE": str(key_file)}
        conn = salesforce_from_env(env)
        assert conn.flow == "jwt_bearer" and key_pem not in repr(conn)
        settings = msgspec.structs.replace(make_settings(redis_url, prefix, server.url), salesforce=conn)
        async with serve_gateway(settings) as client:
            r = await book(client, "jwt")
            assert r.status_code == 201, r.text
        assert server.app.state.sandbox.counters().token_grants == 1


async def test_concurrent_calls_are_bounded(redis_url, prefix, sandbox):
    """With a bound of 2 and Salesforce taking 300 ms a call, 6 bookings need three rounds: the
    lower bound on the wall time cannot be met if more than 2 calls ran at once."""
    import time

    from gateway.settings import SalesforceTuning
    from tests.conftest import make_settings, serve_gateway

    settings = make_settings(redis_url, prefix, sandbox.url, salesforce=SalesforceTuning(max_concurrent_calls=4))
    async with serve_gateway(settings, workers=2) as client:  # 4 per instance, 2 per worker
        assert (await book(client, "warm")).status_code == 201  # the token, outside the timing
        state(sandbox).faults.set(latency_ms=300)
        started = time.perf_counter()
        answers = await asyncio.gather(*(book(client, f"bound-{i}") for i in range(6)))
        elapsed = time.perf_counter() - started
    assert [a.status_code for a in answers] == [201] * 6
    assert elapsed >= 0.9


def test_salesforce_secrets_are_guarded_at_start(tmp_path):
    from gateway.settings import ConfigError, salesforce_from_env

    base = {"SALESFORCE_CLIENT_ID": CLIENT_ID, "SALESFORCE_CLIENT_SECRET": CLIENT_SECRET}
    with pytest.raises(ConfigError, match="must be https"):
        salesforce_from_env({**base, "SALESFORCE_LOGIN_URL": "http://login.example.com"})
    with pytest.raises(ConfigError, match="must be https"):
        salesforce_from_env({**base, "SALESFORCE_LOGIN_URL": "http://127.0.0.1.example.com"})
    assert salesforce_from_env({**base, "SALESFORCE_LOGIN_URL": "http://127.0.0.1:8600"}) is not None
    assert salesforce_from_env({**base, "SALESFORCE_LOGIN_URL": "https://login.salesforce.com"}) is not None
    key_file = tmp_path / "sf.key"
    key_file.write_text("-----BEGIN PRIVATE KEY-----\n")
    key_file.chmod(0o640)
    jwt_env = {"SALESFORCE_LOGIN_URL": "https://login.salesforce.com", "SALESFORCE_CLIENT_ID": CLIENT_ID,
               "SALESFORCE_USERNAME": "int@example.org", "SALESFORCE_PRIVATE_KEY_FILE": str(key_file)}
    with pytest.raises(ConfigError, match="owner only"):
        salesforce_from_env(jwt_env)
    key_file.chmod(0o600)
    assert salesforce_from_env(jwt_env).flow == "jwt_bearer"
