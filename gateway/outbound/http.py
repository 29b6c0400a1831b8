"""HTTP/1.1 toward Salesforce and the EHRs: a small keep-alive client on asyncio and httptools.

Why not a library: the booking path's largest single cost was its HTTP client, and the exactly-once
logic needs one thing every library blurs. Measured at 32 concurrent calls on this machine
(benchmarks/README.md, "HTTP clients"): httpx 974 µs of CPU per call, httpx over aiohttp 258,
niquests 510, aiosonic 82 (and a pool bug that reconnects for every call after 1,000), aiohttp 63,
the Rust pyreqwest 36 and rnet 84; this client 16. And the failure that matters, "was the request
certainly never sent, or may it have reached Salesforce", is not in the exception types of
pyreqwest (its ConnectError covers a reset after sending), rnet or niquests, is mislabelled by
httpx-aiohttp, and needs split timeouts in aiohttp. Here it is two exceptions: `NeverSent` (no
connection could be had in time: refused, DNS, TLS, connect timeout, pool exhausted) and `Lost`
(the request was written and no complete answer came back: a timeout, a dropped connection, an
answer that is not HTTP, or one over `max_answer_bytes`, which is never held in memory).

What it does, all Salesforce needs: HTTP/1.1 keep-alive pools per origin, bounded; bodies with a
Content-Length; answers with a Content-Length, chunked, or up to the close; TLS with certificates
and host names checked against certifi's roots (the same bundle httpx uses); one deadline per call.
What it does not: redirects (never followed, as before), cookies (Salesforce's must not be
replayed), compression (not asked for), proxies (as before: the aiohttp session ignored them too).
Connections idle longer than `_IDLE_SECONDS` are closed instead of reused, so a connection the
server is about to drop is seldom written to; a POST is never re-sent here.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit

import httptools

# query parameters: a mapping, or pairs where a name repeats (`start=ge…&start=lt…`)
Params = Mapping[str, str] | Sequence[tuple[str, str]]

__all__ = ["Answer", "HttpClient", "Lost", "NeverSent"]

_IDLE_SECONDS = 50.0  # under the usual 60 s keep-alive of servers and load balancers
_USER_AGENT = b"ehr-gateway"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # names in lower case; a repeated header keeps its last value
    content: bytes


class NeverSent(Exception):
    """The connection was never made (refused, DNS, TLS, connect timeout, pool exhausted): nothing left."""

    def __init__(self, kind: str) -> None:  # "unreachable", "timeout" or "busy" (no pooled connection came free)
        super().__init__(kind)
        self.kind = kind


class Lost(Exception):
    """The request may have reached Salesforce, but no complete answer came back."""

    def __init__(self, kind: str) -> None:  # "timeout", "connection-lost" or "too-large"
        super().__init__(kind)
        self.kind = kind


class _Connection(asyncio.Protocol):
    """One connection; one request at a time. The answer, or its loss, completes `waiter`."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Answer] | None = None
        self.closed = False
        self.idle_since = 0.0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._framed = False  # the answer says where it ends (Content-Length or chunked)
        self._in_answer = False
        self._size = 0  # the answer's head and body so far, against the pool's bound

    # ----- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes nobody asked for (between calls): the connection is out of step
            self.abort()
            return
        self._size += len(data)
        if self._size > self._pool.max_answer_bytes:  # an answer that could exhaust memory is not read
            self._lose("too-large")
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._lose("connection-lost")
        except httptools.HttpParserError:
            self._lose("connection-lost")  # not HTTP: what was sent may still have been acted on

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed, self.closed = self.closed, True
        if self._in_answer and not self._framed and self._parser_headers_done:
            self._complete()  # an answer that ends at the close (no length, not chunked)
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(Lost("connection-lost"))
        if not was_closed:
            self._pool.gone(self)

    # ----- httptools callbacks

    _parser_headers_done = False

    def on_message_begin(self) -> None:
        self._in_answer, self._parser_headers_done = True, False
        self._headers, self._body = {}, []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._parser_headers_done = True
        headers = self._headers
        self._framed = ("content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()
                        or self._parser.get_status_code() in (204, 304))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if not self._parser.should_keep_alive():
            self.closed = True
            self._pool.gone(self)
            if self.transport is not None:
                self.transport.close()
        self._complete()

    # -----

    def _complete(self) -> None:
        self._in_answer, self._size = False, 0
        answer = Answer(self._parser.get_status_code(), self._headers, b"".join(self._body))
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(answer)

    def _lose(self, kind: str) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(Lost(kind))
        self.abort()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._pool.gone(self)
        if self.transport is not None:
            self.transport.abort()


