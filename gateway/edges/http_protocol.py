"""The gateway's HTTP/1.1 server protocol: uvicorn's httptools protocol with what it lacks.

uvicorn has a keep-alive timeout but no limit on how long a client may take to send a request, no
cap on the size of the request head, and it answers an unparsable request in plain text. A slow or
hostile client could hold connections open byte by byte (slowloris) or send megabytes of headers.
This subclass adds, per connection:

- a head timeout: the request line and headers must arrive within `header_timeout` seconds of the
  connection opening or of the request's first byte (between requests, uvicorn's keep-alive timeout
  applies);
- a body timeout: a declared body must arrive within `body_timeout` seconds of the head;
- a head size cap (`max_header_bytes`), answered 431;
- canonical paths only, before any routing (400): no percent-encoded unreserved character or `/`,
  no empty, `.` or `..` segment, no encoded control character, nothing that does not decode to
  UTF-8. uvicorn decodes the path and Litestar merges slashes, so `/fhir/cern%65r/…` or
  `/fhir//cerner/…` would reach `cerner` past a proxy's rule on the literal prefix; `$` may come
  literally or as `%24` (no source name holds one);
- one Host header on an HTTP/1.1 request, at most one on any, of a valid form (RFC 9112 §3.2; 400);
- FHIR OperationOutcomes instead of plain text for all of these, and for unparsable requests, with
  an `X-Request-ID` like every answer of the app;
- a lingering close: a connection closed while the client may still be sending (an answer given
  before the body arrived, such as a 413, or a refused head) first reads and drops what comes, up to
  16 MiB or 5 seconds. Closing with unread bytes resets the connection, and a client that writes its
  whole request before reading (urllib, Java's and .NET's clients) would lose the answer and retry;
- the ASGI TLS extension (`scope["extensions"]["tls"]`): the client certificate a TLS connection
  presented, which uvicorn does not pass on, so a source can require mutual TLS;
- one write per answer: uvicorn writes the status line and headers, then the body, as two writes
  (two system calls, two TCP segments); here what one turn of the event loop writes goes out together.

Use `gateway_protocol(limits)` as uvicorn's `http=` option; it is a picklable partial, so it reaches
every worker process.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
from typing import Any, Callable
from urllib.parse import unquote_to_bytes

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import GatewayError, HeadersTooLarge, InvalidRequest, RequestTimeout
from gateway.booking.fhir import FHIR_JSON, error_body
from gateway.ids import new_id

__all__ = ["GatewayProtocol", "gateway_protocol"]

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
_LINGER_BYTES, _LINGER_SECONDS = 16 * 1024 * 1024, 5.0
# what a percent-encoding in a path may not stand for: an unreserved character or "/" (the encoded
# form would name the same resource as another spelling), or a control character
_NOT_ENCODED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/" + bytes(range(32)) + b"\x7f")
_HEX = frozenset(b"0123456789ABCDEFabcdef")
# RFC 3986's host (an IP literal, or a reg-name of unreserved, sub-delims and percent-encodings) and port
_HOST = re.compile(rb"(?:\[[0-9A-Za-z:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")


class _Refused(Exception):
    """Raised inside the parser's callback; httptools turns it into a parser error."""


class GatewayProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: Any = None,
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        header_timeout: float = 10.0,
        body_timeout: float = 30.0,
        max_header_bytes: int = 16_384,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._max_header_bytes = max_header_bytes
        self._head_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._refusal: GatewayError | None = None
        self._lingering = False
        self._linger_left = 0

    # --- connection ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._coalescing = _Coalescing(transport, self.loop, self._close_answered)
        tls = _tls_extension(transport.get_extra_info("ssl_object"))
        if tls is not None:
            self.app = _with_tls(self.app, tls)
        # a new connection must send a request head in time, not sit idle until keep-alive would apply
        self._arm(self._header_timeout, "the request head did not arrive in time")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # closing: what the client still sends is dropped, within bounds
            self._linger_left -= len(data)
            if self._linger_left < 0:
                self.transport.close()
            return
        super().data_received(data)

    # --- parser callbacks ---

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        if self._timer is None:
            self._arm(self._header_timeout, "the request head did not arrive in time")

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        problem = _host_problem(self.headers, self.parser.get_http_version()) or _path_problem(self.url)
        if problem is not None:  # refused before uvicorn builds the request and the app routes it
            self._refusal = InvalidRequest(problem)
            raise _Refused
        super().on_headers_complete()
        if self.cycle is not None:  # the answer's writes (its head, then its body) go out as one
            self.cycle.transport = self._coalescing  # type: ignore[assignment]
        if self._expects_body():
            self._arm(self._body_timeout, "the request body did not arrive in time")

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._lingering:  # the connection is closing: no keep-alive wait, no pipelined request
            self.server_state.total_requests += 1
            return
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to what httptools could not parse (or what we refused while parsing)
        self._refuse(self._refusal or InvalidRequest("the request is not valid HTTP/1.1"))

    # --- helpers ---

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self._max_header_bytes:
            self._refusal = HeadersTooLarge(f"the request line and headers are over {self._max_header_bytes} bytes")
            raise _Refused

    def _expects_body(self) -> bool:
        for name, value in self.headers:
            if name == b"content-length":
                return value.strip() not in (b"0", b"")
            if name == b"transfer-encoding":
                return True
        return False

    def _arm(self, seconds: float, why: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._timed_out, why)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self, why: str) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # an answer is under way; nothing sensible can be added to it
            return
        # the handler (if any) is waiting for the body: connection_lost tells it the client is gone
        self._refuse(RequestTimeout(why), linger=False)

    def _refuse(self, error: GatewayError, *, linger: bool = True) -> None:
        body = error_body(error)
        head = [b"HTTP/1.1 %d %s\r\n" % (error.status, _REASONS.get(error.status, b"Error"))]
        for name, value in self.server_state.default_headers:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"content-type: " + FHIR_JSON.encode() + b"\r\n")
        head.append(b"x-request-id: " + new_id().encode() + b"\r\n")  # as every answer of the app has
        head.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self._close(linger)

    def _close_answered(self) -> None:
        # an answer that closes the connection (the client asked, or HTTP/1.0) may have come before
        # the request's body did (a 413, a 401 before reading): the client may still be sending it
        self._close(linger=self.cycle is not None and self.cycle.more_body)

    def _close(self, linger: bool) -> None:
        if not linger or self.transport.is_closing():
            self.transport.close()
            return
        self._lingering, self._linger_left = True, _LINGER_BYTES
        self._coalescing.shut()  # a handler still running writes nothing after this answer
        self._disarm()
        self._timer = self.loop.call_later(_LINGER_SECONDS, self.transport.close)
        if self.transport.can_write_eof():  # the answer is whole: the client may see the end of it
            self.transport.write_eof()
        self.flow.resume_reading()


def _host_problem(headers: list[tuple[bytes, bytes]], version: str) -> str | None:
    hosts = [value for name, value in headers if name == b"host"]
    if len(hosts) > 1:
        return "a request has one Host header"
    if not hosts:
        return "an HTTP/1.1 request needs a Host header" if version == "1.1" else None
    return None if _HOST.fullmatch(hosts[0]) else "the Host header is not a host and port"


def _path_problem(target: bytes) -> str | None:
    """Why the request target's path is not in its one canonical spelling, if it is not."""
    if b"%" not in target and b"//" not in target and b"/." not in target:
        return None  # nearly every request: three scans, no parse
    path = httptools.parse_url(target).path or b""
    if b"//" in path:
        return "the path has an empty segment (//)"
    if any(segment in (b".", b"..") for segment in path.split(b"/")):
        return "the path has a . or .. segment"
    if b"%" not in path:
        return None
    for encoded in path.split(b"%")[1:]:
        if len(encoded) < 2 or encoded[0] not in _HEX or encoded[1] not in _HEX:
            return "a % in the path is not followed by two hexadecimal digits"
        if int(encoded[:2], 16) in _NOT_ENCODED:
            return "the path percent-encodes a character that must be written as itself (or a / or a control character)"
    try:
        unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        return "the path's percent-encodings are not UTF-8"
    return None


class _Coalescing:
    """A connection's transport as an answer sees it: writes made in one turn of the event loop are
    joined and written at the end of that turn (or before a close), in order. A close goes to
    `close` (the protocol's), after which nothing more is written."""

    __slots__ = ("_transport", "_loop", "_pending", "_close", "_closed")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop,
                 close: Callable[[], None] | None = None) -> None:
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] = []
        self._close = close or transport.close
        self._closed = False

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self.shut()
        self._close()

    def shut(self) -> None:
        self._closed = True
        self._pending.clear()

    def is_closing(self) -> bool:
        return self._closed or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # anything else uvicorn asks of its transport
        return getattr(self._transport, name)


def _tls_extension(ssl_object: ssl.SSLObject | None) -> dict[str, Any] | None:
    """The ASGI TLS extension for one connection; the peer certificate was verified by the handshake
    (the server asks for one only when a client CA is configured, and refuses any it cannot verify)."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": None,  # read from the certificate by who needs it (gateway.edges.mtls)
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,  # Python's ssl module does not expose the numeric suite
    }


def _with_tls(app: Any, tls: dict[str, Any]) -> Any:
    async def app_with_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["extensions"] = {**(scope.get("extensions") or {}), "tls": tls}
        await app(scope, receive, send)

    return app_with_tls


def gateway_protocol(*, header_timeout: float, body_timeout: float, max_header_bytes: int) -> Any:
    """uvicorn's `http=` option: the protocol with these limits (a partial, so it pickles to workers)."""
    return functools.partial(
        GatewayProtocol, header_timeout=header_timeout, body_timeout=body_timeout, max_header_bytes=max_header_bytes,
    )
