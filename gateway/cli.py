"""The `ehr-gateway` command: serve, sandbox, codemaps check, translate, queue, requests."""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import signal
import sys
import time
from pathlib import Path

import msgspec

from gateway.settings import ConfigError, FileSettings, default_config_dir, load_file_settings, load_settings

def _config_dir(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else default_config_dir()


def _fail(message: str, code: int = 1) -> int:
    print(message, file=sys.stderr)
    return code


def cmd_codemaps_check(args: argparse.Namespace) -> int:
    from gateway.booking.codemaps import CodeMapError, load_all

    config_dir = _config_dir(args)
    try:
        file_settings = load_file_settings(config_dir)
        maps = load_all(config_dir, list(file_settings.sources))
    except ConfigError as exc:
        return _fail(str(exc))
    except CodeMapError as exc:
        return _fail("\n".join(exc.problems))
    for source, m in maps.items():
        groups = sum(len(v) for v in m.groups.values())
        print(f"{source}: {len(m.files)} file(s), {groups} group(s), version {m.version}")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from gateway.booking.booker import Booker
    from gateway.booking.codemaps import CodeMapError, load_all
    from gateway.errors import GatewayError
    from gateway.booking.fhir import error_body

    config_dir = _config_dir(args)
    try:
        file_settings = load_file_settings(config_dir)
        maps = load_all(config_dir, list(file_settings.sources))
        body = Path(args.file).read_bytes()
    except ConfigError as exc:
        return _fail(str(exc))
    except CodeMapError as exc:
        return _fail("\n".join(exc.problems))
    except OSError as exc:
        return _fail(f"{args.file}: {exc.strerror}")
    if args.to_ehr is not None:
        return _translate_to_ehr(args.to_ehr, file_settings, maps, body)
    try:
        prepared = Booker(file_settings.sources, maps).prepare(args.source, body)
    except GatewayError as error:
        print(msgspec.json.format(error_body(error), indent=2).decode())
        return 1
    for warning in prepared.warnings:  # left out, not refused: beside the request, on stderr
        print(f"warning: {', '.join(warning.expression)}: {warning.diagnostics}", file=sys.stderr)
    print(msgspec.json.format(msgspec.json.encode(prepared.mapped.request), indent=2).decode())
    return 0


def _translate_to_ehr(source: str, file_settings: FileSettings, maps: dict[str, object], body: bytes) -> int:
    """What the gateway would ask of SOURCE's EHR for a callout: the neutral request its EHR client
    takes, with Health Cloud's codes as the EHR's (and, on stderr, what gave each its system)."""
    from gateway.booking.fhir import error_body
    from gateway.errors import GatewayError
    from gateway.scheduling.callouts import read_callout, read_search
    from gateway.scheduling.to_ehr import book_request, ehr_coding, slot_query

    src = file_settings.sources.get(source)
    if src is None:
        return _fail(f"no source {source!r} in gateway.toml")
    source_maps = maps.get(source)
    create = body.lstrip().startswith(b"{")
    try:
        if create:
            callout = read_callout(body)
            request: object = book_request(source_maps, callout, dialect=src.adapter)  # type: ignore[arg-type]
            codes = {"serviceTypes": [c.code for k in callout.serviceType for c in k.coding if c.code],
                     "appointmentTypes": [c.code for c in (callout.appointmentType.coding
                                                           if callout.appointmentType else []) if c.code]}
        else:
            search = read_search(body.strip(), [src.source_system], max_days=file_settings.healthcloud.max_search_days,
                                 max_values=file_settings.healthcloud.max_search_values)
            criteria = search.criteria.get(src.source_system)
            if criteria is None:
                return _fail(f"the search names no value of source system {src.source_system!r}")
            codes = {"serviceTypes": criteria.service_types, "appointmentTypes": criteria.appointment_types}
            request = slot_query(source_maps, search, criteria, system=src.source_system,  # type: ignore[arg-type]
                                 dialect=src.adapter)
    except GatewayError as error:
        print(msgspec.json.format(error_body(error), indent=2).decode())
        return 1
    print(f"# {'book' if create else 'find slots'} in the {source} EHR ({src.adapter}), as its client is asked",
          file=sys.stderr)
    how = {"map": "the EHR's code, in the system of the group listing it", "reverse": "a Salesforce code, mapped back",
           "none": "known to no map: sent without a system"}
    for category, values in codes.items():
        for value in values:
            found = ehr_coding(source_maps, category, value, dialect=src.adapter)  # type: ignore[arg-type]
            where = f" ({found.file} {found.where})" if found.file else ""
            shown = f"{found.coding.system}|{found.coding.code}" if found.coding.system else found.coding.code
            print(f"# {category} {value} -> {shown}: {how[found.via]}{where}", file=sys.stderr)
    print(msgspec.json.format(msgspec.json.encode(request), indent=2).decode())
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.sandbox import SandboxConfig, create_sandbox_app

    client_id = os.environ.get("SANDBOX_CLIENT_ID", "sandbox-client-id")
    secret = os.environ.get("SANDBOX_CLIENT_SECRET") or secrets.token_urlsafe(24)
    cert_file = os.environ.get("SANDBOX_CERTIFICATE_FILE")
    control_key = os.environ.get("SANDBOX_CONTROL_KEY") or secrets.token_urlsafe(24)
    config = SandboxConfig(
        client_id=client_id,
        client_secret=secret,
        control_key=control_key,
        username=os.environ.get("SANDBOX_USERNAME", "integration@sandbox.example"),
        certificate_pem=Path(cert_file).read_text() if cert_file else None,
    )
    print(f"Health Cloud sandbox on http://{args.host}:{args.port}")
    print(f"  client id {client_id}; client secret {'from SANDBOX_CLIENT_SECRET' if 'SANDBOX_CLIENT_SECRET' in os.environ else secret}")
    shown = "from SANDBOX_CONTROL_KEY" if "SANDBOX_CONTROL_KEY" in os.environ else control_key
    print(f"  its own endpoints (/sandbox/appointments, faults, counters, reset): Authorization: Bearer {shown}")
    if cert_file:
        print("  JWT bearer flow: assertions checked against SANDBOX_CERTIFICATE_FILE")
    sys.stdout.flush()
    uvicorn.run(create_sandbox_app(config), host=args.host, port=args.port, log_config=None, access_log=False)
    return 0


def cmd_ehr_sandbox(args: argparse.Namespace) -> int:
    """A twin of one EHR's scheduling API (gateway/twins), alone."""
    import uvicorn

    from gateway.twins import TwinConfig, create_ehr_twin
    from gateway.twins.app import base_path

    key_file = os.environ.get("EHR_SANDBOX_PUBLIC_KEY_FILE")
    secret = os.environ.get("EHR_SANDBOX_CLIENT_SECRET") or (None if key_file else secrets.token_urlsafe(24))
    control_key = os.environ.get("EHR_SANDBOX_CONTROL_KEY") or secrets.token_urlsafe(24)
    mllp = os.environ.get("EHR_SANDBOX_MLLP_PORT")
    config = TwinConfig(dialect=args.dialect, control_key=control_key,
                        client_id=os.environ.get("EHR_SANDBOX_CLIENT_ID", "ehr-twin-client"), client_secret=secret,
                        public_key_pem=Path(key_file).read_text() if key_file else None,
                        permissive=args.permissive and args.dialect == "fhir",
                        mllp_port=int(mllp) if mllp else (0 if args.dialect == "epic" else None))
    base = f"http://{args.host}:{args.port}"
    print(f"{args.dialect} EHR twin: its FHIR base {base}{base_path(args.dialect)}, its token endpoint {base}/oauth2/token")
    print(f"  client id {config.client_id}; "
          + ("assertions checked against EHR_SANDBOX_PUBLIC_KEY_FILE" if key_file else
             f"client secret {'from EHR_SANDBOX_CLIENT_SECRET' if 'EHR_SANDBOX_CLIENT_SECRET' in os.environ else secret}"))
    shown = "from EHR_SANDBOX_CONTROL_KEY" if "EHR_SANDBOX_CONTROL_KEY" in os.environ else control_key
    print(f"  its own endpoints (/twin/appointments, counters, faults, reset): Authorization: Bearer {shown}")
    sys.stdout.flush()
    uvicorn.run(create_ehr_twin(config), host=args.host, port=args.port, log_config=None, access_log=False)
    return 0


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.booking.codemaps import CodeMapError, load_all
    from gateway.state.embedded_redis import EmbeddedRedis
    from gateway.logs import configure

    configure()
    config_dir = _config_dir(args).resolve()
    os.environ["EHR_GATEWAY_CONFIG"] = str(config_dir)
    os.environ["EHR_GATEWAY_WORKERS"] = str(args.workers)
    try:
        settings = load_settings(config_dir)
        load_all(config_dir, list(settings.sources))  # a bad map stops the start here, named
    except ConfigError as exc:
        return _fail(str(exc))
    except CodeMapError as exc:
        return _fail("code maps refused:\n" + "\n".join(exc.problems))

    # uvicorn's own logger is silenced (it may print request data), so check the port here and say
    # plainly when it is taken
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror}")

    from gateway.operators.metrics import prepare_multiprocess_dir
    from gateway.state.sealing import ensure_key_file

    data_root = Path(os.environ.get("EHR_GATEWAY_DATA", ".ehr-gateway")).resolve()
    if not os.environ.get("EHR_GATEWAY_DATA_KEY") and not os.environ.get("EHR_GATEWAY_DATA_KEY_FILE"):
        # inputs kept for replays are sealed; without a configured key, one is made for this data folder
        key_file = ensure_key_file(data_root / "data.key")
        os.environ["EHR_GATEWAY_DATA_KEY_FILE"] = str(key_file)
        print(f"EHR_GATEWAY_DATA_KEY is not set: kept inputs are sealed with {key_file} (owner-only)")
    # every worker writes its metrics there; /metrics on any worker reads them all
    prepare_multiprocess_dir(data_root / "metrics")
    from gateway.edges.server import gateway_server_options

    options = gateway_server_options(settings.file, config_dir)
    scheme = "https" if "ssl_certfile" in options else "http"
    embedded = sandbox_server = None
    twins: list[object] = []
    try:
        if settings.redis_url is None:
            data_dir = data_root / "redis"
            embedded = EmbeddedRedis(data_dir.resolve()).start()
            os.environ["REDIS_URL"] = embedded.url
            print(f"REDIS_URL is not set: started an embedded Redis ({embedded.url}, append-only file on)")
        demo_operators: dict[str, str] = {}
        if settings.salesforce is None:
            from gateway.edges.inbound import DEMO_KEY, DEMO_OPERATORS_ENV, key_digest
            from gateway.sandbox import SandboxConfig, create_sandbox_app
            from gateway.edges.server import ThreadedServer

            secret, control_key = secrets.token_urlsafe(24), secrets.token_urlsafe(18)
            # with no EHR configured, the demo plays both directions: EHR twins behind the gateway, and
            # the sandbox as an org with IAM configured, calling back through Health Cloud's credential
            demo_ehrs = not any(src.ehr is not None for src in settings.sources.values())
            hc_password = secrets.token_urlsafe(18)
            reach = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
            iam = {"iam_url": f"{scheme}://{reach}:{args.port}{settings.file.healthcloud.path_prefix}",
                   "iam_authorization": "Basic " + base64.b64encode(f"healthcloud-demo:{hc_password}".encode()).decode()
                   } if demo_ehrs else {}
            sandbox_server = ThreadedServer(
                create_sandbox_app(SandboxConfig(client_id="ehr-gateway-demo", client_secret=secret,
                                                 control_key=control_key, first_number=_clock_number(), **iam)),
                port=args.sandbox_port, shutdown_timeout=0.2,  # stopped after the gateway: nobody waits for it
            ).start()
            os.environ.update(
                SALESFORCE_LOGIN_URL=sandbox_server.url,
                SALESFORCE_CLIENT_ID="ehr-gateway-demo",
                SALESFORCE_CLIENT_SECRET=secret,
                EHR_GATEWAY_DEMO_KEYS="1",
            )
            print(f"No Salesforce credentials: serving the Health Cloud sandbox at {sandbox_server.url}")
            print(f"  its appointments: {sandbox_server.url}/sandbox/appointments "
                  f"with Authorization: Bearer {control_key} (the sandbox's control key)")
            print(f"  it plays an org holding the demo's patients, practitioners and facilities "
                  f"({sandbox_server.url}/sandbox/org/Identifier); add one with POST "
                  f"{sandbox_server.url}/sandbox/org/patients and the same key")
            print("  demo sources and keys (accepted only while the sandbox stands in for Salesforce):")
            for source, src in settings.sources.items():
                if src.adapter == "hl7v2":  # no key: MLLP has none
                    print(f"    {source:<10} HL7 v2 SIU over MLLP on {src.mllp_host}:{src.mllp_port}")
                else:
                    print(f"    {source:<10} Authorization: Bearer {DEMO_KEY.format(source=source)}")
            if demo_ehrs:
                twins += _start_ehr_twins(settings, data_root, hc_password)
            # the dashboard too: operator keys made for this start, accepted only while the sandbox stands in
            demo_operators = {"admin": secrets.token_urlsafe(18), "phi": secrets.token_urlsafe(18)}
            os.environ[DEMO_OPERATORS_ENV] = ",".join(key_digest(k) for k in demo_operators.values())
        if not settings.file.server.public_urls and "EHR_GATEWAY_PUBLIC_URL" not in os.environ:
            # what the gateway publishes of itself (metadata, search links, the SMART audience)
            shown = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
            os.environ["EHR_GATEWAY_PUBLIC_URL"] = f"{scheme}://{shown if ':' not in shown else f'[{shown}]'}:{args.port}"
            if shown != args.host:
                print(f"[server] public_urls is not set: publishing {os.environ['EHR_GATEWAY_PUBLIC_URL']}; "
                      "set it to the address clients use")
        if demo_operators:
            public = settings.file.server.public_urls[0] if settings.file.server.public_urls else \
                os.environ["EHR_GATEWAY_PUBLIC_URL"]
            print(f"  the operators' dashboard: {public}/admin/ (sign in with a key; both only for this demo):")
            print(f"    admin      {demo_operators['admin']}  (the request log, replays, code maps)")
            print(f"    PHI        {demo_operators['phi']}  (the same, and the patient data it holds)")
        print(f"ehr-gateway on {scheme}://{args.host}:{args.port} with {args.workers} worker(s)")
        sys.stdout.flush()
        # uvicorn re-raises SIGTERM after its graceful shutdown; turning it into SystemExit lets the
        # `finally` below stop the embedded Redis and the sandbox instead of leaving them behind
        signal.signal(signal.SIGTERM, _exit_on_signal)
        uvicorn.run(
            "gateway.app:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
            log_config=None, access_log=False, server_header=False, loop="uvloop", **options,
        )
    finally:
        for twin in twins:
            twin.stop()  # type: ignore[attr-defined]
        if sandbox_server is not None:
            sandbox_server.stop()
        if embedded is not None:
            embedded.stop()
    return 0


