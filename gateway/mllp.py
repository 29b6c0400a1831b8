"""HL7 v2 over MLLP: one listener per `adapter = "hl7v2"` source, on its `mllp_port`.

Each message is a block: a start byte (0x0B), the message, an end byte (0x1C) and a CR. Senders in
the wild drop the start byte or end segments with LF (the corpus's athenaNet messages do both), so
a block here is whatever comes before the end byte, with a leading start byte and line ends
trimmed. Messages on one connection are answered in order, each with its ACK, before the next is
read (what MLLP senders expect). A block over `max_bytes`, or a connection silent for
`idle_seconds`, closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

START, END = b"\x0b", b"\x1c"

Handler = Callable[[str, bytes], Awaitable[bytes]]


class MllpListener:
    def __init__(self, source: str, host: str, port: int, handle: Handler, *, max_bytes: int,
                 idle_seconds: float = 300.0) -> None:
        self.source, self._host, self._port = source, host, port
        self._handle, self._max, self._idle = handle, max_bytes, idle_seconds
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listens (several workers share the port: SO_REUSEPORT); returns the port bound."""
        self._server = await asyncio.start_server(self._serve, self._host, self._port, limit=self._max + 2,
                                                  reuse_port=True)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while (raw := await self._read(reader)) is not None:
                if raw:
                    writer.write(START + await self._handle(self.source, raw) + END + b"\r")
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError):
            pass  # the sender hung up, sent an oversized block, or went quiet: the connection ends
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next message's bytes; None at the end of the stream."""
        try:
            block = await asyncio.wait_for(reader.readuntil(END), self._idle)
        except asyncio.IncompleteReadError:
            return None  # the end of the stream; a message cut off by it is not acted on
        body = block[:-1]
        start = body.rfind(START)
        if start >= 0:
            body = body[start + 1:]
        return body.strip(b"\r\n ")
