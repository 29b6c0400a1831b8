"""Typed configuration: `config/gateway.toml` plus the Salesforce connection from the environment.

Everything is validated when it is loaded, so a bad file stops the start with the element named,
instead of failing on the first request.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_LOOPBACK = re.compile(r"^http://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?(/|$)")
_SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class ConfigError(Exception):
    """The configuration is invalid; the message names the file and element."""


def element_message(exc: msgspec.ValidationError) -> str:
    """msgspec says "Expected `str`, got `int` - at `$.a.b`"; engineers read "$.a.b: Expected …"."""
    what, sep, where = str(exc).rpartition(" - at ")
    return f"{where.strip('`')}: {what}" if sep else str(exc)


class EhrSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the gateway reaches a source's EHR, for Health Cloud's callouts (`[sources.<name>.ehr]`).
    The EHR's API is the source's dialect (`adapter`: cerner, epic or fhir). Its client secret comes
    from the environment (`EHR_<SOURCE>_CLIENT_SECRET`), never from this file."""

    base_url: str  # the EHR's FHIR base (Epic's: …/api/FHIR/STU3)
    token_url: str | None = None  # none: the EHR takes no token (a twin without auth, a FHIR server behind mTLS)
    client_id: str | None = None
    private_key_file: str | None = None  # instead of a secret: a signed JWT assertion (RS384)
    scopes: str = "system/Slot.read system/Appointment.read system/Appointment.write system/Schedule.read"
    mllp_out: str | None = None  # host:port of the EHR's incoming HL7 v2 scheduling interface (Epic's cancel)
    connect_timeout_seconds: float = 3.0
    timeout_seconds: float = 10.0
    max_concurrent_calls: int = 10  # per gateway instance, split among its workers
    max_answer_bytes: int = 4_194_304
    token_cache_seconds: int = 3600  # unless the token's own expires_in is sooner
    unavailable_retry_after_seconds: int = 10


class SourceIdentity(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a source's ids are found among the org's records (`[sources.<name>.identity]`, contract v3):
    the `Identifier.SourceSystem` each kind of its ids is kept under (None: the source's
    `source_system`), the identifier systems it sends mapped to theirs, and what becomes of a booking
    whose patient the org does not know yet."""

    patient_system: str | None = None
    practitioner_system: str | None = None
    location_system: str | None = None
    device_system: str | None = None
    unknown_patient: Literal["hold", "refuse", "create"] = "hold"
    hold_hours: float = 24.0  # a booking held for its patient longer than this is refused (dead letter)
    # identifier systems as the EHR sends them (FHIR Identifier.system, an HL7 v2 assigning authority)
    # -> Identifier.SourceSystem in the org
    systems: dict[str, str] = {}
    # the person-account RecordType of a patient the gateway creates (None: the org's one, looked up)
    person_record_type_id: str | None = None


class SourceSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    adapter: Literal["fhir", "cerner", "epic", "hl7v2"]
    source_system: str
    api_keys_sha256: tuple[str, ...] = ()
    channel_id: str | None = None
    time_zone: str | None = None
    rate_limit_per_minute: int | None = None
    delivery: Literal["sync", "queue"] = "sync"
    mllp_port: int | None = None  # 0: any free port (tests)
    # MLLP has no authentication of its own: the listener binds loopback unless told otherwise
    mllp_host: str = "127.0.0.1"
    # SMART Backend Services: the client id the source signs its assertions with, and its public
    # keys, inline (a JWKS as a TOML table) or by URL
    smart_client_id: str | None = None
    jwks: dict[str, Any] | None = None
    jwks_url: str | None = None
    # mutual TLS: the source's calls must present a client certificate, verified against
    # `[tls] client_ca_file`, whose subject CN or a DNS subject-alternative name is one of these
    client_cert_names: tuple[str, ...] = ()
    ehr: EhrSettings | None = None  # how Health Cloud's callouts reach this source's EHR
    identity: SourceIdentity = SourceIdentity()

    def id_system(self, kind: str) -> str:
        """The `Identifier.SourceSystem` of this source's literal ids of a kind (patient, practitioner,
        location, device)."""
        return getattr(self.identity, f"{kind}_system") or self.source_system


class AdminSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    api_keys_sha256: tuple[str, ...] = ()
    phi_keys_sha256: tuple[str, ...] = ()
    # failed admin keys per client address: this many at once, then this many a minute (429)
    failed_key_burst: int = 10
    failed_keys_per_minute: int = 10


class IdempotencySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    retention_hours: float = 72.0
    # must outlive the slowest Salesforce call (salesforce.timeout_seconds) or a retry could take
    # over a booking that is still being sent
    lease_seconds: float = 60.0
    in_flight_retry_after_seconds: int = 2
    # after an attempt whose answer was lost, how long Salesforce may still be storing it: a booking
    # not found by the look-up is sent again only after this
    in_doubt_settle_seconds: float = 60.0
    # how long the link from an EHR's identifiers to the Salesforce appointment is kept (for
    # reschedules and cancellations): longer than bookings are made ahead
    link_retention_days: float = 400.0


class QueueSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The durable queue of `delivery = "queue"` sources."""

    max_attempts: int = 8  # then the dead-letter stream
    backoff_base_seconds: float = 2.0  # exponential with full jitter: up to base * 2^(attempt-1)
    backoff_max_seconds: float = 300.0
    poll_seconds: float = 1.0
    batch: int = 16


class BreakerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The circuit breaker toward Salesforce, shared by every worker through Redis."""

    failure_ratio: float = 0.5
    min_calls: int = 20
    window_seconds: float = 10.0
    open_seconds: float = 15.0
    sync_interval_seconds: float = 0.5


class SalesforceTuning(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    connect_timeout_seconds: float = 3.0
    timeout_seconds: float = 20.0
    # Salesforce allows 25 concurrent long requests per org (5 in developer orgs); stay under it
    max_concurrent_calls: int = 20
    # Salesforce sends no expires_in; a cached token is dropped after this even if never refused
    token_cache_seconds: int = 3600
    unavailable_retry_after_seconds: int = 30
    # an answer larger than this is not read: the call is lost (in doubt, looked up), the memory kept
    max_answer_bytes: int = 4_194_304
    # readiness calls the instance (an API call, counted against the org's allowance) at most this
    # often per worker; a call that worked within it, a booking's included, stands in for one
    ready_check_seconds: float = 10.0


class LimitSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_body_bytes: int = 1_048_576
    keep_alive_seconds: float = 30.0  # an idle connection is closed after this
    max_connections: int | None = None  # per worker; over it the server answers 503
    # slow clients: the request line and headers, then the body, must arrive within these (408)
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    max_header_bytes: int = 16_384  # request line and headers together (431)


class MllpSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The MLLP listeners of `hl7v2` sources. MLLP has no authentication, so every cap holds before a
    message is read; each worker has its own listeners, so the connection caps are per worker."""

    max_connections: int = 64  # per listener; a connection over it is closed at once
    max_connections_per_peer: int = 8  # per listener and client address
    idle_seconds: float = 60.0  # a connection silent this long, or a block this slow, is closed
    max_message_bytes: int = 262_144  # a larger block is answered AE (an SIU is a few KB)
    # counted in the bytes before python-hl7 sees the message: its parse costs about 10 µs a
    # separator, so these bound a message's parse to tens of milliseconds
    max_segments: int = 200
    max_fields: int = 2_000  # field, component, repetition and subcomponent separators together


class TlsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The gateway's own TLS. Paths are relative to the config folder; the key file must be
    readable by its owner only."""

    certificate_file: str | None = None
    key_file: str | None = None
    # CA certificates that sign sources' client certificates: with it, the server asks every client
    # for a certificate (optional at the TLS level) and sources with `client_cert_names` require one
    client_ca_file: str | None = None


class ServerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # the reverse proxies whose X-Forwarded-For and X-Forwarded-Proto are believed (IP addresses or
    # CIDR networks); from anyone else those headers are ignored. None by default: a forged address
    # would escape the failed-admin-key throttle and mislead the audit
    trusted_proxies: tuple[str, ...] = ()
    # the gateway as its clients reach it (scheme://host[:port][/path]), never read off a request's
    # Host: the first is published (CapabilityStatement, search links, the SMART token URL), and any
    # is a client assertion's audience. Unset: EHR_GATEWAY_PUBLIC_URL (serve sets its own address)
    public_urls: tuple[str, ...] = ()


class RequestLogSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The operators' request log in Redis: bounded by count, age and bytes. Entries an operator may
    act on (failed, refused, unmapped, queued) are bounded on their own, so other entries never
    push them out."""

    max_entries: int = 100_000  # entries of the other outcomes
    retention_hours: float = 168.0
    max_actionable_entries: int = 100_000
    actionable_retention_hours: float = 168.0
    max_bytes: int = 256 * 1024 * 1024  # all entries together, approximately (requestlog.ENTRY_OVERHEAD)
    max_input_bytes: int = 65_536  # a larger input is not kept (the entry says how large it was)
    flush_seconds: float = 0.2  # entries are written in batches; a crash loses at most this much


class CodemapSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    reload_seconds: float = 2.0  # how often each worker looks for changed map files


class RedisSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    key_prefix: str = "ehrgw"
    cluster: bool = False  # REDIS_URL names one node of a Redis Cluster


class HealthCloudSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Health Cloud's callouts into the gateway (`[healthcloud]`): where its Appointment_Management
    named credential points, and that credential, as digests: HTTP Basic (`sha256("user:password")`)
    or a bearer (`sha256(token)`)."""

    path_prefix: str = "/iam"
    basic_sha256: tuple[str, ...] = ()
    bearer_keys_sha256: tuple[str, ...] = ()
    # a search waits this long for each EHR; one slower is answered as its failure, the others stand
    search_timeout_seconds: float = 8.0
    max_search_days: int = 62  # a wider window is refused (400): each EHR would page through it all
    max_search_values: int = 50  # ids and codes in one search
    # every other callout (slot status, read, create, cancel) is answered within this, the wait for a
    # connection to the EHR included: Apex's callouts give up after 10 s by default
    call_timeout_seconds: float = 8.0
    # which EHR appointments Health Cloud's credential may read and cancel: those the gateway knows
    # (booked through the callouts, or through the first direction), or "all" for an org that syncs
    # appointments another way; anything else is 404, as an id that does not exist
    scope: Literal["known", "all"] = "known"
    patient_cache_seconds: float = 900.0  # a patient the EHR has, remembered before a create reads it again
    unknown_patient_cache_seconds: float = 60.0  # ... one it does not have


class IdentitySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The org's records found for the EHRs' ids, cached in Redis for every worker and instance
    (`[identity]`)."""

    cache_hours: float = 6.0  # practitioners, facilities, their HPFs, devices: they change rarely
    patient_cache_seconds: float = 900.0  # patients: merged and corrected more often
    miss_cache_seconds: float = 60.0  # an id the org does not hold, remembered at most a minute
    # what a worker read of the cache, kept in that worker this long (a found record, never a miss):
    # the same people book again and again. A forget reaches the other workers within it. 0: off
    local_cache_seconds: float = 10.0
    lookup_wait_seconds: float = 5.0  # a look-up another worker has in flight is waited for this long
    # look-ups stop (503) while the org's daily allowance (Sforce-Limit-Info) has less than this share
    # left: bookings whose people are cached still go through
    api_reserve_percent: float = 5.0
    hold_retry_seconds: float = 30.0  # a held booking is looked up again after this, then twice as long
    hold_retry_max_seconds: float = 600.0  # ... up to this
    hold_poll_seconds: float = 1.0  # how often each worker looks for held bookings that are due
    hold_batch: int = 16


class FileSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sources: dict[str, SourceSettings] = {}
    admin: AdminSettings = AdminSettings()
    idempotency: IdempotencySettings = IdempotencySettings()
    salesforce: SalesforceTuning = SalesforceTuning()
    limits: LimitSettings = LimitSettings()
    redis: RedisSettings = RedisSettings()
    queue: QueueSettings = QueueSettings()
    breaker: BreakerSettings = BreakerSettings()
    request_log: RequestLogSettings = RequestLogSettings()
    codemaps: CodemapSettings = CodemapSettings()
    tls: TlsSettings = TlsSettings()
    mllp: MllpSettings = MllpSettings()
    server: ServerSettings = ServerSettings()
    healthcloud: HealthCloudSettings = HealthCloudSettings()
    identity: IdentitySettings = IdentitySettings()