def cmd_mllp_send(args: argparse.Namespace) -> int:
    """Send one HL7 v2 message over MLLP, as an EHR's interface engine does, and print the ACK."""
    import asyncio

    from gateway.outbound.http import Lost, NeverSent
    from gateway.outbound.mllp import MllpClient

    try:
        text = Path(args.file).read_bytes()
    except OSError as exc:
        return _fail(f"{args.file}: {exc.strerror}")
    # a file keeps its segments a line each: HL7 ends them with CR
    message = b"\r".join(line.rstrip(b"\r") for line in text.splitlines() if line.strip()) + b"\r"
    client = MllpClient(f"{args.host}:{args.port}", connect_timeout=5, timeout=args.timeout)
    try:
        ack = asyncio.run(client.exchange(message))
    except NeverSent:
        return _fail(f"nothing listens for MLLP on {args.host}:{args.port}; nothing was sent")
    except Lost:
        return _fail("the message went out but no ACK came back (it may or may not have been acted on)")
    shown = ack.decode("utf-8", errors="replace")
    print(shown.replace("\r", "\n").rstrip("\n"))
    code = next((line.split(shown[3] if len(shown) > 3 else "|")[1] for line in shown.split("\r")
                 if line.startswith("MSA")), "")
    return 0 if code in ("AA", "CA") else 1


