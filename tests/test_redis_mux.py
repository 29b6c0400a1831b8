"""The booking's shared, pipelined Redis connection (gateway/state/redis_mux.py): replies go to their own
callers, on a real Redis, and every failure of the link fails closed with redis-py's exceptions,
against fake servers on loopback that misbehave on purpose."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aredis
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError, TimeoutError

from gateway.state.embedded_redis import EmbeddedRedis
from gateway.state.redis_mux import MultiplexedRedis, pack

# a script whose reply has every shape the booking's scripts return: bulk strings, integers,
# nested arrays, nil (false), a status, and a Lua float that Redis truncates to an integer
SHAPES = """
return {KEYS[1], ARGV[1], tonumber(ARGV[2]), {ARGV[1], 7, {KEYS[1]}}, false, redis.status_reply('FINE'), 3.9}
"""


@pytest.fixture
async def mux(redis_url: str) -> AsyncIterator[MultiplexedRedis]:
    m = MultiplexedRedis(redis_url, timeout=2, connect_timeout=2)
    yield m
    await m.aclose()


def with_db(url: str, db: int) -> str:
    """The fixture's Redis (TCP or the embedded server's Unix socket) with another db selected."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}?db={db}"
    return f"{parts.scheme}://{parts.netloc}/{db}"


# ----- fake servers: raw RESP over asyncio streams, counting connections


async def read_command(reader: asyncio.StreamReader) -> list[bytes] | None:
    """One RESP command (an array of bulk strings), or None at the end of the stream."""
    line = await reader.readline()
    if not line:
        return None
    assert line.startswith(b"*"), line
    args = []
    for _ in range(int(line[1:])):
        size = await reader.readline()
        args.append((await reader.readexactly(int(size[1:]) + 2))[:-2])
    return args


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def echo_reply(args: list[bytes]) -> bytes:
    """How the fake servers answer: +OK to AUTH and SELECT, PONG to PING, else the last argument."""
    if args[0].upper() in (b"AUTH", b"SELECT"):
        return b"+OK\r\n"
    if args[0].upper() == b"PING":
        return b"+PONG\r\n"
    return bulk(args[-1])


