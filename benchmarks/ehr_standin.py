"""A fast EHR stand-in for the callouts benchmark: each dialect's slot search answered with a fixed,
pre-encoded body of the documented shape after a fixed delay, so that the EHRs do not set the pace.

    .venv/bin/python -m benchmarks.ehr_standin --delay-ms 20 [--fd N ... | --port 8710]

Every listening socket serves every dialect (the paths differ); the benchmark gives each EHR a
socket of its own, so the gateway holds a connection pool per EHR as in production.

* `POST …/oauth2/token`: 200, a fixed bearer token (any client, any grant: the token is not what is
  measured; the gateway caches it).
* Cerner, `GET /r4/<tenant>/Slot?…`: a searchset of four free Slots (Cerner's location extension,
  service type, schedule) and their two Schedules included (`search.mode` include).
* Epic, `POST /api/FHIR/STU3/Appointment/$find`: a Bundle of four *proposed* Appointments (their
  practitioner and location as participants) and the informational OperationOutcome entry Epic adds.
* FHIR, `GET /fhir/Slot?…`: an R4 searchset of four free Slots and their Schedules; `GET
  /fhir/Schedule?actor=…`: the two Schedules (the client looks a practitioner's schedules up first,
  then keeps them a few minutes).
* `GET …/metadata`: a CapabilityStatement (what a FHIR client may read first).
* `GET /_standin/counters`: calls answered per kind (the benchmark checks the EHRs were asked);
  `POST /_standin/delay?ms=N`: the delay from now on.
* anything else: 404 with an OperationOutcome; a search without the bearer token: 401.

The delay is `call_later` on the event loop: nothing blocks, so one process answers thousands of
searches a second whatever the delay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys

from benchmarks.baselines.common import listening_socket

TOKEN = "ehr-standin-token-3f7a9c"
_BEARER = b"Bearer " + TOKEN.encode()
CERNER_TENANT = "ec2458f2-1e24-41c8-b71b-0e701af7583d"
CERNER_SERVICE = (f"https://fhir.cerner.com/{CERNER_TENANT}/codeSet/14249", "2572307911")
EPIC_SERVICE = ("urn:oid:1.2.840.114350.1.13.861.1.7.3.808267.11", "40111223")
FHIR_SERVICE = ("http://terminology.hl7.org/CodeSystem/service-type", "124")
# the answers' slots: four half hours of this day, two schedules (one practitioner and location each)
DAY = "2027-03-01"
STARTS = ("09:00", "09:30", "10:00", "10:30")
SCHEDULES = {"cerner": (("4817572", "593923", "32216049"), ("4817573", "1912007", "32216049")),
             "epic": (("e-s1", "eM5CWtq15N0WJeuCet5bJlQ3", "e4W4rmGe9QzuGm2Dy4NBqVc0JDSNEiE3"),
                      ("e-s2", "eivaFtl6ABQ3Vx6nQ4bmM6Q3", "e4W4rmGe9QzuGm2Dy4NBqVc0JDSNEiE3")),
             "fhir": (("s1", "example", "1"), ("s2", "f001", "2"))}
LOCATION_EXTENSION = "https://fhir-ehr.cerner.com/r4/StructureDefinition/scheduling-location"


def _end(start: str) -> str:
    h, m = map(int, start.split(":"))
    m += 30
    return f"{h + m // 60:02d}:{m % 60:02d}"


def _times() -> list[tuple[str, str, str]]:
    """(slot stamp, start, end) of each slot."""
    return [(f"{DAY.replace('-', '')}{s.replace(':', '')}", f"{DAY}T{s}:00Z", f"{DAY}T{_end(s)}:00Z") for s in STARTS]


def _searchset(base: str, kind: str, service: tuple[str, str], schedules, *, cerner: bool) -> dict:
    """An R4 searchset of free Slots (two schedules, alternating) and the Schedules included."""
    concept = [{"coding": [{"system": service[0], "code": service[1]}]}]
    entries = []
    for i, (stamp, start, end) in enumerate(_times()):
        sid, _practitioner, location = schedules[i % len(schedules)]
        slot = {"resourceType": "Slot", "id": f"{sid}-{stamp}", "serviceType": concept,
                "schedule": {"reference": f"Schedule/{sid}"}, "status": "free", "start": start, "end": end}
        if cerner:
            slot["extension"] = [{"url": LOCATION_EXTENSION, "valueReference": {"reference": f"Location/{location}"}}]
        entries.append({"fullUrl": f"{base}/Slot/{slot['id']}", "resource": slot, "search": {"mode": "match"}})
    for sid, practitioner, location in schedules:
        schedule = {"resourceType": "Schedule", "id": sid, "active": True, "serviceType": concept,
                    "actor": [{"reference": f"Practitioner/{practitioner}"}, {"reference": f"Location/{location}"}]}
        entries.append({"fullUrl": f"{base}/Schedule/{sid}", "resource": schedule, "search": {"mode": "include"}})
    return {"resourceType": "Bundle", "type": "searchset", "total": len(STARTS),
            "link": [{"relation": "self", "url": f"{base}/{kind}"}], "entry": entries}


def _schedules(base: str, service: tuple[str, str], schedules) -> dict:
    """An R4 searchset of the Schedules, as `Schedule?actor=` answers."""
    concept = [{"coding": [{"system": service[0], "code": service[1]}]}]
    entries = [{"fullUrl": f"{base}/Schedule/{sid}", "search": {"mode": "match"},
                "resource": {"resourceType": "Schedule", "id": sid, "active": True, "serviceType": concept,
                             "actor": [{"reference": f"Practitioner/{practitioner}"},
                                       {"reference": f"Location/{location}"}]}}
               for sid, practitioner, location in schedules]
    return {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}


def _epic_find(base: str) -> dict:
    """Epic's `$find` answer: proposed Appointments (ids are what `$book` takes) and an outcome entry."""
    schedules = SCHEDULES["epic"]
    entries = []
    for i, (stamp, start, end) in enumerate(_times()):
        sid, practitioner, location = schedules[i % len(schedules)]
        appointment = {
            "resourceType": "Appointment", "id": f"{sid}-{stamp}", "status": "proposed",
            "serviceType": [{"coding": [{"system": EPIC_SERVICE[0], "code": EPIC_SERVICE[1]}]}],
            "start": start, "end": end, "minutesDuration": 30,
            "participant": [{"actor": {"reference": f"Practitioner/{practitioner}"}, "required": "required",
                             "status": "needs-action"},
                            {"actor": {"reference": f"Location/{location}"}, "required": "required",
                             "status": "needs-action"}]}
        entries.append({"fullUrl": f"{base}/Appointment/{appointment['id']}", "resource": appointment,
                        "search": {"mode": "match"}})
    entries.append({"resource": {"resourceType": "OperationOutcome", "issue": [
        {"severity": "information", "code": "informational", "details": {"text": "4 appointment times found"}}]},
        "search": {"mode": "outcome"}})
    return {"resourceType": "Bundle", "type": "searchset", "total": len(STARTS), "entry": entries}


