"""The queue worker: every gateway process runs one per `delivery = "queue"` source.

It reads the source's stream through the consumer group, hands each entry to the booker (which
claims the idempotency record, looks up what an earlier attempt may have booked, and sends), and
then acknowledges, delays or dead-letters the entry. Several workers and instances share the work;
the record's lease keeps any two from sending the same booking at once.
"""

from __future__ import annotations

import asyncio
import os
import time

from gateway.booking.booker import Booker, Trace
from gateway.state.idempotency import REDIS_FAILURES
from gateway.ids import new_id
from gateway.logs import log
from gateway.state.queue import BookingQueue, Entry, consumer_name
from gateway.state.requestlog import Entry as LogEntry
from gateway.state.requestlog import RequestLog, logged_issues
from gateway.settings import QueueSettings


class QueueWorker:
    def __init__(self, booker: Booker, queue: BookingQueue, sources: list[str], settings: QueueSettings,
                 *, reclaim_idle_seconds: float, request_log: RequestLog | None = None) -> None:
        self._request_log = request_log
        self._booker = booker
        self._queue = queue
        self._sources = sources
        self._settings = settings
        self._reclaim_idle_ms = int(reclaim_idle_seconds * 1000)
        self._consumer = consumer_name()

    async def run(self) -> None:
        await asyncio.gather(*(self._run_source(s) for s in self._sources))

    async def _run_source(self, source: str) -> None:
        block_ms = int(self._settings.poll_seconds * 1000)
        while True:
            try:
                entries = await self._queue.read(source, self._consumer, count=self._settings.batch,
                                                  block_ms=block_ms, reclaim_idle_ms=self._reclaim_idle_ms)
            except REDIS_FAILURES:
                # Redis is down: the entries wait in its append-only file; try again shortly
                await asyncio.sleep(self._settings.poll_seconds)
                continue
            if entries:
                await asyncio.gather(*(self.handle(e) for e in entries))

    async def handle(self, entry: Entry) -> str:
        """One delivery attempt; returns done | delayed | dead | busy | paused | error."""
        trace = Trace()
        outcome = "error"
        try:
            result = await self._booker.deliver_queued(entry.item, trace)
            if result == "done":
                await self._queue.done(entry)
                outcome = "done"
            elif result == "busy":
                await self._queue.retry(entry, None, count_attempt=False)
                outcome = "busy"
            elif result == "paused":
                # an open circuit is an outage, not this booking's failure: wait it out, spend nothing
                await self._queue.retry(entry, "circuit-open", count_attempt=False, delay_seconds=trace.paused_for)
                outcome = "paused"
            else:
                error = trace.salesforce.error_code or trace.looked_up or "unavailable"
                outcome = await self._queue.retry(entry, error)
        except Exception as exc:
            # Redis gone, or a bug: the entry stays pending and XAUTOCLAIM hands it out again
            log.warning("queue-attempt-failed", error=type(exc).__name__, source=entry.item.source)
        sf = trace.salesforce
        self._record(entry, outcome, trace)
        log.info(
            "queue", entry=entry.id, source=entry.item.source, outcome=outcome, attempt=entry.item.attempts + 1,
            idempotency=trace.idempotency, sf_status=sf.status, sf_error=sf.error_code,
            sf_in_doubt=sf.in_doubt or None, looked_up=trace.looked_up, adopted=trace.adopted or None, pid=os.getpid(),
        )
        return outcome

    def _record(self, entry: Entry, outcome: str, trace: Trace) -> None:
        """Deliveries that did Salesforce work join the request log (op `deliver`), so an operator
        sees a queued booking become an appointment, or why it has not yet."""
        if self._request_log is None or (trace.salesforce.status is None and trace.salesforce.error_code is None
                                         and not trace.adopted):
            return
        sf = trace.salesforce
        if trace.refusal is not None:
            logged, status = "refused", 422
        elif trace.salesforce_id is not None:
            logged, status = "booked", 201
        else:
            logged, status = "failed", 503
        issues = logged_issues(trace.refusal.issues if trace.refusal else ())
        self._request_log.record(LogEntry(
            id=new_id(), time_ms=int(time.time() * 1000), source=entry.item.source, op="deliver",
            outcome=logged, status=status, idempotency=trace.idempotency, sf_status=sf.status,
            sf_id=trace.salesforce_id, sf_error=sf.error_code, sf_ms=round(sf.latency_ms, 2) if sf.status else None,
            issues=issues,
        ))
