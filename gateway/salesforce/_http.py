"""HTTP toward Salesforce: aiohttp, used directly.

The booking path's single largest cost was the HTTP client: httpx's own transport spends about
1.4 ms of CPU per call at 32 concurrent calls, httpx over the aiohttp transport about 250 µs, and
aiohttp alone about 70 µs (benchmarks/README.md). So Salesforce calls go through aiohttp, behind
this small interface that says the one thing the exactly-once logic needs from a failure: was the
request certainly never sent (`NeverSent`), or may it have reached Salesforce (`Lost`)?

The session keeps no cookie jar (Salesforce sets cookies that must not be replayed), uses httpx's
CA bundle (certifi, certificates and host names checked), follows no redirect, and is created on
first use, inside the running loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import httpx
from multidict import CIMultiDictProxy

from gateway.settings import SalesforceTuning

__all__ = ["Answer", "HttpClient", "Lost", "NeverSent"]


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    content: bytes


class NeverSent(Exception):
    """The connection was never made (refused, DNS, TLS, connect timeout): nothing left."""


class Lost(Exception):
    """The request may have reached Salesforce, but no complete answer came back."""

    def __init__(self, kind: str) -> None:  # "timeout" or "connection-lost"
        super().__init__(kind)
        self.kind = kind


class HttpClient:
    def __init__(self, tuning: SalesforceTuning) -> None:
        self._tuning = tuning
        # total: the whole call, answer read included; connect: waiting for a pooled connection
        # plus making one, so an exhausted pool or an unreachable host is "never sent"
        self._timeout = aiohttp.ClientTimeout(total=tuning.timeout_seconds, connect=tuning.connect_timeout_seconds,
                                              sock_connect=tuning.connect_timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._tuning.max_concurrent_calls + 4, keepalive_timeout=60,
                                         ssl=httpx.create_ssl_context())
        self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                              timeout=self._timeout, auto_decompress=True)
        return self._session

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        form: Mapping[str, str] | None = None,
    ) -> Answer:
        session = self._session or self._open()
        try:
            async with session.request(method, url, data=form if form is not None else body, headers=headers,
                                       params=params, allow_redirects=False) as response:
                return Answer(response.status, response.headers, await response.read())
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            raise NeverSent from None
        except TimeoutError:  # the total deadline, or a read that stalled (aiohttp's SocketTimeoutError)
            raise Lost("timeout") from None
        except aiohttp.ClientError:  # dropped after sending, reset, or an answer that is not HTTP
            raise Lost("connection-lost") from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