def _capability() -> dict:
    return {"resourceType": "CapabilityStatement", "status": "active", "date": "2026-01-01", "kind": "instance",
            "fhirVersion": "4.0.1", "format": ["json"],
            "rest": [{"mode": "server", "resource": [
                {"type": "Slot", "interaction": [{"code": "read"}, {"code": "search-type"}]},
                {"type": "Appointment", "conditionalCreate": True,
                 "interaction": [{"code": "read"}, {"code": "create"}, {"code": "update"}, {"code": "search-type"}]}]}]}


def _wire(status: int, body: dict | bytes, media: str = "application/fhir+json") -> bytes:
    content = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 400: "Bad Request"}[status]
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: {media}\r\nContent-Length: {len(content)}\r\n\r\n"
    return head.encode() + content


def _outcome(code: str, text: str) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "details": {"text": text}}]}


def answers(base: str) -> dict[str, bytes]:
    """Every fixed answer on the wire: name -> response bytes."""
    token = {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600, "scope": "system/Slot.read"}
    return {
        "token": _wire(200, token, "application/json"),
        "cerner": _wire(200, _searchset(f"{base}/r4/{CERNER_TENANT}", "Slot", CERNER_SERVICE, SCHEDULES["cerner"],
                                        cerner=True)),
        "epic": _wire(200, _epic_find(f"{base}/api/FHIR/STU3")),
        # the FHIR server honours Find's practitioner: its slots are all of that practitioner's schedule
        "fhir": _wire(200, _searchset(f"{base}/fhir", "Slot", FHIR_SERVICE, SCHEDULES["fhir"][:1], cerner=False)),
        "fhir_schedules": _wire(200, _schedules(f"{base}/fhir", FHIR_SERVICE, SCHEDULES["fhir"])),
        "metadata": _wire(200, _capability()),
        "unauthorized": _wire(401, _outcome("login", "the bearer token is missing or unknown")),
        "not_found": _wire(404, _outcome("not-found", "not served by the stand-in")),
        "bad_request": _wire(400, b"bad request", "text/plain"),
    }