def cmd_healthcloud(args: argparse.Namespace) -> int:
    """Health Cloud's callouts, as an org with IAM configured makes them (gateway/sandbox/iam.py),
    with its named credential from EHR_GATEWAY_HEALTHCLOUD_CREDENTIAL (`user:password` for HTTP
    Basic, or `Bearer <token>`). Prints the answer; exits 0 on a 200."""
    import asyncio
    import base64
    import json

    from gateway.sandbox.iam import Callouts

    credential = os.environ.get("EHR_GATEWAY_HEALTHCLOUD_CREDENTIAL", "")
    if not credential:
        return _fail("EHR_GATEWAY_HEALTHCLOUD_CREDENTIAL: user:password (HTTP Basic) or Bearer <token>")
    authorization = credential if credential.lower().startswith("bearer ") else \
        "Basic " + base64.b64encode(credential.encode()).decode()

    async def call() -> tuple[int, bytes]:
        callouts = Callouts(args.url, authorization)
        try:
            if args.hc_command == "find":
                r = await callouts.find(args.start, args.end, practitioners=args.practitioner, locations=args.location,
                                        service_types=args.service_type, appointment_types=args.appointment_type)
            elif args.hc_command == "status":
                r = await callouts.slot_status(args.system, args.slot)
            elif args.hc_command == "book":
                r = await callouts.create(args.system, args.slot, service_appointment=args.service_appointment,
                                          account=args.account, patient=args.patient, practitioner=args.practitioner,
                                          service_type=args.service_type, appointment_type=args.appointment_type)
            elif args.hc_command == "cancel":
                r = await callouts.cancel(args.system, args.appointment, args.reason)
            else:
                r = await callouts.read(args.system, args.appointment)
            return r.status_code, r.content
        finally:
            await callouts.aclose()

    import httpx

    try:
        status, content = asyncio.run(call())
    except httpx.HTTPError as exc:
        return _fail(f"the callout could not be made: {type(exc).__name__}")
    try:
        print(json.dumps(json.loads(content), indent=2))
    except ValueError:
        print(content.decode(errors="replace"))
    if status != 200:
        print(f"HTTP {status}", file=sys.stderr)
    return 0 if status == 200 else 1


