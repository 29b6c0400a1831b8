"""The server's edge, over real sockets: whose forwarded headers are believed, answers given before
a large body has arrived, request heads refused before any routing (paths not in their one
canonical spelling, Host headers missing or repeated), and bodies that name a JSON key twice."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request

import pytest

from gateway.settings import ServerSettings
from tests.conftest import ADMIN_KEY, VIDEO_VISIT, auth, corpus, make_settings, serve_gateway
from tests.test_server_limits import _exchange, _outcome

FORGED = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}


async def _sign_in(gw, **headers: str):
    signed = await gw.post("/admin/api/session", json={"key": ADMIN_KEY}, headers=headers)
    assert signed.status_code == 200, signed.text
    audit = (await gw.get("/admin/api/audit", headers={"Authorization": f"Bearer {ADMIN_KEY}"})).json()["audit"]
    return signed.headers["set-cookie"], audit[0]["ip"]


async def _guesses_are_throttled_together(gw) -> bool:
    """Eleven wrong admin keys, each claiming another client address: is the eleventh throttled?"""
    for i in range(10):
        wrong = await gw.post("/admin/api/session", json={"key": "guess"}, headers={"X-Forwarded-For": f"198.51.100.{i}"})
        assert wrong.status_code == 401
    last = await gw.post("/admin/api/session", json={"key": "guess"}, headers={"X-Forwarded-For": "198.51.100.99"})
    return last.status_code == 429


async def test_forwarded_headers_are_ignored_by_default_even_with_forwarded_allow_ips(
        redis_url, prefix, sandbox, monkeypatch: pytest.MonkeyPatch):
    # uvicorn reads FORWARDED_ALLOW_IPS when it is given no list: the gateway always gives one
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    async with serve_gateway(make_settings(redis_url, prefix, sandbox.url)) as gw:
        cookie, ip = await _sign_in(gw, **FORGED)
        assert ip == "127.0.0.1" and "Secure" not in cookie  # the connection's address and scheme
        assert await _guesses_are_throttled_together(gw)  # a guesser cannot pose as many addresses


async def test_forwarded_headers_are_believed_from_a_trusted_proxy(redis_url, prefix, sandbox):
    settings = make_settings(redis_url, prefix, sandbox.url, server=ServerSettings(trusted_proxies=("127.0.0.1",)))
    async with serve_gateway(settings) as gw:
        cookie, ip = await _sign_in(gw, **FORGED)
        assert ip == "203.0.113.9" and "Secure" in cookie
        assert not await _guesses_are_throttled_together(gw)  # each client behind the proxy has its own allowance


@pytest.mark.parametrize("value", ["*", "localhost", "10.0.0.1/8", "300.1.2.3"])
def test_trusted_proxies_are_addresses_or_networks(tmp_path, value: str):
    import shutil

    from gateway.settings import ConfigError, load_file_settings
    from tests.conftest import CONFIG

    config = tmp_path / "config"
    shutil.copytree(CONFIG, config)
    toml = config / "gateway.toml"
    toml.write_text(toml.read_text() + f'\n[server]\ntrusted_proxies = ["::1", "10.0.0.0/8", "{value}"]\n')
    with pytest.raises(ConfigError, match=r"\$\.server\.trusted_proxies\[2\]: not an IP address or CIDR network"):
        load_file_settings(config)


@pytest.fixture
async def gateway(redis_url, prefix, sandbox):
    async with serve_gateway(make_settings(redis_url, prefix, sandbox.url)) as client:
        yield client


BIG = b"x" * (4 << 20)  # four times [limits] max_body_bytes


def _write_all_then_read(port: int, head: bytes, body: bytes) -> bytes:
    """As urllib, Java's and .NET's clients do: the whole request first, then the answer, to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body)
        answer = b""
        while block := sock.recv(65536):
            answer += block
        return answer


