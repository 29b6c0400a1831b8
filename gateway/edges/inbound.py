"""Who may call a source's routes: its certificate (mutual TLS, when it names one), its inbound key or
SMART token, then its rate limit; and the demo's keys, accepted only while the loopback sandbox
stands in for Salesforce. Keys are compared as digests only."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from gateway.edges.mtls import ClientCertificates
from gateway.edges.smart import SmartAuth
from gateway.errors import Forbidden, Unauthorized
from gateway.settings import EhrCredentials, EhrSettings, Settings, SourceSettings
from gateway.state.ratelimit import RateLimiter

# accepted only while the loopback sandbox stands in for Salesforce (see demo_credentials)
DEMO_KEY = "demo-{source}-key"
DEMO_OPERATORS_ENV = "EHR_GATEWAY_DEMO_OPERATORS_SHA256"  # the demo's admin and PHI key digests
DEMO_EHRS_ENV = "EHR_GATEWAY_DEMO_EHRS"  # the EHR twins serve started: dialect -> its [….ehr] table, as JSON
DEMO_HEALTHCLOUD_ENV = "EHR_GATEWAY_DEMO_HEALTHCLOUD_SHA256"  # the digest of Health Cloud's demo credential


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def basic_credential(authorization: str | None) -> str | None:
    """`user:password` of an HTTP Basic header, or None."""
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


class Inbound:
    """Inbound keys: which source each key digest belongs to. Keys are compared as digests only.
    Health Cloud's named credential (`[healthcloud]`) is known too, to be refused here with 403."""

    def __init__(self, settings: Settings, extra: dict[str, list[str]] | None = None) -> None:
        hc = settings.file.healthcloud
        self._healthcloud = {*hc.basic_sha256, *hc.bearer_keys_sha256}
        self._owner: dict[str, str] = {}
        for name, source in settings.sources.items():
            for digest in (*source.api_keys_sha256, *(extra or {}).get(name, ())):
                self._owner[digest] = name

    def digests(self) -> set[str]:
        return set(self._owner)

    async def authorize(self, source: str, authorization: str | None, smart: SmartAuth | None = None) -> None:
        basic = basic_credential(authorization)
        if basic is not None and key_digest(basic) in self._healthcloud:
            raise Forbidden("Health Cloud's named credential does not open a source's routes")
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():  # the scheme is case-insensitive (RFC 9110)
            raise Unauthorized("an inbound key is required: Authorization: Bearer <key>")
        owner = self._owner.get(key_digest(key.strip()))
        if owner is None and key_digest(key.strip()) in self._healthcloud:
            raise Forbidden("Health Cloud's named credential does not open a source's routes")
        if owner is None and smart is not None:
            owner = await smart.source_of(key.strip())  # a SMART access token: one Redis read
        if owner is None:
            raise Unauthorized("unknown key or token")
        if owner != source:
            raise Forbidden("this key belongs to another source")


class Admission:
    """The door of a source's routes: the source exists, and the caller is it."""

    def __init__(self, source: Callable[[str], SourceSettings], inbound: Inbound, smart: SmartAuth,
                 certificates: ClientCertificates, limiter: RateLimiter) -> None:
        """`source`: the configured source of a name, or NotFound (the booker's own look-up)."""
        self._source, self._inbound, self._smart = source, inbound, smart
        self._certificates, self.limiter = certificates, limiter

    async def admit(self, source: str, scope: Any, authorization: str | None, *, spend: bool = True) -> None:
        """Its certificate (when it needs one), its key or SMART token, then its rate limit (`spend`: a
        batch spends it per entry, once it has read them)."""
        self._source(source)
        self._certificates.check(source, scope)
        await self._inbound.authorize(source, authorization, self._smart)
        if spend:
            await self.limiter.check(source)  # after the key: strangers cannot spend a source's allowance


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
    return _with_demo_ehrs(settings, env), extra


def _with_demo_ehrs(settings: Settings, env: Mapping[str, str]) -> Settings:
    """The EHR twins `serve` started (each source's dialect's), and Health Cloud's demo credential."""
    twins = msgspec.json.decode(env.get(DEMO_EHRS_ENV, "{}") or "{}", type=dict[str, dict[str, str]])
    file = settings.file
    if twins and not any(src.ehr is not None for src in file.sources.values()):
        credentials = dict(settings.ehr_credentials)
        sources = {}
        for name, src in file.sources.items():
            twin = twins.get(src.adapter)
            if twin is not None:
                secret = twin.get("client_secret")
                table = {k: v for k, v in twin.items() if k != "client_secret"}
                src = msgspec.structs.replace(src, ehr=msgspec.convert(table, EhrSettings))
                key_file = table.get("private_key_file")
                credentials[name] = EhrCredentials(
                    client_secret=secret, private_key_pem=Path(key_file).read_text() if key_file else None)
            sources[name] = src
        file = msgspec.structs.replace(file, sources=sources)
        settings = msgspec.structs.replace(settings, ehr_credentials=credentials)
    digest = env.get(DEMO_HEALTHCLOUD_ENV)
    if digest:
        hc = msgspec.structs.replace(file.healthcloud, basic_sha256=(*file.healthcloud.basic_sha256, digest))
        file = msgspec.structs.replace(file, healthcloud=hc)
    return msgspec.structs.replace(settings, file=file)
