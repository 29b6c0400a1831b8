"""The composition root: every long-lived part of a gateway process, built once from typed settings
and wired here, and nowhere else. `create_app` (gateway/app.py) builds one `Gateway` and mounts its
edges; tests and benchmarks build the same. The Gateway owns the parts' start and close (Litestar's
lifespan hooks run `start` and `close`).

Parts are built in the order data flows back from the called systems: the state kept in Redis, the
Salesforce client and the EHR clients, the booking core and the scheduling core (Health Cloud's
callouts), the operators' side, then the edges that take requests in.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import httpx
import msgspec

from gateway.booking.booker import Booker, Trace
from gateway.booking.livemaps import LiveMaps
from gateway.booking.holding import Holding
from gateway.booking.worker import HoldWorker, QueueWorker
from gateway.edges.fhir_routes import FhirEdge
from gateway.edges.healthcloud_routes import HealthCloudAuth, HealthCloudEdge
from gateway.edges.inbound import Admission, Inbound
from gateway.edges.mllp import MllpListener, SiuPath
from gateway.edges.mtls import ClientCertificates
from gateway.edges.openapi import openapi_json
from gateway.edges.service_routes import ServiceEdge
from gateway.edges.smart import SmartAuth
from gateway.ehr import EhrClient, client_class
from gateway.errors import GatewayError, NotFound
from gateway.identity import Resolver
from gateway.identity.create import PatientCreator
from gateway.ids import new_id
from gateway.operators.admin import AdminAuth, AdminDeps, Audit
from gateway.operators.gauges import Gauges
from gateway.operators.metrics import Metrics
from gateway.operators.summary import Recorder
from gateway.outbound.http import HttpClient
from gateway.salesforce.auth import TokenProvider
from gateway.salesforce.client import SalesforceClient
from gateway.scheduling.scheduler import Scheduler
from gateway.settings import Settings
from gateway.state.breaker import CircuitBreaker
from gateway.state.callouts import CalloutState
from gateway.state.connect import connect_redis
from gateway.state.holds import HoldStore
from gateway.state.idempotency import IdempotencyStore
from gateway.state.identities import IdentityCache
from gateway.state.links import Links
from gateway.state.queue import BookingQueue
from gateway.state.ratelimit import RateLimiter
from gateway.state.redis_mux import MultiplexedRedis
from gateway.state.requestlog import Entry, RequestLog
from gateway.state.sealing import Sealer, sealer_from_env


class Gateway:
    """`extra_keys` adds inbound key digests per source (the demo's keys); `workers` is how many
    processes share this instance's Salesforce call limit; `run_queue_workers` starts the durable
    queue's delivery in this process (the default); `sealer` seals patient data at rest (default:
    the data key in the environment)."""

    def __init__(self, settings: Settings, *, extra_keys: dict[str, list[str]] | None = None, workers: int = 1,
                 run_queue_workers: bool = True, sealer: Sealer | None = None) -> None:
        if settings.salesforce is None:
            raise ValueError("create_app needs a Salesforce connection (the serve command supplies the sandbox's)")
        if settings.redis_url is None:
            raise ValueError("create_app needs a Redis URL (the serve command starts an embedded Redis)")
        self.settings = settings
        cfg = settings.file
        # salesforce.max_concurrent_calls bounds the whole instance: each worker gets its share
        per_worker = max(1, cfg.salesforce.max_concurrent_calls // max(1, workers))
        self.cfg = cfg = msgspec.structs.replace(
            cfg, salesforce=msgspec.structs.replace(cfg.salesforce, max_concurrent_calls=per_worker))
        self.metrics = Metrics(sources=settings.sources)
        # checked at start (a bad map stops it), then followed: a changed map is picked up without a restart
        self.maps = LiveMaps(settings.config_dir, list(settings.sources), on_reload=self._maps_reloaded,
                             interval_seconds=cfg.codemaps.reload_seconds)
        for source, version in self.maps.versions().items():
            self.metrics.codemap_version(source, version)
        self.sealer = sealer if sealer is not None else sealer_from_env()
        self.queue_sources = [name for name, src in settings.sources.items() if src.delivery == "queue"]
        self._run_queue_workers = run_queue_workers
        self._build_state(settings.redis_url)
        self._build_salesforce()
        self._build_ehrs(workers)
        self._build_booking()
        self._build_scheduling()
        self._build_operators(extra_keys)
        self._build_edges()
        self._background: list[asyncio.Task[None]] = []

    # -- the parts, downstream first -------------------------------------------------------------

    def _build_state(self, redis_url: str) -> None:
        cfg, prefix = self.cfg, self.cfg.redis.key_prefix
        self.redis = connect_redis(redis_url, cluster=cfg.redis.cluster)
        # the booking's two scripts share one pipelined connection (gateway/state/redis_mux.py); a
        # Cluster spreads records over its shards, so there redis-py's cluster client runs them
        self.scripts = self.redis if cfg.redis.cluster else MultiplexedRedis(redis_url, timeout=2, connect_timeout=2)
        self.store = IdempotencyStore(self.scripts, prefix, lease_seconds=cfg.idempotency.lease_seconds,
                                      retention_hours=cfg.idempotency.retention_hours, sealer=self.sealer)
        self.queue = BookingQueue(self.redis, prefix, max_attempts=cfg.queue.max_attempts,
                                  backoff_base_seconds=cfg.queue.backoff_base_seconds,
                                  backoff_max_seconds=cfg.queue.backoff_max_seconds)
        self.links = Links(self.redis, prefix, retention_days=cfg.idempotency.link_retention_days, sealer=self.sealer)
        self.identities = IdentityCache(self.scripts, self.redis, prefix)
        self.holds = HoldStore(self.redis, prefix)
        b = cfg.breaker
        self.breaker = CircuitBreaker(
            self.redis, prefix, failure_ratio=b.failure_ratio, min_calls=b.min_calls,
            window_seconds=b.window_seconds, open_seconds=b.open_seconds, sync_interval_seconds=b.sync_interval_seconds,
            # a probe's slot is held no longer than its call can last
            probe_timeout_seconds=cfg.salesforce.timeout_seconds + cfg.salesforce.connect_timeout_seconds + 1,
        )
        r = cfg.request_log
        self.request_log = RequestLog(
            self.redis, prefix, sealer=self.sealer, max_entries=r.max_entries, retention_hours=r.retention_hours,
            max_actionable_entries=r.max_actionable_entries, actionable_retention_hours=r.actionable_retention_hours,
            max_bytes=r.max_bytes, max_input_bytes=r.max_input_bytes, flush_seconds=r.flush_seconds,
            scripts=self.scripts,
        )
        self.limiter = RateLimiter(self.redis, prefix, {name: src.rate_limit_per_minute or 0
                                                        for name, src in self.settings.sources.items()})

    def _build_salesforce(self) -> None:
        cfg, connection = self.cfg, self.settings.salesforce
        assert connection is not None
        self.http = HttpClient(cfg.salesforce)
        self.tokens = TokenProvider(connection, self.http, self.redis, cfg.redis.key_prefix,
                                    cache_seconds=cfg.salesforce.token_cache_seconds,
                                    retry_after=cfg.salesforce.unavailable_retry_after_seconds)
        self.salesforce = SalesforceClient(connection, cfg.salesforce, self.tokens, self.http, self.breaker)

    def _build_ehrs(self, workers: int) -> None:
        """A client per source with an `[….ehr]` table, in its EHR's own API (gateway/ehr), each with
        its own connections and its own breaker (Redis-shared, as Salesforce's)."""
        cfg, prefix = self.cfg, self.cfg.redis.key_prefix
        self.ehr_http: list[HttpClient] = []
        self.ehr_breakers: list[CircuitBreaker] = []
        self.ehr_clients: dict[str, EhrClient] = {}
        for name, src in self.settings.sources.items():
            if src.ehr is None:
                continue
            http = HttpClient(src.ehr)
            b = cfg.breaker
            breaker = CircuitBreaker(
                self.redis, prefix, failure_ratio=b.failure_ratio, min_calls=b.min_calls, window_seconds=b.window_seconds,
                open_seconds=b.open_seconds, sync_interval_seconds=b.sync_interval_seconds,
                probe_timeout_seconds=src.ehr.timeout_seconds + src.ehr.connect_timeout_seconds + 1,
                name=f"ehr:{name}", called=f"the {name} EHR")
            self.ehr_http.append(http)
            self.ehr_breakers.append(breaker)
            self.ehr_clients[name] = client_class(src.adapter)(
                name, src.ehr, self.settings.ehr_credentials.get(name), http, self.redis, prefix, workers=workers,
                breaker=breaker)

    def _build_scheduling(self) -> None:
        self.callouts = CalloutState(self.redis, self.cfg.redis.key_prefix, scripts=self.scripts,
                                     retention_days=self.cfg.idempotency.link_retention_days, sealer=self.sealer)
        self.scheduler = Scheduler(self.settings.sources, self.ehr_clients, self.maps, self.cfg.healthcloud, self.store,
                                   self.links, self.callouts)

    def _build_booking(self) -> None:
        cfg, sources = self.cfg, self.settings.sources
        self.resolver = Resolver(sources, self.identities, self.salesforce, cfg.identity)
        self.creator = PatientCreator(sources, self.salesforce, self.ehr_clients)
        self.holding = Holding(self.holds, self.store, sources, cfg.identity, self.sealer)
        self.booker = Booker(
            sources, self.maps, self.store, self.salesforce, self.queue if self.queue_sources else None,
            in_flight_retry_after=cfg.idempotency.in_flight_retry_after_seconds,
            in_doubt_settle_seconds=cfg.idempotency.in_doubt_settle_seconds, sealer=self.sealer, links=self.links,
            resolver=self.resolver, holding=self.holding, creator=self.creator,
        )
        # an entry whose consumer went quiet for a whole lease is taken over by another worker
        self.worker = QueueWorker(self.booker, self.queue, self.queue_sources, cfg.queue,
                                  reclaim_idle_seconds=cfg.idempotency.lease_seconds, request_log=self.request_log)
        self.hold_worker = HoldWorker(self.booker, self.holding, list(sources), cfg.identity,
                                      lease_seconds=cfg.idempotency.lease_seconds, request_log=self.request_log)

    def _build_operators(self, extra_keys: dict[str, list[str]] | None) -> None:
        self.recorder = Recorder(self.settings.sources, self.metrics, self.request_log)
        self.gauges = Gauges(self.metrics, self.tokens, self.breaker, self.salesforce, self.queue, self.queue_sources,
                             self.holds, tuple(self.settings.sources))
        self.inbound = Inbound(self.settings, extra_keys)
        # JWKS fetches are rare (cached 5 minutes) and go to the EHRs' hosts: a client of their own
        self.jwks_http = httpx.AsyncClient(timeout=5, follow_redirects=False)
        self.smart = SmartAuth(self.settings.sources, self.redis, self.cfg.redis.key_prefix, self.jwks_http)

    def _build_edges(self) -> None:
        settings, cfg = self.settings, self.cfg
        # what the gateway says of its own address comes from its settings, never from a request's Host
        public = settings.public_urls[0]
        admission = Admission(self.booker.source, self.inbound, self.smart, ClientCertificates(settings.sources),
                              self.limiter)
        hc = cfg.healthcloud
        self.healthcloud = HealthCloudEdge(HealthCloudAuth(hc, self.inbound.digests(), self.smart), self.scheduler,
                                           self.recorder, base=public + hc.path_prefix)
        self.fhir = FhirEdge(settings.sources, self.booker, admission, self.recorder, public=public,
                             published=time.strftime("%Y-%m-%d", time.gmtime()))
        self.service = ServiceEdge(self.redis, self.salesforce, self.breaker, self.smart, self.metrics, self.gauges,
                                   token_urls=[f"{url}/auth/token" for url in settings.public_urls],
                                   openapi=openapi_json(settings))
        siu = SiuPath(settings.sources, cfg.mllp, self.booker, self.recorder)
        self.listeners = [MllpListener(name, src.mllp_host, src.mllp_port or 0, siu, cfg.mllp, self.metrics)
                          for name, src in settings.sources.items()
                          if src.adapter == "hl7v2" and src.mllp_port is not None]
        self.mllp_ports: dict[str, int] = {}  # source -> the port its MLLP listener bound

    def admin_deps(self) -> AdminDeps:
        """What the admin API (gateway/operators/admin.py) works with."""
        return AdminDeps(
            auth=AdminAuth(self.settings.file.admin, self.inbound.digests(), self.redis, self.cfg.redis.key_prefix,
                           self.smart),
            audit=Audit(self.redis, self.cfg.redis.key_prefix), log=self.request_log, booker=self.booker,
            queue=self.queue, store=self.store, queue_sources=self.queue_sources, replay=self.replay, maps=self.maps,
            usage=lambda: {"api_used": self.salesforce.usage.used, "api_limit": self.salesforce.usage.limit,
                           "circuit": self.breaker.state},
            forget_identities=self.resolver.forget_all,
            origins=tuple("{0.scheme}://{0.netloc}".format(urlsplit(url)) for url in self.settings.public_urls),
        )

    def _maps_reloaded(self, source: str, ok: bool, version: str | None) -> None:
        self.metrics.codemap_reload(source, ok)
        if ok and version:
            self.metrics.codemap_version(source, version)

    # -- what the operators' side asks of the booking path ---------------------------------------

    async def replay(self, entry: Entry) -> Entry:
        """An operator's replay of a logged booking from its sealed input, through the same path."""
        sealed = self.request_log.unseal(entry)
        if sealed is None or sealed.input is None:
            raise NotFound("this entry kept no input to replay")
        started = time.perf_counter()
        request_id = new_id()
        trace = Trace(request_id=request_id)
        status, error = 500, None
        body = sealed.input.encode()
        try:
            answer = await self.booker.book(entry.source, body, sealed.idempotency_key, trace, retry_refusal=True)
            status = answer.status
        except GatewayError as exc:
            status, error = exc.status, exc
        finally:
            new = self.recorder.summarise(request_id, entry.source, "replay", status, trace, started, error, body,
                                          sealed.media_type, sealed.idempotency_key, replay_of=entry.id)
        await self.request_log.link_replay(entry.id, request_id)
        return new

    # -- start and close -------------------------------------------------------------------------

    async def start(self) -> None:
        """The MLLP listeners and the background work (code maps, gauges, breaker, request log, queue)."""
        for listener in self.listeners:
            self.mllp_ports[listener.source] = await listener.start()
        tasks = [(self.maps.run(), "codemaps"), (self.gauges.run(), "gauges"), (self.breaker.run(), "circuit-breaker"),
                 (self.request_log.run(), "request-log"),
                 *((b.run(), f"circuit-breaker-{b.called}") for b in self.ehr_breakers)]
        if self.queue_sources and self._run_queue_workers:
            tasks.append((self.worker.run(), "queue-worker"))
        if self._run_queue_workers:
            tasks.append((self.hold_worker.run(), "hold-worker"))
        self._background += [asyncio.create_task(work, name=name) for work, name in tasks]

    async def close(self) -> None:
        for listener in self.listeners:
            await listener.close()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.request_log.flush()
        await self.http.aclose()
        for http in self.ehr_http:
            await http.aclose()
        await self.jwks_http.aclose()
        await self.redis.aclose()
        if self.scripts is not self.redis:
            await self.scripts.aclose()
