"""OAuth 2.0 to Salesforce: client credentials or JWT bearer, one token shared by every worker
(gateway/outbound/tokens.py). The token and its `instance_url` live in Redis under a key of the
connection's own (a digest of the login URL, client id, username and grant), so a gateway pointed at
another org, app or user never reads a token minted for the first.
"""

from __future__ import annotations

import time

import jwt
import msgspec
import redis.asyncio as redis

from gateway.errors import Unavailable
from gateway.outbound.http import HttpClient, Lost, NeverSent
from gateway.outbound.tokens import SharedToken, Token, connection_key
from gateway.salesforce.wire import TokenAnswer
from gateway.settings import SalesforceConnection

__all__ = ["JWT_BEARER", "Token", "TokenProvider", "token_key"]

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def token_key(prefix: str, conn: SalesforceConnection) -> str:
    """The Redis key of the connection's token (its refresh lock adds `:refresh`)."""
    return connection_key(prefix, "sf", (conn.login_url.rstrip("/"), conn.client_id, conn.username or "", conn.flow,
                                         conn.audience if conn.flow == "jwt_bearer" else ""))


class TokenProvider(SharedToken):
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
        super().__init__(client, token_key(prefix, conn), name="Salesforce", cache_seconds=cache_seconds,
                         retry_after=retry_after)
        self._conn = conn
        self._http = http

    def _grant(self) -> dict[str, str]:
        c = self._conn
        if c.client_secret:
            return {"grant_type": "client_credentials", "client_id": c.client_id, "client_secret": c.client_secret}
        claims = {"iss": c.client_id, "sub": c.username, "aud": c.audience, "exp": int(time.time()) + 180}
        assertion = jwt.encode(claims, c.private_key_pem, algorithm="RS256")
        return {"grant_type": JWT_BEARER, "assertion": assertion}

    async def _mint(self) -> tuple[Token, float | None]:
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
        # Salesforce says nothing of a token's life (no expires_in): [salesforce] token_cache_seconds bounds it
        return Token(access_token=parsed.access_token, instance_url=parsed.instance_url.rstrip("/")), None
