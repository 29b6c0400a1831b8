"""The queue worker and the holds' worker: every gateway process runs one of each.

The queue worker serves the `delivery = "queue"` sources.

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
from gateway.booking.holding import Holding
from gateway.identity import EhrId, Found, IdentityRecord
from gateway.settings import IdentitySettings
from gateway.state.holds import HeldBooking
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
                error = (trace.salesforce.error_code or trace.identity.call.error_code or trace.looked_up
                         or "unavailable")
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
                                         and not trace.adopted and trace.unmatched is None):
            return
        if trace.unmatched is not None:
            logged, status = "unmatched", 422
        elif trace.refusal is not None:
            logged, status = "refused", 422
        elif trace.salesforce_id is not None:
            logged, status = "booked", 201
        else:
            logged, status = "failed", 503
        self._request_log.record(_logged(entry.item.source, "deliver", logged, status, trace))


class HoldWorker:
    """Every gateway process runs one: the held bookings of each source that are due are tried again
    (`Booker.release_held`), a batch at a time, and each try that did Salesforce work is logged."""

    def __init__(self, booker: Booker, holding: Holding, sources: list[str], settings: IdentitySettings, *,
                 lease_seconds: float, request_log: RequestLog | None = None) -> None:
        self._booker, self._holding, self._sources, self._settings = booker, holding, sources, settings
        self._lease_ms = int(lease_seconds * 1000)
        self._request_log = request_log

    async def run(self) -> None:
        while True:
            busy = False
            for source in self._sources:
                try:
                    busy |= await self.once(source) > 0
                except REDIS_FAILURES:
                    pass  # held bookings wait in Redis; try again shortly
                except Exception as exc:  # a bug must not stop the holds
                    log.error("hold-worker-failed", error=type(exc).__name__, source=source)
            if not busy:
                await asyncio.sleep(self._settings.hold_poll_seconds)

    async def once(self, source: str) -> int:
        """Try the source's due held bookings once; how many were taken."""
        items = await self._holding.store.take(source, count=self._settings.hold_batch, lease_ms=self._lease_ms)
        if items:
            record = IdentityRecord()
            found = await self._booker.prefetch(items, record)
            log.info("holds", source=source, taken=len(items), id_calls=record.calls or None, pid=os.getpid())
            await asyncio.gather(*(self._release(item, found) for item in items))
        return len(items)

    async def _release(self, item: HeldBooking, found: dict[EhrId, Found] | None) -> None:
        trace = Trace()
        outcome = "error"
        try:
            outcome = await self._booker.release_held(item, trace, found)
        except Exception as exc:  # Redis gone, or a bug: the hold's lease lapses and it is taken again
            log.warning("hold-attempt-failed", error=type(exc).__name__, source=item.source)
        log.info("hold", source=item.source, outcome=outcome, attempt=item.attempts + 1, idempotency=trace.idempotency,
                 sf_status=trace.salesforce.status, sf_error=trace.salesforce.error_code,
                 id_calls=trace.identity.calls or None)
        self._record(item, outcome, trace)

    def _record(self, item: HeldBooking, outcome: str, trace: Trace) -> None:
        """A release that booked, or ended the hold, joins the request log (op `release`)."""
        if self._request_log is None or outcome not in ("booked", "refused", "unmatched"):
            return
        self._request_log.record(_logged(item.source, "release", outcome, 201 if outcome == "booked" else 422, trace))


def _logged(source: str, op: str, outcome: str, status: int, trace: Trace) -> LogEntry:
    """A worker's attempt as the request log keeps it: its outcome, Salesforce's part, and the issues
    of a refusal (Salesforce's, or a participant the org lacks)."""
    sf, problem = trace.salesforce, trace.unmatched or trace.refusal
    return LogEntry(
        id=new_id(), time_ms=int(time.time() * 1000), source=source, op=op, outcome=outcome, status=status,
        idempotency=trace.idempotency, sf_status=sf.status, sf_id=trace.salesforce_id, sf_error=sf.error_code,
        sf_ms=round(sf.latency_ms, 2) if sf.status else None, issues=logged_issues(problem.issues if problem else ()),
    )
