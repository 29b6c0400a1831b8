"""The MLLP edge's limits, over real sockets: MLLP has no authentication, so what one sender can cost
the gateway is capped before a message is read (separator counts, size) and per connection (how
many, from one address, how long idle); refusals are ACKs (AE), never a reset, or a closed
connection when it is over a connection cap."""

from __future__ import annotations

import asyncio
import time

import pytest

from adapters.hl7v2 import parse_siu
from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.settings import MllpSettings
from tests.conftest import make_settings
from tests.test_hl7v2 import ATHENA, exchange, mllp_gateway, msa, state

HEADER = "MSH|^~\\&|A|B|C|D|200401010000||SIU^S12|{control}|P|2.3\r"
LIMITS = MllpSettings()


def delimiters(control: str, filler: bytes, size: int) -> bytes:
    """A message that is nothing but separators after its MSH, `size` bytes in all."""
    head = HEADER.format(control=control).encode()
    return head + filler * ((size - len(head)) // len(filler)) + filler[: (size - len(head)) % len(filler)]


@pytest.mark.parametrize("separator", ["|", "^", "~", "&", "\r", "\n"])
def test_separator_counts_are_capped_before_parsing(separator):
    """At the cap a message goes on to be parsed (and is refused for what it lacks); one separator
    more and it is refused by the counts alone."""
    head = HEADER.format(control="1").replace("\r", separator if separator in "\r\n" else "\r")
    used = sum(head.count(c) for c in "|^~&") if separator not in "\r\n" else head.count(separator) + 1
    cap = LIMITS.max_fields if separator not in "\r\n" else LIMITS.max_segments
    at_cap = (head + separator * (cap - used)).encode()
    with pytest.raises(InvalidRequest) as parsed:
        parse_siu(at_cap, None)
    assert not isinstance(parsed.value, PayloadTooLarge)
    with pytest.raises(PayloadTooLarge):
        parse_siu(at_cap + separator.encode(), None)


async def test_messages_of_delimiters_at_the_size_cap_are_ae_and_health_stays_live(settings, sandbox):
    """Four senders of messages made of separators, each at the size cap: each is answered AE with its
    MSH-10, and meanwhile the same gateway's /health/live answers (a generous bound, not a speed
    target: the event loop is not held by a parse)."""
    fillers = [b"|", b"^", b"~", b"S|\r"]
    async with mllp_gateway(settings) as (port, http):
        senders = [asyncio.create_task(exchange(port, *[
            delimiters(f"dl-{i}-{n}", filler, LIMITS.max_message_bytes) for n in range(3)]))
            for i, filler in enumerate(fillers)]
        waits = []
        while not all(s.done() for s in senders) or not waits:
            started = time.monotonic()
            assert (await http.get("/health/live", timeout=30)).status_code == 200
            waits.append(time.monotonic() - started)
            await asyncio.sleep(0.02)
        answers = [await s for s in senders]
        assert max(waits) < 2.0, waits
    for i, acks in enumerate(answers):
        assert [msa(a)[1:3] for a in acks] == [["AE", f"dl-{i}-{n}"] for n in range(3)]
    assert state(sandbox).appointments() == []


def capped(redis_url, prefix, sandbox, **limits):
    return make_settings(redis_url, prefix, sandbox.url, mllp=MllpSettings(**limits))


# a message answered at once, without Salesforce: not an SIU
PROBE = b"\x0b" + HEADER.format(control="probe").replace("SIU^S12", "ADT^A01").encode() + b"\x1c\r"


async def open_answered(port: int, host: str = "127.0.0.1"):
    """A connection the listener has taken: a message sent on it was answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(host, 0))
    writer.write(PROBE)
    ack = (await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 10))[1:-2].decode()
    assert msa(ack)[2] == "probe"
    return reader, writer


async def closed_unanswered(port: int, host: str = "127.0.0.1") -> bool:
    """A new connection is closed by the listener before it answers anything (False: it answered)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(host, 0))
    try:
        writer.write(PROBE)
        await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 10)
        return False
    except (asyncio.IncompleteReadError, ConnectionError):
        return True
    finally:
        writer.close()


async def refused_count(http, reason: str) -> float:
    body = (await http.get("/metrics")).text
    line = f'ehrgw_mllp_refused_total{{reason="{reason}",source="athena"}}'
    return next((float(x.split()[-1]) for x in body.splitlines() if x.startswith(line)), 0.0)


async def test_connections_over_the_listener_cap_are_closed_counted_and_logged(redis_url, prefix, sandbox, log_file):
    settings = capped(redis_url, prefix, sandbox, max_connections=4)
    async with mllp_gateway(settings) as (port, http):
        held = [await open_answered(port) for _ in range(4)]
        assert await closed_unanswered(port)
        assert await refused_count(http, "max_connections") == 1
        for reader, writer in held:  # the ones inside the cap still work
            writer.write(b"\x0b" + ATHENA.read_bytes().rstrip(b"\r\n") + b"\x1c\r")
            assert msa((await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 30))[1:-2].decode())[1:3] == ["AA", "403"]
        held.pop()[1].close()
        deadline = time.monotonic() + 10
        while await closed_unanswered(port):  # the freed place is taken again, once the close is seen
            assert time.monotonic() < deadline
        for _, writer in held:
            writer.close()
    assert len(state(sandbox).appointments()) == 1
    refusals = [line for line in log_file.read_text().splitlines() if '"mllp_refused"' in line]
    assert any('"reason":"max_connections"' in line and '"source":"athena"' in line for line in refusals)