# each demo twin's appointment ids in a space of its own: a bare id names one EHR's appointment
_ID_SPACES = {"cerner": 0, "epic": 200_000_000_000, "fhir": 400_000_000_000}


def _clock_number() -> int:
    """Where a demo's numbering starts: tenths of a second since 1970, so that ids made after a
    restart on the same data never repeat the ones before it (unless a start made more than ten a
    second since the last)."""
    return int(time.time() * 10)


def _start_ehr_twins(settings: object, data_root: Path, password: str) -> list[object]:
    """With no EHR configured, one twin per EHR dialect the sources speak, each on a free loopback
    port, and Health Cloud's demo credential: what a scripted Health Cloud needs to book on their
    calendars. The workers learn them from the environment (`demo_credentials`)."""
    import hashlib
    import json

    from gateway.edges.inbound import DEMO_EHRS_ENV, DEMO_HEALTHCLOUD_ENV
    from gateway.edges.server import ThreadedServer
    from gateway.twins import TwinConfig, create_ehr_twin
    from gateway.twins.app import base_path
    from gateway.twins.config import corpus_bookings, key_pair

    sources = settings.sources  # type: ignore[attr-defined]
    started, ehrs = [], {}
    for dialect in sorted({src.adapter for src in sources.values()} & {"cerner", "epic", "fhir"}):
        control_key, secret, extra, public_pem = secrets.token_urlsafe(18), secrets.token_urlsafe(24), {}, None
        if dialect == "epic":  # Epic's backend services sign an assertion: a key made for this start
            private_pem, public_pem = key_pair()
            key_file = data_root / "ehr-twins" / "epic.pem"
            key_file.parent.mkdir(parents=True, exist_ok=True)
            key_file.touch(mode=0o600)
            key_file.chmod(0o600)
            key_file.write_text(private_pem)
            secret, extra = None, {"private_key_file": str(key_file), "mllp_out": f"127.0.0.1:{_free_port()}"}
        # the FHIR twin plays a plain server that enforces nothing beyond the spec, as many do: the
        # gateway's own slot guard is what keeps a slot booked once there
        config = TwinConfig(dialect=dialect, control_key=control_key, client_id="ehr-gateway-demo",
                            client_secret=secret, public_key_pem=public_pem, permissive=dialect == "fhir",
                            first_number=_clock_number() + _ID_SPACES[dialect], booked=corpus_bookings(dialect),
                            mllp_port=int(extra["mllp_out"].rpartition(":")[2]) if "mllp_out" in extra else None)
        server = ThreadedServer(create_ehr_twin(config), shutdown_timeout=0.2).start()
        started.append(server)
        ehrs[dialect] = {"base_url": server.url + base_path(dialect), "token_url": f"{server.url}/oauth2/token",
                         "client_id": "ehr-gateway-demo", **extra}
        if secret:
            ehrs[dialect]["client_secret"] = secret
        print(f"  {dialect} EHR twin at {server.url} (its appointments: {server.url}/twin/appointments with "
              f"Authorization: Bearer {control_key})")
        if config.permissive:
            print("    (a plain FHIR server: it enforces nothing beyond the spec, so the gateway guards its slots)")
    os.environ[DEMO_EHRS_ENV] = json.dumps(ehrs)
    os.environ[DEMO_HEALTHCLOUD_ENV] = hashlib.sha256(f"healthcloud-demo:{password}".encode()).hexdigest()
    prefix = settings.file.healthcloud.path_prefix  # type: ignore[attr-defined]
    print(f"  Health Cloud's callouts (its Appointment_Management named credential): {prefix} with HTTP Basic "
          f"healthcloud-demo:{password}; the sandbox calls them as an org with IAM configured, and so can\n"
          f"    EHR_GATEWAY_HEALTHCLOUD_CREDENTIAL=healthcloud-demo:{password} ehr-gateway healthcloud find …")
    return started


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _redis_url_for_tools() -> str | None:
    """REDIS_URL, else the embedded Redis that `serve` keeps in EHR_GATEWAY_DATA."""
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    sock = Path(os.environ.get("EHR_GATEWAY_DATA", ".ehr-gateway")) / "redis" / "redis.sock"
    return f"unix://{sock.resolve()}" if sock.exists() else None