Handler = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class MisbehavingServer:
    """A TCP server speaking just enough RESP to fail as a real Redis cannot be made to on cue
    (never answering, hanging up, replying out of turn); every working case uses the real Redis."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.commands: list[list[bytes]] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            await self.handler(self.connections, reader, writer)
        except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError):
            pass  # the client dropped the link: what several tests expect
        finally:
            writer.close()

    async def serve_commands(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             answer: Callable[[list[bytes]], bytes] = echo_reply) -> None:
        while (args := await read_command(reader)) is not None:
            self.commands.append(args)
            writer.write(answer(args))


@asynccontextmanager
async def misbehaving_server(handler: Handler) -> AsyncIterator[tuple[MisbehavingServer, int]]:
    fake = MisbehavingServer(handler)
    server = await asyncio.start_server(fake._serve, "127.0.0.1", 0)
    try:
        yield fake, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in fake._writers:  # handlers may be parked forever: end their connections
            writer.transport.abort()
        await server.wait_closed()


async def within(awaitable: Awaitable[object], seconds: float = 2.0) -> object:
    """A call that never ends must fail its test, not hang the run."""
    return await asyncio.wait_for(awaitable, seconds)


def free_port() -> int:
    """A loopback port nobody listens on (bound a moment, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- on a real Redis


async def test_concurrent_scripts_each_get_their_own_reply_as_redis_py_would(mux, redis_url, prefix):
    key = f"{prefix}:shapes"
    script = mux.register_script(SHAPES)
    got = await asyncio.gather(*(script(keys=[key], args=[f"v{i}", i]) for i in range(500)))
    assert got == [[key.encode(), f"v{i}".encode(), i, [f"v{i}".encode(), 7, [key.encode()]], None, b"FINE", 3]
                   for i in range(500)]
    # the same script through redis-py gives the same values, types included
    client = aredis.Redis.from_url(redis_url)
    try:
        expected = await client.register_script(SHAPES)(keys=[key], args=["v42", 42])
    finally:
        await client.aclose()
    assert got[42] == expected
    assert [type(v) for v in got[42]] == [type(v) for v in expected]


async def test_concurrent_commands_on_distinct_keys_are_not_crossed(mux, redis_url, prefix):
    keys = [f"{prefix}:n:{i}" for i in range(500)]
    try:
        assert await asyncio.gather(*(mux.execute("INCRBY", k, i) for i, k in enumerate(keys))) == list(range(500))
        assert await asyncio.gather(*(mux.execute("GET", k) for k in keys)) == [str(i).encode() for i in range(500)]
    finally:
        with redis.Redis.from_url(redis_url) as client:
            client.delete(*keys)


async def test_a_script_redis_never_saw_is_loaded_by_eval(mux, redis_url, prefix):
    # a body no server has loaded (its comment is unique): the first EVALSHA gets NOSCRIPT
    source = f"-- {uuid.uuid4().hex}\nreturn ARGV[1] .. KEYS[1]"
    digest = hashlib.sha1(source.encode()).hexdigest()
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.script_exists(digest) == [False]
        script = mux.register_script(source)
        assert await script(keys=[f"{prefix}:k"], args=["x"]) == f"x{prefix}:k".encode()
        assert client.script_exists(digest) == [True]  # EVAL loaded it: the next call is an EVALSHA
        assert await script(keys=[f"{prefix}:k"], args=["y"]) == f"y{prefix}:k".encode()
    finally:
        client.close()


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, for what must not touch the shared one (SCRIPT FLUSH)."""
    server = EmbeddedRedis(appendonly=False).start()
    yield server
    server.stop()


async def test_a_script_runs_again_after_the_server_forgets_it(private_redis):
    # as after a Redis restart; SCRIPT FLUSH on a private server, since the shared one's scripts are everyone's
    source = "return tonumber(ARGV[1]) * 2"
    digest = hashlib.sha1(source.encode()).hexdigest()
    m = MultiplexedRedis(private_redis.url, timeout=2)
    try:
        script = m.register_script(source)
        assert await script(args=[21]) == 42
        assert await m.execute("SCRIPT", "FLUSH") == b"OK"
        assert await m.execute("SCRIPT", "EXISTS", digest) == [0]
        # several calls at once all get NOSCRIPT, all fall back to EVAL, each gets its own answer
        assert await asyncio.gather(*(script(args=[i]) for i in range(20))) == [i * 2 for i in range(20)]
        assert await m.execute("SCRIPT", "EXISTS", digest) == [1]
    finally:
        await m.aclose()


async def test_an_error_reply_fails_its_call_only_and_the_link_stays(mux, prefix):
    boom = mux.register_script("return redis.error_reply('BOOM no such thing')")
    crash = mux.register_script("error('lua crashed')")
    echo = mux.register_script("return ARGV[1]")
    link_id = await mux.execute("CLIENT", "ID")
    results = await asyncio.gather(echo(args=["a"]), boom(), echo(args=["b"]), crash(), echo(args=["c"]),
                                   return_exceptions=True)
    assert results[0::2] == [b"a", b"b", b"c"]
    assert isinstance(results[1], ResponseError) and "BOOM no such thing" in str(results[1])
    assert isinstance(results[3], ResponseError) and "lua crashed" in str(results[3])
    await mux.execute("SET", f"{prefix}:s", "text")
    with pytest.raises(ResponseError, match="not an integer"):
        await mux.execute("INCR", f"{prefix}:s")
    assert await mux.execute("CLIENT", "ID") == link_id  # the same connection all along
    await mux.execute("DEL", f"{prefix}:s")


async def test_a_db_number_in_the_url_selects_that_db(redis_url, prefix):
    key = f"{prefix}:db5"
    m = MultiplexedRedis(with_db(redis_url, 5), timeout=2)
    check5, check0 = redis.Redis.from_url(with_db(redis_url, 5)), redis.Redis.from_url(redis_url)
    try:
        assert await m.execute("SET", key, "in five") == b"OK"
        assert check5.get(key) == b"in five"
        assert check0.get(key) is None
    finally:
        check5.delete(key)  # the session's clean-up scans db 0 only
        await m.aclose()
        check5.close()
        check0.close()


# ----- against fake servers


async def test_no_answer_fails_every_waiting_call_by_the_timeout_then_reconnects():
    async def handler(n, reader, writer):
        if n == 1:  # the first link reads and never answers
            while await reader.read(65536):
                pass
        else:
            await fake.serve_commands(reader, writer)

    async with misbehaving_server(handler) as (fake, port):
        m = MultiplexedRedis(f"redis://127.0.0.1:{port}/0", timeout=0.2)
        started = time.monotonic()
        results = await within(asyncio.gather(*(m.execute("ECHO", f"m{i}") for i in range(10)), return_exceptions=True))
        elapsed = time.monotonic() - started
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert 0.15 <= elapsed < 1.0
        assert await m.execute("ECHO", "later") == b"later"  # a fresh link, not the late one
        assert fake.connections == 2
        await m.aclose()


async def test_a_dropped_link_fails_every_waiting_call_then_reconnects():
    async def handler(n, reader, writer):
        if n == 1:
            await read_command(reader)  # takes the first command, then hangs up
            return
        await fake.serve_commands(reader, writer)

    async with misbehaving_server(handler) as (fake, port):
        m = MultiplexedRedis(f"redis://127.0.0.1:{port}/0", timeout=2)
        started = time.monotonic()
        results = await within(asyncio.gather(*(m.execute("ECHO", f"m{i}") for i in range(10)), return_exceptions=True))
        assert all(isinstance(r, ConnectionError) for r in results), results
        assert time.monotonic() - started < 1.0  # at the drop, not at the timeout
        assert await asyncio.gather(*(m.execute("ECHO", f"n{i}") for i in range(10))) == [
            f"n{i}".encode() for i in range(10)]
        assert fake.connections == 2
        await m.aclose()


async def test_a_refused_connection_is_a_connection_error_at_once():
    m = MultiplexedRedis(f"redis://127.0.0.1:{free_port()}/0", timeout=2, connect_timeout=2)
    started = time.monotonic()
    results = await within(asyncio.gather(*(m.execute("PING") for _ in range(5)), return_exceptions=True))
    assert all(isinstance(r, ConnectionError) for r in results), results
    assert time.monotonic() - started < 0.5
    await m.aclose()


async def test_a_connection_that_never_says_hello_fails_by_the_connect_timeout():
    async def handler(n, reader, writer):
        while await reader.read(65536):  # AUTH is read, never answered
            pass

    async with misbehaving_server(handler) as (fake, port):
        m = MultiplexedRedis(f"redis://:pw@127.0.0.1:{port}/0", timeout=5, connect_timeout=0.2)
        started = time.monotonic()
        with pytest.raises(ConnectionError):
            await within(m.execute("PING"))
        assert time.monotonic() - started < 1.0
        await m.aclose()


@pytest.mark.parametrize("extra", ["with-the-answer", "later-while-idle"])
async def test_a_reply_nobody_asked_for_closes_the_link_and_reaches_nobody(extra):
    async def handler(n, reader, writer):
        if n == 1:
            args = await read_command(reader)
            if extra == "with-the-answer":
                writer.write(bulk(args[-1]) + b"+OK\r\n")  # two replies for one command
            else:
                writer.write(bulk(args[-1]))
                await asyncio.sleep(0.02)
                writer.write(b"+OK\r\n")
        await fake.serve_commands(reader, writer)

    async with misbehaving_server(handler) as (fake, port):
        m = MultiplexedRedis(f"redis://127.0.0.1:{port}/0", timeout=2)
        assert await m.execute("ECHO", "one") == b"one"
        await asyncio.sleep(0.1)  # the stray reply arrives while no call waits
        assert await m.execute("ECHO", "two") == b"two"  # not the stray OK
        assert fake.connections == 2  # the out-of-step link was dropped
        await m.aclose()


async def test_a_reply_before_any_command_was_written_reaches_nobody():
    """A reply is matched only to a command on the wire. (A stray reply read after a command went out
    cannot be told from its answer: RESP2 replies carry no request id. A real Redis never sends one.)"""
    async def handler(n, reader, writer):
        if n == 1:
            writer.write(b"+OK\r\n")  # stray, before the mux's SELECT went out
        await fake.serve_commands(reader, writer)

    async with misbehaving_server(handler) as (fake, port):
        m = MultiplexedRedis(f"redis://127.0.0.1:{port}/5", timeout=2)
        try:
            reply = await m.execute("ECHO", "mine")
        except ConnectionError:
            return  # failing closed is right
        finally:
            await m.aclose()
        assert reply == b"mine", f"the call was handed {reply!r}"


async def test_a_cancelled_call_does_not_shift_the_replies_of_the_others():
    release, all_read = asyncio.Event(), asyncio.Event()

    async def handler(n, reader, writer):
        pending = []
        while len(pending) < 6:  # hold the six commands, answer them together once released
            pending.append(await read_command(reader))
        all_read.set()
        await release.wait()
        writer.write(b"".join(bulk(args[-1]) for args in pending))
        await fake.serve_commands(reader, writer)

    async with misbehaving_server(handler) as (fake, port):
        m = MultiplexedRedis(f"redis://127.0.0.1:{port}/0", timeout=2)
        tasks = [asyncio.create_task(m.execute("ECHO", f"m{i}")) for i in range(6)]
        await asyncio.wait_for(all_read.wait(), 1)  # every command is on the wire
        tasks[2].cancel()
        tasks[4].cancel()
        release.set()
        results = await within(asyncio.gather(*tasks, return_exceptions=True))
        assert isinstance(results[2], asyncio.CancelledError) and isinstance(results[4], asyncio.CancelledError)
        assert [results[i] for i in (0, 1, 3, 5)] == [b"m0", b"m1", b"m3", b"m5"]
        assert await m.execute("ECHO", "after") == b"after"  # the link is still in step
        assert fake.connections == 1
        await m.aclose()


@pytest.mark.parametrize(
    ("userinfo", "db", "hello"),
    [
        ("user:pw@", 0, [[b"AUTH", b"user", b"pw"]]),
        (":pw@", 0, [[b"AUTH", b"pw"]]),
        ("user:pw@", 3, [[b"AUTH", b"user", b"pw"], [b"SELECT", b"3"]]),
    ],
)
async def test_auth_and_select_are_sent_first_on_every_link(userinfo, db, hello):
    first_bytes = []

    async def handler(n, reader, writer):
        first_bytes.append(await reader.read(len(pack(hello[0]))))
        writer.write(b"+OK\r\n")
        await fake.serve_commands(reader, writer)

    async with misbehaving_server(handler) as (fake, port):
        m = MultiplexedRedis(f"redis://{userinfo}127.0.0.1:{port}/{db}", timeout=2)
        assert await m.execute("ECHO", "hi") == b"hi"
        assert first_bytes == [pack(hello[0])]
        assert first_bytes[0].startswith(b"*%d\r\n$4\r\nAUTH\r\n" % len(hello[0]))  # RESP, as Redis reads it
        assert fake.commands == [*hello[1:], [b"ECHO", b"hi"]]
        await m.aclose()


async def test_a_refused_password_is_an_authentication_error():
    async def handler(n, reader, writer):
        await fake.serve_commands(reader, writer, lambda args: (
            b"-WRONGPASS invalid username-password pair or user is disabled.\r\n" if args[0] == b"AUTH"
            else echo_reply(args)))

    async with misbehaving_server(handler) as (fake, port):
        m = MultiplexedRedis(f"redis://user:bad@127.0.0.1:{port}/0", timeout=2)
        with pytest.raises(AuthenticationError, match="WRONGPASS"):
            await m.execute("PING")
        assert all(args[0] == b"AUTH" for args in fake.commands)  # PING never went out unauthenticated
        await m.aclose()