def route(method: bytes, path: str, auth: bytes | None) -> str:
    """The answer's name for a request."""
    if method == b"POST" and path.endswith("/oauth2/token"):
        return "token"
    if method == b"GET" and path.endswith("/metadata"):
        return "metadata"
    if method == b"GET" and path == f"/r4/{CERNER_TENANT}/Slot":
        name = "cerner"
    elif method == b"POST" and path == "/api/FHIR/STU3/Appointment/$find":
        name = "epic"
    elif method == b"GET" and path == "/fhir/Slot":
        name = "fhir"
    elif method == b"GET" and path == "/fhir/Schedule":
        name = "fhir_schedules"
    else:
        return "not_found"
    return name if auth == _BEARER else "unauthorized"


def serve(socks: list[socket.socket], delay_ms: float) -> None:
    import httptools
    import uvloop

    counters = {"token": 0, "cerner": 0, "epic": 0, "fhir": 0, "fhir_schedules": 0, "metadata": 0, "unauthorized": 0,
                "not_found": 0}
    delay = [delay_ms / 1000]  # changed between runs by POST /_standin/delay?ms=N

    class Protocol(asyncio.Protocol):
        __slots__ = ("transport", "parser", "url", "auth", "wire", "loop")

        def __init__(self, wire: dict[str, bytes]) -> None:
            self.wire, self.loop = wire, asyncio.get_running_loop()
            self.parser = httptools.HttpRequestParser(self)
            self.url, self.auth = b"", None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.write(self.wire["bad_request"])
                self.transport.close()

        def on_message_begin(self) -> None:
            self.url, self.auth = b"", None

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            if len(name) == 13 and name.lower() == b"authorization":
                self.auth = value

        def on_message_complete(self) -> None:
            path, _, query = self.url.decode("latin-1").partition("?")
            if path == "/_standin/counters":
                self.transport.write(_wire(200, counters, "application/json"))
                return
            if path == "/_standin/delay":
                delay[0] = float(query.removeprefix("ms=") or 0) / 1000
                self.transport.write(_wire(200, {"delay_ms": delay[0] * 1000}, "application/json"))
                return
            name = route(self.parser.get_method(), path, self.auth)
            counters[name] += 1
            if name in ("cerner", "epic", "fhir", "fhir_schedules") and delay[0] > 0:
                # the EHR's think time, without blocking the loop
                self.loop.call_later(delay[0], self._write, self.wire[name])
            else:
                self.transport.write(self.wire[name])

        def _write(self, data: bytes) -> None:
            if not self.transport.is_closing():
                self.transport.write(data)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = []
        for sock in socks:
            host, port = sock.getsockname()[:2]
            wire = answers(f"http://{host}:{port}")
            servers.append(await loop.create_server(lambda w=wire: Protocol(w), sock=sock, backlog=4096))
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for server in servers:
            server.close()

    uvloop.run(main())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Fast EHR stand-in (fixed slot searches after a fixed delay)")
    p.add_argument("--fd", type=int, action="append", help="an inherited listening socket (repeatable)")
    p.add_argument("--port", default="8710", help="bind 127.0.0.1:PORT[,PORT…] when no --fd is given")
    p.add_argument("--delay-ms", type=float, default=0.0, help="each search answered after this long")
    a = p.parse_args(argv)
    if a.fd:
        socks = [socket.socket(fileno=fd) for fd in a.fd]
    else:
        socks = [listening_socket(int(port), backlog=4096) for port in a.port.split(",")]
        print(f"EHR stand-in on 127.0.0.1:{a.port} (delay {a.delay_ms:g} ms)", flush=True)
    serve(socks, a.delay_ms)


if __name__ == "__main__":
    sys.exit(main())