def _parse(answer: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert int(headers["content-length"]) == len(body)  # the whole answer, not a reset
    return int(lines[0].split()[1]), headers, json.loads(body)


def _read_answer(stream) -> bytes:
    """One answer off a keep-alive connection: its status line and its body."""
    lines = []
    while (line := stream.readline()) not in (b"\r\n", b""):
        lines.append(line)
    length = next(int(x.split(b":")[1]) for x in lines if x.lower().startswith(b"content-length"))
    return lines[0] + stream.read(length)


@pytest.mark.parametrize(("authorization", "status"), [(True, 413), (False, 401)])
async def test_an_answer_before_the_body_reaches_a_client_that_writes_it_all_first(gateway, authorization, status):
    # closing with the body still arriving would reset the connection and lose the answer: the
    # server reads and drops the rest first
    head = "POST /fhir/cerner/Appointment HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    head += f"Authorization: {auth()['Authorization']}\r\n" if authorization else ""
    head += f"Content-Type: application/fhir+json\r\nContent-Length: {len(BIG)}\r\n\r\n"
    answer = await asyncio.to_thread(_write_all_then_read, gateway.base_url.port, head.encode(), BIG)
    got, headers, outcome = _parse(answer)
    assert got == status and headers["content-type"] == "application/fhir+json"
    assert outcome["resourceType"] == "OperationOutcome"


async def test_a_keep_alive_client_keeps_its_connection_after_a_413(gateway):
    head = (f"POST /fhir/cerner/Appointment HTTP/1.1\r\nHost: x\r\nAuthorization: {auth()['Authorization']}\r\n"
            f"Content-Type: application/fhir+json\r\nContent-Length: {len(BIG)}\r\n\r\n").encode()

    def exchange() -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", gateway.base_url.port), timeout=30) as sock:
            stream = sock.makefile("rb")
            sock.sendall(head + BIG)
            too_large = _read_answer(stream)
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            return too_large, _read_answer(stream)

    too_large, next_one = await asyncio.to_thread(exchange)
    assert too_large.startswith(b"HTTP/1.1 413") and b"OperationOutcome" in too_large
    assert next_one.startswith(b"HTTP/1.1 200")  # the rest of the body was read and dropped


async def test_urllib_gets_its_413(gateway):
    def post() -> tuple[int, dict]:
        request = urllib.request.Request(f"{gateway.base_url}/fhir/cerner/Appointment", data=BIG, headers=auth(),
                                         method="POST")
        try:
            urllib.request.urlopen(request, timeout=30)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        raise AssertionError("the body was taken")

    status, outcome = await asyncio.to_thread(post)
    assert status == 413 and outcome["issue"][0]["code"] == "too-costly"


def _request(method: str, target: str, *, body: bytes = b"", host: str | None = "Host: x\r\n",
             version: str = "HTTP/1.1") -> bytes:
    head = f"{method} {target} {version}\r\n{host or ''}Connection: close\r\n"
    if body:
        head += f"Authorization: {auth()['Authorization']}\r\nContent-Type: application/fhir+json\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _answer(gw, request: bytes) -> tuple[int, dict]:
    answer, _ = await _exchange(gw.base_url.port, [request])
    status, _, body = _outcome(answer)
    return status, body


@pytest.mark.parametrize("target", [
    "/fhir/cern%65r/Appointment",  # an unreserved character encoded: cerner by another spelling
    "/fhir/cerner/%41ppointment",
    "/fhir//cerner/Appointment",  # an empty segment: merged into /fhir/cerner/… by the router
    "/fhir/cerner//Appointment",
    "/fhir/./cerner/Appointment",
    "/fhir/x/../cerner/Appointment",
    "/fhir/cerner%2FAppointment",  # an encoded /
    "/fhir/cerner/Appointment%zz",  # not a percent-encoding
    "http://x/fhir//cerner/Appointment",  # the absolute form is read the same way
])
async def test_a_path_in_another_spelling_is_refused_before_routing(gateway, target: str):
    status, outcome = await _answer(gateway, _request("POST", target, body=corpus(VIDEO_VISIT)))
    assert status == 400 and outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "structure" and "path" in outcome["issue"][0]["details"]["text"]


@pytest.mark.parametrize("target", ["/admin/static/%00", "/admin/static/app.js%00", "/fhir/cerner/Appointment%0a",
                                    "/admin/static/%ff", "/admin/static/%c3%28"])
async def test_encoded_control_characters_and_bytes_that_are_not_utf8_are_400(gateway, target: str):
    status, outcome = await _answer(gateway, _request("GET", target))
    assert status == 400 and outcome["issue"][0]["code"] == "structure"


async def test_canonical_paths_and_their_queries_still_pass(gateway):
    translate = corpus(VIDEO_VISIT)
    # FHIR clients write $ as itself; one that encodes it reaches the same operation (no source name has a $)
    for target in ("/fhir/cerner/Appointment/$translate", "/fhir/cerner/Appointment/%24translate"):
        assert (await _answer(gateway, _request("POST", target, body=translate)))[0] == 200
    assert (await _answer(gateway, _request("GET", "/fhir/caf%C3%A9/metadata")))[0] == 404  # UTF-8: a name
    # the query is not the path: slashes and encodings there are the parameters' business
    assert (await _answer(gateway, _request("GET", "/fhir/cerner/metadata?url=http://x//y/./%41")))[0] == 200
    assert (await gateway.get("/admin/static/app.js")).status_code == 200
    assert (await gateway.get("/.well-known/nothing")).status_code == 404


async def test_the_dashboard_serves_its_own_files_only(gateway):
    assert (await gateway.get("/admin/static/app.css")).status_code == 200
    for name in ("a" * 300, "index.html", "nothing.js", "%2e%2e"):  # too long for a file name was a 500
        missing = await gateway.get(f"/admin/static/{name}")
        assert 400 <= missing.status_code < 500 and missing.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(("host", "version"), [
    (None, "HTTP/1.1"),
    ("Host: x\r\nHost: y\r\n", "HTTP/1.1"),
    ("Host: x\r\nHost: x\r\n", "HTTP/1.0"),
    ("Host: x/y\r\n", "HTTP/1.1"),
])
async def test_a_missing_repeated_or_malformed_host_is_400(gateway, host: str | None, version: str):
    status, outcome = await _answer(gateway, _request("GET", "/health/live", host=host, version=version))
    assert status == 400 and "Host" in outcome["issue"][0]["details"]["text"]


async def test_an_http10_request_needs_no_host(gateway):
    answer, _ = await _exchange(gateway.base_url.port, [_request("GET", "/health/live", host=None, version="HTTP/1.0")])
    assert answer.startswith(b"HTTP/1.1 200")


VISIT = corpus(VIDEO_VISIT).decode()
BOOKED = VISIT.replace('"status": "noshow"', '"status": "booked"', 1)  # the Appointment's own status


@pytest.mark.parametrize("body", [
    BOOKED.replace('{', '{"status": "cancelled",', 1),  # which status was meant?
    BOOKED.replace('{', '{"st\\u0061tus": "cancelled",', 1),  # the same key, spelled with an escape
    BOOKED.replace('"reference": "Patient/12724066"', '"reference": "Patient/1", "reference": "Patient/12724066"'),
    # a colon written as an escape takes the standard library's pair-by-pair check
    BOOKED.replace('{', '{"comment": "at 10\\u003a30", "comment": "later",', 1),
    # $book Parameters: the resource inside
    '{"resourceType": "Parameters", "parameter": [{"name": "appt-resource", "resource": '
    + BOOKED.replace('{', '{"start": "2020-07-10T12:00:00Z",', 1) + '}]}',
])
async def test_a_key_named_twice_is_refused(gateway, sandbox, body: str):
    for path in ("/fhir/cerner/Appointment", "/fhir/cerner/Appointment/$translate"):
        r = await gateway.post(path, content=body.encode(), headers=auth())
        assert r.status_code == 400, r.text
        issue = r.json()["issue"][0]
        assert issue["code"] == "structure" and "key twice" in issue["details"]["text"]
        assert "cancelled" not in r.text and "Patient/1" not in r.text  # no value is echoed
    assert sandbox.app.state.sandbox.appointments() == []  # nothing was booked


async def test_a_batch_whose_bundle_names_a_key_twice_is_refused(gateway):
    entry = '{"resource": ' + BOOKED + ', "request": {"method": "POST", "url": "Appointment"}}'
    body = '{"resourceType": "Bundle", "type": "batch", "type": "transaction", "entry": [' + entry + ']}'
    r = await gateway.post("/fhir/cerner", content=body.encode(), headers=auth())
    assert r.status_code == 400 and "key twice" in r.json()["issue"][0]["details"]["text"]


async def test_the_same_key_in_different_objects_and_escaped_colons_pass(gateway):
    # "status", "reference" and "system" recur across the booking's objects; an escaped colon in a
    # string is the same text as a colon
    body = BOOKED.replace('{', '{"comment": "at 10\\u003a30",', 1)
    r = await gateway.post("/fhir/cerner/Appointment/$translate", content=body.encode(), headers=auth())
    assert r.status_code == 200, r.text
