"""One call to a called system (Salesforce, an EHR), the same way for each: the circuit breaker asked
first, a bound on concurrent calls, the shared bearer token, one renewal when the system refuses it
(and, when `resend`, one retry with the new one), one renewal when the token's address cannot be
reached (an instance that moved), and the call's health told to the breaker.

What is the system's own is given to the `Caller`: where a token's calls go (`base`), which answers
say the system cannot serve (`unhealthy`: they count against the breaker) and which say the token was
refused (`auth_refused`), and the error a lost answer becomes (`lost`: the request went out, its
outcome is unknown).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.errors import GatewayError, Unavailable
from gateway.outbound.http import Answer, HttpClient, Lost, NeverSent, Params
from gateway.outbound.tokens import SharedToken, Token
from gateway.state.breaker import CircuitBreaker


@dataclass(slots=True)
class CallRecord:
    """What one call did, for the request's summary log line (no patient data)."""

    status: int | None = None
    latency_ms: float = 0.0
    error_code: str | None = None
    retried_auth: bool = False
    in_doubt: bool = False  # the request may have reached the system without its answer reaching us
    # in doubt, but the system itself answered in full (its own error shape): it is done with the
    # request, so a look-up now is final; else (a drop, a timeout, an intermediary's page) it may
    # still be working on it
    answered: bool = False
    reauthenticated: bool = False  # answered 401 and not re-sent (`resend` false): the token was renewed
    matches: int | None = None  # a look-up: how many records matched


class Caller:
    def __init__(self, http: HttpClient, tokens: SharedToken | None, breaker: CircuitBreaker | None, *,
                 limit: int, name: str, retry_after: int, base: Callable[[Token | None], str],
                 unhealthy: Callable[[Answer], bool], auth_refused: Callable[[Answer], bool],
                 lost: Callable[[], GatewayError], headers: Mapping[str, str] | None = None) -> None:
        self._http, self._tokens, self._breaker = http, tokens, breaker
        self._gate = asyncio.Semaphore(limit)
        self._name, self._retry_after = name, retry_after
        self._base, self._unhealthy, self._auth_refused, self._lost = base, unhealthy, auth_refused, lost
        self._headers = dict(headers or {})
        self.served_at = -float("inf")  # when a call last answered healthily (perf_counter)

    async def call(self, method: str, path: str, body: bytes, record: CallRecord,
                   params: Params | None = None, *, resend: bool = True, counted: bool = True,
                   gated: bool = True, headers: Mapping[str, str] | None = None) -> Answer:
        """`counted`: the call's health goes to the breaker; `gated`: the breaker is asked first."""
        if self._breaker is not None and gated:
            await self._breaker.before_call(counted=counted)  # open: refused at once, nothing sent
        started = time.perf_counter()
        healthy = False
        try:
            async with self._gate:
                response = await self._exchange(method, path, body, record, params, resend, headers)
            healthy = not self._unhealthy(response)
            if healthy:
                self.served_at = time.perf_counter()
        finally:
            record.latency_ms = (time.perf_counter() - started) * 1000
            if self._breaker is not None and counted:
                # the system's health only: a refusal of the request itself (a 4xx) is an answer
                await (self._breaker.record_success() if healthy else self._breaker.record_failure())
        record.status = response.status
        return response

    async def _exchange(self, method: str, path: str, body: bytes, record: CallRecord,
                        params: Params | None, resend: bool,
                        headers: Mapping[str, str] | None) -> Answer:
        """The call's attempts: a second one only after a token renewal."""
        tokens = self._tokens
        for attempt in (1, 2):
            mark = tokens.refreshes if tokens is not None else 0
            token = await tokens.token() if tokens is not None else None
            try:
                response = await self._send(method, token, path, body, record, params, headers)
            except NeverSent as exc:
                # A cached token whose address cannot be reached may name an instance that moved (an
                # org migrated, a sandbox restarted on another port): renewed once, and if the new one
                # names another address, the call goes there (nothing was sent: even a create may go).
                if tokens is not None and token is not None and attempt == 1 and exc.kind != "busy" \
                        and not tokens.minted_since(mark, token):
                    if self._base(await tokens.renew(token)) != self._base(token):
                        record.retried_auth = True
                        continue
                raise Unavailable(f"{self._name} cannot be reached; nothing was sent",
                                  retry_after=self._retry_after) from None
            if tokens is not None and token is not None and response.status == 401 and attempt == 1 \
                    and self._auth_refused(response):
                # one refresh (in flight once across workers), then one retry
                record.retried_auth = True
                await tokens.invalidate(token)
                if resend:
                    continue
                record.reauthenticated = True
            return response
        raise AssertionError("the second attempt always returns")

    async def _send(self, method: str, token: Token | None, path: str, body: bytes, record: CallRecord,
                    params: Params | None, headers: Mapping[str, str] | None) -> Answer:
        """One request with `token`. NeverSent goes to the caller; a lost answer is in doubt."""
        sent = {"Authorization": f"Bearer {token.access_token}"} if token is not None else {}
        sent.update(self._headers)
        if headers:
            sent.update(headers)
        try:
            return await self._http.request(method, self._base(token) + path, body=body or None, headers=sent,
                                            params=params)
        except Lost as exc:
            record.in_doubt = True
            record.error_code = exc.kind
            raise self._lost() from None
