"""Serve an ASGI app with uvicorn in a background thread.

Tests, the demo run and the benchmarks need real HTTP (real sockets, real keep-alive, real
connection drops) without a subprocess whose state they could not inspect. The port is bound here,
before uvicorn starts, so an ephemeral port is known the moment `start()` returns.

Uvicorn's own logging is off: the project logs with structlog and no server may log bodies or headers.
"""

from __future__ import annotations

import importlib.util
import socket
import ssl
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn

from gateway.edges.http_protocol import gateway_protocol
from gateway.settings import FileSettings

__all__ = ["ThreadedServer", "gateway_server_options"]


SHUTDOWN_GRACE_SECONDS = 2


def gateway_server_options(cfg: FileSettings, config_dir: Path) -> dict[str, Any]:
    """uvicorn options for the gateway from its settings: limits, slow-client timeouts, forwarded
    headers, TLS, and mutual TLS when a client CA is configured. `serve` and the tests use the same ones."""
    lim, tls = cfg.limits, cfg.tls
    options: dict[str, Any] = {
        "http": gateway_protocol(header_timeout=lim.header_timeout_seconds, body_timeout=lim.body_timeout_seconds,
                                 max_header_bytes=lim.max_header_bytes),
        "timeout_keep_alive": max(1, round(lim.keep_alive_seconds)),
        "limit_concurrency": lim.max_connections,
        # on SIGTERM, in-flight requests get this long to be answered, then are cancelled (a booking
        # stays in its record for the EHR's retry): with the process's own teardown, a stop takes < 5 s
        "timeout_graceful_shutdown": SHUTDOWN_GRACE_SECONDS,
        **forwarded_options(cfg.server.trusted_proxies),
    }
    if tls.certificate_file and tls.key_file:
        options.update(ssl_certfile=str(config_dir / tls.certificate_file), ssl_keyfile=str(config_dir / tls.key_file))
    if tls.client_ca_file:
        # optional at the TLS level: sources without client_cert_names call with keys alone; a
        # certificate that is presented must verify, or the handshake fails
        options.update(ssl_ca_certs=str(config_dir / tls.client_ca_file), ssl_cert_reqs=ssl.CERT_OPTIONAL)
    return options


def forwarded_options(trusted_proxies: tuple[str, ...]) -> dict[str, Any]:
    """X-Forwarded-For and X-Forwarded-Proto believed from these proxies only. Always explicit: given
    no list, uvicorn would read FORWARDED_ALLOW_IPS from the environment (or trust loopback)."""
    return {"proxy_headers": bool(trusted_proxies), "forwarded_allow_ips": list(trusted_proxies)}


def _best(module: str, preferred: str, fallback: str) -> str:
    return preferred if importlib.util.find_spec(module) is not None else fallback


class ThreadedServer:
    """One uvicorn server on 127.0.0.1 in a daemon thread; usable as a context manager.

    `uvicorn_options` pass straight to `uvicorn.Config` (e.g. `timeout_keep_alive`, `limit_concurrency`)
    and may override the defaults chosen here, except the logging switches.
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 10.0,
        shutdown_timeout: float = 5.0,
        **uvicorn_options: Any,
    ) -> None:
        self.app = app
        self.host = host
        self._requested_port = port
        self._startup_timeout = startup_timeout
        self._shutdown_timeout = shutdown_timeout
        options: dict[str, Any] = {
            "loop": _best("uvloop", "uvloop", "asyncio"),
            "http": _best("httptools", "httptools", "h11"),
            "lifespan": "auto",
            "timeout_graceful_shutdown": shutdown_timeout,
            **forwarded_options(()),
        }
        options.update(uvicorn_options)
        # Never let uvicorn configure logging or write access lines, whatever the caller passed.
        options.update(log_config=None, access_log=False, server_header=False)
        self._options = options
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._error: BaseException | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        scheme = "https" if self._options.get("ssl_certfile") else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def started(self) -> bool:
        return self._server is not None and self._server.started

    def start(self) -> ThreadedServer:
        """Bind, start serving, and return only once uvicorn accepts connections."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._requested_port))
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, host=self.host, port=self.port, **self._options)
        server = uvicorn.Server(config)
        self._server = server

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not server.started:
            if not self._thread.is_alive():
                self._cleanup_socket()
                raise RuntimeError("server thread ended before listening") from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server did not start within {self._startup_timeout}s")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Ask uvicorn to shut down gracefully; force it if connections linger."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(self._shutdown_timeout + 1.0)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5.0)
        self._cleanup_socket()
        self._server = None
        self._thread = None

    def _cleanup_socket(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