class _Pool:
    """The connections to one origin: reused newest first, at most `limit` open, callers queue beyond."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, limit: int, max_answer_bytes: int) -> None:
        self.host, self.port, self.tls, self.limit = host, port, tls, limit
        self.max_answer_bytes = max_answer_bytes
        self.idle: list[_Connection] = []
        self.open = 0
        self.closed = False
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()

    async def take(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        """A live connection, reused or new, by `deadline`; NeverSent otherwise."""
        while True:
            now = loop.time()
            while self.idle:
                conn = self.idle.pop()
                if now - conn.idle_since > _IDLE_SECONDS:
                    conn.abort()
                elif _alive(conn):
                    return conn
            if self.open < self.limit:
                self.open += 1  # this caller's slot, until its connection is gone
                break
            waiter: asyncio.Future[_Connection | None] = loop.create_future()
            self.waiters.append(waiter)
            timer = loop.call_at(deadline, _expire, waiter, NeverSent("busy"))
            try:
                handed = await waiter
            except BaseException:
                # a connection or a slot handed over just as the wait ended must not be lost with it
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._pass_on(waiter.result(), loop.time())
                raise
            finally:
                timer.cancel()
            if handed is None:
                break  # a slot, handed over: connect in it
            if _alive(handed):
                return handed
            # closed between being given back and being taken: its slot went on when it closed; again
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port, ssl=self.tls,
                                       server_hostname=self.host if self.tls else None),
                max(0.0, deadline - loop.time()),
            )
        except OSError as exc:  # ssl.SSLError, DNS errors and TimeoutError are OSErrors
            self._slot_free()
            raise NeverSent("timeout" if isinstance(exc, TimeoutError) else "unreachable") from None
        except BaseException:
            self._slot_free()
            raise
        return conn

    def _pass_on(self, handed: _Connection | None, now: float) -> None:
        if handed is None:
            self._slot_free()
        else:
            self.give_back(handed, now)

    def give_back(self, conn: _Connection, now: float) -> None:
        if conn.closed:
            return
        if self.closed:  # the client was closed while this call was under way
            conn.abort()
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = now
        self.idle.append(conn)

    def gone(self, conn: _Connection) -> None:
        """`conn` closed (or will be): its slot is free."""
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        self._slot_free()

    def _slot_free(self) -> None:
        """A slot came free: handed to the first caller waiting (it connects in it), else counted free."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.open -= 1

    def close(self) -> None:
        self.closed = True
        for conn in list(self.idle):
            conn.abort()


def _alive(conn: _Connection) -> bool:
    return not conn.closed and conn.transport is not None and not conn.transport.is_closing()


@lru_cache(maxsize=64)
def _target(url: str) -> tuple[tuple[str, str, int], bytes, bytes]:
    """(origin, request target, Host header line) of a URL; the few the gateway calls are cached."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("a Salesforce URL is http(s)://host[:port]/path")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname
    shown = host if ":" not in host else f"[{host}]"
    if parts.port:
        shown += f":{parts.port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (parts.scheme, host, port), target.encode(), b"Host: " + shown.encode("idna") + b"\r\n"


class CallTuning(Protocol):
    """What a client of one called system is tuned by (`[salesforce]`, a source's `[….ehr]`)."""

    connect_timeout_seconds: float
    timeout_seconds: float
    max_concurrent_calls: int
    max_answer_bytes: int


class HttpClient:
    def __init__(self, tuning: CallTuning) -> None:
        self._total = tuning.timeout_seconds  # the whole call, answer read included
        # waiting for a pooled connection plus making one: beyond it the call is "never sent"
        self._connect = tuning.connect_timeout_seconds
        self._limit = tuning.max_concurrent_calls + 4  # the booking calls, and room for token and look-up calls
        self._max_answer = tuning.max_answer_bytes
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._tls: ssl.SSLContext | None = None

    def _pool(self, origin: tuple[str, str, int]) -> _Pool:
        pool = self._pools.get(origin)
        if pool is None:
            tls = None
            if origin[0] == "https":
                if self._tls is None:
                    import httpx  # certifi's roots, host names checked: httpx's own default context

                    self._tls = httpx.create_ssl_context()
                tls = self._tls
            pool = self._pools[origin] = _Pool(origin[1], origin[2], tls, self._limit, self._max_answer)
        return pool

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Params | None = None,
        form: Mapping[str, str] | None = None,
    ) -> Answer:
        origin, target, host = _target(url)
        if params:
            target += (b"&" if b"?" in target else b"?") + urlencode(params).encode()
        head = [method.encode(), b" ", target, b" HTTP/1.1\r\n", host, b"User-Agent: ", _USER_AGENT, b"\r\n"]
        if form is not None:
            body = urlencode(form).encode()
            head.append(b"Content-Type: application/x-www-form-urlencoded\r\n")
        for name, value in (headers or {}).items():
            head += (name.encode(), b": ", value.encode(), b"\r\n")
        body = body or b""
        if body or method not in ("GET", "HEAD"):
            head.append(b"Content-Length: %d\r\n" % len(body))
        head += (b"\r\n", body)

        loop = asyncio.get_running_loop()
        start = loop.time()
        pool = self._pool(origin)
        conn = await pool.take(loop, start + min(self._connect, self._total))
        assert conn.transport is not None
        conn.waiter = waiter = loop.create_future()
        # from this write on, Salesforce may act on the request: any failure is Lost, never NeverSent
        conn.transport.write(b"".join(head))
        timer = loop.call_at(start + self._total, _expire, waiter, Lost("timeout"))
        try:
            answer = await waiter
        except Lost:
            conn.abort()
            raise
        except BaseException:  # cancelled: the connection is mid-answer and cannot be reused
            conn.abort()
            raise
        finally:
            timer.cancel()
            conn.waiter = None
        pool.give_back(conn, loop.time())
        return answer

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


def _expire(waiter: asyncio.Future[Any], error: Exception) -> None:
    if not waiter.done():
        waiter.set_exception(error)
