"""OAuth 2.0 to Salesforce: client credentials or JWT bearer, one token shared by every worker.

The token and its `instance_url` live in Redis, under a key of the connection's own (a digest of the
login URL, client id, username and grant), so a gateway pointed at another org, app or user never
reads a token minted for the first. A worker keeps a local copy to save a round trip per call; when
Salesforce refuses it (401 INVALID_SESSION_ID) or its instance cannot be reached, the worker drops
the shared token only if it is still the one that failed (compare-and-delete), and one refresh is in
flight across all workers (a Redis lock), the others waiting for its result.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import jwt
import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError

from gateway.errors import Unavailable
from gateway.salesforce._http import HttpClient, Lost, NeverSent
from gateway.salesforce.wire import TokenAnswer
from gateway.settings import SalesforceConnection

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"

_DROP_IF_SAME = """
local cur = redis.call('GET', KEYS[1])
if cur and cjson.decode(cur).access_token == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def token_key(prefix: str, conn: SalesforceConnection) -> str:
    """The Redis key of the connection's token (its refresh lock adds `:refresh`): one hash tag, so
    each is one Redis Cluster slot. A digest names the connection; no secret goes into it."""
    parts = (conn.login_url.rstrip("/"), conn.client_id, conn.username or "", conn.flow,
             conn.audience if conn.flow == "jwt_bearer" else "")
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
    return f"{prefix}:sf:{{token:{digest}}}"


class Token(msgspec.Struct, frozen=True):
    access_token: str
    instance_url: str

    def __repr__(self) -> str:  # the access token is a secret
        return f"Token(instance_url={self.instance_url!r})"


class TokenProvider:
    def __init__(
        self,
        conn: SalesforceConnection,
        http: HttpClient,
        client: redis.Redis,
        prefix: str,
        *,
        cache_seconds: int,
        retry_after: int,
    ) -> None:
        self._conn = conn
        self._http = http
        self._redis = client
        self._key = token_key(prefix, conn)
        self._lock_key = f"{self._key}:refresh"
        self._cache_ms = cache_seconds * 1000
        self._retry_after = retry_after
        self._local: Token | None = None
        self._local_lock = asyncio.Lock()
        self._drop = client.register_script(_DROP_IF_SAME)
        self.refreshes = 0  # tokens this worker minted
        self._last_minted: Token | None = None

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
                        token = await self._mint()
                        await self._redis.set(self._key, msgspec.json.encode(token), px=self._cache_ms)
                        return token
                    finally:
                        await self._redis.delete(self._lock_key)
                await asyncio.sleep(0.05)
        except RedisError:
            raise Unavailable("Redis is unavailable", retry_after=5) from None
        raise Unavailable("Salesforce authentication is taking too long", retry_after=self._retry_after)

    def _grant(self) -> dict[str, str]:
        c = self._conn
        if c.client_secret:
            return {"grant_type": "client_credentials", "client_id": c.client_id, "client_secret": c.client_secret}
        claims = {"iss": c.client_id, "sub": c.username, "aud": c.audience, "exp": int(time.time()) + 180}
        assertion = jwt.encode(claims, c.private_key_pem, algorithm="RS256")
        return {"grant_type": JWT_BEARER, "assertion": assertion}

    async def _mint(self) -> Token:
        try:
            answer = await self._http.request("POST", f"{self._conn.login_url}/services/oauth2/token", form=self._grant())
        except (NeverSent, Lost):
            raise Unavailable("the Salesforce token endpoint cannot be reached", retry_after=self._retry_after) from None
        if answer.status != 200:
            # OAuth errors are {"error", "error_description"}: safe to name the error code only
            try:
                code = msgspec.json.decode(answer.content).get("error", "unknown")
            except (msgspec.DecodeError, AttributeError):
                code = "unreadable answer"
            raise Unavailable(f"Salesforce authentication failed ({code})", retry_after=self._retry_after)
        try:
            parsed = msgspec.json.decode(answer.content, type=TokenAnswer)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise Unavailable("Salesforce's token answer cannot be read", retry_after=self._retry_after) from None
        self.refreshes += 1
        self._last_minted = Token(access_token=parsed.access_token, instance_url=parsed.instance_url.rstrip("/"))
        return self._last_minted