async def test_connections_over_the_per_address_cap_are_closed_and_others_still_come_in(redis_url, prefix, sandbox):
    settings = capped(redis_url, prefix, sandbox, max_connections=4, max_connections_per_peer=2)
    async with mllp_gateway(settings) as (port, http):
        held = [await open_answered(port) for _ in range(2)]
        assert await closed_unanswered(port)
        held.append(await open_answered(port, host="127.0.0.2"))  # another address is not held back
        assert await refused_count(http, "max_connections_per_peer") == 1
        assert await refused_count(http, "max_connections") == 0
        for _, writer in held:
            writer.close()


async def test_a_silent_connection_and_a_block_that_never_ends_are_closed_after_idle_seconds(
        redis_url, prefix, sandbox):
    settings = capped(redis_url, prefix, sandbox, idle_seconds=0.5)
    async with mllp_gateway(settings) as (port, _):
        silent = await asyncio.open_connection("127.0.0.1", port)
        trickle = await asyncio.open_connection("127.0.0.1", port)
        trickle[1].write(b"\x0b" + HEADER.format(control="slow").encode())  # and then nothing
        for reader, writer in (silent, trickle):
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing answered
            writer.close()


async def test_oversized_and_empty_blocks_are_ae_and_the_connection_goes_on(redis_url, prefix, sandbox):
    """Over the cap by one byte or by several times it, the block is drained and answered AE with its
    MSH-10; an empty block is AE with MSA-2 `""` (HL7's null: no control id to echo); the same
    connection then books."""
    settings = capped(redis_url, prefix, sandbox, max_message_bytes=4096)
    async with mllp_gateway(settings) as (port, _):
        just_over = delimiters("over-1", b"x", 4097)
        far_over = delimiters("over-2", b"|", 3 * 4096)
        acks = await exchange(port, *[just_over, far_over, b"", ATHENA.read_bytes().rstrip(b"\r\n")])
    assert [msa(a)[1:3] for a in acks] == [["AE", "over-1"], ["AE", "over-2"], ["AE", '""'], ["AA", "403"]]
    assert msa(acks[0])[3] == "MSH: over the gateway's caps for one message"
    assert len(state(sandbox).appointments()) == 1


async def test_a_block_too_long_to_drain_is_answered_then_closed_cleanly(redis_url, prefix, sandbox):
    settings = capped(redis_url, prefix, sandbox, max_message_bytes=4096)
    async with mllp_gateway(settings) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x0b" + delimiters("endless", b"x", 10 * 4096))  # no end byte
        ack = (await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 10))[1:-2].decode()
        assert msa(ack)[1:3] == ["AE", "endless"]
        assert await asyncio.wait_for(reader.read(), 10) == b""  # then the end of the stream, not a reset
        writer.close()


@pytest.mark.parametrize(("table", "refused"), [
    ("[mllp]\nmax_connections = 8\nidle_seconds = 5\n", None),
    ("[mllp]\nmax_connections_per_peer = 0\n", r"\$\.mllp: caps and idle_seconds must be positive"),
    ("[mllp]\nmax_sockets = 8\n", r"mllp.*max_sockets"),  # an unknown key stops the start too
])
def test_the_mllp_table_is_checked_at_load(tmp_path, table, refused):
    import shutil

    from gateway.settings import ConfigError, load_file_settings
    from tests.conftest import CONFIG

    config = tmp_path / "config"
    shutil.copytree(CONFIG, config)
    with (config / "gateway.toml").open("a") as toml:
        toml.write("\n" + table)
    if refused is None:
        assert load_file_settings(config).mllp == MllpSettings(max_connections=8, idle_seconds=5)
    else:
        with pytest.raises(ConfigError, match=refused):
            load_file_settings(config)


def test_a_delimiter_that_is_not_ascii_is_refused_before_parsing():
    """The caps count the delimiters' bytes; a delimiter byte that is not UTF-8 was decoded to U+FFFD,
    whose bytes are not in the message, so nothing was counted while python-hl7 split on every one
    (200 KB of them: about 3 s on the event loop). It is refused (AE, MSH-2) before any parse."""
    mark = b"\xff"
    head = mark.join([b"MSH", b"^~\\&", b"A", b"B", b"C", b"D", b"200401010000", b"", b"SIU^S12", b"1", b"P", b"2.3"])
    with pytest.raises(InvalidRequest) as refused:
        parse_siu(head + b"\r" + mark * 200_000, "UTC")
    assert refused.value.issues[0].expression == ("MSH-2",)
