"""SMART Backend Services: a source gets short-lived tokens with a signed JWT assertion (RS384 or
ES384, checked against its registered JWKS, inline or by URL) and books with them; its tokens, like
its keys, fail everywhere but on its own source."""

from __future__ import annotations

import json
import time
import uuid

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.sandbox import SandboxConfig, create_sandbox_app
from gateway.edges.server import ThreadedServer
from tests.conftest import KEYS, VIDEO_VISIT, corpus, make_settings, serve_gateway

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP384R1())
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(key, kid: str, alg: str) -> dict:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()) if alg.startswith("RS")
                     else jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


JWKS = {"keys": [public_jwk(RSA_KEY, "rsa-1", "RS384"), public_jwk(EC_KEY, "ec-1", "ES384")]}


def with_smart(settings, source: str, **fields):
    sources = dict(settings.file.sources)
    sources[source] = msgspec.structs.replace(sources[source], smart_client_id=f"{source}-client", **fields)
    return msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, sources=sources))


def assertion(client_id: str, aud: str, *, key=RSA_KEY, kid="rsa-1", alg="RS384", exp_in=120, jti=None, **claims) -> str:
    body = {"iss": client_id, "sub": client_id, "aud": aud, "exp": int(time.time()) + exp_in,
            "jti": jti or uuid.uuid4().hex, **claims}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


