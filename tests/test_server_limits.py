"""The server's own limits (gateway.edges.http_protocol), over raw sockets, as a slow or hostile client
would meet them: head and body timeouts (408), a head size cap (431), and unparsable requests
(400), each answered with an OperationOutcome, never plain text, and each closing the connection."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest

from gateway.settings import LimitSettings
from tests.conftest import CONFIG, VIDEO_VISIT, auth, corpus, make_settings, serve_gateway

LIMITS = LimitSettings(header_timeout_seconds=0.6, body_timeout_seconds=0.6, max_header_bytes=4096,
                       keep_alive_seconds=5)


@pytest.fixture
async def gateway(redis_url, prefix, sandbox):
    async with serve_gateway(make_settings(redis_url, prefix, sandbox.url, limits=LIMITS)) as client:
        yield client


async def _exchange(port: int, chunks: list[bytes], pause: float = 0.0) -> tuple[bytes, float]:
    """Send the chunks (pausing between them) while reading, until the server closes; the answer
    and the seconds from connecting to the close."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def trickle() -> None:
        try:
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(pause)
        except ConnectionError:  # the server has answered and closed
            pass

    sending = asyncio.create_task(trickle())
    answer = b""
    try:
        while block := await asyncio.wait_for(reader.read(65536), timeout=10):
            answer += block
    except ConnectionResetError:  # the server closed while we were still writing
        pass
    finally:
        took = time.monotonic() - started
        sending.cancel()
        writer.close()
    return answer, took


def _outcome(answer: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return status, headers, json.loads(body)


def _port(client) -> int:
    return client.base_url.port


async def test_a_silent_connection_is_answered_408_and_closed(gateway):
    answer, took = await _exchange(_port(gateway), [])
    status, headers, body = _outcome(answer)
    assert status == 408 and headers["content-type"] == "application/fhir+json" and headers["connection"] == "close"
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "timeout"
    assert 0.5 < took < 3


async def test_a_head_sent_a_byte_at_a_time_cannot_hold_the_connection(gateway):
    head = b"POST /fhir/cerner/Appointment HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    answer, took = await _exchange(_port(gateway), [bytes([b]) for b in head], pause=0.02)
    status, _, body = _outcome(answer)
    # bytes keep arriving, yet the whole head is due within the timeout from its first byte
    assert status == 408 and body["issue"][0]["details"]["text"] == "the request head did not arrive in time"
    assert took < 3


async def test_a_body_that_stops_arriving_is_408_and_logged_as_the_clients_fault(gateway, log_file: Path):
    body = corpus(VIDEO_VISIT)
    head = (f"POST /fhir/cerner/Appointment HTTP/1.1\r\nHost: x\r\nAuthorization: {auth()['Authorization']}\r\n"
            f"Content-Type: application/fhir+json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    answer, took = await _exchange(_port(gateway), [head + body[:50]])
    status, _, outcome = _outcome(answer)
    assert status == 408 and outcome["issue"][0]["details"]["text"] == "the request body did not arrive in time"
    assert took < 3
    await asyncio.sleep(0.3)  # the handler learns of the disconnect and logs its line
    lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
    mine = [x for x in lines if x.get("event") == "request" and x.get("status") in (408, 500)
            and x.get("source") == "cerner"]
    assert mine and mine[-1]["status"] == 408  # the client's fault, not the gateway's (never a 500)


async def test_keep_alive_idle_time_is_not_the_head_timeout(gateway):
    # a client that pauses between requests longer than the head timeout keeps its connection
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(gateway))
    try:
        for _ in range(2):
            writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            await asyncio.sleep(1.0)  # > header_timeout_seconds, < keep_alive_seconds
    finally:
        writer.close()


async def test_an_oversized_head_is_431(gateway):
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 500) for i in range(12))
    answer, _ = await _exchange(_port(gateway), [head + b"\r\n"])
    status, headers, body = _outcome(answer)
    assert status == 431 and headers["content-type"] == "application/fhir+json"
    assert body["issue"][0]["code"] == "too-costly" and "4096 bytes" in body["issue"][0]["details"]["text"]


@pytest.mark.parametrize("request_bytes", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"GET /health/live HTTP/1.1\r\nHost: x\r\nBad Header Name: v\r\n\r\n",
    b"POST /fhir/cerner/Appointment HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
    b"POST /fhir/cerner/Appointment HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
async def test_unparsable_requests_get_an_operation_outcome(gateway, request_bytes: bytes):
    answer, _ = await _exchange(_port(gateway), [request_bytes])
    status, headers, body = _outcome(answer)
    assert status == 400 and headers["content-type"] == "application/fhir+json"
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "structure"


async def test_ordinary_bookings_pass_the_server_limits(gateway):
    r = await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT),
                           headers=auth(**{"Content-Type": "application/fhir+json"}))
    assert r.status_code == 201, r.text


def test_limits_are_validated_at_start(tmp_path: Path):
    from gateway.settings import ConfigError, load_file_settings

    config = tmp_path / "config"
    shutil.copytree(CONFIG, config)
    toml = config / "gateway.toml"
    toml.write_text(toml.read_text().replace("[limits]\n", "[limits]\nheader_timeout_seconds = 0\n"))
    with pytest.raises(ConfigError, match=r"\$\.limits: sizes, times and max_connections must be positive"):
        load_file_settings(config)



class _Recording:
    """What the coalescer writes to: the calls it makes, in order (a transport's write side)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing


async def test_an_answer_leaves_in_one_write():
    """uvicorn writes an answer's head and body separately (two system calls, two TCP segments);
    the gateway's protocol gives it a transport that joins one loop turn's writes, in order, and
    writes what is pending before a close."""
    from gateway.edges.http_protocol import _Coalescing

    inner = _Recording()
    out = _Coalescing(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    out.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    out.write(b"ok")
    assert inner.calls == []  # nothing until the loop turns
    await asyncio.sleep(0)
    assert inner.calls == [("write", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")]
    out.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    out.close()  # a closing answer is written first, not lost
    assert inner.calls[1:] == [("write", b"HTTP/1.1 400 Bad Request\r\n\r\n"), ("close", b"")]
    out.write(b"late")
    await asyncio.sleep(0)
    assert inner.calls[-1] == ("close", b"")  # nothing is written to a closed connection
