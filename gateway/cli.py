"""The `ehr-gateway` command: serve, sandbox, codemaps check, translate."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
from pathlib import Path

import msgspec

from gateway.settings import ConfigError, default_config_dir, load_file_settings, load_settings

def _config_dir(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else default_config_dir()


def _fail(message: str, code: int = 1) -> int:
    print(message, file=sys.stderr)
    return code


def cmd_codemaps_check(args: argparse.Namespace) -> int:
    from gateway.codemaps import CodeMapError, load_all

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
    from gateway.booking import Booker
    from gateway.codemaps import CodeMapError, load_all
    from gateway.errors import GatewayError
    from gateway.fhir import error_body

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
    try:
        prepared = Booker(file_settings.sources, maps).prepare(args.source, body)
    except GatewayError as error:
        print(msgspec.json.format(error_body(error), indent=2).decode())
        return 1
    print(msgspec.json.format(msgspec.json.encode(prepared.mapped.request), indent=2).decode())
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.sandbox import SandboxConfig, create_sandbox_app

    client_id = os.environ.get("SANDBOX_CLIENT_ID", "sandbox-client-id")
    secret = os.environ.get("SANDBOX_CLIENT_SECRET") or secrets.token_urlsafe(24)
    cert_file = os.environ.get("SANDBOX_CERTIFICATE_FILE")
    config = SandboxConfig(
        client_id=client_id,
        client_secret=secret,
        username=os.environ.get("SANDBOX_USERNAME", "integration@sandbox.example"),
        certificate_pem=Path(cert_file).read_text() if cert_file else None,
    )
    print(f"Health Cloud sandbox on http://{args.host}:{args.port}")
    print(f"  client id {client_id}; client secret {'from SANDBOX_CLIENT_SECRET' if 'SANDBOX_CLIENT_SECRET' in os.environ else secret}")
    if cert_file:
        print("  JWT bearer flow: assertions checked against SANDBOX_CERTIFICATE_FILE")
    sys.stdout.flush()
    uvicorn.run(create_sandbox_app(config), host=args.host, port=args.port, log_config=None, access_log=False)
    return 0


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.codemaps import CodeMapError, load_all
    from gateway.embedded_redis import EmbeddedRedis
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

    embedded = sandbox_server = None
    try:
        if settings.redis_url is None:
            data_dir = Path(os.environ.get("EHR_GATEWAY_DATA", ".ehr-gateway")) / "redis"
            embedded = EmbeddedRedis(data_dir.resolve()).start()
            os.environ["REDIS_URL"] = embedded.url
            print(f"REDIS_URL is not set: started an embedded Redis ({embedded.url}, append-only file on)")
        if settings.salesforce is None:
            from gateway.app import DEMO_KEY
            from gateway.sandbox import SandboxConfig, create_sandbox_app
            from gateway.server import ThreadedServer

            secret = secrets.token_urlsafe(24)
            sandbox_server = ThreadedServer(
                create_sandbox_app(SandboxConfig(client_id="ehr-gateway-demo", client_secret=secret)),
                port=args.sandbox_port,
            ).start()
            os.environ.update(
                SALESFORCE_LOGIN_URL=sandbox_server.url,
                SALESFORCE_CLIENT_ID="ehr-gateway-demo",
                SALESFORCE_CLIENT_SECRET=secret,
                EHR_GATEWAY_DEMO_KEYS="1",
            )
            print(f"No Salesforce credentials: serving the Health Cloud sandbox at {sandbox_server.url}")
            print(f"  its appointments: {sandbox_server.url}/sandbox/appointments")
            print("  demo sources and keys (accepted only while the sandbox stands in for Salesforce):")
            for source in settings.sources:
                print(f"    {source:<10} Authorization: Bearer {DEMO_KEY.format(source=source)}")
        print(f"ehr-gateway on http://{args.host}:{args.port} with {args.workers} worker(s)")
        sys.stdout.flush()
        # uvicorn re-raises SIGTERM after its graceful shutdown; turning it into SystemExit lets the
        # `finally` below stop the embedded Redis and the sandbox instead of leaving them behind
        signal.signal(signal.SIGTERM, _exit_on_signal)
        uvicorn.run(
            "gateway.app:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
            log_config=None, access_log=False, server_header=False, timeout_keep_alive=30,
            loop="uvloop", http="httptools",
        )
    finally:
        if sandbox_server is not None:
            sandbox_server.stop()
        if embedded is not None:
            embedded.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ehr-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--config")
    serve.add_argument("--sandbox-port", type=int, default=0, help="port of the in-process sandbox (default: any free)")
    serve.set_defaults(func=cmd_serve)

    sandbox = sub.add_parser("sandbox", help="run the Health Cloud sandbox alone")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8600)
    sandbox.set_defaults(func=cmd_sandbox)

    codemaps = sub.add_parser("codemaps", help="code map tools")
    codemaps_sub = codemaps.add_subparsers(dest="codemaps_command", required=True)
    check = codemaps_sub.add_parser("check", help="validate every code map")
    check.add_argument("--config")
    check.set_defaults(func=cmd_codemaps_check)

    translate = sub.add_parser("translate", help="dry run: print the Salesforce request FILE would become")
    translate.add_argument("--source", required=True)
    translate.add_argument("file")
    translate.add_argument("--config")
    translate.set_defaults(func=cmd_translate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
