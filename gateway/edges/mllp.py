"""HL7 v2 over MLLP: one listener per `adapter = "hl7v2"` source, on its `mllp_port`.

Each message is a block: a start byte (0x0B), the message, an end byte (0x1C) and a CR. Senders in
the wild drop the start byte or end segments with LF (the corpus's athenaNet messages do both), so
a block here is whatever comes before the end byte, with a leading start byte and line ends
trimmed. Messages on one connection are answered in order, each with its ACK, before the next is
read (what MLLP senders expect).

MLLP has no authentication, so what a stranger can hold is capped (`[mllp]`): connections per
listener and per client address (one over a cap is closed at once, unanswered), a connection silent
for `idle_seconds` (or a block that takes longer) is closed, and a block over `max_message_bytes`
or an empty one is answered AE without being handled. An oversized block is drained to its end byte
(at most `_DRAIN_FACTOR` times the cap) so the connection can go on; past that it is answered and
the connection closed cleanly. Refusals are counted (`ehrgw_mllp_refused_total`) and logged, a line per reason at most
every `_LOG_EVERY` seconds.

`SiuPath` is what a listener hands each message to: the HL7 v2 edge's way into the booking path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapters.hl7v2 import FILLER, PLACER, Header, ack, parse_siu, read_header
from gateway.booking.booker import Booker, Target, Trace
from gateway.errors import GatewayError, InvalidRequest, Issue, PayloadTooLarge
from gateway.ids import new_id
from gateway.logs import log
from gateway.operators.summary import Recorder
from gateway.settings import MllpSettings, SourceSettings

if TYPE_CHECKING:
    from gateway.operators.metrics import Metrics

START, END = b"\x0b", b"\x1c"
_DRAIN_FACTOR = 4
_LOG_EVERY = 10.0

Handler = Callable[[str, bytes], Awaitable[bytes]]
# an SIU whose stored answer is Salesforce's refusal, replayed: its ACK says so (AE), quoting nothing
_REFUSED = Issue(code="processing", diagnostics="Salesforce refused this booking when it was first sent")


class SiuPath:
    """One SIU message from a listener: S12 books, S13/S14 reschedule, S15 cancels, through the same
    maps, rules and idempotency (keyed on the placer and filler ids). The ACK says AA, AE (sending
    the same message again cannot succeed: unreadable, unmapped, refused, an unknown appointment,
    ids used for another one) or AR (it can: Redis or Salesforce unavailable, a 429, the circuit
    open, the appointment in flight, or a fault of the gateway's own). The message is parsed once;
    the ACK is built from its MSH read cheaply, and names this request log entry."""

    def __init__(self, sources: dict[str, SourceSettings], limits: MllpSettings, booker: Booker,
                 recorder: Recorder) -> None:
        self._sources, self._limits, self._booker, self._recorder = sources, limits, booker, recorder

    async def __call__(self, source: str, raw: bytes) -> bytes:
        started = time.perf_counter()
        request_id = new_id()
        trace = Trace(request_id=request_id)
        status, error, op, issues = 500, None, "book", ()
        booker = self._booker
        try:
            siu = parse_siu(raw, self._sources[source].time_zone, self._limits)
            if siu.event == "book":
                answer = await booker.book_prepared(source, booker.check(source, siu.booking, trace), None, trace)
            else:
                op = "change"
                target = Target(system=PLACER, value=siu.placer) if siu.placer else Target(system=FILLER, value=siu.filler)
                answer = await booker.change_booking(source, siu.booking, target, None, trace)
            status = answer.status
            code = "AA" if status < 400 else "AE"
            if status >= 400:  # Salesforce's refusal, or its replay (stored as the answer it was)
                issues = tuple(trace.refusal.issues) if trace.refusal else (_REFUSED,)
        except GatewayError as exc:
            status, error, issues = exc.status, exc, tuple(exc.issues)
            code = "AR" if status >= 500 or status in (409, 429) else "AE"  # AR: the same message may pass later
        except Exception as exc:  # a bug: the sender gets an AR (send again), the log the exception's type only
            log.error("unhandled", error=type(exc).__name__, path="mllp")
            code = "AR"
        finally:
            # the v2 message is not kept: a replay from the dashboard speaks FHIR
            self._recorder.summarise(request_id, source, op, status, trace, started, error, None, None, None)
        return ack(read_header(raw), code, issues, reference=request_id)


@dataclass(frozen=True)
class _Block:
    body: bytes  # the message; of an oversized block, its first bytes only
    oversized: bool = False
    ended: bool = True  # False: an oversized block whose end byte was not found within the drain bound


class MllpListener:
    def __init__(self, source: str, host: str, port: int, handle: Handler, limits: MllpSettings,
                 metrics: Metrics | None = None) -> None:
        self.source, self._host, self._port = source, host, port
        self._handle, self._limits, self._metrics = handle, limits, metrics
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._peers: Counter[str] = Counter()
        self._unlogged: Counter[str] = Counter()
        self._logged_at: dict[str, float] = {}

    async def start(self) -> int:
        """Listens (several workers share the port: SO_REUSEPORT); returns the port bound."""
        self._server = await asyncio.start_server(self._serve, self._host, self._port,
                                                  limit=self._limits.max_message_bytes + 2, reuse_port=True)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        if len(self._connections) >= self._limits.max_connections:
            return self._refuse(writer, "max_connections")
        if self._peers[peer] >= self._limits.max_connections_per_peer:
            return self._refuse(writer, "max_connections_per_peer")
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._peers[peer] += 1
        try:
            while (block := await self._read(reader)) is not None:
                writer.write(START + await self._answer(block) + END + b"\r")
                await writer.drain()
                if not block.ended:  # the rest of the block cannot be told from the next message
                    await self._linger(reader, writer)
                    break
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the sender hung up or went quiet: the connection ends
        finally:
            self._connections.discard(task)
            self._peers[peer] -= 1
            if not self._peers[peer]:
                del self._peers[peer]
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, block: _Block) -> bytes:
        if block.oversized:
            self._refused("too_large")
            too_large = PayloadTooLarge(f"the message is over {self._limits.max_message_bytes} bytes",
                                        expression=("MSH",))
            return ack(read_header(block.body), "AE", tuple(too_large.issues))
        if not block.body:
            self._refused("empty")
            return ack(Header(), "AE", tuple(InvalidRequest("an empty message", expression=("MSH",)).issues))
        return await self._handle(self.source, block.body)

    async def _read(self, reader: asyncio.StreamReader) -> _Block | None:
        """The next block, within `idle_seconds`; None at the end of the stream (a block cut off by
        it is not acted on)."""
        cap = self._limits.max_message_bytes
        head, drained = b"", 0
        async with asyncio.timeout(self._limits.idle_seconds):
            while True:
                try:
                    chunk = await reader.readuntil(END)
                except asyncio.IncompleteReadError:
                    return None
                except asyncio.LimitOverrunError as exc:  # over the cap: the bytes wait in the buffer
                    chunk = await reader.readexactly(exc.consumed)
                    head, drained = head or chunk[:cap], drained + len(chunk)
                    if drained > _DRAIN_FACTOR * cap:
                        return _Block(_trim(head), oversized=True, ended=False)
                    continue
                if drained:
                    return _Block(_trim(head), oversized=True)
                body = _trim(chunk[:-1])
                return _Block(body[:cap], oversized=True) if len(body) > cap else _Block(body)

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After the ACK to a block too long to drain: the write side is shut, and what the sender
        still sends is dropped for a moment, so the close is clean (a reset can lose the ACK before
        the sender reads it)."""
        writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(min(self._limits.idle_seconds, 2.0)):
                while await reader.read(65_536):
                    pass

    def _refuse(self, writer: asyncio.StreamWriter, reason: str) -> None:
        self._refused(reason)
        writer.close()  # at once, unanswered: the file descriptor is what the cap protects

    def _refused(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.mllp_refused(self.source, reason)
        self._unlogged[reason] += 1
        now = time.monotonic()
        if now - self._logged_at.get(reason, -_LOG_EVERY) >= _LOG_EVERY:  # a flood of refusals, a line a while
            log.warning("mllp_refused", source=self.source, reason=reason, count=self._unlogged.pop(reason))
            self._logged_at[reason] = now


def _peer(writer: asyncio.StreamWriter) -> str:
    address = writer.get_extra_info("peername")
    return str(address[0]) if isinstance(address, tuple) and address else "?"


def _trim(block: bytes) -> bytes:
    start = block.rfind(START)
    if start >= 0:
        block = block[start + 1:]
    return block.strip(b"\r\n ")
