"""The Litestar app, built by a factory from settings so that tests build their own."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import msgspec
import redis.asyncio as redis
from litestar import Litestar, Request, Response, get, post, put
from litestar.datastructures import MultiDict
from litestar.exceptions import HTTPException, InternalServerException
from litestar.params import FromPath

from gateway.operators.admin import AdminAuth, AdminDeps, Audit, admin_router
from gateway.booking.booker import NO_SUCH_APPOINTMENT, Answer, Booker, Target, Trace, identifier_target, if_none_exist
from adapters.hl7v2 import FILLER, PLACER, ack, parse_siu, read_header
from gateway.booking.batch import Item, batch_response, parse_batch, response_entry
from gateway.state.breaker import CircuitBreaker
from gateway.booking.capability import TRANSLATE, capability_statement, translate_definition
from gateway.errors import (
    Forbidden,
    IdempotencyKeyReused,
    SalesforceRefused,
    GatewayError,
    InvalidRequest,
    Issue,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    UnsupportedMediaType,
    http,
)
from gateway.booking.fhir import FHIR_JSON, error_body, if_match, negotiate, slot_searchset, warning_header
from gateway.ids import new_id
from gateway.state.idempotency import REDIS_FAILURES, IdempotencyStore, parse_key_header
from gateway.state.links import Links
from gateway.booking.livemaps import LiveMaps
from gateway.logs import log
from gateway.operators.metrics import Metrics
from gateway.edges.mllp import MllpListener
from gateway.edges.mtls import ClientCertificates
from gateway.edges.openapi import OPENAPI_PATH, openapi_json
from gateway.state.queue import BookingQueue
from gateway.state.redis_mux import MultiplexedRedis
from gateway.state.ratelimit import RateLimiter
from gateway.state.requestlog import KEEP_INPUT, Entry, RequestLog, logged_issues, logged_maps
from gateway.state.requestlog import key_digest as log_key_digest
from gateway.state.sealing import Sealer, sealer_from_env
from gateway.edges.smart import SmartAuth, TokenError
from gateway.salesforce.auth import TokenProvider
from gateway.salesforce._http import HttpClient
from gateway.salesforce.client import SALESFORCE_ID, SalesforceClient
from gateway.settings import Settings, SourceSettings, load_settings
from gateway.booking.slots import paging
from gateway.booking.worker import QueueWorker

_ACCEPTED_MEDIA = ("application/fhir+json", "application/json")
_FORM = "application/x-www-form-urlencoded"  # a FHIR search by POST
# accepted only while the loopback sandbox stands in for Salesforce (see app_from_env)
DEMO_KEY = "demo-{source}-key"
DEMO_OPERATORS_ENV = "EHR_GATEWAY_DEMO_OPERATORS_SHA256"  # the demo's admin and PHI key digests
_json = msgspec.json.Encoder()
# an SIU whose stored answer is Salesforce's refusal, replayed: its ACK says so (AE), quoting nothing
_REFUSED = Issue(code="processing", diagnostics="Salesforce refused this booking when it was first sent")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Inbound:
    """Inbound keys: which source each key digest belongs to. Keys are compared as digests only."""

    def __init__(self, settings: Settings, extra: dict[str, list[str]] | None = None) -> None:
        self._owner: dict[str, str] = {}
        for name, source in settings.sources.items():
            for digest in (*source.api_keys_sha256, *(extra or {}).get(name, ())):
                self._owner[digest] = name

    def digests(self) -> set[str]:
        return set(self._owner)

    async def authorize(self, source: str, authorization: str | None, smart: SmartAuth | None = None) -> None:
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():  # the scheme is case-insensitive (RFC 9110)
            raise Unauthorized("an inbound key is required: Authorization: Bearer <key>")
        owner = self._owner.get(key_digest(key.strip()))
        if owner is None and smart is not None:
            owner = await smart.source_of(key.strip())  # a SMART access token: one Redis read
        if owner is None:
            raise Unauthorized("unknown key or token")
        if owner != source:
            raise Forbidden("this key belongs to another source")


def _media(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _check_media(request: Request) -> None:
    if _media(request) not in _ACCEPTED_MEDIA:
        raise UnsupportedMediaType("send application/fhir+json or application/json")


def _negotiate(request: Request, params: Any = None) -> None:
    """FHIR's content negotiation on every FHIR route: `_format` (from `params`, else the query)
    overrides `Accept`. The query is parsed only when it may hold `_format`."""
    if params is None and b"_format" in request.scope.get("query_string", b""):
        params = request.query_params
    formats = params.getall("_format", []) if params is not None else []
    negotiate(formats[0] if formats else None, request.headers.get("accept"))


async def _read_body(request: Request) -> bytes:
    try:
        return await request.body()
    except InternalServerException:  # Litestar's word for a client gone mid-body
        raise RequestTimeout("the client stopped sending the body") from None


def _absolute(headers: dict[str, str], public: str) -> dict[str, str]:
    """`Location` as FHIR wants it, `[base]/Appointment/<id>`: the Booker (and the idempotency
    records, old and new) name the path; the gateway's published address is prefixed on the way out."""
    location = headers.get("Location")
    if location is not None and location.startswith("/"):
        return {**headers, "Location": public + location}
    return headers


