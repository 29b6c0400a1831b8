"""Shared fixtures: a real Redis (REDIS_URL, else an embedded server), the Health Cloud sandbox over
real HTTP, and gateway apps built by the factory against both.

Every run uses its own Redis key prefix and deletes its keys at the end, because the Redis at
REDIS_URL is shared by every run on the machine.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import msgspec
import pytest
import redis

from gateway.state.embedded_redis import EmbeddedRedis
from gateway.sandbox import SandboxConfig, create_sandbox_app
from gateway.edges.server import ThreadedServer, gateway_server_options
from gateway.settings import SalesforceConnection, Settings, load_file_settings
from tests.fhir_server import fhir_server  # noqa: F401  (a fixture: the independent FHIR server, one per session)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config"
CORPUS = ROOT.parent / "shared" / "corpus"
# the corpus booking most tests send: Cerner's video visit
VIDEO_VISIT = "cerner-millennium-r4/r4_appointment_video_visit_entry.json"

# inbound keys used by the tests, one per configured source
KEYS = {"cerner": "test-cerner-key", "epic": "test-epic-key", "fhir": "test-fhir-key"}
ADMIN_KEY, PHI_KEY = "test-admin-key", "test-phi-admin-key"
CLIENT_ID, CLIENT_SECRET = "test-client", "test-secret-3f9a1c"
CONTROL_KEY = "test-sandbox-control-key"  # opens the sandbox's own endpoints (appointments, faults, reset)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="session", autouse=True)
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every gateway log line of the run goes to one file, so tests can read what was logged."""
    from gateway.logs import configure

    path = tmp_path_factory.mktemp("logs") / "gateway.log"
    with path.open("ab", buffering=0) as stream:
        configure(stream=stream)
        yield path
    _no_secret_was_logged(path.read_text(errors="replace"))


def _no_secret_was_logged(logged: str) -> None:
    """At the end of the run: no line any gateway in the suite logged holds a secret (keys, the
    Salesforce client secret, the data key, a Salesforce access token)."""
    import re

    from gateway.sandbox.state import ORG_ID

    secrets = {CLIENT_SECRET, ADMIN_KEY, PHI_KEY, *KEYS.values(), os.environ.get("EHR_GATEWAY_DATA_KEY", "")} - {""}
    leaked = sorted(s for s in secrets if s in logged)
    tokens = re.findall(re.escape(ORG_ID[:15]) + r"![A-Za-z0-9_-]{8,}", logged)
    assert not leaked and not tokens, f"secrets in the log: {len(leaked)} keys, {len(tokens)} tokens"


@pytest.fixture(scope="session", autouse=True)
def data_key() -> Iterator[None]:
    """The key that seals kept inputs: the gateways the tests build keep them, as in production."""
    from gateway.state.sealing import new_key

    os.environ["EHR_GATEWAY_DATA_KEY"] = new_key()
    yield
    os.environ.pop("EHR_GATEWAY_DATA_KEY", None)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with EmbeddedRedis(appendonly=False) as server:
        yield server.url


@pytest.fixture(scope="session")
def key_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"ehrgw-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def prefix(key_prefix: str) -> str:
    """A prefix of its own for each test, so records and tokens never leak between tests."""
    return f"{key_prefix}:{uuid.uuid4().hex[:8]}"


@pytest.fixture
def sandbox_config(request: pytest.FixtureRequest) -> SandboxConfig:
    """Override per test with `@pytest.mark.parametrize("sandbox_config", [{...}], indirect=True)`."""
    return SandboxConfig(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, control_key=CONTROL_KEY,
                         **getattr(request, "param", {}))


@pytest.fixture
def sandbox(sandbox_config: SandboxConfig) -> Iterator[ThreadedServer]:
    app = create_sandbox_app(sandbox_config)
    with ThreadedServer(app) as server:
        yield server


