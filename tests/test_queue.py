"""The durable queue's own semantics on a real Redis and on a real three-master Cluster: consumer
groups and acknowledgement, delayed retries with backoff, dead letters, replay and drop, and
XAUTOCLAIM of what a dead consumer left pending."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.state.queue import BookingQueue, QueuedBooking


def item(n: int = 0, source: str = "epic") -> QueuedBooking:
    return QueuedBooking(record_key=f"rec-{n}", fingerprint="fp", source=source, request=b'{"r":1}',
                         booking=b'{"b":1}', accepted_ms=1000 + n, since_ms=1000 + n, last_error="HTTP_503")


@pytest.fixture
def queue(any_redis, prefix):
    return BookingQueue(any_redis, f"{prefix}:{uuid.uuid4().hex[:6]}", max_attempts=3,
                        backoff_base_seconds=0.05, backoff_max_seconds=0.1)


async def read(queue, consumer="c1", reclaim_ms=60_000, block_ms=10):
    return await queue.read("epic", consumer, count=10, block_ms=block_ms, reclaim_idle_ms=reclaim_ms)


async def test_read_and_acknowledge(queue):
    await queue.add(item(1))
    await queue.add(item(2))
    got = await read(queue)
    assert [e.item.record_key for e in got] == ["rec-1", "rec-2"] and all(e.where == "ready" for e in got)
    assert await read(queue) == []  # delivered once to the group, not again
    for e in got:
        await queue.done(e)
    assert await queue.depth("epic") == {"ready": 0, "delayed": 0, "dead": 0}
    assert await queue.list("epic") == []


async def test_failed_attempt_waits_its_backoff_then_returns(queue):
    await queue.add(item(1))
    [entry] = await read(queue)
    assert await queue.retry(entry, "REQUEST_LIMIT_EXCEEDED") == "delayed"
    assert await queue.depth("epic") == {"ready": 0, "delayed": 1, "dead": 0}
    [delayed] = [e for e in await queue.list("epic") if e.where == "delayed"]
    assert delayed.item.attempts == 1 and delayed.item.last_error == "REQUEST_LIMIT_EXCEEDED"
    assert delayed.item.due_ms > 0
    await asyncio.sleep(0.12)  # past the longest backoff (0.05 s for the first retry, capped at 0.1)
    [again] = await read(queue)
    assert again.item.attempts == 1 and again.id != entry.id
    assert await queue.depth("epic") == {"ready": 1, "delayed": 0, "dead": 0}  # pending until done


async def test_spent_attempts_go_to_dead_letters_then_replay_or_drop(queue):
    await queue.add(item(1))
    await queue.add(item(2))
    for _ in range(3):
        for entry in await read(queue, block_ms=200):
            await queue.retry(entry, "HTTP_500")
        await asyncio.sleep(0.12)
    dead = [e for e in await queue.list("epic") if e.where == "dead"]
    assert sorted(e.item.record_key for e in dead) == ["rec-1", "rec-2"]
    assert all(e.item.attempts == 3 for e in dead)
    assert await read(queue) == []  # dead letters are not delivered
    first, second = dead
    assert await queue.replay("epic", first.id)
    assert not await queue.replay("epic", first.id)  # one replay wins
    [back] = await read(queue)
    assert back.item.record_key == first.item.record_key and back.item.attempts == 0
    dropped = await queue.drop("epic", second.id)
    assert dropped is not None and dropped.record_key == second.item.record_key
    assert await queue.drop("epic", second.id) is None
    assert (await queue.depth("epic"))["dead"] == 0


async def test_busy_record_is_delayed_without_spending_an_attempt(queue):
    await queue.add(item(1))
    [entry] = await read(queue)
    await queue.retry(entry, None, count_attempt=False)
    await asyncio.sleep(0.08)
    [again] = await read(queue)
    assert again.item.attempts == 0


async def test_a_dead_consumers_entries_are_claimed_by_another(queue):
    await queue.add(item(1))
    [taken] = await read(queue, consumer="doomed")
    assert await read(queue, consumer="alive", reclaim_ms=60_000) == []  # still fresh: left alone
    await asyncio.sleep(0.15)
    [claimed] = await read(queue, consumer="alive", reclaim_ms=100)
    assert claimed.id == taken.id and claimed.item == taken.item
    await queue.done(claimed)
    assert await queue.depth("epic") == {"ready": 0, "delayed": 0, "dead": 0}


def test_one_sources_keys_share_one_slot(queue):
    stream, delayed, dead = queue.keys("epic")
    tags = {k[k.index("{") + 1 : k.index("}")] for k in (stream, delayed, dead)}
    assert len(tags) == 1
    assert queue.keys("cerner")[0] != stream