def _respond(answer: Answer, request_id: str, public: str) -> Response[bytes]:
    return Response(answer.body, status_code=answer.status,
                    headers={**_absolute(answer.headers, public), "X-Request-ID": request_id})


def _error_response(error: GatewayError, request_id: str | None = None) -> Response[bytes]:
    headers = {"Content-Type": FHIR_JSON, **error.headers, "X-Request-ID": request_id or new_id()}
    return Response(error_body(error), status_code=error.status, headers=headers)


async def _with_request_id(response: Response[Any]) -> Response[Any]:
    """Every answer names its request (`X-Request-ID`): a request that is logged keeps its log line's
    id, any other (metadata, health, admin, ...) gets one here."""
    response.headers.setdefault("X-Request-ID", new_id())
    return response


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
    response = _error_response(cls(message))
    allow = (exc.headers or {}).get("allow")
    if allow:  # RFC 9110: a 405 names the methods the resource serves
        response.headers["Allow"] = allow
    return response


def _unexpected(request: Request, exc: Exception) -> Response[bytes]:
    # a bug: say so without a trace or any request data; log only the exception type
    log.error("unhandled", error=type(exc).__name__, path=request.url.path)
    return _error_response(GatewayError("internal error"))


def _target(request: Request, appointment_id: str | None) -> Target:
    return _target_of(appointment_id, request.query_params.getall("identifier", []))


def _target_of(appointment_id: str | None, values: list[str]) -> Target:
    """What a PUT names: the Salesforce id in the path, or `?identifier=system|value` (FHIR's
    conditional update, with a token: `|value` means no system, `value` alone any system)."""
    if appointment_id is not None:
        if not SALESFORCE_ID.fullmatch(appointment_id):
            raise NotFound(NO_SUCH_APPOINTMENT)
        return Target(salesforce_id=appointment_id)
    if len(values) != 1:
        raise InvalidRequest("a conditional update names the appointment by one identifier: ?identifier=system|value",
                             location=http("identifier"))
    return identifier_target(values[0], "identifier")


def _outcome(status: int, trace: Trace, error: GatewayError | None) -> str:
    if status in (200, 201):
        if trace.idempotency == "done":
            return "replayed"
        return trace.result or "booked"
    if status == 202:
        return "queued"
    if trace.refusal is not None or isinstance(error, SalesforceRefused) or (status == 422 and trace.idempotency == "done"):
        return "refused"
    if isinstance(error, IdempotencyKeyReused) or status == 409:
        return "conflict"
    if status == 422:
        return "unmapped"
    if status == 429:
        return "throttled"
    return "failed" if status >= 500 else "rejected"


