"""The Litestar app, built by a factory from settings so that tests build their own."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from typing import Any

import msgspec
import redis.asyncio as redis
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.params import FromPath
from redis.exceptions import RedisError

from gateway import codemaps
from gateway.booking import Answer, Booker, Trace
from gateway.errors import (
    Forbidden,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from gateway.fhir import FHIR_JSON, error_body
from gateway.idempotency import IdempotencyStore, parse_key_header
from gateway.logs import log
from gateway.salesforce.auth import TokenProvider
from gateway.salesforce.client import SalesforceClient, make_http_client
from gateway.settings import Settings, load_settings

_ACCEPTED_MEDIA = ("application/fhir+json", "application/json")
# accepted only while the loopback sandbox stands in for Salesforce (see app_from_env)
DEMO_KEY = "demo-{source}-key"
_json = msgspec.json.Encoder()


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Inbound:
    """Inbound keys: which source each key digest belongs to. Keys are compared as digests only."""

    def __init__(self, settings: Settings, extra: dict[str, list[str]] | None = None) -> None:
        self._owner: dict[str, str] = {}
        for name, source in settings.sources.items():
            for digest in (*source.api_keys_sha256, *(extra or {}).get(name, ())):
                self._owner[digest] = name

    def authorize(self, source: str, authorization: str | None) -> None:
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():  # the scheme is case-insensitive (RFC 9110)
            raise Unauthorized("an inbound key is required: Authorization: Bearer <key>")
        owner = self._owner.get(key_digest(key.strip()))
        if owner is None:
            raise Unauthorized("unknown key")
        if owner != source:
            raise Forbidden("this key belongs to another source")


def _check_media(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in _ACCEPTED_MEDIA:
        raise UnsupportedMediaType("send application/fhir+json or application/json")


def _respond(answer: Answer, request_id: str) -> Response[bytes]:
    return Response(answer.body, status_code=answer.status, headers={**answer.headers, "X-Request-ID": request_id})


def _error_response(error: GatewayError, request_id: str | None = None) -> Response[bytes]:
    headers = {"Content-Type": FHIR_JSON, **error.headers}
    if request_id:
        headers["X-Request-ID"] = request_id
    return Response(error_body(error), status_code=error.status, headers=headers)


_LITESTAR_REFUSALS: dict[int, tuple[type[GatewayError], str]] = {
    404: (NotFound, "no such endpoint"),
    405: (MethodNotAllowed, "method not allowed"),
    413: (PayloadTooLarge, "the body is too large"),
    415: (UnsupportedMediaType, "send application/fhir+json or application/json"),
}


def _litestar_error(request: Request, exc: HTTPException) -> Response[bytes]:
    """Litestar's own refusals (no route, wrong method, body too large) as OperationOutcomes."""
    fallback = (InvalidRequest, "bad request") if exc.status_code < 500 else (GatewayError, "internal error")
    cls, message = _LITESTAR_REFUSALS.get(exc.status_code, fallback)
    return _error_response(cls(message))


def _unexpected(request: Request, exc: Exception) -> Response[bytes]:
    # a bug: say so without a trace or any request data; log only the exception type
    log.error("unhandled", error=type(exc).__name__, path=request.url.path)
    return _error_response(GatewayError("internal error"))


