"""One shared, pipelined Redis connection for the booking's scripts.

Why not redis-py here: each redis-py call checks a connection out of the pool, runs it through
retries, encoders and its parser and back, about 45 µs of CPU per EVALSHA (measured; valkey-glide
was no cheaper, coredis twice as dear), and a booking makes two. Redis answers one connection's
commands in the order they came, so every caller can write to the same connection and take the
replies in turn: the commands of one event-loop tick go out in one write, hiredis parses the
replies, and a call costs about 8 µs. Everything else (admin, the request log, the queue, Cluster)
keeps redis-py.

It does only what those scripts need: EVALSHA, falling back to EVAL when Redis does not know the
script, on one Redis server. It fails closed: a reply that does not come within the timeout, or a
dropped link, fails every call waiting on that connection with redis-py's own exceptions (so
callers catch one set) and is never retried here; the next call connects afresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from typing import Any, Sequence

import hiredis
from redis.connection import parse_url
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    NoScriptError,
    ResponseError,
    TimeoutError,
)

_Arg = str | bytes | int | float


def pack(args: Sequence[_Arg]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, (int, float)):
            arg = repr(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


def _error(reply: hiredis.ReplyError) -> ResponseError:
    text = str(reply)
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    if text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
        return AuthenticationError(text)
    return ResponseError(text)


class _Link(asyncio.Protocol):
    """One connection: calls wait in a FIFO for their replies; writes gather until the loop turns."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._reader = hiredis.Reader()
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._out: list[bytes] = []
        self._written = 0  # waiting calls whose commands are on the wire: only they can be answered
        self._transport: asyncio.Transport | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False

    # ----- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self._waiting
        while (reply := self._reader.gets()) is not False:
            if not self._written:  # a reply to no command sent: the stream is out of step
                self._fail(ConnectionError("Redis sent a reply nobody asked for"))
                return
            self._written -= 1
            future, _ = waiting.popleft()
            if future.done():  # its caller gave up (cancelled); the reply still had to be taken
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(_error(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("the connection to Redis was lost"))

    # ----- calls

    def call(self, packed: bytes) -> asyncio.Future[Any]:
        future = self._loop.create_future()
        if self.closed:
            future.set_exception(ConnectionError("the connection to Redis is closed"))
            return future
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(packed)
        self._waiting.append((future, self._loop.time() + self._timeout))
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(self._waiting[0][1], self._check)
        return future

    def _flush(self) -> None:
        if self._out and not self.closed and self._transport is not None:
            self._transport.write(b"".join(self._out))
            self._written = len(self._waiting)  # every waiting call's command has now been sent
        self._out.clear()

    def _check(self) -> None:
        """Replies come in order, so only the oldest waiting call can be late: one timer, not one per call."""
        self._watchdog = None
        if not self._waiting:
            return
        deadline = self._waiting[0][1]
        if deadline <= self._loop.time():
            self._fail(TimeoutError(f"Redis did not answer within {self._timeout:g} s"))
        else:
            self._watchdog = self._loop.call_at(deadline, self._check)

    def _fail(self, error: Exception) -> None:
        """The connection is of no more use (late, lost or out of step): every waiting call fails."""
        if self.closed:
            return
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._out.clear()
        waiting, self._waiting = self._waiting, deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(error)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self._fail(ConnectionError("the connection to Redis was closed"))


class Script:
    """A Lua script run by SHA, loaded on first use: `await script(keys=[...], args=[...])`, as redis-py's."""

    __slots__ = ("_mux", "_source", "_sha")

    def __init__(self, mux: MultiplexedRedis, source: str) -> None:
        self._mux, self._source = mux, source.encode()
        self._sha = hashlib.sha1(self._source).hexdigest().encode()

    async def __call__(self, keys: Sequence[_Arg] = (), args: Sequence[_Arg] = ()) -> Any:
        try:
            return await self._mux.execute(b"EVALSHA", self._sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or flushed Redis: EVAL runs it and loads it again
            return await self._mux.execute(b"EVAL", self._source, len(keys), *keys, *args)


class MultiplexedRedis:
    def __init__(self, url: str, *, timeout: float = 2.0, connect_timeout: float = 2.0) -> None:
        options = parse_url(url)
        self._host, self._port, self._path = options.get("host", "localhost"), options.get("port", 6379), options.get("path")
        self._ssl: ssl.SSLContext | None = None
        if url.startswith("rediss://"):
            self._ssl = ssl.create_default_context()
            if options.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
                self._ssl.check_hostname, self._ssl.verify_mode = False, ssl.CERT_NONE
        self._hello: list[bytes] = []  # sent first on every new connection
        if options.get("password") is not None:
            user = options.get("username")
            self._hello.append(pack([b"AUTH", user, options["password"]] if user else [b"AUTH", options["password"]]))
        if options.get("db"):
            self._hello.append(pack([b"SELECT", int(options["db"])]))
        self._timeout, self._connect_timeout = timeout, connect_timeout
        self._link: _Link | None = None
        self._connecting: asyncio.Future[_Link] | None = None

    def register_script(self, source: str) -> Script:
        return Script(self, source)

    async def execute(self, *args: _Arg) -> Any:
        link = self._link
        if link is None or link.closed:
            link = await self._connect()
        return await link.call(pack(args))

    def send(self, packed: bytes) -> asyncio.Future[Any] | None:
        """A command (`pack`ed) queued now, on a connected link, its reply a future: it goes out in
        this tick's write with whatever else is sent before the loop turns (no task made to run it
        beside another call). None when there is no link yet: `execute` connects."""
        link = self._link
        return None if link is None or link.closed else link.call(packed)

    async def _connect(self) -> _Link:
        # callers arriving while a connection is being made wait for that one
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            link = await asyncio.wait_for(self._open(loop), self._connect_timeout)
        except BaseException as exc:
            error = exc if isinstance(exc, (ConnectionError, AuthenticationError)) else ConnectionError(
                f"cannot connect to Redis: {type(exc).__name__}")
            self._connecting.set_exception(error)
            self._connecting.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            self._connecting = None
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise error from None
        self._link = link
        self._connecting.set_result(link)
        self._connecting = None
        return link

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Link:
        def factory() -> _Link:
            return _Link(loop, self._timeout)

        try:
            if self._path:
                _, link = await loop.create_unix_connection(factory, self._path)
            else:
                _, link = await loop.create_connection(factory, self._host, self._port, ssl=self._ssl)
        except OSError as exc:
            raise ConnectionError(f"cannot connect to Redis: {exc.strerror or type(exc).__name__}") from None
        try:
            for command in self._hello:
                await link.call(command)
        except BaseException:
            link.close()
            raise
        return link

    async def aclose(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
