"""A fast Salesforce stand-in for the benchmarks: fixed answers, no state but counters.

    .venv/bin/python -m benchmarks.standin [--port 8700 | --fd N] [--server raw|asgi]

It answers what the gateway's Salesforce client and the benchmark baselines call:

* `POST /services/oauth2/token`: 200, a fixed access token, `instance_url` = this server's own
  base URL (client credentials and JWT bearer grants alike; the form is not checked).
* `POST /services/data/v<version>/connect/health/appointment-management/appointment` (Book): 201,
  `{"id": "08pxx…", "isSuccess": true, "status": "Scheduled", "error": []}` with a
  `Sforce-Limit-Info: api-usage=…` header, as the Health Cloud sandbox answers. Without the fixed
  token it answers 401 `INVALID_SESSION_ID`, and an empty body gets 400 `JSON_PARSER_ERROR`, so a
  caller that loses its token or its body shows up as errors.
* `GET /services/data/v<version>/query?q=…` (the gateway's look-up after a lost answer): 200, no
  records.
* `POST /services/data/v<version>/composite` (the gateway's identity look-up of the benchmark
  booking's people, the corpus's Cerner video visit: Patient/12724066, Location/21304876,
  Practitioner/593923): 200, one fixed answer holding their records (`IDENTITY`), whatever is asked.
* `GET /services/data/v<version>/` (Resources by Version, what the gateway's readiness calls): 200.
* `GET /_standin/counters`: how many calls of each kind it answered (the benchmark checks that
  replays never reach it).
* anything else: 404 with Salesforce's `NOT_FOUND` error list.

Two servers, same answers:

* `raw` (default): an asyncio protocol on uvloop that parses HTTP/1.1 with httptools and writes
  pre-built response bytes. No ASGI, no per-request objects. This is the one the benchmark uses,
  because the stand-in shares the machine's cores with everything it measures.
* `asgi`: the same answers as a raw ASGI app under uvicorn (httptools + uvloop), for comparison
  (`compare.py --standin asgi`).

Both listen on a socket passed as an inherited file descriptor (`--fd`), or bind `--port` on
127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import sys

from benchmarks.baselines.common import listening_socket

TOKEN = "00Dxx0000000001!AQ0AQBenchStandinAccessTokenForLoopbackOnly.FixedValue"
BOOKED_ID = "08pxx0000000001AAA"
LIMIT_INFO = "api-usage=25/5000000"
DEFAULT_API_VERSION = "66.0"

_BOOK_PATH = re.compile(r"^/services/data/v[0-9.]+/connect/health/appointment-management/appointment$")
_QUERY_PATH = re.compile(r"^/services/data/v[0-9.]+/query/?$")
_RESOURCES_PATH = re.compile(r"^/services/data/v[0-9.]+/?$")
_COMPOSITE_PATH = re.compile(r"^/services/data/v[0-9.]+/composite/?$")

# The org's records of the benchmark booking's people, as the gateway's identity Composite reads them
# (its four queries, in its order: Identifiers, HPFs by Contact, by HealthcareProvider, by their own id)
PATIENT, FACILITY, CONTACT, HPF = "001xx0000000001AAA", "001xx0000000002AAA", "003xx0000000001AAA", "0bSxx0000000001AAA"


def _identifier(value: str, parent: str, kind: str, **typed: object) -> dict[str, object]:
    return {"attributes": {"type": "Identifier"}, "Id": f"0cixx00000000{len(value):02d}AAA", "IdValue": value,
            "SourceSystem": "cerner", "ParentRecordId": parent,
            "ParentRecord": {"attributes": {"type": kind}, **typed}}


IDENTITY = {"compositeResponse": [
    {"referenceId": "ids", "httpStatusCode": 200, "httpHeaders": {}, "body": {"totalSize": 3, "done": True, "records": [
        _identifier("12724066", PATIENT, "Account", IsPersonAccount=True),
        _identifier("21304876", FACILITY, "Account", IsPersonAccount=False),
        _identifier("593923", CONTACT, "Contact", AccountId=None)]}},
    {"referenceId": "byContact", "httpStatusCode": 200, "httpHeaders": {}, "body": {"totalSize": 1, "done": True, "records": [
        {"attributes": {"type": "HealthcarePractitionerFacility"}, "Id": HPF, "PractitionerId": CONTACT,
         "HealthcareProviderId": None, "AccountId": FACILITY, "EffectiveFrom": None, "EffectiveTo": None}]}},
    {"referenceId": "byProvider", "httpStatusCode": 200, "httpHeaders": {}, "body": {"totalSize": 0, "done": True, "records": []}},
    {"referenceId": "byOwnId", "httpStatusCode": 200, "httpHeaders": {}, "body": {"totalSize": 0, "done": True, "records": []}},
]}


def answers(base_url: str) -> dict[str, tuple[int, list[tuple[str, str]], bytes]]:
    """Every fixed answer: name -> (status, headers, body)."""
    sf_json = [("Content-Type", "application/json;charset=UTF-8"), ("Sforce-Limit-Info", LIMIT_INFO)]
    token = {
        "access_token": TOKEN,
        "instance_url": base_url,
        "id": f"{base_url}/id/00Dxx0000000001EAA/005xx0000000001AAA",
        "token_type": "Bearer",
        "issued_at": "1767225600000",
        "signature": "c3RhbmQtaW4tc2lnbmF0dXJlLW5vdC1jaGVja2Vk",
        "scope": "api",
    }
    enc = lambda v: json.dumps(v, separators=(",", ":")).encode()  # noqa: E731
    return {
        "token": (200, [("Content-Type", "application/json;charset=UTF-8"), ("Cache-Control", "no-cache,must-revalidate,max-age=0,no-store,private")], enc(token)),
        "book": (201, sf_json, enc({"id": BOOKED_ID, "isSuccess": True, "status": "Scheduled", "error": []})),
        "query": (200, sf_json, enc({"totalSize": 0, "done": True, "records": []})),
        "composite": (200, sf_json, enc(IDENTITY)),
        "resources": (200, sf_json, enc({"query": "/services/data/v66.0/query", "sobjects": "/services/data/v66.0/sobjects"})),
        "unauthorized": (401, sf_json, enc([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}])),
        "empty_body": (400, sf_json, enc([{"message": "The request body is empty.", "errorCode": "JSON_PARSER_ERROR"}])),
        "not_found": (404, sf_json, enc([{"message": "The requested resource does not exist", "errorCode": "NOT_FOUND"}])),
        "bad_request": (400, [("Content-Type", "text/plain")], b"bad request"),
    }


class Counters:
    def __init__(self) -> None:
        self.values = {"token": 0, "book": 0, "query": 0, "composite": 0, "resources": 0, "unauthorized": 0,
                       "empty_body": 0, "not_found": 0}

    def body(self) -> bytes:
        return json.dumps(self.values).encode()


_BEARER = ("Bearer " + TOKEN).encode()


def route(method: str, path: str, auth: bytes | None, body_len: int) -> str:
    """The answer's name for a request (counters excluded)."""
    if method == "POST" and path == "/services/oauth2/token":
        return "token"
    if path.startswith("/services/data/"):
        if auth != _BEARER:
            return "unauthorized"
        if method == "POST" and _BOOK_PATH.match(path):
            return "book" if body_len else "empty_body"
        if method == "GET" and _QUERY_PATH.match(path):
            return "query"
        if method == "POST" and _COMPOSITE_PATH.match(path):
            return "composite"
        if method == "GET" and _RESOURCES_PATH.match(path):
            return "resources"
    return "not_found"


