"""A bearer token shared by every worker of every gateway instance through Redis: the one mechanism
behind Salesforce's token and each EHR's.

The token lives in Redis under a key of the connection's own (a digest: never the secret). A worker
keeps a local copy to save a round trip per call. When the called system refuses it (401) or its
address cannot be reached, the worker drops the shared token only if it is still the one that failed
(compare-and-delete), and one refresh is in flight across all workers (a Redis lock), the others
waiting for its result. What minting is (a grant, a JWT assertion) is the subclass's `_mint`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable

import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError

from gateway.errors import Unavailable

_DROP_IF_SAME = """
local cur = redis.call('GET', KEYS[1])
if cur and cjson.decode(cur).access_token == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Token(msgspec.Struct, frozen=True, omit_defaults=True):
    access_token: str
    instance_url: str = ""  # Salesforce's: where its API calls go; an EHR's token names none

    def __repr__(self) -> str:  # the access token is a secret
        return f"Token(instance_url={self.instance_url!r})"


def connection_key(prefix: str, kind: str, parts: Iterable[str]) -> str:
    """The Redis key of a connection's token (its refresh lock adds `:refresh`): one hash tag, so each
    is one Redis Cluster slot; a digest of what names the connection, never a secret."""
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
    return f"{prefix}:{kind}:{{token:{digest}}}"


class SharedToken:
    """`name` is the called system's, for messages; `cache_seconds` bounds a token's life here even if
    it is never refused (`_mint` may say it expires sooner)."""

    def __init__(self, client: redis.Redis, key: str, *, name: str, cache_seconds: int, retry_after: int) -> None:
        self._redis = client
        self._key = key
        self._lock_key = f"{key}:refresh"
        self._name = name
        self._cache_ms = cache_seconds * 1000
        self._retry_after = retry_after
        self._local: Token | None = None
        self._local_lock = asyncio.Lock()
        self._drop = client.register_script(_DROP_IF_SAME)
        self.refreshes = 0  # tokens this worker minted
        self._last_minted: Token | None = None

    async def _mint(self) -> tuple[Token, float | None]:
        """A new token, and the seconds it lives if the issuer said (None: `cache_seconds`)."""
        raise NotImplementedError

    async def token(self) -> Token:
        if self._local is not None:
            return self._local
        async with self._local_lock:  # one refresh in flight in this worker
            if self._local is None:
                self._local = await self._shared_token()
            return self._local

    async def invalidate(self, failed: Token) -> None:
        """Forget `failed` here and, if no other worker replaced it yet, in Redis."""
        if self._local == failed:
            self._local = None
        try:
            await self._drop(keys=[self._key], args=[failed.access_token])
        except RedisError:
            raise Unavailable("Redis is unavailable", retry_after=5) from None

    def minted_since(self, mark: int, token: Token) -> bool:
        """Whether `token` is one this worker minted since `refreshes` was `mark`: renewing it would
        only mint the same again."""
        return self.refreshes != mark and token == self._last_minted

    async def renew(self, failed: Token) -> Token:
        """A token other than `failed`: dropped (as `invalidate`), then shared or minted anew."""
        await self.invalidate(failed)
        return await self.token()

    async def _shared_token(self) -> Token:
        try:
            for _ in range(200):  # ~10 s of waiting for another worker's refresh at most
                raw = await self._redis.get(self._key)
                if raw:
                    return msgspec.json.decode(raw, type=Token)
                if await self._redis.set(self._lock_key, b"1", nx=True, px=15_000):
                    try:
                        token, lives = await self._mint()
                        self.refreshes += 1
                        self._last_minted = token
                        ttl = self._cache_ms if lives is None else max(1, min(self._cache_ms, int(lives * 1000)))
                        await self._redis.set(self._key, msgspec.json.encode(token), px=ttl)
                        return token
                    finally:
                        await self._redis.delete(self._lock_key)
                await asyncio.sleep(0.05)
        except RedisError:
            raise Unavailable("Redis is unavailable", retry_after=5) from None
        raise Unavailable(f"{self._name} authentication is taking too long", retry_after=self._retry_after)
