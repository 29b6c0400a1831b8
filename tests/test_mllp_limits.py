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
from tests.test_hl7v2 import mllp_gateway, msa, state

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


async def send_and_read(port: int, messages: list[bytes]) -> list[str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    acks = []
    try:
        for message in messages:
            writer.write(b"\x0b" + message + b"\x1c\r")
            await writer.drain()
            acks.append((await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 60))[1:-2].decode())
    finally:
        writer.close()
    return acks


async def test_messages_of_delimiters_at_the_size_cap_are_ae_and_health_stays_live(settings, sandbox):
    """Four senders of messages made of separators, each at the size cap: each is answered AE with its
    MSH-10, and meanwhile the same gateway's /health/live answers (a generous bound, not a speed
    target: the event loop is not held by a parse)."""
    fillers = [b"|", b"^", b"~", b"S|\r"]
    async with mllp_gateway(settings) as (port, http):
        senders = [asyncio.create_task(send_and_read(port, [
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