def _when(ms: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if ms else "-"


def _tool_settings(args: argparse.Namespace) -> tuple[FileSettings, str] | int:
    """The operators' tools read Redis directly: the config (for the key prefix) and the Redis URL,
    or the exit code of the failure, already reported."""
    try:
        file_settings = load_file_settings(_config_dir(args))
    except ConfigError as exc:
        return _fail(str(exc))
    url = _redis_url_for_tools()
    if url is None:
        return _fail("REDIS_URL is not set and no embedded Redis is running here")
    return file_settings, url


def cmd_queue(args: argparse.Namespace) -> int:
    """The durable queue, for operators: list shows no patient data, only where each entry stands."""
    import asyncio

    from redis.exceptions import RedisError

    from gateway.state.connect import connect_redis
    from gateway.state.idempotency import IdempotencyStore
    from gateway.state.queue import BookingQueue

    found = _tool_settings(args)
    if isinstance(found, int):
        return found
    file_settings, url = found
    queue_sources = [n for n, s in file_settings.sources.items() if s.delivery == "queue"]
    source = getattr(args, "source", None)
    if source is not None and source not in file_settings.sources:
        return _fail(f"no source named {source!r} is configured")

    async def run() -> int:
        client = connect_redis(url, cluster=file_settings.redis.cluster)
        prefix = file_settings.redis.key_prefix
        queue = BookingQueue(client, prefix)
        try:
            if args.queue_command == "list":
                rows = []
                for name in [source] if source else queue_sources:
                    for e in await queue.list(name):
                        i = e.item
                        rows.append((name, e.where, e.id, str(i.attempts), _when(i.accepted_ms),
                                     _when(i.due_ms), i.last_error or "-"))
                header = ("source", "state", "entry", "attempts", "accepted", "due", "last error")
                widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
                for row in [header, *rows]:
                    print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
                return 0
            if args.queue_command == "replay":
                if not await queue.replay(args.source, args.entry):
                    return _fail(f"no dead-letter entry {args.entry} for {args.source}")
                print(f"{args.entry}: back in the {args.source} queue")
                return 0
            dropped = await queue.drop(args.source, args.entry)
            if dropped is None:
                return _fail(f"no dead-letter entry {args.entry} for {args.source}")
            store = IdempotencyStore(client, prefix, lease_seconds=1, retention_hours=1)
            await store.unqueue(dropped.record_key)  # the EHR's next retry starts afresh (looking first)
            print(f"{args.entry}: dropped; the booking was not made")
            return 0
        except RedisError as exc:
            return _fail(f"Redis: {type(exc).__name__}")
        finally:
            await client.aclose()

    return asyncio.run(run())


def _request_table(entries: list, title: str):  # type: ignore[no-untyped-def]
    from rich.table import Table

    colours = {"booked": "green", "replayed": "cyan", "queued": "yellow", "refused": "red", "unmapped": "magenta",
               "conflict": "yellow", "rejected": "bright_black", "failed": "bold red"}
    table = Table(title=title, expand=False)
    for column in ("time (UTC)", "id", "source", "op", "outcome", "status", "idempotency", "salesforce", "error",
                   "ms", "maps"):
        table.add_column(column, overflow="fold")  # ids are never cut short
    for e in entries:
        when = _when(e.time_ms)
        table.add_row(
            when, e.id, e.source, e.op, f"[{colours.get(e.outcome, 'white')}]{e.outcome}[/]", str(e.status),
            e.idempotency or "-", f"{e.sf_status or '-'} {e.sf_id or ''}".strip(), e.sf_error or "-",
            f"{e.ms:.1f}", e.maps_version or "-",
        )
    return table


def cmd_requests(args: argparse.Namespace) -> int:
    """The request log as a table (no patient data): newest first, or followed live."""
    import asyncio

    from rich.console import Console
    from rich.live import Live

    from gateway.state.connect import connect_redis
    from gateway.state.requestlog import OUTCOMES, RequestLog

    found = _tool_settings(args)
    if isinstance(found, int):
        return found
    file_settings, url = found
    if getattr(args, "outcome", None) and args.outcome not in OUTCOMES:
        return _fail(f"--outcome is one of {', '.join(OUTCOMES)}")
    console = Console()

    async def run() -> int:
        client = connect_redis(url, cluster=file_settings.redis.cluster)
        reqlog = RequestLog(client, file_settings.redis.key_prefix, sealer=None)
        try:
            if args.requests_command == "show":
                entry = await reqlog.get(args.id)
                if entry is None:
                    return _fail(f"no request log entry {args.id}")
                console.print_json(msgspec.json.encode(reqlog.view(entry, phi=False)).decode())
                return 0
            async def table():  # type: ignore[no-untyped-def]
                found = await reqlog.search(source=args.source, outcome=args.outcome, limit=args.limit)
                return _request_table(found, "ehr-gateway requests")
            if not args.follow and not sys.stdout.isatty():
                # piped: one JSON object a line (what the table shows, no patient data), for jq and grep
                for entry in await reqlog.search(source=args.source, outcome=args.outcome, limit=args.limit):
                    sys.stdout.write(msgspec.json.encode(reqlog.view(entry, phi=False)).decode() + "\n")
                return 0
            if not args.follow:
                console.print(await table())
                return 0
            with Live(await table(), console=console, refresh_per_second=2) as live:
                while True:
                    await asyncio.sleep(1)
                    live.update(await table())
        finally:
            await client.aclose()

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 0


def cmd_identity(args: argparse.Namespace) -> int:
    """Identity, through a running gateway's admin API (its org, its cache), with an admin key from
    EHR_GATEWAY_ADMIN_KEY: `check` prints how each participant of FILE resolves (a dry run: nothing is
    booked; exit 1 when one does not), `forget` drops every cached record."""
    import httpx

    key = os.environ.get("EHR_GATEWAY_ADMIN_KEY", "")
    if not key:
        return _fail("EHR_GATEWAY_ADMIN_KEY: an admin key of the gateway (serve prints one in its demo)")
    base, headers = args.url.rstrip("/"), {"Authorization": f"Bearer {key}"}
    try:
        if args.identity_command == "forget":
            r = httpx.post(f"{base}/admin/api/identity/forget", headers=headers, timeout=30)
        else:
            body = Path(args.file).read_bytes()
            r = httpx.post(f"{base}/admin/api/identity/{args.source}/check", content=body, timeout=60,
                           headers={**headers, "Content-Type": "application/octet-stream"})
    except (OSError, httpx.HTTPError) as exc:
        return _fail(f"{type(exc).__name__}: {exc}")
    if r.status_code != 200:
        return _fail(f"HTTP {r.status_code}: {_diagnostics(r.content)}")
    if args.identity_command == "forget":
        print(f"{r.json()['forgotten']} cached records forgotten")
        return 0
    rows = [(p["element"], p["kind"], p["source_system"], p["by"], p["record"] or "-", p["problem"] or "ok")
            for p in r.json()["participants"]]
    header = ("element", "kind", "SourceSystem", "by", "org record", "result")
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    for p in r.json()["participants"]:
        if p["why"]:
            print(f"{p['element']}: {p['why']}")
    return 0 if all(p["record"] for p in r.json()["participants"]) else 1


def _diagnostics(body: bytes) -> str:
    try:
        return "; ".join(i.get("diagnostics", "") for i in msgspec.json.decode(body).get("issue", []))
    except (msgspec.DecodeError, AttributeError, TypeError):
        return body[:200].decode(errors="replace")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ehr-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           description="Run the gateway. With no Salesforce credentials in the environment it "
                                       "starts the Health Cloud sandbox in the same process and, with no EHR "
                                       "configured, a twin of each EHR, and prints every demo key it needs.")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="the HTTP port (FHIR, Health Cloud's callouts, "
                                                               "the operators' dashboard)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes sharing the port and Redis")
    serve.add_argument("--config", help="the config directory (gateway.toml and codemaps/); default: "
                                        "EHR_GATEWAY_CONFIG, else ./config")
    serve.add_argument("--sandbox-port", type=int, default=0, help="port of the in-process sandbox (0: any free)")
    serve.set_defaults(func=cmd_serve)

    sandbox = sub.add_parser("sandbox", help="run the Health Cloud sandbox alone")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8600)
    sandbox.set_defaults(func=cmd_sandbox)

    ehr_sandbox = sub.add_parser("ehr-sandbox", help="run a twin of one EHR's scheduling API alone")
    ehr_sandbox.add_argument("--dialect", required=True, choices=("cerner", "epic", "fhir"))
    ehr_sandbox.add_argument("--host", default="127.0.0.1")
    ehr_sandbox.add_argument("--port", type=int, default=8700)
    ehr_sandbox.add_argument("--permissive", action="store_true",
                             help="fhir: enforce nothing beyond the spec (books a taken slot, checks no reference)")
    ehr_sandbox.set_defaults(func=cmd_ehr_sandbox)

    hc = sub.add_parser("healthcloud", help="play Health Cloud: its IAM callouts (find, status, book, cancel, read)")
    hc.add_argument("--url", default=os.environ.get("EHR_GATEWAY_HEALTHCLOUD_URL", "http://127.0.0.1:8000/iam"),
                    help="the Appointment_Management named credential's URL (EHR_GATEWAY_HEALTHCLOUD_URL)")
    hc_sub = hc.add_subparsers(dest="hc_command", required=True)
    find = hc_sub.add_parser("find", help="Find available slots (one search across the source systems)")
    find.add_argument("--start", required=True, help="date or date-time: start=ge…")
    find.add_argument("--end", required=True, help="date or date-time: start=le…")
    for name in ("practitioner", "location", "service-type", "appointment-type"):
        find.add_argument(f"--{name}", action="append", default=[], help="[sourceSystem|]value, repeatable")
    status = hc_sub.add_parser("status", help="Get slot status")
    status.add_argument("system")
    status.add_argument("slot")
    book = hc_sub.add_parser("book", help="Create appointment in SYSTEM's EHR on SLOT")
    book.add_argument("system")
    book.add_argument("slot")
    book.add_argument("--patient", required=True, help="the EHR's patient id")
    book.add_argument("--practitioner")
    book.add_argument("--service-appointment", required=True, help="the ServiceAppointment id (08p…)")
    book.add_argument("--account", default="001xx000003DGb2AAG", help="the patient's Account id")
    book.add_argument("--service-type")
    book.add_argument("--appointment-type")
    for name, text in (("cancel", "Cancel appointment"), ("read", "Get appointment")):
        cmd = hc_sub.add_parser(name, help=text)
        cmd.add_argument("system")
        cmd.add_argument("appointment")
        if name == "cancel":
            cmd.add_argument("--reason", default="pat-mv",
                             help="the cancelationReason sent: an appointment-cancellation-reason code "
                                  "(default pat-mv: the patient moved the appointment)")
    hc.set_defaults(func=cmd_healthcloud)

    mllp = sub.add_parser("mllp-send", help="send an HL7 v2 message (a file, a segment a line) over MLLP; print the ACK",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mllp.add_argument("file", help="the message, e.g. ../shared/corpus/hl7v2/athena-siu-s12-403.hl7")
    mllp.add_argument("--host", default="127.0.0.1")
    mllp.add_argument("--port", type=int, default=2575, help="the source's mllp_port (the shipped athena source's)")
    mllp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the ACK")
    mllp.set_defaults(func=cmd_mllp_send)

    codemaps = sub.add_parser("codemaps", help="code map tools")
    codemaps_sub = codemaps.add_subparsers(dest="codemaps_command", required=True)
    check = codemaps_sub.add_parser("check", help="validate every code map")
    check.add_argument("--config")
    check.set_defaults(func=cmd_codemaps_check)

    translate = sub.add_parser("translate", help="dry run: print the Salesforce request FILE would become, or "
                                                 "(--to-ehr) what a Health Cloud callout would ask of the EHR")
    direction = translate.add_mutually_exclusive_group(required=True)
    direction.add_argument("--source", help="FILE is this source's booking: print the Salesforce request")
    direction.add_argument("--to-ehr", metavar="SOURCE", help="FILE is a Health Cloud callout for this source's "
                                                               "EHR (a create's Appointment, or Find's form line)")
    translate.add_argument("file")
    translate.add_argument("--config")
    translate.set_defaults(func=cmd_translate)

    queue = sub.add_parser("queue", help="the durable queue: list, replay or drop entries")
    queue.add_argument("--config")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True)
    q_list = queue_sub.add_parser("list", help="every entry: ready, delayed or dead (no patient data)")
    q_list.add_argument("--source")
    for name, text in (("replay", "send a dead-letter entry back to its queue"),
                       ("drop", "give up a dead-letter entry (the booking is not made)")):
        cmd = queue_sub.add_parser(name, help=text)
        cmd.add_argument("source")
        cmd.add_argument("entry", help="the entry id shown by `queue list`")
    queue.set_defaults(func=cmd_queue)

    identity = sub.add_parser("identity", help="participants as the org's records, through a running gateway "
                                               "(admin key in EHR_GATEWAY_ADMIN_KEY)")
    identity.add_argument("--url", default=os.environ.get("EHR_GATEWAY_URL", "http://127.0.0.1:8000"),
                          help="the gateway (EHR_GATEWAY_URL; default http://127.0.0.1:8000)")
    identity_sub = identity.add_subparsers(dest="identity_command", required=True)
    id_check = identity_sub.add_parser("check", help="dry run: how each participant of FILE resolves in the org")
    id_check.add_argument("--source", required=True)
    id_check.add_argument("file")
    identity_sub.add_parser("forget", help="drop every cached record (after records were fixed in the org)")
    identity.set_defaults(func=cmd_identity)

    requests = sub.add_parser("requests", help="the request log: a table, or followed live (no patient data)")
    requests.add_argument("--config")
    requests.add_argument("--source")
    requests.add_argument("--outcome")
    requests.add_argument("--limit", type=int, default=30)
    requests.add_argument("--follow", action="store_true", help="keep the table up to date")
    requests.set_defaults(func=cmd_requests, requests_command="list")
    req_sub = requests.add_subparsers(dest="requests_command")
    show = req_sub.add_parser("show", help="one entry, whole")
    show.add_argument("id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
