"""Run the sandbox on its own (`python -m gateway.sandbox --port 8765`) for a demo or a manual try."""

from __future__ import annotations

import argparse
import signal
import threading

from gateway.sandbox import SandboxConfig, create_sandbox_app
from gateway.edges.server import ThreadedServer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.sandbox", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--client-id", default=SandboxConfig.client_id)
    parser.add_argument("--client-secret", default=SandboxConfig.client_secret)
    parser.add_argument("--username", default=SandboxConfig.username)
    parser.add_argument("--certificate", help="PEM file of the X.509 certificate for the JWT bearer flow")
    parser.add_argument("--org-seed", choices=("demo", "empty"), default=SandboxConfig.org_seed,
                        help="the org's records: the demo's EHR ids (gateway/sandbox/seed.py) or none")
    parser.add_argument("--require-records", action="store_true",
                        help="Book, Update and Get Slots refuse references that are not records of the org")
    args = parser.parse_args(argv)
    pem = None
    if args.certificate:
        with open(args.certificate, encoding="ascii") as fh:
            pem = fh.read()
    config = SandboxConfig(
        client_id=args.client_id, client_secret=args.client_secret, username=args.username, certificate_pem=pem,
        org_seed=args.org_seed, require_records=args.require_records,
    )
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with ThreadedServer(create_sandbox_app(config), port=args.port) as server:
        print(f"sandbox listening on {server.url}", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
