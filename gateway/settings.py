"""Typed configuration: `config/gateway.toml` plus the Salesforce connection from the environment.

Everything is validated when it is loaded, so a bad file stops the start with the element named,
instead of failing on the first request.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class ConfigError(Exception):
    """The configuration is invalid; the message names the file and element."""


def element_message(exc: msgspec.ValidationError) -> str:
    """msgspec says "Expected `str`, got `int` - at `$.a.b`"; engineers read "$.a.b: Expected …"."""
    what, sep, where = str(exc).rpartition(" - at ")
    return f"{where.strip('`')}: {what}" if sep else str(exc)


class SourceSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    adapter: Literal["fhir", "cerner", "epic", "hl7v2"]
    source_system: str
    api_keys_sha256: tuple[str, ...] = ()
    channel_id: str | None = None
    time_zone: str | None = None
    rate_limit_per_minute: int | None = None
    delivery: Literal["sync", "queue"] = "sync"
    mllp_port: int | None = None


class AdminSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    api_keys_sha256: tuple[str, ...] = ()
    phi_keys_sha256: tuple[str, ...] = ()


class IdempotencySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    retention_hours: float = 72.0
    # must outlive the slowest Salesforce call (salesforce.timeout_seconds) or a retry could take
    # over a booking that is still being sent
    lease_seconds: float = 60.0
    in_flight_retry_after_seconds: int = 2


class SalesforceTuning(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    connect_timeout_seconds: float = 3.0
    timeout_seconds: float = 20.0
    # Salesforce allows 25 concurrent long requests per org (5 in developer orgs); stay under it
    max_concurrent_calls: int = 20
    # Salesforce sends no expires_in; a cached token is dropped after this even if never refused
    token_cache_seconds: int = 3600
    unavailable_retry_after_seconds: int = 30


class LimitSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_body_bytes: int = 1_048_576


class RedisSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    key_prefix: str = "ehrgw"


class FileSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sources: dict[str, SourceSettings] = {}
    admin: AdminSettings = AdminSettings()
    idempotency: IdempotencySettings = IdempotencySettings()
    salesforce: SalesforceTuning = SalesforceTuning()
    limits: LimitSettings = LimitSettings()
    redis: RedisSettings = RedisSettings()


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


class Settings(msgspec.Struct, frozen=True):
    config_dir: Path
    file: FileSettings
    salesforce: SalesforceConnection | None  # None: no credentials, the sandbox is used
    redis_url: str | None

    @property
    def sources(self) -> dict[str, SourceSettings]:
        return self.file.sources


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
        if (src.adapter == "hl7v2") != (src.mllp_port is not None):
            problems.append(f"{where}.mllp_port: required with adapter 'hl7v2' and only with it")
        if src.rate_limit_per_minute is not None and src.rate_limit_per_minute < 1:
            problems.append(f"{where}.rate_limit_per_minute: must be at least 1")
    for kind in ("api_keys_sha256", "phi_keys_sha256"):
        for i, digest in enumerate(getattr(settings.admin, kind)):
            if not _SHA256_HEX.match(digest):
                problems.append(f"$.admin.{kind}[{i}]: not a lowercase SHA-256 hex digest")
    idem = settings.idempotency
    if idem.lease_seconds <= settings.salesforce.timeout_seconds:
        problems.append("$.idempotency.lease_seconds: must exceed salesforce.timeout_seconds")
    if idem.retention_hours <= 0:
        problems.append("$.idempotency.retention_hours: must be positive")
    if settings.salesforce.max_concurrent_calls < 1:
        problems.append("$.salesforce.max_concurrent_calls: must be at least 1")
    if problems:
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems))
    return settings


def salesforce_from_env(env: dict[str, str] | os._Environ[str] = os.environ) -> SalesforceConnection | None:
    """None when no Salesforce credentials are set: the gateway then uses its sandbox."""
    login_url = env.get("SALESFORCE_LOGIN_URL")
    client_id = env.get("SALESFORCE_CLIENT_ID")
    if not login_url and not client_id:
        return None
    if not login_url or not client_id:
        raise ConfigError("SALESFORCE_LOGIN_URL and SALESFORCE_CLIENT_ID are needed together")
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
    return Settings(
        config_dir=config_dir,
        file=load_file_settings(config_dir),
        salesforce=salesforce_from_env(),
        redis_url=os.environ.get("REDIS_URL") or None,
    )