# --------------------------------------------------------------------------- raw protocol server


def _wire(status: int, headers: list[tuple[str, str]], body: bytes, close: bool = False) -> bytes:
    reason = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}[status]
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers), f"Content-Length: {len(body)}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def serve_raw(sock: socket.socket, base_url: str) -> None:
    import httptools
    import uvloop

    fixed = answers(base_url)
    wire = {name: (_wire(*a), _wire(*a, close=True)) for name, a in fixed.items()}
    counters = Counters()
    # the hot path: Book with the right token, looked up by exact path first
    book_paths = {f"/services/data/v{DEFAULT_API_VERSION}/connect/health/appointment-management/appointment"}

    class Protocol(asyncio.Protocol):
        __slots__ = ("transport", "parser", "url", "auth", "body_len")

        def __init__(self) -> None:
            self.transport: asyncio.Transport | None = None
            self.parser = httptools.HttpRequestParser(self)
            self.url = b""
            self.auth: bytes | None = None
            self.body_len = 0

        def connection_made(self, transport) -> None:  # type: ignore[override]
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.write(wire["bad_request"][1])
                self.transport.close()

        # httptools callbacks
        def on_message_begin(self) -> None:
            self.url = b""
            self.auth = None
            self.body_len = 0

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            if len(name) == 13 and name.lower() == b"authorization":
                self.auth = value

        def on_body(self, body: bytes) -> None:
            self.body_len += len(body)

        def on_message_complete(self) -> None:
            method = self.parser.get_method().decode()
            path, _, _query = self.url.decode("latin-1").partition("?")
            if method == "POST" and path in book_paths and self.auth == _BEARER and self.body_len:
                name = "book"
            elif method == "GET" and path == "/_standin/counters":
                body = counters.body()
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                self.transport.write(head.encode() + body)
                return
            else:
                name = route(method, path, self.auth, self.body_len)
            counters.values[name] += 1
            keep = self.parser.should_keep_alive()
            self.transport.write(wire[name][0 if keep else 1])
            if not keep:
                self.transport.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Protocol, sock=sock, backlog=4096)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()

    uvloop.run(main())


