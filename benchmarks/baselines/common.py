"""What the baselines share: the server options (the same for every system the benchmark runs) and
the settings they read from the environment, named as the gateway names them."""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any

# uvicorn options for every baseline: one worker, uvloop + httptools, no access log, the gateway's
# keep-alive (limits.keep_alive_seconds = 30)
UVICORN_OPTIONS: dict[str, Any] = {
    "loop": "uvloop",
    "http": "httptools",
    "lifespan": "on",
    "access_log": False,
    "log_level": "warning",
    "timeout_keep_alive": 30,
    "backlog": 2048,
    "server_header": False,
}


def env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if value is None:
        raise SystemExit(f"{name} is not set")
    return value


def listening_socket(port: int = 0, backlog: int = 2048) -> socket.socket:
    """Bound on 127.0.0.1 (port 0: any free port) and inheritable, so a child process can serve it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def run(app: Any, description: str) -> None:
    """`--fd N` (an inherited listening socket, as compare.py starts it) or `--port P` on 127.0.0.1."""
    import uvicorn

    p = argparse.ArgumentParser(description=description)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--fd", type=int)
    where.add_argument("--port", type=int, default=8001)
    a = p.parse_args()
    sock = socket.socket(fileno=a.fd) if a.fd is not None else listening_socket(a.port)
    uvicorn.Server(uvicorn.Config(app, **UVICORN_OPTIONS)).run(sockets=[sock])
