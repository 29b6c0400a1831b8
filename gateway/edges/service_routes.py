"""The gateway's own routes, beside the sources': health (liveness, readiness), Prometheus metrics,
the OpenAPI document, and the SMART Backend Services token endpoint. `ServiceEdge`, built once by the
composition root, is injected as `service`."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.di import NamedDependency

from gateway.edges.openapi import OPENAPI_PATH
from gateway.edges.smart import SmartAuth, TokenError
from gateway.errors import GatewayError
from gateway.logs import log
from gateway.operators.gauges import Gauges
from gateway.operators.metrics import Metrics
from gateway.salesforce.client import SalesforceClient
from gateway.state.breaker import CircuitBreaker
from gateway.state.idempotency import REDIS_FAILURES

_json = msgspec.json.Encoder()
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class ServiceEdge:
    """`token_urls`: the token endpoint at each of the gateway's published addresses (an assertion's
    audience); `openapi`: the document, encoded once (it changes only with the settings)."""

    def __init__(self, redis: Any, salesforce: SalesforceClient, breaker: CircuitBreaker, smart: SmartAuth,
                 metrics: Metrics, gauges: Gauges, *, token_urls: list[str], openapi: bytes) -> None:
        self._redis, self._salesforce, self._breaker, self._smart = redis, salesforce, breaker, smart
        self._metrics, self._gauges, self._token_urls, self.openapi = metrics, gauges, token_urls, openapi

    async def ready(self) -> Response[bytes]:
        checks: dict[str, Any] = {}
        try:
            await self._redis.ping()
            checks["redis"] = "pass"
        except REDIS_FAILURES:
            checks["redis"] = "fail"
        checks["salesforce_auth"] = checks["salesforce_instance"] = "unknown"
        client = self._salesforce
        for name, check in (("salesforce_auth", client.check_auth), ("salesforce_instance", client.check_instance)):
            if "fail" in checks.values():  # each needs the one before: a token needs Redis, a call a token
                break
            try:
                await check()
                checks[name] = "pass"
            except GatewayError:
                checks[name] = "fail"
        ok = all(v == "pass" for v in checks.values())
        body = {"status": "pass" if ok else "fail", "checks": checks, "circuit": self._breaker.state,
                "salesforce_api_usage": {"used": client.usage.used, "limit": client.usage.limit}}
        return Response(_json.encode(body), status_code=200 if ok else 503, media_type="application/json",
                        headers={} if ok else {"Retry-After": "5"})

    def metrics_page(self) -> Response[bytes]:
        self._gauges.sample()
        body, content_type = self._metrics.render()
        return Response(body, media_type=content_type)

    async def token(self, request: Request) -> Response[bytes]:
        """SMART Backend Services token endpoint (client credentials with a JWT assertion)."""
        try:
            form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
            # the audience an assertion names: this endpoint at one of the gateway's configured URLs
            answer = await self._smart.issue(form, self._token_urls)
        except TokenError as exc:
            log.info("token", status=exc.status, error=exc.error)
            return Response(exc.body(), status_code=exc.status, media_type="application/json", headers=_NO_STORE)
        log.info("token", status=200)
        return Response(_json.encode(answer), status_code=200, media_type="application/json", headers=_NO_STORE)


@get("/health/live")
async def live() -> Response[bytes]:
    return Response(b'{"status":"pass"}', media_type="application/json")


@get("/health/ready")
async def ready(service: NamedDependency[ServiceEdge]) -> Response[bytes]:
    return await service.ready()


@get("/metrics")
async def metrics_page(service: NamedDependency[ServiceEdge]) -> Response[bytes]:
    return service.metrics_page()


@post("/auth/token", status_code=200)
async def token(request: Request, service: NamedDependency[ServiceEdge]) -> Response[bytes]:
    return await service.token(request)


@get(OPENAPI_PATH)
async def openapi(service: NamedDependency[ServiceEdge]) -> Response[bytes]:
    """The OpenAPI 3.1 document (gateway/edges/openapi.py): no auth, no secret, no patient data."""
    return Response(service.openapi, media_type="application/json")


def service_router() -> Router:
    return Router(path="/", route_handlers=[live, ready, metrics_page, token, openapi])