def create_app(
    settings: Settings, *, extra_keys: dict[str, list[str]] | None = None, workers: int = 1,
    run_queue_workers: bool = True, sealer: Sealer | None = None,
) -> Litestar:
    """Build the gateway. `extra_keys` adds inbound key digests per source (the demo's keys);
    `workers` is how many processes share this instance's Salesforce call limit;
    `run_queue_workers` starts the durable queue's delivery in this process (the default)."""
    metrics = Metrics(sources=settings.sources)

    def _reloaded(source: str, ok: bool, version: str | None) -> None:
        metrics.codemap_reload(source, ok)
        if ok and version:
            metrics.codemap_version(source, version)

    # checked at start (a bad map stops it), then followed: a changed map is picked up without a restart
    maps = LiveMaps(settings.config_dir, list(settings.sources), on_reload=_reloaded,
                    interval_seconds=settings.file.codemaps.reload_seconds)
    for source, version in maps.versions().items():
        metrics.codemap_version(source, version)
    if settings.salesforce is None:
        raise ValueError("create_app needs a Salesforce connection (the serve command supplies the sandbox's)")
    if settings.redis_url is None:
        raise ValueError("create_app needs a Redis URL (the serve command starts an embedded Redis)")
    cfg = settings.file
    # salesforce.max_concurrent_calls bounds the whole instance: each worker gets its share
    per_worker = max(1, cfg.salesforce.max_concurrent_calls // max(1, workers))
    cfg = msgspec.structs.replace(cfg, salesforce=msgspec.structs.replace(cfg.salesforce, max_concurrent_calls=per_worker))
    redis_client = connect_redis(settings.redis_url, cluster=cfg.redis.cluster)
    # the booking's two scripts share one pipelined connection (gateway/state/redis_mux.py); a Cluster
    # spreads records over its shards, so there redis-py's cluster client runs them
    scripts = redis_client if cfg.redis.cluster else MultiplexedRedis(settings.redis_url, timeout=2, connect_timeout=2)
    http = HttpClient(cfg.salesforce)
    tokens = TokenProvider(
        settings.salesforce, http, redis_client, cfg.redis.key_prefix,
        cache_seconds=cfg.salesforce.token_cache_seconds,
        retry_after=cfg.salesforce.unavailable_retry_after_seconds,
    )
    b = cfg.breaker
    breaker = CircuitBreaker(
        redis_client, cfg.redis.key_prefix, failure_ratio=b.failure_ratio, min_calls=b.min_calls,
        window_seconds=b.window_seconds, open_seconds=b.open_seconds, sync_interval_seconds=b.sync_interval_seconds,
        # a probe's slot is held no longer than its call can last
        probe_timeout_seconds=cfg.salesforce.timeout_seconds + cfg.salesforce.connect_timeout_seconds + 1,
    )
    client = SalesforceClient(settings.salesforce, cfg.salesforce, tokens, http, breaker)
    data_sealer = sealer if sealer is not None else sealer_from_env()
    store = IdempotencyStore(
        scripts, cfg.redis.key_prefix,
        lease_seconds=cfg.idempotency.lease_seconds, retention_hours=cfg.idempotency.retention_hours,
        sealer=data_sealer,
    )
    queue_sources = [name for name, src in settings.sources.items() if src.delivery == "queue"]
    queue = BookingQueue(
        redis_client, cfg.redis.key_prefix, max_attempts=cfg.queue.max_attempts,
        backoff_base_seconds=cfg.queue.backoff_base_seconds, backoff_max_seconds=cfg.queue.backoff_max_seconds,
    )
    links = Links(redis_client, cfg.redis.key_prefix, retention_days=cfg.idempotency.link_retention_days,
                  sealer=data_sealer)
    booker = Booker(
        settings.sources, maps, store, client, queue if queue_sources else None,
        in_flight_retry_after=cfg.idempotency.in_flight_retry_after_seconds,
        in_doubt_settle_seconds=cfg.idempotency.in_doubt_settle_seconds, sealer=data_sealer, links=links,
    )
    # an entry whose consumer went quiet for a whole lease is taken over by another worker
    background: list[asyncio.Task[None]] = []
    reqlog = RequestLog(
        redis_client, cfg.redis.key_prefix, sealer=data_sealer,
        max_entries=cfg.request_log.max_entries, retention_hours=cfg.request_log.retention_hours,
        max_actionable_entries=cfg.request_log.max_actionable_entries,
        actionable_retention_hours=cfg.request_log.actionable_retention_hours,
        max_bytes=cfg.request_log.max_bytes, max_input_bytes=cfg.request_log.max_input_bytes,
        flush_seconds=cfg.request_log.flush_seconds, scripts=scripts,
    )
    worker = QueueWorker(booker, queue, queue_sources, cfg.queue, reclaim_idle_seconds=cfg.idempotency.lease_seconds,
                         request_log=reqlog)
    inbound = Inbound(settings, extra_keys)
    # JWKS fetches are rare (cached 5 minutes) and go to the EHRs' hosts: a client of their own
    jwks_http = httpx.AsyncClient(timeout=5, follow_redirects=False)
    smart = SmartAuth(settings.sources, redis_client, cfg.redis.key_prefix, jwks_http)
    limiter = RateLimiter(redis_client, cfg.redis.key_prefix,
                          {name: src.rate_limit_per_minute or 0 for name, src in settings.sources.items()})
    certificates = ClientCertificates(settings.sources)
    pid = os.getpid()
    published = time.strftime("%Y-%m-%d", time.gmtime())
    # what the gateway says of its own address comes from its settings, never from a request's Host
    public = settings.public_urls[0]
    token_urls = [f"{url}/auth/token" for url in settings.public_urls]

    async def _admit(request: Request, source: str, *, spend: bool = True) -> None:
        """The source exists, and the caller is it: its certificate (when it needs one), its key or
        SMART token, then its rate limit (`spend`: a batch spends it per entry, once it has read them)."""
        booker.source(source)
        certificates.check(source, request.scope)
        await inbound.authorize(source, request.headers.get("authorization"), smart)
        if spend:
            await limiter.check(source)  # after the key: strangers cannot spend a source's allowance

    async def _handle(request: Request, source: str, dry_run: bool, change: str | None = None) -> Response[bytes]:
        """`change`: a PUT (`change` is its path id, or "" for a conditional update by identifier)."""
        started = time.perf_counter()
        request_id = new_id()
        trace = Trace()
        status, body, key, error, admitted = 500, None, None, None, False
        try:
            await _admit(request, source)
            admitted = True
            _negotiate(request)
            _check_media(request)
            body = await _read_body(request)
            if dry_run:
                prepared = booker.prepare(source, body, trace)
                status = 200
                headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
                if prepared.warnings:  # the body stays the Salesforce request: what was left out goes beside it
                    headers["Warning"] = warning_header(prepared.warnings)
                return Response(_json.encode(prepared.mapped.request), status_code=200, headers=headers)
            key = parse_key_header(request.headers.get("idempotency-key"))
            if change is not None:
                answer = await booker.change(source, body, _target(request, change or None), key, trace,
                                             allowed=if_match(request.headers.get("if-match")))
            else:
                answer = await booker.book(source, body, key, trace,
                                           condition=if_none_exist(request.headers.get("if-none-exist")))
            status = answer.status
            return _respond(answer, request_id, public)
        except GatewayError as exc:
            status, error = exc.status, exc
            return _error_response(exc, request_id)
        except HTTPException as exc:  # body over the size limit, raised while reading it
            status = exc.status_code
            response = _litestar_error(request, exc)
            response.headers["X-Request-ID"] = request_id
            return response
        finally:
            _summarise(request_id, source, "translate" if dry_run else "change" if change is not None else "book",
                       status, trace, started, error, body, request.headers.get("content-type"), key,
                       admitted=admitted)

    async def replay(entry: Entry) -> Entry:
        """An operator's replay of a logged booking from its sealed input, through the same path."""
        sealed = reqlog.unseal(entry)
        if sealed is None or sealed.input is None:
            raise NotFound("this entry kept no input to replay")
        started = time.perf_counter()
        request_id = new_id()
        trace = Trace()
        status, error = 500, None
        body = sealed.input.encode()
        try:
            answer = await booker.book(entry.source, body, sealed.idempotency_key, trace, retry_refusal=True)
            status = answer.status
        except GatewayError as exc:
            status, error = exc.status, exc
        finally:
            new = _summarise(request_id, entry.source, "replay", status, trace, started, error, body,
                             sealed.media_type, sealed.idempotency_key, replay_of=entry.id)
        await reqlog.link_replay(entry.id, request_id)
        return new

    def _summarise(request_id: str, source: str, op: str, status: int, trace: Trace, started: float,
                   error: GatewayError | None, body: bytes | None, media_type: str | None, key: str | None,
                   replay_of: str | None = None, admitted: bool = True) -> Entry:
        """The request's one log line and its request-log entry. `admitted`: false for a request
        refused at the door (`_admit`), whose entries the request log samples."""
        sf = trace.salesforce
        ms = round((time.perf_counter() - started) * 1000, 2)
        log.info(
            "request", request_id=request_id, source=source, op=op,
            status=status, idempotency=trace.idempotency, sf_status=sf.status,
            sf_ms=round(sf.latency_ms, 2) if sf.status or sf.latency_ms else None,
            sf_error=sf.error_code, sf_in_doubt=sf.in_doubt or None, sf_reauth=sf.retried_auth or None,
            looked_up=trace.looked_up, adopted=trace.adopted or None, parked=trace.parked,
            # more than one ServiceAppointment matched the look-up: worth an operator's look
            lookup_matches=trace.lookup.matches if (trace.lookup.matches or 0) > 1 else None,
            maps=trace.maps_version, warnings=len(trace.warnings) or None, ms=ms, pid=pid,
        )
        outcome = _outcome(status, trace, error)
        metrics.request(source if source in settings.sources else "other", op, outcome, status, ms / 1000)
        if trace.idempotency != "none":
            metrics.idempotency(source, trace.idempotency)
        for operation, call in (("book", sf), ("lookup", trace.lookup)):
            if call.status is not None or call.error_code is not None:
                metrics.salesforce_call(operation, call.latency_ms / 1000, call.error_code)
        entry = Entry(
            id=request_id, time_ms=int(time.time() * 1000), source=source, op=op, outcome=outcome, status=status,
            idempotency=trace.idempotency if trace.idempotency != "none" else None,
            sf_status=sf.status, sf_id=trace.salesforce_id, sf_error=sf.error_code,
            ms=ms, sf_ms=round(sf.latency_ms, 2) if sf.status else None,
            maps_version=trace.maps_version, maps_used=logged_maps(trace.maps_used),
            issues=logged_issues((error or trace.refusal).issues if (error or trace.refusal) else trace.warnings),
            key_digest=log_key_digest(source, trace.key_material) if trace.key_material else None,
            replay_of=replay_of,
        )
        if op not in ("translate", "search") and source in settings.sources:  # bookings and changes only
            if not admitted:  # refused at the door: counted above, sampled here, nothing sealed
                if (suppressed := reqlog.at_the_door(source)) is None:
                    return entry
                entry = msgspec.structs.replace(entry, suppressed=suppressed or None)
            else:
                # a failed change keeps no input: the replay path books, and the EHR resends its PUT
                keep = outcome in KEEP_INPUT and op != "change"
                entry = reqlog.with_sealed(entry, trace.patient, body if keep else None, media_type, key)
            reqlog.record(entry)
        return entry

    @post("/fhir/{source:str}/Appointment", status_code=201)
    async def book(request: Request, source: FromPath[str]) -> Response[bytes]:
        return await _handle(request, source, dry_run=False)

    @post("/fhir/{source:str}/Appointment/$book", status_code=201)
    async def book_operation(request: Request, source: FromPath[str]) -> Response[bytes]:
        return await _handle(request, source, dry_run=False)

    @put("/fhir/{source:str}/Appointment/{appointment_id:str}", status_code=200)
    async def change_by_id(request: Request, source: FromPath[str], appointment_id: FromPath[str]) -> Response[bytes]:
        return await _handle(request, source, dry_run=False, change=appointment_id)

    @put("/fhir/{source:str}/Appointment", status_code=200)
    async def change_by_identifier(request: Request, source: FromPath[str]) -> Response[bytes]:
        return await _handle(request, source, dry_run=False, change="")

    async def _hl7(source: str, raw: bytes) -> bytes:
        """One SIU message from an MLLP listener: S12 books, S13/S14 reschedule, S15 cancels, through
        the same maps, rules and idempotency (keyed on the placer and filler ids). The ACK says AA,
        AE (sending the same message again cannot succeed: unreadable, unmapped, refused, an unknown
        appointment, ids used for another one) or AR (it can: Redis or Salesforce unavailable, a 429,
        the circuit open, the appointment in flight, or a fault of the gateway's own). The message is
        parsed once; the ACK is built from its MSH read cheaply, and names this request log entry."""
        started = time.perf_counter()
        request_id = new_id()
        trace = Trace()
        status, error, op, issues = 500, None, "book", ()
        try:
            siu = parse_siu(raw, settings.sources[source].time_zone, cfg.mllp)
            if siu.event == "book":
                answer = await booker.book_prepared(source, booker.check(source, siu.booking, trace), None, trace)
            else:
                op = "change"
                target = Target(system=PLACER, value=siu.placer) if siu.placer else Target(system=FILLER, value=siu.filler)
                answer = await booker.change_booking(source, siu.booking, target, None, trace)
            status = answer.status
            code = "AA" if status < 400 else "AE"
            if status >= 400:  # Salesforce's refusal, or its replay (stored as the answer it was)
                issues = tuple(trace.refusal.issues) if trace.refusal else (_REFUSED,)
        except GatewayError as exc:
            status, error, issues = exc.status, exc, tuple(exc.issues)
            code = "AR" if status >= 500 or status in (409, 429) else "AE"  # AR: the same message may pass later
        except Exception as exc:  # a bug: the sender gets an AR (send again), the log the exception's type only
            log.error("unhandled", error=type(exc).__name__, path="mllp")
            code = "AR"
        finally:
            # the v2 message is not kept: a replay from the dashboard speaks FHIR
            _summarise(request_id, source, op, status, trace, started, error, None, None, None)
        return ack(read_header(raw), code, issues, reference=request_id)

    listeners = [MllpListener(name, src.mllp_host, src.mllp_port or 0, _hl7, cfg.mllp, metrics)
                 for name, src in settings.sources.items() if src.adapter == "hl7v2" and src.mllp_port is not None]
    mllp_ports: dict[str, int] = {}

    @post("/fhir/{source:str}", status_code=200)
    async def batch(request: Request, source: FromPath[str]) -> Response[bytes]:
        """A FHIR batch Bundle (gateway/booking/batch.py): each entry booked or changed as if sent alone, each
        with its own request-log entry; the key of entry i is `<Idempotency-Key>#i` when the header
        is given, else derived from the entry as for a single request."""
        request_id = new_id()
        try:
            await _admit(request, source, spend=False)
            _negotiate(request)
            _check_media(request)
            body = await _read_body(request)
            if source not in booker.sources or settings.sources[source].adapter == "hl7v2":
                raise NotFound("this source takes HL7 v2 over MLLP, not FHIR over HTTP")
            items = parse_batch(body)
            key = parse_key_header(request.headers.get("idempotency-key"))
            await limiter.check(source, cost=max(1, len(items)))  # each entry is a request
        except GatewayError as exc:
            return _error_response(exc, request_id)
        except HTTPException as exc:  # body over the size limit
            response = _litestar_error(request, exc)
            response.headers["X-Request-ID"] = request_id
            return response
        entries = []
        for item in items:
            if isinstance(item, GatewayError):
                entries.append(response_entry(item.status, error_body(item), None))
                continue
            entries.append(await _entry(source, item, f"{key}#{item.index}" if key is not None else None))
        return Response(batch_response(entries), status_code=200,
                        headers={"Content-Type": FHIR_JSON, "X-Request-ID": request_id})

    async def _entry(source: str, item: Item, key: str | None) -> dict[str, Any]:
        started = time.perf_counter()
        request_id = new_id()
        trace = Trace()
        status, error, op = 500, None, "book" if item.kind == "book" else "change"
        try:
            if item.kind == "book":
                answer = await booker.book(source, item.body, key, trace, condition=if_none_exist(item.if_none_exist))
            else:
                target = _target_of(item.appointment_id, [item.identifier] if item.identifier else [])
                answer = await booker.change(source, item.body, target, key, trace, allowed=if_match(item.if_match))
            status = answer.status
            return response_entry(status, answer.body, _absolute(answer.headers, public).get("Location"),
                                  answer.headers.get("ETag"))
        except GatewayError as exc:
            status, error = exc.status, exc
            return response_entry(exc.status, error_body(exc), None)
        except Exception as exc:  # a bug in one entry must not lose the others' answers
            log.error("unhandled", error=type(exc).__name__, path="batch-entry")
            failure = GatewayError("internal error")
            return response_entry(failure.status, error_body(failure), None)
        finally:
            _summarise(request_id, source, op, status, trace, started, error,
                       item.body if status not in (401, 403) else None, "application/fhir+json", key)

    def _conformance(source: str, request: Request) -> SourceSettings:
        """The FHIR source whose conformance resources are asked for (no credentials: FHIR clients
        read them first; they hold no key and no patient data)."""
        found = settings.sources.get(source)
        if found is None or found.adapter == "hl7v2":
            raise NotFound("no FHIR source of that name is configured")
        _negotiate(request)
        return found

    @get("/fhir/{source:str}/metadata")
    async def metadata(request: Request, source: FromPath[str]) -> Response[bytes]:
        """The source's CapabilityStatement (gateway/booking/capability.py)."""
        try:
            found = _conformance(source, request)
        except GatewayError as exc:
            return _error_response(exc)
        return Response(capability_statement(source, found, public, published), media_type=FHIR_JSON)

    @get("/fhir/{source:str}/OperationDefinition/{name:str}")
    async def operation_definition(request: Request, source: FromPath[str], name: FromPath[str]) -> Response[bytes]:
        """The definition the CapabilityStatement names for `$translate`, so that it resolves."""
        try:
            _conformance(source, request)
            if name != TRANSLATE:
                raise NotFound(f"the one operation defined here is OperationDefinition/{TRANSLATE}")
        except GatewayError as exc:
            return _error_response(exc)
        return Response(translate_definition(f"{public}/fhir/{source}", published), media_type=FHIR_JSON)

    async def _search(request: Request, source: str, *, by_post: bool) -> Response[bytes]:
        """Free slots, from Salesforce's Get Slots, as a FHIR searchset Bundle (gateway/booking/slots.py); by
        POST, the form body's parameters join the query's (FHIR search by POST: the same answer)."""
        started = time.perf_counter()
        request_id = new_id()
        trace = Trace()
        status, error = 500, None
        try:
            await _admit(request, source)
            params = await _search_form(request) if by_post else request.query_params
            _negotiate(request, params)
            offset, count = paging(params)
            found = await booker.find_slots(source, params, trace)
            status = 200
            base = f"{public}/fhir/{source}"
            return Response(slot_searchset(found, params, base, f"{base}/Slot", offset, count), status_code=200,
                            headers={"Content-Type": FHIR_JSON, "X-Request-ID": request_id})
        except GatewayError as exc:
            status, error = exc.status, exc
            return _error_response(exc, request_id)
        except HTTPException as exc:  # a form body over the size limit
            status = exc.status_code
            response = _litestar_error(request, exc)
            response.headers["X-Request-ID"] = request_id
            return response
        finally:
            _summarise(request_id, source, "search", status, trace, started, error, None, None, None)

    async def _search_form(request: Request) -> MultiDict[str]:
        if _media(request) != _FORM:
            raise UnsupportedMediaType(f"a search by POST sends its parameters as {_FORM}")
        try:
            form = parse_qsl((await _read_body(request)).decode(), keep_blank_values=True, max_num_fields=1000)
        except (UnicodeDecodeError, ValueError):
            raise InvalidRequest("the search's form body cannot be read (UTF-8, at most 1,000 fields)") from None
        return MultiDict([*request.query_params.multi_items(), *form])

    @get("/fhir/{source:str}/Slot")
    async def slot_search(request: Request, source: FromPath[str]) -> Response[bytes]:
        return await _search(request, source, by_post=False)

    @post("/fhir/{source:str}/Slot/_search", status_code=200)
    async def slot_search_by_post(request: Request, source: FromPath[str]) -> Response[bytes]:
        return await _search(request, source, by_post=True)

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
        except REDIS_FAILURES:
            checks["redis"] = "fail"
        checks["salesforce_auth"] = checks["salesforce_instance"] = "unknown"
        for name, check in (("salesforce_auth", client.check_auth), ("salesforce_instance", client.check_instance)):
            if "fail" in checks.values():  # each needs the one before: a token needs Redis, a call a token
                break
            try:
                await check()
                checks[name] = "pass"
            except GatewayError:
                checks[name] = "fail"
        ok = all(v == "pass" for v in checks.values())
        body = {"status": "pass" if ok else "fail", "checks": checks, "circuit": breaker.state,
                "salesforce_api_usage": {"used": client.usage.used, "limit": client.usage.limit}}
        return Response(_json.encode(body), status_code=200 if ok else 503, media_type="application/json",
                        headers={} if ok else {"Retry-After": "5"})

    async def _start() -> None:
        for listener in listeners:
            mllp_ports[listener.source] = await listener.start()
        background.append(asyncio.create_task(maps.run(), name="codemaps"))
        background.append(asyncio.create_task(_gauges(), name="gauges"))
        background.append(asyncio.create_task(breaker.run(), name="circuit-breaker"))
        background.append(asyncio.create_task(reqlog.run(), name="request-log"))
        if queue_sources and run_queue_workers:
            background.append(asyncio.create_task(worker.run(), name="queue-worker"))

    minted = [0]

    def _token_refreshes() -> None:
        for _ in range(tokens.refreshes - minted[0]):
            metrics.token_refresh()
        minted[0] = tokens.refreshes

    async def _gauges() -> None:
        """Values that are states, not events: read every few seconds for /metrics."""
        while True:
            _token_refreshes()
            metrics.circuit(breaker.state)
            metrics.api_usage(client.usage.used, client.usage.limit)
            for source in queue_sources:
                try:
                    depth = await queue.depth(source)
                    metrics.queue_depth(source, depth["ready"], depth["delayed"], depth["dead"])
                except REDIS_FAILURES:
                    pass
            await asyncio.sleep(5)

    @post("/auth/token", status_code=200)
    async def token(request: Request) -> Response[bytes]:
        """SMART Backend Services token endpoint (client credentials with a JWT assertion)."""
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        try:
            form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
            # the audience an assertion names: this endpoint at one of the gateway's configured URLs
            answer = await smart.issue(form, token_urls)
        except TokenError as exc:
            log.info("token", status=exc.status, error=exc.error)
            return Response(exc.body(), status_code=exc.status, media_type="application/json", headers=headers)
        log.info("token", status=200)
        return Response(_json.encode(answer), status_code=200, media_type="application/json", headers=headers)

    document = openapi_json(settings)  # encoded once: it changes only with the settings

    @get(OPENAPI_PATH)
    async def openapi() -> Response[bytes]:
        """The OpenAPI 3.1 document (gateway/edges/openapi.py): no auth, no secret, no patient data."""
        return Response(document, media_type="application/json")

    @get("/metrics")
    async def metrics_page() -> Response[bytes]:
        _token_refreshes()
        metrics.circuit(breaker.state)
        metrics.api_usage(client.usage.used, client.usage.limit)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    admin = admin_router(AdminDeps(
        auth=AdminAuth(settings.file.admin, inbound.digests(), redis_client, cfg.redis.key_prefix, smart),
        audit=Audit(redis_client, cfg.redis.key_prefix), log=reqlog, booker=booker, queue=queue, store=store,
        queue_sources=queue_sources, replay=replay, maps=maps,
        usage=lambda: {"api_used": client.usage.used, "api_limit": client.usage.limit, "circuit": breaker.state},
        origins=tuple("{0.scheme}://{0.netloc}".format(urlsplit(url)) for url in settings.public_urls),
    ))

    async def _close() -> None:
        for listener in listeners:
            await listener.close()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await reqlog.flush()
        await http.aclose()
        await jwks_http.aclose()
        await redis_client.aclose()
        if scripts is not redis_client:
            await scripts.aclose()

    app = Litestar(
        route_handlers=[batch, book, book_operation, change_by_id, change_by_identifier, slot_search,
                        slot_search_by_post, metadata, operation_definition, translate, live, ready, metrics_page,
                        token, openapi, admin],
        exception_handlers={HTTPException: _litestar_error, Exception: _unexpected},
        after_request=_with_request_id,
        on_startup=[_start],
        on_shutdown=[_close],
        request_max_body_size=cfg.limits.max_body_bytes,
        logging_config=None,
        openapi_config=None,
        debug=False,
    )
    app.state.queue = queue
    app.state.store = store
    app.state.breaker = breaker
    app.state.request_log = reqlog
    app.state.replay = replay
    app.state.mllp_ports = mllp_ports  # source -> the port its MLLP listener bound
    return app


def _freeze_startup_objects() -> None:
    """What start-up built (modules, the app, compiled maps) lives as long as the process: frozen,
    the garbage collector's full passes skip it. Unfrozen, a full pass walked some 100,000 objects
    (about 50 ms with the event loop stopped), which showed as latency spikes. Only for `serve`'s
    workers: a test process builds many apps and should collect them."""
    gc.collect()
    gc.freeze()


def connect_redis(url: str, *, cluster: bool = False) -> Any:
    """One Redis client for the process; with `cluster`, the URL names any node of a Redis Cluster."""
    if cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def demo_credentials(settings: Settings, env: Mapping[str, str]) -> tuple[Settings, dict[str, list[str]] | None]:
    """The demo's keys, only while the loopback sandbox `serve` started stands in for Salesforce
    (never with a real org): each source's fixed demo key, and the operator keys `serve` made for
    this start (their digests in `DEMO_OPERATORS_ENV`, `<admin>,<phi>`), added to `[admin]` so the
    dashboard opens on the sandbox's data."""
    sandbox = settings.salesforce is not None and settings.salesforce.login_url.startswith("http://127.0.0.1:")
    if env.get("EHR_GATEWAY_DEMO_KEYS") != "1" or not sandbox:
        return settings, None
    extra = {s: [key_digest(DEMO_KEY.format(source=s))] for s in settings.sources}
    admin_digest, _, phi_digest = env.get(DEMO_OPERATORS_ENV, "").partition(",")
    if admin_digest and phi_digest:
        admin = settings.file.admin
        admin = msgspec.structs.replace(admin, api_keys_sha256=(*admin.api_keys_sha256, admin_digest),
                                        phi_keys_sha256=(*admin.phi_keys_sha256, phi_digest))
        settings = msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, admin=admin))
    return settings, extra


def app_from_env() -> Litestar:
    """Entry point for `uvicorn --factory` workers: the serve command leaves everything in the
    environment (config folder, REDIS_URL, Salesforce connection or the sandbox's)."""
    from gateway.logs import configure

    configure()
    settings, extra = demo_credentials(load_settings(), os.environ)
    app = create_app(settings, extra_keys=extra, workers=int(os.environ.get("EHR_GATEWAY_WORKERS", "1")))
    app.on_startup.append(_freeze_startup_objects)  # after the app's own start-up
    return app
