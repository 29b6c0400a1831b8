"""The Salesforce HTTP/1.1 client (gateway/outbound/http.py) against servers written here, speaking
raw HTTP/1.1 on loopback: keep-alive and the pool's bound, every way an answer can be framed, the
bytes a request is made of, TLS, and the one distinction the exactly-once logic needs from a
failure: `NeverSent` (certainly not sent) or `Lost` (may have been acted on)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.outbound.http import HttpClient, Lost, NeverSent
from gateway.settings import SalesforceTuning
from tests.certs import CA


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    head: bytes  # the request line and headers as sent


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One HTTP/1.1 request with a Content-Length body (all the client sends), or None at the end."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    line, *fields = head[:-4].decode("latin-1").split("\r\n")
    method, target, version = line.split(" ")
    assert version == "HTTP/1.1"
    headers = {}
    for field in fields:
        name, _, value = field.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return Request(method, target, headers, body, head)


def answer(body: bytes, status: str = "200 OK", *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# respond(connection number, request, writer): the answer is written; False ends the connection
Respond = Callable[[int, Request, asyncio.StreamWriter], Awaitable[bool | None]]


async def echo_target(conn: int, request: Request, writer: asyncio.StreamWriter) -> None:
    writer.write(answer(request.target.encode()))


class FakeHttp:
    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.connections = 0  # accepted in all
        self.open = self.most_open = 0  # open at once
        self.requests: list[Request] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        self._writers.append(writer)
        conn = self.connections
        try:
            while (request := await read_request(reader)) is not None:
                self.requests.append(request)
                if await self.respond(conn, request, writer) is False:
                    break
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up (a cancelled or timed-out call aborts its connection)
        finally:
            self.open -= 1
            writer.close()


@asynccontextmanager
async def http_server(respond: Respond = echo_target, *, tls: ssl.SSLContext | None = None,
                      ) -> AsyncIterator[tuple[FakeHttp, str]]:
    fake = FakeHttp(respond)
    server = await asyncio.start_server(fake.serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield fake, f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.close()
        for writer in fake._writers:  # handlers may be parked forever: end their connections
            writer.transport.abort()
        await server.wait_closed()


@asynccontextmanager
async def http_client(**tuning: float) -> AsyncIterator[HttpClient]:
    client = HttpClient(SalesforceTuning(**tuning))
    try:
        yield client
    finally:
        await client.aclose()


def free_port() -> int:
    """A loopback port nobody listens on (bound a moment, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(condition: Callable[[], bool], timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the server never got there"
        await asyncio.sleep(0.005)


# ----- keep-alive and the pool


async def test_sequential_calls_reuse_one_connection():
    async with http_server() as (fake, url), http_client() as client:
        for i in range(50):
            got = await client.request("GET", f"{url}/n/{i}")
            assert (got.status, got.content) == (200, f"/n/{i}".encode())
        assert fake.connections == 1
        assert len(fake.requests) == 50


async def test_concurrent_calls_stay_within_the_pool_limit_and_get_their_own_answers():
    async def slow_echo(conn, request, writer):
        await asyncio.sleep(0.02)  # long enough for the calls to overlap
        writer.write(answer(request.body))

    async with http_server(slow_echo) as (fake, url), http_client(max_concurrent_calls=2) as client:
        got = await asyncio.gather(*(client.request("POST", f"{url}/c", body=f"b{i}".encode()) for i in range(20)))
        assert [a.content for a in got] == [f"b{i}".encode() for i in range(20)]
        assert fake.most_open <= 6  # max_concurrent_calls + 4
        assert fake.connections == 6  # the limit was used, then the connections were reused
        assert len(fake.requests) == 20


async def write_slowly(writer: asyncio.StreamWriter, *pieces: bytes) -> None:
    """Each piece in its own segment, so the client reads the answer in parts."""
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.002)


BIG = bytes(range(256)) * 800  # 200 KB: more than one read


@pytest.mark.parametrize(
    ("framing", "connections"),
    [("content-length", 1), ("chunked", 1), ("content-length-then-close", 2), ("until-close", 2)],
)
async def test_every_framing_of_an_answer_is_read_whole(framing, connections):
    async def respond(conn, request, writer):
        head = "HTTP/1.1 201 Created\r\nX-Custom: Yes\r\n"
        if framing == "content-length":
            await write_slowly(writer, f"{head}Content-Length: {len(BIG)}\r\n\r\n".encode(), BIG[:1000], BIG[1000:])
        elif framing == "chunked":
            chunks = [BIG[:10], BIG[10:70_000], BIG[70_000:]]
            await write_slowly(writer, f"{head}Transfer-Encoding: chunked\r\n\r\n".encode(),
                               *(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks), b"0\r\n\r\n")
        elif framing == "content-length-then-close":
            await write_slowly(writer, f"{head}Content-Length: {len(BIG)}\r\nConnection: close\r\n\r\n".encode(), BIG)
            return False
        else:  # no length, not chunked: the body ends where the server closes
            await write_slowly(writer, f"{head}Connection: close\r\n\r\n".encode(), BIG[:5000], BIG[5000:])
            return False

    async with http_server(respond) as (fake, url), http_client() as client:
        for _ in range(2):
            got = await client.request("GET", f"{url}/x")
            assert (got.status, got.content) == (201, BIG)
            assert got.headers["x-custom"] == "Yes"  # names in lower case
        assert fake.connections == connections  # a closed connection is not used again


async def test_the_request_carries_host_length_headers_query_and_form():
    async with http_server() as (fake, url), http_client() as client:
        await client.request("POST", f"{url}/services/data?x=1", body=b'{"a": 1}',
                             headers={"Authorization": "Bearer t0k", "Content-Type": "application/json"},
                             params={"q": "a b&c=d", "n": "2"})
        await client.request("POST", f"{url}/services/oauth2/token",
                             form={"grant_type": "client_credentials", "client_secret": "s&t=u v"})
        await client.request("GET", url, params={"q": "é"})
    port = url.rsplit(":", 1)[1]
    sent, token, bare = fake.requests
    assert (sent.method, sent.target) == ("POST", "/services/data?x=1&q=a+b%26c%3Dd&n=2")
    assert sent.headers["host"] == f"127.0.0.1:{port}"
    assert sent.headers["content-length"] == "8" and sent.body == b'{"a": 1}'
    assert sent.headers["authorization"] == "Bearer t0k" and sent.headers["content-type"] == "application/json"
    assert token.headers["content-type"] == "application/x-www-form-urlencoded"
    assert token.body == b"grant_type=client_credentials&client_secret=s%26t%3Du+v"
    assert token.headers["content-length"] == str(len(token.body))
    assert (bare.method, bare.target) == ("GET", "/?q=%C3%A9")


# ----- failures: never sent, or lost


async def test_a_refused_connection_is_never_sent():
    async with http_client(connect_timeout_seconds=2) as client:
        started = time.monotonic()
        with pytest.raises(NeverSent) as refused:
            await client.request("POST", f"http://127.0.0.1:{free_port()}/x", body=b"b")
        assert time.monotonic() - started < 0.5
        assert refused.value.kind == "unreachable"  # the Salesforce client renews a cached token's instance then


@pytest.mark.parametrize(
    "partial",
    [
        b"",  # read, then hung up without a word
        b"HTTP/1.1 200 OK\r\nContent-Le",  # half the headers
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd",  # half the body
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n",  # no last chunk
    ],
)
async def test_a_connection_dropped_before_the_whole_answer_is_lost(partial):
    async def respond(conn, request, writer):
        if conn > 1:
            writer.write(answer(b"fine"))
            return None
        writer.write(partial)
        return False

    async with http_server(respond) as (fake, url), http_client(timeout_seconds=5) as client:
        started = time.monotonic()
        with pytest.raises(Lost) as lost:
            await client.request("POST", f"{url}/book", body=b"{}")
        assert lost.value.kind == "connection-lost"
        assert time.monotonic() - started < 1.0  # at the drop, not at the timeout
        assert (await client.request("GET", f"{url}/next")).content == b"fine"
        assert fake.connections == 2


@pytest.mark.parametrize("stall", ["before-the-answer", "after-the-headers"])
async def test_an_answer_that_does_not_come_in_time_is_lost_by_the_timeout(stall):
    async def respond(conn, request, writer):
        if stall == "after-the-headers":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        await asyncio.Event().wait()  # never more

    async with http_server(respond) as (fake, url), http_client(timeout_seconds=0.3) as client:
        started = time.monotonic()
        with pytest.raises(Lost) as lost:
            await client.request("POST", f"{url}/book", body=b"{}")
        elapsed = time.monotonic() - started
        assert lost.value.kind == "timeout"
        assert 0.25 <= elapsed < 1.0
        assert len(fake.requests) == 1  # it was sent: that is why it is Lost, not NeverSent


@pytest.mark.parametrize("garbage", [b"+OK\r\n", b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n"])
async def test_an_answer_that_is_not_http_is_lost(garbage):
    async def respond(conn, request, writer):
        writer.write(garbage if conn == 1 else answer(b"fine"))

    async with http_server(respond) as (fake, url), http_client(timeout_seconds=5) as client:
        started = time.monotonic()
        with pytest.raises(Lost) as lost:
            await client.request("POST", f"{url}/book", body=b"{}")
        assert lost.value.kind == "connection-lost"
        assert time.monotonic() - started < 1.0  # told apart at once, not left to the timeout
        assert (await client.request("GET", f"{url}/next")).content == b"fine"
        assert fake.connections == 2  # the confused connection was dropped


# ----- the pool under pressure


def held_server() -> tuple[Respond, asyncio.Semaphore]:
    """/hold waits for the test to let one answer go; anything else answers at once."""
    gate = asyncio.Semaphore(0)

    async def respond(conn, request, writer):
        if request.target.startswith("/hold"):
            await gate.acquire()
        writer.write(answer(request.target.encode()))

    return respond, gate


async def test_a_full_pool_makes_the_next_call_wait_then_never_sent_or_served():
    respond, gate = held_server()
    async with http_server(respond) as (fake, url), \
            http_client(max_concurrent_calls=1, connect_timeout_seconds=0.2, timeout_seconds=3) as client:
        held = [asyncio.create_task(client.request("GET", f"{url}/hold/{i}")) for i in range(5)]
        await until(lambda: len(fake.requests) == 5)  # the limit: max_concurrent_calls + 4
        started = time.monotonic()
        with pytest.raises(NeverSent) as busy:
            await client.request("POST", f"{url}/sixth", body=b"{}")
        assert 0.15 <= time.monotonic() - started < 1.0  # waited the connect timeout for a free slot
        assert busy.value.kind == "busy"  # the instance answers: no reason to renew the token
        assert len(fake.requests) == 5 and fake.connections == 5  # nothing of the sixth went out

        queued = asyncio.create_task(client.request("GET", f"{url}/queued"))
        await asyncio.sleep(0.05)
        assert not queued.done()  # waiting for a connection
        gate.release()  # one held call is answered: its connection goes to the queued call
        assert (await queued).content == b"/queued"
        assert fake.connections == 5

        for _ in range(4):
            gate.release()
        assert [a.content for a in await asyncio.gather(*held)] == [f"/hold/{i}".encode() for i in range(5)]
        # no slot was lost on the way: the pool still serves more calls than its limit at once
        got = await asyncio.gather(*(client.request("GET", f"{url}/after/{i}") for i in range(30)))
        assert [a.content for a in got] == [f"/after/{i}".encode() for i in range(30)]
        assert fake.most_open <= 5


async def test_an_idle_connection_the_server_closed_is_not_reused():
    async def respond(conn, request, writer):
        writer.write(answer(b"fine"))
        if conn == 1:
            await writer.drain()
            await asyncio.sleep(0.02)  # then the server drops the idle connection (its keep-alive timeout)
            return False

    async with http_server(respond) as (fake, url), http_client() as client:
        assert (await client.request("POST", f"{url}/a", body=b"1")).content == b"fine"
        await asyncio.sleep(0.1)
        assert (await client.request("POST", f"{url}/b", body=b"2")).content == b"fine"  # not Lost
        assert fake.connections == 2


async def test_a_connection_closed_while_handed_to_a_queued_call_is_not_used():
    async def respond(conn, request, writer):
        await asyncio.sleep(0.05)
        writer.write(answer(b"ok"))  # keep-alive by its headers...
        await writer.drain()
        return False  # ...but the server hangs up at once, as one closing idle connections may

    async with http_server(respond) as (fake, url), \
            http_client(max_concurrent_calls=1, connect_timeout_seconds=1, timeout_seconds=2) as client:
        # five calls fill the pool, the sixth waits and is handed the first connection given back
        got = await asyncio.gather(*(client.request("GET", f"{url}/{i}") for i in range(6)), return_exceptions=True)
        assert got[5] == got[0]  # the sixth was not written to the dead connection, so not Lost...
        assert len(fake.requests) == 6 and fake.connections == 6  # ...but sent on a fresh one


async def test_cancelled_calls_give_their_slots_back():
    respond, gate = held_server()
    async with http_server(respond) as (fake, url), \
            http_client(max_concurrent_calls=1, connect_timeout_seconds=0.2, timeout_seconds=3) as client:
        in_flight = [asyncio.create_task(client.request("GET", f"{url}/hold/a{i}")) for i in range(5)]
        await until(lambda: len(fake.requests) == 5)
        queued = asyncio.create_task(client.request("GET", f"{url}/queued"))
        await asyncio.sleep(0.02)
        for task in (*in_flight, queued):  # cancelled mid-answer, and while waiting for a slot
            task.cancel()
        results = await asyncio.gather(*in_flight, queued, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)

        # all five slots are free again: five new calls are all sent at once...
        again = [asyncio.create_task(client.request("GET", f"{url}/hold/b{i}")) for i in range(5)]
        await until(lambda: len(fake.requests) == 10)
        assert fake.connections == 10  # a connection cancelled mid-answer is never reused
        with pytest.raises(NeverSent):  # ...and the limit still holds
            await client.request("GET", f"{url}/over")
        for _ in range(10):
            gate.release()
        assert [a.content for a in await asyncio.gather(*again)] == [f"/hold/b{i}".encode() for i in range(5)]
        got = await asyncio.gather(*(client.request("GET", f"{url}/after/{i}") for i in range(20)))
        assert [a.content for a in got] == [f"/after/{i}".encode() for i in range(20)]


# ----- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("http-client-pki")
    ca = CA("http client test CA")
    files = {"ca": ca.write(folder / "ca.crt")}
    files["server"], files["server_key"] = ca.issue(folder, "server", common_name="127.0.0.1",
                                                    dns=("localhost",), ip="127.0.0.1")
    files["other"], files["other_key"] = ca.issue(folder, "other", common_name="other.example",
                                                  dns=("other.example",))
    return files


def server_tls(pki: dict[str, Path], who: str = "server") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki[who], pki[f"{who}_key"])
    return context


async def test_https_with_a_trusted_certificate(pki):
    async with http_server(tls=server_tls(pki)) as (fake, url), http_client() as client:
        # trust the test CA: the client's TLS context is made on first use unless one is set
        client._tls = ssl.create_default_context(cafile=str(pki["ca"]))
        for host in (url, url.replace("127.0.0.1", "localhost")):
            got = await client.request("POST", f"{host}/secure", body=b"{}")
            assert (got.status, got.content) == (200, b"/secure")
        assert len(fake.requests) == 2


@pytest.mark.parametrize("case", ["unknown-ca", "wrong-host-name"])
async def test_https_that_cannot_be_verified_is_never_sent(pki, case):
    async with http_server(tls=server_tls(pki, "server" if case == "unknown-ca" else "other")) as (fake, url), \
            http_client(connect_timeout_seconds=2) as client:
        if case == "wrong-host-name":  # the CA is trusted, the certificate names another host
            client._tls = ssl.create_default_context(cafile=str(pki["ca"]))
        # else: the client's own context (certifi's roots) does not know the test CA
        started = time.monotonic()
        with pytest.raises(NeverSent):
            await client.request("POST", f"{url}/secure", body=b"{}")
        assert time.monotonic() - started < 1.0
        assert fake.requests == []


async def test_bytes_between_calls_end_the_connection():
    """An answer nobody asked for (a second answer to one request) puts the connection out of step:
    it is dropped, and the next call goes out on a fresh one and gets its own answer."""
    async def twice(conn: int, request: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(request.target.encode()))
        if request.target == "/first":
            await asyncio.sleep(0.02)
            writer.write(answer(b"stray"))

    async with http_server(twice) as (fake, url), http_client() as client:
        assert (await client.request("GET", f"{url}/first")).content == b"/first"
        await asyncio.sleep(0.1)  # the stray answer arrives while the connection is idle
        assert (await client.request("GET", f"{url}/second")).content == b"/second"
        assert fake.connections == 2


async def test_a_call_under_way_when_the_client_closes_leaves_no_connection_open():
    async def slow(conn: int, request: Request, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.1)
        writer.write(answer(b"late"))

    async with http_server(slow) as (fake, url):
        client = HttpClient(SalesforceTuning())
        call = asyncio.create_task(client.request("GET", f"{url}/x"))
        await until(lambda: len(fake.requests) == 1)
        await client.aclose()
        assert (await call).content == b"late"  # the call under way still gets its answer...
        await until(lambda: fake.open == 0)  # ...and its connection is closed, not left idle
