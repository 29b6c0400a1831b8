"""The composition root (gateway/runtime.py) owns its parts' start and close: a gateway that has
served requests stops promptly, its background work cancelled and its listeners closed, well within
the server's shutdown timeout (a close that waited that out once cost the suite 11 s a gateway,
unseen, since every answer was still right)."""

from __future__ import annotations

import socket
import time

import httpx
import msgspec
import pytest

from gateway.app import create_app
from gateway.edges.server import ThreadedServer, gateway_server_options
from tests.conftest import auth, free_port, make_settings


async def test_gateways_that_served_stop_at_once_and_close_their_parts(redis_url, prefix, sandbox):
    for n in range(3):  # tests and benchmarks build many gateways in one process
        settings = make_settings(redis_url, f"{prefix}:{n}", sandbox.url)
        port = free_port()
        server_settings = msgspec.structs.replace(settings.file.server, public_urls=(f"http://127.0.0.1:{port}",))
        settings = msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, server=server_settings))
        app = create_app(settings)
        with ThreadedServer(app, port=port, **gateway_server_options(settings.file, settings.config_dir)) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                assert (await client.put("/fhir/cerner/Appointment", content=b"{}", headers=auth())).status_code == 400
            started = time.monotonic()
        took = time.monotonic() - started
        assert took < 5, f"gateway {n} took {took:.1f} s to stop: a part did not close"  # about 0.2 s; the timeout is 10
        gateway = app.state.gateway
        assert gateway._background and all(task.done() for task in gateway._background)
        for listening in gateway.mllp_ports.values():  # the MLLP listeners are closed too
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", listening), timeout=2).close()
