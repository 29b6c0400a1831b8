"""The Redis clients of a process."""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis


def connect_redis(url: str, *, cluster: bool = False) -> Any:
    """One Redis client for the process; with `cluster`, the URL names any node of a Redis Cluster."""
    if cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