def make_settings(
    redis_url: str, prefix: str, login_url: str, *, config_dir: Path = CONFIG, **file_overrides: object
) -> Settings:
    file = load_file_settings(config_dir)
    sources = {
        name: msgspec.structs.replace(src, api_keys_sha256=(digest(KEYS[name]),)) if name in KEYS else src
        for name, src in file.sources.items()
    }
    # MLLP listeners on any free port (app.state.mllp_ports says which): tests build many gateways
    sources = {name: msgspec.structs.replace(src, mllp_port=0) if src.mllp_port is not None else src
               for name, src in sources.items()}
    admin = msgspec.structs.replace(file.admin, api_keys_sha256=(*file.admin.api_keys_sha256, digest(ADMIN_KEY)),
                                    phi_keys_sha256=(*file.admin.phi_keys_sha256, digest(PHI_KEY)))
    file = msgspec.structs.replace(file, sources=sources, redis=msgspec.structs.replace(file.redis, key_prefix=prefix),
                                   admin=admin, **file_overrides)
    return Settings(
        config_dir=config_dir,
        file=file,
        salesforce=SalesforceConnection(login_url=login_url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET),
        redis_url=redis_url,
    )


@pytest.fixture
def settings(redis_url: str, prefix: str, sandbox: ThreadedServer) -> Settings:
    return make_settings(redis_url, prefix, sandbox.url)


@asynccontextmanager
async def serve_gateway(
    settings: Settings, *, client_tls: ssl.SSLContext | bool = True, port: int | None = None, **options: object
) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway on a real port (its own thread and loop), and an HTTP client for it. Litestar's
    in-process test client runs requests one at a time, which would hide every race."""
    from gateway.app import create_app

    server_options = gateway_server_options(settings.file, settings.config_dir)  # as `serve` runs it
    port = port or free_port()  # chosen beforehand when another server must know the gateway's address
    if not settings.file.server.public_urls:  # the gateway's address, as `serve` gives it its own
        scheme = "https" if "ssl_certfile" in server_options else "http"
        server = msgspec.structs.replace(settings.file.server, public_urls=(f"{scheme}://127.0.0.1:{port}",))
        settings = msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, server=server))
    with ThreadedServer(create_app(settings, **options), port=port, **server_options) as server:  # type: ignore[arg-type]
        async with httpx.AsyncClient(base_url=server.url, timeout=30, verify=client_tls) as client:
            yield client


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve_gateway(settings) as client:
        yield client


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def corpus(path: str) -> bytes:
    return (CORPUS / path).read_bytes()


def visit_records(sandbox: ThreadedServer) -> dict[str, str]:
    """The Book references of the corpus video visit's people as the sandbox's org holds them (its
    seed): what the gateway sends for Patient/12724066, Location/21304876 and Practitioner/593923."""
    seeded = sandbox.app.state.sandbox.org.seeded["cerner"]  # type: ignore[attr-defined]
    facility = seeded["facilities"]["21304876"].account
    return {"Patient": f"Patient/{seeded['patients']['12724066'].account}", "Facility": f"Facility/{facility}",
            "Practitioner": f"Practitioner/{seeded['practitioners']['593923'].practitioner_facilities[facility]}"}


async def warm(client: httpx.AsyncClient, source: str = "cerner", body: bytes | None = None) -> None:
    """The participants of `body` (the corpus's video visit by default) looked up once, through the
    operators' identity check, so that a test about a Salesforce fault meets it at Book, not at the
    identity look-up before it (which is cached for hours)."""
    r = await client.post(f"/admin/api/identity/{source}/check", content=body or corpus(VIDEO_VISIT),
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200 and all(p["record"] for p in r.json()["participants"]), r.text


def auth(source: str = "cerner", **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[source]}", "Content-Type": "application/fhir+json", **headers}


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A real three-master Redis Cluster on loopback (about 2 s to form, paid only by runs that use it)."""
    from tests.redis_cluster import LocalRedisCluster

    with LocalRedisCluster() as cluster:
        yield cluster.url


@pytest.fixture(params=["redis", "cluster"])
async def any_redis(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[object]:
    """An asyncio client on the single Redis, then on the three-master Cluster: the idempotency and
    queue scripts must work on both (every script touches one hash-tagged slot)."""
    import redis.asyncio as aredis
    from redis.asyncio.cluster import RedisCluster

    if request.param == "cluster":
        client: object = RedisCluster.from_url(request.getfixturevalue("redis_cluster_url"))
    else:
        client = aredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()  # type: ignore[attr-defined]
