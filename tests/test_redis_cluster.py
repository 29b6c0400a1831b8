"""The three-master Redis Cluster fixture is a real cluster: keys spread over the masters by slot,
scripts run on hash-tagged keys, cross-slot scripts are refused, and streams work on a tagged key."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterCrossSlotError, MovedError, RedisClusterException

from tests.redis_cluster import SLOTS


@pytest.fixture
async def cluster(redis_cluster_url: str) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(redis_cluster_url)
    await client.initialize()
    yield client
    await client.aclose()


def _tag() -> str:
    return uuid.uuid4().hex[:10]


async def test_three_masters_share_every_slot(cluster: RedisCluster) -> None:
    primaries = cluster.get_primaries()
    assert len(primaries) == 3 and len({(n.host, n.port) for n in primaries}) == 3
    assert cluster.get_replicas() == []
    for primary in primaries:  # every node holds the same slot map
        slot_map = await cluster.cluster_slots(target_nodes=primary)
        assert len({tuple(v["primary"]) for v in slot_map.values()}) == 3
        assert all(v["replicas"] == [] for v in slot_map.values())
    owned = sorted(slot_map)
    assert owned[0][0] == 0 and owned[-1][1] == SLOTS - 1
    assert all(a[1] + 1 == b[0] for a, b in zip(owned, owned[1:]))
    assert sorted(end - start + 1 for start, end in owned) == [5461, 5461, 5462]


async def test_hash_tags_decide_the_slot_and_land_on_different_nodes(cluster: RedisCluster) -> None:
    run = _tag()
    by_node: dict[tuple[str, int], str] = {}
    for i in range(100):
        tag = f"{run}-{i}"
        key = f"{{{tag}}}:a"
        # The client's slot is the server's slot, and the tag alone decides it.
        slot = await cluster.cluster_keyslot(key)
        assert slot == cluster.keyslot(key) == cluster.keyslot(f"{{{tag}}}:other")
        node = cluster.get_node_from_key(key)
        by_node.setdefault((node.host, node.port), key)
        if len(by_node) == 3:
            break
    assert len(by_node) == 3, by_node
    for key in by_node.values():
        await cluster.set(key, key)
    # Each key lives on its own node only: a plain connection to another master is redirected.
    for (host, port), key in by_node.items():
        for other_host, other_port in by_node:
            async with aioredis.Redis(host=other_host, port=other_port) as node:
                if (other_host, other_port) == (host, port):
                    assert await node.get(key) == key.encode()
                else:
                    with pytest.raises(MovedError, match=rf" {host}:{port}$"):
                        await node.get(key)
    await cluster.delete(*by_node.values())


async def test_registered_script_runs_on_hash_tagged_keys(cluster: RedisCluster) -> None:
    tag = _tag()
    counter, log = f"{{{tag}}}:counter", f"{{{tag}}}:log"
    script = cluster.register_script(
        "local n = redis.call('INCR', KEYS[1]) redis.call('RPUSH', KEYS[2], ARGV[1]) return {n, redis.call('LLEN', KEYS[2])}"
    )
    # The first call loads the script on the owning node (NOSCRIPT, then EVALSHA again); the second reuses it.
    assert await script(keys=[counter, log], args=["first"]) == [1, 1]
    assert await script(keys=[counter, log], args=["second"]) == [2, 2]
    assert await cluster.lrange(log, 0, -1) == [b"first", b"second"]
    await cluster.delete(counter, log)


async def test_cross_slot_script_is_refused(cluster: RedisCluster) -> None:
    a, b = f"{{{_tag()}}}:x", f"{{{_tag()}}}:y"
    assert cluster.keyslot(a) != cluster.keyslot(b)
    script = cluster.register_script("return redis.call('MGET', KEYS[1], KEYS[2])")
    with pytest.raises(RedisClusterException, match="same key slot"):  # redis-py refuses before sending
        await script(keys=[a, b])
    # Sent to a node anyway, the server itself refuses it.
    with pytest.raises(ClusterCrossSlotError, match="hash to the same slot"):
        await cluster.execute_command(
            "EVAL", "return redis.call('MGET', KEYS[1], KEYS[2])", 2, a, b, target_nodes=cluster.get_node_from_key(a)
        )


async def test_stream_group_round_trip_on_a_tagged_key(cluster: RedisCluster) -> None:
    stream = f"{{{_tag()}}}:outbox"
    await cluster.xgroup_create(stream, "workers", id="0", mkstream=True)
    ids = [await cluster.xadd(stream, {"booking": str(i)}) for i in range(3)]
    read = await cluster.xreadgroup("workers", "w1", {stream: ">"}, count=10)
    [(name, entries)] = read
    assert name == stream.encode()
    assert [entry_id for entry_id, _ in entries] == ids
    assert [fields[b"booking"] for _, fields in entries] == [b"0", b"1", b"2"]
    assert (await cluster.xpending(stream, "workers"))["pending"] == 3
    assert await cluster.xack(stream, "workers", *ids[:2]) == 2
    pending = await cluster.xpending_range(stream, "workers", min="-", max="+", count=10)
    assert [p["message_id"] for p in pending] == [ids[2]]
    assert await cluster.xreadgroup("workers", "w1", {stream: ">"}, count=10) == []
    await cluster.delete(stream)


def test_sync_cluster_client_sees_the_same_cluster(redis_cluster_url: str) -> None:
    with redis.RedisCluster.from_url(redis_cluster_url) as client:
        assert len(client.get_primaries()) == 3
        assert client.cluster_info()["cluster_state"] == "ok"