async def get_token(gw, signed: str, headers: dict[str, str] | None = None, **form):
    return await gw.post("/auth/token", headers=headers, data={
        "grant_type": "client_credentials", "scope": "system/Appointment.write",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": signed, **form})


def fhir(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}


@pytest.fixture
async def smart_gateway(redis_url, prefix, sandbox):
    settings = with_smart(make_settings(redis_url, prefix, sandbox.url), "cerner", jwks=JWKS)
    async with serve_gateway(settings) as gw:
        yield gw


@pytest.mark.parametrize(("key", "kid", "alg"), [(RSA_KEY, "rsa-1", "RS384"), (EC_KEY, "ec-1", "ES384")])
async def test_a_token_books_on_its_own_source_only(smart_gateway, sandbox, key, kid, alg):
    gw = smart_gateway
    aud = str(gw.base_url) + "/auth/token"
    r = await get_token(gw, assertion("cerner-client", aud, key=key, kid=kid, alg=alg))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 300 and r.headers["cache-control"] == "no-store"
    token = body["access_token"]
    booked = await gw.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=fhir(token))
    assert booked.status_code == 201, booked.text
    # the same token elsewhere: another source, the admin API
    assert (await gw.post("/fhir/epic/Appointment", content=b"{}", headers=fhir(token))).status_code == 403
    assert (await gw.get("/admin/api/requests", headers={"Authorization": f"Bearer {token}"})).status_code == 403
    # and the source's key still works beside it; another source's key is still 403 here
    assert (await gw.post("/fhir/cerner/Appointment/$translate", content=corpus(VIDEO_VISIT),
                          headers={**fhir(KEYS["cerner"])})).status_code == 200
    assert (await gw.post("/fhir/cerner/Appointment/$translate", content=b"{}", headers=fhir(KEYS["epic"]))).status_code == 403


async def test_assertions_that_must_be_refused(smart_gateway):
    gw = smart_gateway
    aud = str(gw.base_url) + "/auth/token"
    cases = {
        "unknown client": assertion("nobody", aud),
        "wrong audience": assertion("cerner-client", "https://elsewhere.example/token"),
        "expired": assertion("cerner-client", aud, exp_in=-60),
        "too long-lived": assertion("cerner-client", aud, exp_in=3600),
        "unregistered key": assertion("cerner-client", aud, key=OTHER_KEY),
        "RS256 is not SMART's": assertion("cerner-client", aud, alg="RS256"),
        "HMAC with the public key": jwt.encode({"iss": "cerner-client", "sub": "cerner-client", "aud": aud,
                                                "exp": int(time.time()) + 60, "jti": "x"}, "s" * 32, algorithm="HS256"),
        "sub differs": assertion("cerner-client", aud, sub="someone-else"),
        "not a JWT": "not-a-jwt",
    }
    for why, signed in cases.items():
        r = await get_token(gw, signed)
        assert r.status_code == 401 and r.json()["error"] == "invalid_client", (why, r.text)
    once = assertion("cerner-client", aud, jti="only-once")
    assert (await get_token(gw, once)).status_code == 200
    replayed = await get_token(gw, once)
    assert replayed.status_code == 401 and "used before" in replayed.json()["error_description"]
    wrong_grant = await get_token(gw, assertion("cerner-client", aud), grant_type="password")
    assert wrong_grant.status_code == 400 and wrong_grant.json()["error"] == "unsupported_grant_type"
    assert (await gw.post("/fhir/cerner/Appointment", content=b"{}", headers=fhir("made-up-token"))).status_code == 401


async def test_jwks_by_url(redis_url, prefix, sandbox):
    """The source publishes its keys at a URL; the gateway fetches them (served here by a small app)."""
    from litestar import Litestar, get

    @get("/.well-known/jwks.json")
    async def keys() -> dict:
        return JWKS

    with ThreadedServer(Litestar(route_handlers=[keys])) as published:
        settings = with_smart(make_settings(redis_url, prefix, sandbox.url), "epic",
                              jwks_url=published.url + "/.well-known/jwks.json")
        async with serve_gateway(settings) as gw:
            aud = str(gw.base_url) + "/auth/token"
            r = await get_token(gw, assertion("epic-client", aud, key=EC_KEY, kid="ec-1", alg="ES384"))
            assert r.status_code == 200, r.text
            token = r.json()["access_token"]
            assert (await gw.post("/fhir/epic/Appointment/$translate", content=b"{}", headers=fhir(token))).status_code == 400
            assert (await gw.post("/fhir/cerner/Appointment/$translate", content=b"{}", headers=fhir(token))).status_code == 403


async def test_the_answer_names_what_the_token_can_do_not_what_was_asked(smart_gateway):
    """The token's scope is the gateway's to say: never an echo of the request (which could be any
    text), and a request for what no source may have is invalid_scope; a jti is bounded."""
    gw = smart_gateway
    aud = str(gw.base_url) + "/auth/token"
    r = await get_token(gw, assertion("cerner-client", aud), scope="system/Slot.read")
    assert r.status_code == 200 and r.json()["scope"] == "system/Appointment.read system/Appointment.write system/Slot.read"
    for asked in ("system/Patient.read", "system/*.*", "system/Slot.read <script>", "x" * 5000):
        refused = await get_token(gw, assertion("cerner-client", aud), scope=asked)
        assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope", asked
        assert asked not in refused.text
    for jti in ("j" * 256, "a\nb"):
        refused = await get_token(gw, assertion("cerner-client", aud, jti=jti))
        assert refused.status_code == 401 and "jti" in refused.json()["error_description"]
    assert (await get_token(gw, assertion("cerner-client", aud, jti="j" * 255))).status_code == 200


async def test_the_audience_is_the_configured_url_whatever_the_host_header_says(redis_url, prefix, sandbox):
    """An assertion minted for another server's token endpoint is refused even when sent with that
    server's Host; one for this gateway's configured URL (any of them) is taken whatever the Host."""
    settings = with_smart(make_settings(redis_url, prefix, sandbox.url), "cerner", jwks=JWKS)
    server = msgspec.structs.replace(settings.file.server,
                                     public_urls=("https://ehr-gateway.example.org", "https://gw.internal.example"))
    settings = msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, server=server))
    async with serve_gateway(settings) as gw:
        elsewhere = "https://other-server.example/auth/token"
        r = await get_token(gw, assertion("cerner-client", elsewhere), headers={"Host": "other-server.example"})
        assert r.status_code == 401 and r.json()["error"] == "invalid_client"
        reached = str(gw.base_url) + "/auth/token"  # how this test reaches it: not a configured URL
        assert (await get_token(gw, assertion("cerner-client", reached))).status_code == 401
        for aud in ("https://ehr-gateway.example.org/auth/token", "https://gw.internal.example/auth/token"):
            r = await get_token(gw, assertion("cerner-client", aud), headers={"Host": "evil.example"})
            assert r.status_code == 200, (aud, r.text)