class SalesforceConnection(msgspec.Struct, frozen=True):
    """From the environment. `repr` hides the secret and key so a dump never shows them."""

    login_url: str
    client_id: str
    client_secret: str | None = None
    username: str | None = None
    private_key_pem: str | None = None
    audience: str = "https://login.salesforce.com"
    api_version: str = "66.0"

    @property
    def flow(self) -> str:
        return "client_credentials" if self.client_secret else "jwt_bearer"

    def __repr__(self) -> str:  # never print the secret or the key
        return f"SalesforceConnection(login_url={self.login_url!r}, flow={self.flow!r})"


DEFAULT_PUBLIC_URL = "http://127.0.0.1:8000"  # serve's own default address


class Settings(msgspec.Struct, frozen=True):
    config_dir: Path
    file: FileSettings
    salesforce: SalesforceConnection | None  # None: no credentials, the sandbox is used
    redis_url: str | None
    public_url_env: str | None = None  # EHR_GATEWAY_PUBLIC_URL
    ehr_credentials: dict[str, EhrCredentials] = {}  # per source with an [….ehr] token_url

    @property
    def sources(self) -> dict[str, SourceSettings]:
        return self.file.sources

    @property
    def public_urls(self) -> tuple[str, ...]:
        """The gateway's own base URLs, the published one first (see ServerSettings.public_urls)."""
        return self.file.server.public_urls or (self.public_url_env or DEFAULT_PUBLIC_URL,)


