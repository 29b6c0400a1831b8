"""SMART Backend Services for EHRs: a source registers its public keys (a JWKS, inline or by URL)
and a client id; it obtains short-lived access tokens from `POST /auth/token` with a signed JWT
client assertion (RS384 or ES384), and calls the source's endpoints with them.

Checked for every assertion: the algorithm (RS384/ES384 only, never `none` or an HMAC), the key
(`kid` in the source's JWKS), `iss` = `sub` = the client id, `aud` = this token endpoint's URL at one
of the gateway's configured public URLs (`[server] public_urls`, never the request's Host), `exp`
in the future and at most five minutes ahead, and `jti` never seen before (kept in Redis until the
assertion expires). Tokens are random; Redis keeps only their digest, with the source and a TTL.
A token is good only on its own source's endpoints, like a key.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import msgspec
import redis.asyncio as redis

from gateway.state.idempotency import REDIS_FAILURES
from gateway.settings import SourceSettings

ALGORITHMS = ("RS384", "ES384")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_SECONDS = 300
# what a token lets its source do (SMART v1 names, and v2's for the same); the answer's `scope` says
# this, whatever was asked for, and a request for anything else is refused (invalid_scope)
GRANTED = "system/Appointment.read system/Appointment.write system/Slot.read"
_GRANTABLE = frozenset({*GRANTED.split(), "system/Appointment.*", "system/Appointment.cruds", "system/Appointment.rs",
                        "system/Appointment.cu", "system/Appointment.u", "system/Appointment.c", "system/Slot.rs",
                        "system/Slot.s", "system/Slot.r"})
_MAX_JTI = 255  # RFC 7519 sets no bound; Redis keeps each one until its assertion expires
_MAX_ASSERTION_LIFETIME = 300
_JWKS_CACHE_SECONDS = 300


class TokenError(Exception):
    """An OAuth error answer (RFC 6749 §5.2), not an OperationOutcome: SMART clients expect this."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status

    def body(self) -> bytes:
        return msgspec.json.encode({"error": self.error, "error_description": self.description})


@dataclass
class _Client:
    source: str
    jwks: dict[str, Any] | None
    jwks_url: str | None
    fetched: float = 0.0


class SmartAuth:
    def __init__(self, sources: dict[str, SourceSettings], client: redis.Redis, prefix: str,
                 http: httpx.AsyncClient) -> None:
        self._clients = {
            s.smart_client_id: _Client(name, s.jwks, s.jwks_url) for name, s in sources.items() if s.smart_client_id
        }
        self._redis = client
        self._prefix = prefix
        self._http = http

    @property
    def enabled(self) -> bool:
        return bool(self._clients)

    def _token_key(self, token: str) -> str:
        return f"{self._prefix}:smart:token:{hashlib.sha256(token.encode()).hexdigest()}"

    async def issue(self, form: dict[str, str], token_urls: list[str]) -> dict[str, Any]:
        """A token for a valid assertion whose `aud` is one of `token_urls` (this endpoint at the
        gateway's configured public URLs), or TokenError."""
        if form.get("grant_type") != "client_credentials":
            raise TokenError("unsupported_grant_type", "grant_type must be client_credentials")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise TokenError("invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}")
        assertion = form.get("client_assertion") or ""
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except (jwt.PyJWTError, RecursionError, ValueError):
            raise TokenError("invalid_client", "client_assertion is not a JWT", 401) from None
        client = self._clients.get(str(unverified.get("iss")))
        if client is None:
            raise TokenError("invalid_client", "unknown client", 401)
        if header.get("alg") not in ALGORITHMS:
            raise TokenError("invalid_client", "the assertion must be signed with RS384 or ES384", 401)
        key = await self._key(client, header.get("kid"), header["alg"])
        try:
            claims = jwt.decode(
                assertion, key, algorithms=[header["alg"]], audience=token_urls, issuer=str(unverified.get("iss")),
                options={"require": ["iss", "sub", "aud", "exp", "jti"]}, leeway=5,
            )
        except jwt.PyJWTError as exc:
            raise TokenError("invalid_client", f"the assertion is not valid: {type(exc).__name__}", 401) from None
        if claims["sub"] != claims["iss"]:
            raise TokenError("invalid_client", "sub must equal iss", 401)
        jti = claims["jti"]
        if not isinstance(jti, str) or not 0 < len(jti) <= _MAX_JTI or not jti.isprintable():
            raise TokenError("invalid_client", f"jti must be a string of 1 to {_MAX_JTI} printable characters", 401)
        asked = (form.get("scope") or "").split()
        if len(asked) > 16 or any(s not in _GRANTABLE for s in asked):
            raise TokenError("invalid_scope", f"the scopes a source may have are {GRANTED} (or their SMART v2 names)")
        now = time.time()
        if claims["exp"] > now + _MAX_ASSERTION_LIFETIME + 5:
            raise TokenError("invalid_client", "the assertion may live five minutes at most", 401)
        try:
            fresh = await self._redis.set(f"{self._prefix}:smart:jti:{{{claims['iss']}}}:{claims['jti']}", b"1",
                                          nx=True, exat=int(claims["exp"]) + 6)
            if not fresh:
                raise TokenError("invalid_client", "this assertion was used before (jti)", 401)
            token = secrets.token_urlsafe(32)
            await self._redis.set(self._token_key(token), client.source.encode(), ex=TOKEN_SECONDS)
        except REDIS_FAILURES:
            raise TokenError("temporarily_unavailable", "the token store is unavailable", 503) from None
        return {"access_token": token, "token_type": "bearer", "expires_in": TOKEN_SECONDS, "scope": GRANTED}

    async def source_of(self, token: str) -> str | None:
        """The source a token was issued to, or None (unknown or expired)."""
        if not self._clients:
            return None
        try:
            found = await self._redis.get(self._token_key(token))
        except REDIS_FAILURES:
            return None
        return found.decode() if found else None

    async def _key(self, client: _Client, kid: str | None, alg: str) -> Any:
        jwks = client.jwks
        if client.jwks_url is not None and (jwks is None or time.monotonic() - client.fetched > _JWKS_CACHE_SECONDS):
            try:
                response = await self._http.get(client.jwks_url, timeout=5)
                response.raise_for_status()
                jwks = client.jwks = response.json()
                client.fetched = time.monotonic()
            except (httpx.HTTPError, ValueError):
                if jwks is None:
                    raise TokenError("invalid_client", "the client's JWKS cannot be fetched", 401) from None
        try:
            keys = jwt.PyJWKSet.from_dict(jwks or {"keys": []}).keys
        except jwt.PyJWTError:
            raise TokenError("invalid_client", "the client's JWKS cannot be read", 401) from None
        # the signature check itself pins the algorithm; a key of the wrong type fails there
        wanted = [k for k in keys if kid is None or k.key_id == kid]
        if not wanted:
            raise TokenError("invalid_client", "no key of the client's JWKS matches the assertion's kid", 401)
        return wanted[0].key
