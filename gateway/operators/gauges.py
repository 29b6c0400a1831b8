"""Values that are states, not events, for /metrics: the circuit, Salesforce's API usage, the tokens
minted, the queues' depths, the bookings held for their patient; sampled every few seconds in the
background and at each scrape."""

from __future__ import annotations

import asyncio

from gateway.operators.metrics import Metrics
from gateway.salesforce.auth import TokenProvider
from gateway.salesforce.client import SalesforceClient
from gateway.state.breaker import CircuitBreaker
from gateway.state.holds import HoldStore
from gateway.state.idempotency import REDIS_FAILURES
from gateway.state.queue import BookingQueue


class Gauges:
    def __init__(self, metrics: Metrics, tokens: TokenProvider, breaker: CircuitBreaker, salesforce: SalesforceClient,
                 queue: BookingQueue, queue_sources: list[str], holds: HoldStore | None = None,
                 sources: tuple[str, ...] = ()) -> None:
        self._metrics, self._tokens, self._breaker, self._salesforce = metrics, tokens, breaker, salesforce
        self._queue, self._queue_sources = queue, queue_sources
        self._holds, self._sources = holds, list(sources)
        self._minted = 0  # tokens already counted

    def sample(self) -> None:
        """What this process knows without I/O."""
        for _ in range(self._tokens.refreshes - self._minted):
            self._metrics.token_refresh()
        self._minted = self._tokens.refreshes
        self._metrics.circuit(self._breaker.state)
        self._metrics.api_usage(self._salesforce.usage.used, self._salesforce.usage.limit)

    async def run(self) -> None:
        while True:
            self.sample()
            for source in self._queue_sources:
                try:
                    depth = await self._queue.depth(source)
                    self._metrics.queue_depth(source, depth["ready"], depth["delayed"], depth["dead"])
                except REDIS_FAILURES:
                    pass
            for source in self._sources if self._holds is not None else ():
                try:
                    self._metrics.held(source, *await self._holds.count(source))  # type: ignore[union-attr]
                except REDIS_FAILURES:
                    pass
            await asyncio.sleep(5)