def public_url_problem(url: str) -> str | None:
    """Why `url` cannot be the gateway's public base URL, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
            or url.endswith("/") or any(c.isspace() for c in url):
        return "an http(s)://host[:port][/path] URL, without a query or a trailing slash"
    return None


def default_config_dir() -> Path:
    return Path(os.environ.get("EHR_GATEWAY_CONFIG", "config"))


def load_file_settings(config_dir: Path) -> FileSettings:
    path = config_dir / "gateway.toml"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        settings = msgspec.convert(raw, FileSettings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {element_message(exc)}") from None
    problems = []
    for name, src in settings.sources.items():
        where = f"$.sources.{name}"
        if not _SOURCE_NAME.match(name):
            problems.append(f"{where}: a source name is a lowercase path segment ([a-z0-9_-])")
        if not src.source_system.strip():
            problems.append(f"{where}.source_system: must not be empty")
        for i, digest in enumerate(src.api_keys_sha256):
            if not _SHA256_HEX.match(digest):
                problems.append(f"{where}.api_keys_sha256[{i}]: not a lowercase SHA-256 hex digest")
        if src.time_zone is not None:
            try:
                ZoneInfo(src.time_zone)
            except (ZoneInfoNotFoundError, ValueError):
                problems.append(f"{where}.time_zone: not an IANA time zone name")
        if src.adapter == "hl7v2" and src.time_zone is None:  # v2 times rarely carry an offset
            problems.append(f"{where}.time_zone: required with adapter 'hl7v2' (the zone of times without an offset)")
        if (src.adapter == "hl7v2") != (src.mllp_port is not None):
            problems.append(f"{where}.mllp_port: required with adapter 'hl7v2' and only with it")
        elif src.mllp_port is not None and not 0 <= src.mllp_port <= 65535:
            problems.append(f"{where}.mllp_port: a TCP port (0 to 65535)")
        if src.smart_client_id is not None and (src.jwks is None) == (src.jwks_url is None):
            problems.append(f"{where}.smart_client_id: needs either jwks or jwks_url")
        if src.jwks_url is not None and not (src.jwks_url.startswith("https://") or src.jwks_url.startswith("http://127.0.0.1")):
            problems.append(f"{where}.jwks_url: must be https (or loopback for tests)")
        if src.rate_limit_per_minute is not None and src.rate_limit_per_minute < 1:
            problems.append(f"{where}.rate_limit_per_minute: must be at least 1")
        if src.ehr is not None:
            problems += _ehr_problems(f"{where}.ehr", src, config_dir)
        problems += _identity_problems(f"{where}.identity", src)
    problems += _healthcloud_problems(settings.healthcloud)
    ident = settings.identity
    if min(ident.cache_hours, ident.patient_cache_seconds, ident.miss_cache_seconds, ident.lookup_wait_seconds,
           ident.hold_retry_seconds, ident.hold_poll_seconds, ident.hold_batch) <= 0 \
            or ident.hold_retry_max_seconds < ident.hold_retry_seconds:
        problems.append("$.identity: times and hold_batch must be positive, hold_retry_max_seconds >= hold_retry_seconds")
    if not 0 <= ident.local_cache_seconds <= 60:
        problems.append("$.identity.local_cache_seconds: from 0 (off) to 60")
    if ident.miss_cache_seconds > 60:
        problems.append("$.identity.miss_cache_seconds: at most 60 (a patient may be about to arrive)")
    if not 0 <= ident.api_reserve_percent < 100:
        problems.append("$.identity.api_reserve_percent: from 0 to under 100")
    for kind in ("api_keys_sha256", "phi_keys_sha256"):
        for i, digest in enumerate(getattr(settings.admin, kind)):
            if not _SHA256_HEX.match(digest):
                problems.append(f"$.admin.{kind}[{i}]: not a lowercase SHA-256 hex digest")
    idem = settings.idempotency
    if idem.lease_seconds <= settings.salesforce.timeout_seconds:
        problems.append("$.idempotency.lease_seconds: must exceed salesforce.timeout_seconds")
    if idem.retention_hours <= 0:
        problems.append("$.idempotency.retention_hours: must be positive")
    if idem.link_retention_days <= 0:
        problems.append("$.idempotency.link_retention_days: must be positive")
    if settings.salesforce.ready_check_seconds < 0:
        problems.append("$.salesforce.ready_check_seconds: must be 0 or more")
    if settings.salesforce.max_answer_bytes < 65_536:
        problems.append("$.salesforce.max_answer_bytes: must be at least 65536")
    if idem.in_doubt_settle_seconds < 0:
        problems.append("$.idempotency.in_doubt_settle_seconds: must not be negative")
    q = settings.queue
    if q.max_attempts < 1 or q.batch < 1:
        problems.append("$.queue: max_attempts and batch must be at least 1")
    if not 0 < q.backoff_base_seconds <= q.backoff_max_seconds or q.poll_seconds <= 0:
        problems.append("$.queue: need 0 < backoff_base_seconds <= backoff_max_seconds and poll_seconds > 0")
    b = settings.breaker
    if not 0 < b.failure_ratio <= 1 or b.min_calls < 1 or min(b.window_seconds, b.open_seconds, b.sync_interval_seconds) <= 0:
        problems.append("$.breaker: need 0 < failure_ratio <= 1, min_calls >= 1 and positive times")
    if settings.admin.failed_key_burst < 1 or settings.admin.failed_keys_per_minute < 1:
        problems.append("$.admin: failed_key_burst and failed_keys_per_minute must be at least 1")
    lim = settings.limits
    if min(lim.max_body_bytes, lim.max_header_bytes, lim.keep_alive_seconds, lim.header_timeout_seconds,
           lim.body_timeout_seconds) <= 0 or (lim.max_connections is not None and lim.max_connections < 1):
        problems.append("$.limits: sizes, times and max_connections must be positive")
    mllp = settings.mllp
    if min(mllp.max_connections, mllp.max_connections_per_peer, mllp.idle_seconds, mllp.max_message_bytes,
           mllp.max_segments, mllp.max_fields) <= 0:
        problems.append("$.mllp: caps and idle_seconds must be positive")
    tls = settings.tls
    if (tls.certificate_file is None) != (tls.key_file is None):
        problems.append("$.tls: certificate_file and key_file go together")
    if tls.client_ca_file is not None and tls.certificate_file is None:
        problems.append("$.tls.client_ca_file: needs the gateway's own certificate_file and key_file")
    for name, source in settings.sources.items():
        if source.client_cert_names and tls.client_ca_file is None:
            problems.append(f"$.sources.{name}.client_cert_names: needs [tls] client_ca_file")
    for name in ("certificate_file", "key_file", "client_ca_file"):
        value = getattr(tls, name)
        if value is not None and not (config_dir / value).is_file():
            problems.append(f"$.tls.{name}: no such file")
    if tls.key_file is not None and (config_dir / tls.key_file).is_file():
        if (config_dir / tls.key_file).stat().st_mode & 0o077:
            problems.append("$.tls.key_file: must be readable by its owner only (chmod 600)")
    for i, url in enumerate(settings.server.public_urls):
        if why := public_url_problem(url):
            problems.append(f"$.server.public_urls[{i}]: {why}")
    for i, proxy in enumerate(settings.server.trusted_proxies):
        try:
            ipaddress.ip_network(proxy)
        except ValueError:
            problems.append(f"$.server.trusted_proxies[{i}]: not an IP address or CIDR network (host bits unset)")
    if settings.codemaps.reload_seconds <= 0:
        problems.append("$.codemaps.reload_seconds: must be positive")
    rl = settings.request_log
    if min(rl.max_entries, rl.max_actionable_entries) < 1 or min(rl.retention_hours, rl.actionable_retention_hours,
                                                                  rl.flush_seconds) <= 0:
        problems.append("$.request_log: need max_entries and max_actionable_entries >= 1 and positive "
                        "retention_hours, actionable_retention_hours and flush_seconds")
    if rl.max_bytes < 65_536 or rl.max_input_bytes < 0:
        problems.append("$.request_log: need max_bytes >= 64 KiB and max_input_bytes >= 0")
    if settings.salesforce.max_concurrent_calls < 1:
        problems.append("$.salesforce.max_concurrent_calls: must be at least 1")
    if problems:
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems))
    return settings


def _identity_problems(where: str, src: SourceSettings) -> list[str]:
    ident, problems = src.identity, []
    for kind in ("patient", "practitioner", "location", "device"):
        if (value := getattr(ident, f"{kind}_system")) is not None and not value.strip():
            problems.append(f"{where}.{kind}_system: must not be empty")
    for system, kept in ident.systems.items():
        if not system.strip() or not kept.strip():
            problems.append(f"{where}.systems: neither a system nor its SourceSystem may be empty")
    if ident.hold_hours <= 0:
        problems.append(f"{where}.hold_hours: must be positive")
    if ident.unknown_patient == "create" and src.adapter != "hl7v2" and src.ehr is None:
        problems.append(f"{where}.unknown_patient: 'create' reads the EHR's Patient, so this source needs "
                        f"[sources.<name>.ehr] (an HL7 v2 source creates from PID)")
    return problems


def _healthcloud_problems(hc: HealthCloudSettings) -> list[str]:
    problems = []
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", hc.path_prefix) or hc.path_prefix.split("/")[1] in (
            "fhir", "admin", "auth", "metrics", "health", "ready", "openapi.json"):
        problems.append("$.healthcloud.path_prefix: a path of its own, like /iam (not under /fhir, /admin, …)")
    for kind in ("basic_sha256", "bearer_keys_sha256"):
        for i, digest in enumerate(getattr(hc, kind)):
            if not _SHA256_HEX.match(digest):
                problems.append(f"$.healthcloud.{kind}[{i}]: not a lowercase SHA-256 hex digest")
    if hc.search_timeout_seconds <= 0 or hc.max_search_days < 1 or hc.max_search_values < 1:
        problems.append("$.healthcloud: search_timeout_seconds, max_search_days and max_search_values must be positive")
    if min(hc.call_timeout_seconds, hc.patient_cache_seconds, hc.unknown_patient_cache_seconds) <= 0:
        problems.append("$.healthcloud: call_timeout_seconds and the patient cache times must be positive")
    return problems


def _ehr_problems(where: str, src: SourceSettings, config_dir: Path) -> list[str]:
    ehr, problems = src.ehr, []
    assert ehr is not None
    if src.adapter == "hl7v2":
        problems.append(f"{where}: an hl7v2 source has no EHR API to call (adapter cerner, epic or fhir)")
    for name in ("base_url", "token_url"):
        url = getattr(ehr, name)
        if url is not None and not (url.startswith("https://") or _LOOPBACK.match(url)):
            # a token, a secret or an assertion goes there: never in the clear but on this machine
            problems.append(f"{where}.{name}: must be https:// (http:// only on loopback)")
    if ehr.token_url is not None and not ehr.client_id:
        problems.append(f"{where}.client_id: required with token_url")
    if ehr.private_key_file is not None:
        key = config_dir / ehr.private_key_file
        if not key.is_file():
            problems.append(f"{where}.private_key_file: no such file")
        elif key.stat().st_mode & 0o077:
            problems.append(f"{where}.private_key_file: must be readable by its owner only (chmod 600)")
    if ehr.mllp_out is not None:
        host, _, port = ehr.mllp_out.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            problems.append(f"{where}.mllp_out: host:port")
    if min(ehr.connect_timeout_seconds, ehr.timeout_seconds, ehr.max_concurrent_calls,
           ehr.token_cache_seconds, ehr.unavailable_retry_after_seconds) <= 0 or ehr.max_answer_bytes < 65_536:
        problems.append(f"{where}: times and max_concurrent_calls must be positive, max_answer_bytes at least 65536")
    return problems


class EhrCredentials(msgspec.Struct, frozen=True):
    """A source EHR's secrets: its client secret (from the environment) or the private key that signs
    its assertions (from `private_key_file`). `repr` shows neither."""

    client_secret: str | None = None
    private_key_pem: str | None = None

    def __repr__(self) -> str:
        return f"EhrCredentials(secret={self.client_secret is not None}, key={self.private_key_pem is not None})"


def ehr_credentials_from_env(file: FileSettings, config_dir: Path,
                             env: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, EhrCredentials]:
    """Each source EHR's credentials: `EHR_<SOURCE>_CLIENT_SECRET` (the source's name upper-cased,
    `-` as `_`), else the key in `private_key_file`; one of them when it has a `token_url`."""
    found = {}
    for name, src in file.sources.items():
        if src.ehr is None or src.ehr.token_url is None:
            continue
        variable = f"EHR_{name.upper().replace('-', '_')}_CLIENT_SECRET"
        secret, key = env.get(variable) or None, None
        if src.ehr.private_key_file is not None:
            try:
                key = (config_dir / src.ehr.private_key_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"$.sources.{name}.ehr.private_key_file: cannot be read ({exc.strerror})") from None
        if secret is None and key is None:
            raise ConfigError(f"$.sources.{name}.ehr: set {variable} in the environment, or private_key_file")
        found[name] = EhrCredentials(client_secret=secret if key is None else None, private_key_pem=key)
    return found


def salesforce_from_env(env: dict[str, str] | os._Environ[str] = os.environ) -> SalesforceConnection | None:
    """None when no Salesforce credentials are set: the gateway then uses its sandbox."""
    login_url = env.get("SALESFORCE_LOGIN_URL")
    client_id = env.get("SALESFORCE_CLIENT_ID")
    if not login_url and not client_id:
        return None
    if not login_url or not client_id:
        raise ConfigError("SALESFORCE_LOGIN_URL and SALESFORCE_CLIENT_ID are needed together")
    if not login_url.startswith("https://") and not _LOOPBACK.match(login_url):
        # the client secret or a signed assertion goes to this URL: never in the clear, but for a
        # stand-in on this machine
        raise ConfigError("SALESFORCE_LOGIN_URL must be https:// (http:// only on loopback)")
    secret = env.get("SALESFORCE_CLIENT_SECRET")
    username = env.get("SALESFORCE_USERNAME")
    key_file = env.get("SALESFORCE_PRIVATE_KEY_FILE")
    private_key = None
    if not secret:
        if not (username and key_file):
            raise ConfigError(
                "Salesforce credentials: set SALESFORCE_CLIENT_SECRET (client credentials), or "
                "SALESFORCE_USERNAME and SALESFORCE_PRIVATE_KEY_FILE (JWT bearer)"
            )
        try:
            if Path(key_file).stat().st_mode & 0o077:
                raise ConfigError("SALESFORCE_PRIVATE_KEY_FILE: must be readable by its owner only (chmod 600)")
            private_key = Path(key_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"SALESFORCE_PRIVATE_KEY_FILE: cannot be read ({exc.strerror})") from None
    return SalesforceConnection(
        login_url=login_url.rstrip("/"),
        client_id=client_id,
        client_secret=secret or None,
        username=username,
        private_key_pem=private_key,
        audience=env.get("SALESFORCE_AUDIENCE", "https://login.salesforce.com"),
        api_version=env.get("SALESFORCE_API_VERSION", "66.0"),
    )


def load_settings(config_dir: Path | None = None) -> Settings:
    config_dir = config_dir or default_config_dir()
    public = os.environ.get("EHR_GATEWAY_PUBLIC_URL") or None
    if public is not None and (why := public_url_problem(public)):
        raise ConfigError(f"EHR_GATEWAY_PUBLIC_URL: {why}")
    file = load_file_settings(config_dir)
    return Settings(
        config_dir=config_dir,
        file=file,
        salesforce=salesforce_from_env(),
        redis_url=os.environ.get("REDIS_URL") or None,
        public_url_env=public,
        ehr_credentials=ehr_credentials_from_env(file, config_dir),
    )