def create_app(settings: Settings, *, extra_keys: dict[str, list[str]] | None = None, workers: int = 1) -> Litestar:
    """Build the gateway. `extra_keys` adds inbound key digests per source (the demo's keys);
    `workers` is how many processes share this instance's Salesforce call limit."""
    maps = codemaps.load_all(settings.config_dir, list(settings.sources))  # a bad map stops the start
    if settings.salesforce is None:
        raise ValueError("create_app needs a Salesforce connection (the serve command supplies the sandbox's)")
    if settings.redis_url is None:
        raise ValueError("create_app needs a Redis URL (the serve command starts an embedded Redis)")
    cfg = settings.file
    # salesforce.max_concurrent_calls bounds the whole instance: each worker gets its share
    per_worker = max(1, cfg.salesforce.max_concurrent_calls // max(1, workers))
    cfg = msgspec.structs.replace(cfg, salesforce=msgspec.structs.replace(cfg.salesforce, max_concurrent_calls=per_worker))
    redis_client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    http = make_http_client(cfg.salesforce)
    tokens = TokenProvider(
        settings.salesforce, http, redis_client, cfg.redis.key_prefix,
        cache_seconds=cfg.salesforce.token_cache_seconds,
        retry_after=cfg.salesforce.unavailable_retry_after_seconds,
    )
    client = SalesforceClient(settings.salesforce, cfg.salesforce, tokens, http)
    store = IdempotencyStore(
        redis_client, cfg.redis.key_prefix,
        lease_seconds=cfg.idempotency.lease_seconds, retention_hours=cfg.idempotency.retention_hours,
    )
    booker = Booker(settings.sources, maps, store, client, in_flight_retry_after=cfg.idempotency.in_flight_retry_after_seconds)
    inbound = Inbound(settings, extra_keys)
    pid = os.getpid()

    async def _handle(request: Request, source: str, dry_run: bool) -> Response[bytes]:
        started = time.perf_counter()
        request_id = secrets.token_hex(8)
        trace = Trace()
        status = 500
        try:
            booker.source(source)
            inbound.authorize(source, request.headers.get("authorization"))
            _check_media(request)
            body = await request.body()
            if dry_run:
                prepared = booker.prepare(source, body)
                status = 200
                return Response(_json.encode(prepared.mapped.request), status_code=200,
                                headers={"Content-Type": "application/json", "X-Request-ID": request_id})
            key = parse_key_header(request.headers.get("idempotency-key"))
            answer = await booker.book(source, body, key, trace)
            status = answer.status
            return _respond(answer, request_id)
        except GatewayError as error:
            status = error.status
            return _error_response(error, request_id)
        except HTTPException as exc:  # body over the size limit, raised while reading it
            status = exc.status_code
            response = _litestar_error(request, exc)
            response.headers["X-Request-ID"] = request_id
            return response
        finally:
            sf = trace.salesforce
            log.info(
                "request", request_id=request_id, source=source, op="translate" if dry_run else "book",
                status=status, idempotency=trace.idempotency, sf_status=sf.status,
                sf_ms=round(sf.latency_ms, 2) if sf.status or sf.latency_ms else None,
                sf_error=sf.error_code, sf_in_doubt=sf.in_doubt or None, sf_reauth=sf.retried_auth or None,
                maps=trace.maps_version,
                ms=round((time.perf_counter() - started) * 1000, 2), pid=pid,
            )

    @post("/fhir/{source:str}/Appointment", status_code=201)
    async def book(request: Request, source: FromPath[str]) -> Response[bytes]:
        return await _handle(request, source, dry_run=False)

    @post("/fhir/{source:str}/Appointment/$book", status_code=201)
    async def book_operation(request: Request, source: FromPath[str]) -> Response[bytes]:
        return await _handle(request, source, dry_run=False)

    @post("/fhir/{source:str}/Appointment/$translate", status_code=200)
    async def translate(request: Request, source: FromPath[str]) -> Response[bytes]:
        return await _handle(request, source, dry_run=True)

    @get("/health/live")
    async def live() -> Response[bytes]:
        return Response(b'{"status":"pass"}', media_type="application/json")

    @get("/health/ready")
    async def ready() -> Response[bytes]:
        checks: dict[str, Any] = {}
        try:
            await redis_client.ping()
            checks["redis"] = "pass"
        except RedisError:
            checks["redis"] = "fail"
        if checks["redis"] == "pass":
            try:
                await client.check_auth()
                checks["salesforce_auth"] = "pass"
            except GatewayError:
                checks["salesforce_auth"] = "fail"
        else:
            checks["salesforce_auth"] = "unknown"
        ok = all(v == "pass" for v in checks.values())
        body = {"status": "pass" if ok else "fail", "checks": checks,
                "salesforce_api_usage": {"used": client.usage.used, "limit": client.usage.limit}}
        return Response(_json.encode(body), status_code=200 if ok else 503, media_type="application/json",
                        headers={} if ok else {"Retry-After": "5"})

    async def _close() -> None:
        await http.aclose()
        await redis_client.aclose()

    return Litestar(
        route_handlers=[book, book_operation, translate, live, ready],
        exception_handlers={HTTPException: _litestar_error, Exception: _unexpected},
        on_shutdown=[_close],
        request_max_body_size=cfg.limits.max_body_bytes,
        logging_config=None,
        openapi_config=None,
        debug=False,
    )


def app_from_env() -> Litestar:
    """Entry point for `uvicorn --factory` workers: the serve command leaves everything in the
    environment (config folder, REDIS_URL, Salesforce connection or the sandbox's)."""
    from gateway.logs import configure

    configure()
    settings = load_settings()
    extra = None
    # demo keys only ever reach the loopback sandbox the serve command started, never a real org
    sandbox = settings.salesforce is not None and settings.salesforce.login_url.startswith("http://127.0.0.1:")
    if os.environ.get("EHR_GATEWAY_DEMO_KEYS") == "1" and sandbox:
        extra = {s: [key_digest(DEMO_KEY.format(source=s))] for s in settings.sources}
    return create_app(settings, extra_keys=extra, workers=int(os.environ.get("EHR_GATEWAY_WORKERS", "1")))