# --------------------------------------------------------------------------- ASGI variant


def serve_asgi(sock: socket.socket, base_url: str) -> None:
    import uvicorn

    fixed = answers(base_url)
    asgi = {
        name: ({"type": "http.response.start", "status": status,
                "headers": [(k.lower().encode(), v.encode()) for k, v in headers] + [(b"content-length", str(len(body)).encode())]},
               {"type": "http.response.body", "body": body})
        for name, (status, headers, body) in fixed.items()
    }
    counters = Counters()

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        size, more = 0, True
        while more:
            msg = await receive()
            size += len(msg.get("body", b""))
            more = msg.get("more_body", False)
        if scope["method"] == "GET" and scope["path"] == "/_standin/counters":
            body = counters.body()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        name = route(scope["method"], scope["path"], auth, size)
        counters.values[name] += 1
        start, body = asgi[name]
        await send(start)
        await send(body)

    config = uvicorn.Config(app, loop="uvloop", http="httptools", lifespan="on", access_log=False,
                            log_level="warning", timeout_keep_alive=60, backlog=4096)
    uvicorn.Server(config).run(sockets=[sock])


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Fast Salesforce stand-in (fixed answers) for the benchmarks")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--fd", type=int, help="an inherited listening socket")
    where.add_argument("--port", type=int, default=8700, help="bind 127.0.0.1:PORT (default 8700)")
    p.add_argument("--server", choices=("raw", "asgi"), default="raw")
    a = p.parse_args(argv)
    if a.fd is not None:
        sock = socket.socket(fileno=a.fd)
    else:
        sock = listening_socket(a.port, backlog=4096)
        print(f"Salesforce stand-in ({a.server}) on http://127.0.0.1:{a.port}", flush=True)
    host, port = sock.getsockname()[:2]
    base_url = f"http://{host}:{port}"
    (serve_raw if a.server == "raw" else serve_asgi)(sock, base_url)


if __name__ == "__main__":
    sys.exit(main())
