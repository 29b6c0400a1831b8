"""HL7 v2 over MLLP toward an EHR's incoming interface (Epic's scheduling interface takes the cancels):
one message framed `\\x0b…\\x1c\\x0d` on a connection of its own, and the one framed answer read back,
bounded in size and time.

The same two failures as the HTTP client's, for the same reason (whether a cancel may have been
applied): `NeverSent` when no connection could be made (nothing went out), `Lost` once the message
was written and no complete answer came back (a timeout, a closed connection, an answer over the
bound): the EHR may have acted on it.
"""

from __future__ import annotations

import asyncio

from gateway.outbound.http import Lost, NeverSent

START, END = b"\x0b", b"\x1c\r"


class MllpClient:
    def __init__(self, address: str, *, connect_timeout: float, timeout: float, max_answer_bytes: int = 65_536) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self._connect, self._timeout, self._max = connect_timeout, timeout, max_answer_bytes

    async def exchange(self, message: bytes) -> bytes:
        """Send `message` (unframed, segments ended by CR) and return the answer without its frame."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=self._max), self._connect)
        except TimeoutError:
            raise NeverSent("timeout") from None
        except OSError:
            raise NeverSent("unreachable") from None
        try:
            # from this write on the EHR may act on the message: any failure is Lost
            writer.write(START + message + END)
            await writer.drain()
            return await asyncio.wait_for(self._answer(reader), self._timeout)
        except TimeoutError:
            raise Lost("timeout") from None
        except asyncio.LimitOverrunError:
            raise Lost("too-large") from None
        except (asyncio.IncompleteReadError, OSError):
            raise Lost("connection-lost") from None
        finally:
            writer.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader) -> bytes:
        await reader.readuntil(START)  # bytes before the frame's start are no answer
        return (await reader.readuntil(END))[:-len(END)]
