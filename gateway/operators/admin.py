"""The operators' side: `/admin/api/…` and the dashboard at `/admin/`.

Who: an admin key (`[admin] api_keys_sha256`) sees the request log without patient data; a PHI key
(`phi_keys_sha256`) sees it with, and every such view is written to the audit stream. A source's
key is 403, no key 401. The dashboard signs in once with the key and then holds a session cookie
(HttpOnly, SameSite=Strict, only the session's digest kept in Redis); a cookie-authenticated
action must also carry the session's CSRF token in `X-CSRF-Token`.
"""

from __future__ import annotations

import hashlib
import hmac
import mimetypes
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError
from litestar import Request, Response, Router, delete, get, post
from litestar.params import FromPath

from gateway.booking.booker import Booker
from gateway.errors import (
    Conflict,
    Forbidden,
    GatewayError,
    InvalidRequest,
    NotFound,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    http,
)
from gateway.booking.fhir import FHIR_JSON, error_body
from gateway.state.idempotency import IdempotencyStore
from gateway.ids import new_id
from gateway.state.queue import BookingQueue
from gateway.state.ratelimit import FailureThrottle
from gateway.state.requestlog import CALLOUT_OPS, HEALTHCLOUD, OUTCOMES, Entry, RequestLog, View
from gateway.settings import AdminSettings

DASHBOARD = Path(__file__).parent / "dashboard"
COOKIE = "ehrgw_admin"
SESSION_SECONDS = 8 * 3600
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_json = msgspec.json.Encoder()


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Operator:
    role: str  # admin | phi
    who: str  # the first 12 hex digits of the key's digest: enough to tell operators apart, not a secret
    csrf: str | None  # set when signed in by cookie: actions must echo it


class AdminAuth:
    def __init__(self, settings: AdminSettings, source_digests: set[str], client: redis.Redis, prefix: str,
                 smart: Any = None) -> None:
        self._smart = smart  # a source's SMART token is a source's credential: 403 here, like its key
        self._roles = {d: "admin" for d in settings.api_keys_sha256} | {d: "phi" for d in settings.phi_keys_sha256}
        self._source_digests = source_digests
        self._redis = client
        self._prefix = prefix
        self._throttle = FailureThrottle(client, prefix, per_minute=settings.failed_keys_per_minute,
                                         burst=settings.failed_key_burst)

    def _session_key(self, sid: str) -> str:
        return f"{self._prefix}:admin:session:{_digest(sid)}"

    def role_of(self, key: str) -> tuple[str, str]:
        digest = _digest(key)
        role = next((r for d, r in self._roles.items() if hmac.compare_digest(d, digest)), None)
        if role is None:
            if digest in self._source_digests:
                raise Forbidden("a source's key cannot be used here")
            raise Unauthorized("unknown key")
        return role, digest[:12]

    async def identify(self, request: Request) -> Operator:
        scheme, _, key = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            role, who = await self.verify(key.strip(), request)
            return Operator(role, who, None)  # a bearer key is no ambient credential: no CSRF needed
        sid = request.cookies.get(COOKIE)
        if sid:
            found = await self._redis.hgetall(self._session_key(sid))
            if found:
                return Operator(found[b"role"].decode(), found[b"who"].decode(), found[b"csrf"].decode())
        raise Unauthorized("an admin key is required: Authorization: Bearer <key>, or sign in")

    async def verify(self, key: str, request: Request) -> tuple[str, str]:
        """A key's role, with failed keys throttled per client address (checked before the key)."""
        address = _address(request)
        await self._throttle.check(address)
        try:
            return self.role_of(key)
        except Unauthorized:
            if self._smart is not None and await self._smart.source_of(key):
                raise Forbidden("a source's token cannot be used here") from None
            await self._throttle.failed(address)
            raise
        except Forbidden:
            await self._throttle.failed(address)  # a source's key here is a wrong key too
            raise

    async def sign_in(self, key: str, request: Request) -> tuple[str, Operator]:
        role, who = await self.verify(key, request)
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        skey = self._session_key(sid)
        await self._redis.hset(skey, mapping={"role": role, "who": who, "csrf": csrf})
        await self._redis.expire(skey, SESSION_SECONDS)
        return sid, Operator(role, who, csrf)

    async def sign_out(self, request: Request) -> None:
        if sid := request.cookies.get(COOKIE):
            await self._redis.delete(self._session_key(sid))


class Audit:
    """Who did what, when: every view of patient data and every admin action (sign-in, refused key,
    sign-out, replay, queue replay or drop). A stream, bounded, under the log's hash tag. Keys appear
    only as `who` (12 hex digits of their digest); no patient data is written."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._redis = client
        self.key = f"{prefix}:audit:{{{prefix}:log}}"

    async def record(self, op: Operator | None, action: str, request: Request, **what: str) -> None:
        await self._redis.xadd(self.key, {"t": str(int(time.time() * 1000)), "who": op.who if op else "",
                                          "role": op.role if op else "", "action": action, **what,
                                          "ip": _address(request)},
                               maxlen=100_000, approximate=True)

    async def recent(self, count: int = 100) -> list[dict[str, str]]:
        rows = await self._redis.xrevrange(self.key, count=count)
        return [{k.decode(): v.decode() for k, v in fields.items()} | {"id": i.decode()} for i, fields in rows]


@dataclass
class AdminDeps:
    auth: AdminAuth
    audit: Audit
    log: RequestLog
    booker: Booker
    queue: BookingQueue
    store: IdempotencyStore
    queue_sources: list[str]
    replay: Callable[[Entry], Awaitable[Entry]]
    maps: Any  # LiveMaps
    usage: Callable[[], dict[str, Any]]
    forget_identities: Callable[[], Awaitable[int]]
    origins: tuple[str, ...] = ()  # the gateway's public origins ([server] public_urls): a sign-in may come from them


def _same_origin_json(request: Request, origins: tuple[str, ...]) -> None:
    """A sign-in is JSON from this origin: a form or a text/plain body (which another site's page
    can post without asking) is refused, and so is a browser's request from another origin, so no
    page can sign a browser in with a key of its choosing (login CSRF)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaType("send JSON {\"key\": \"<admin key>\"} as application/json")
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"  # the browser's own view of it
    cross_site = request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none")
    if cross_site or (origin is not None and origin != own and origin not in origins):
        raise Forbidden("a sign-in from another origin is refused")


def _address(request: Request) -> str:
    return request.client.host if request.client else ""


def _ok(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(_json.encode(body), status_code=status, media_type="application/json",
                    headers={**SECURITY_HEADERS, **(headers or {})})


def _fail(error: GatewayError) -> Response[bytes]:
    # the router's exception handlers answer past the app's after_request: the id is set here
    return Response(error_body(error), status_code=error.status,
                    headers={"Content-Type": FHIR_JSON, **SECURITY_HEADERS, **error.headers, "X-Request-ID": new_id()})


def _views(deps: AdminDeps, entries: list[Entry]) -> list[dict[str, Any]]:
    return [_with_time(deps.log.view(e, phi=False)) for e in entries]  # lists never carry PHI


def _with_time(view: View) -> dict[str, Any]:
    body = msgspec.to_builtins(view)
    body.setdefault("replayable", False)
    body["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(view.time_ms / 1000)) + f".{view.time_ms % 1000:03d}Z"
    return body


def _held_row(h: Any) -> dict[str, Any]:
    """A held booking as operators see it (no patient data)."""
    return {"hold": h.hold_id, "state": "refused" if h.refused else "held", "since_ms": h.accepted_ms,
            "deadline_ms": h.deadline_ms, "due_ms": h.due_ms or None, "attempts": h.attempts,
            "why": h.refused or h.last_error}


def _int(value: str | None, name: str, default: int | None = None) -> int | None:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer", location=http(name)) from None


def admin_router(deps: AdminDeps) -> Router:
    async def guard(request: Request, *, action: bool = False) -> Operator:
        try:
            op = await deps.auth.identify(request)
        except (Unauthorized, Forbidden):
            if (request.headers.get("authorization") or "").strip():  # a key was shown and refused
                await deps.audit.record(None, "key-refused", request)
            raise
        if action and op.csrf is not None:
            sent = request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(sent, op.csrf):
                raise Forbidden("this action needs the session's X-CSRF-Token header")
        return op

    @post("/api/session", status_code=200)
    async def sign_in(request: Request) -> Response[bytes]:
        _same_origin_json(request, deps.origins)
        try:
            body = msgspec.json.decode(await request.body() or b"{}")
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            raise InvalidRequest("send JSON {\"key\": \"<admin key>\"}") from None
        key = body.get("key") if isinstance(body, dict) else None
        if not isinstance(key, str) or not key.strip():
            raise Unauthorized("an admin key is required")
        try:
            sid, op = await deps.auth.sign_in(key.strip(), request)
        except (Unauthorized, Forbidden):
            await deps.audit.record(None, "sign-in-refused", request)
            raise
        await deps.audit.record(op, "sign-in", request)
        secure = "; Secure" if request.url.scheme == "https" else ""
        cookie = f"{COOKIE}={sid}; HttpOnly; SameSite=Strict; Path=/admin; Max-Age={SESSION_SECONDS}{secure}"
        return _ok({"role": op.role, "csrf": op.csrf}, headers={"Set-Cookie": cookie})

    @get("/api/session")
    async def session(request: Request) -> Response[bytes]:
        op = await guard(request)
        return _ok({"role": op.role, "csrf": op.csrf})

    @delete("/api/session", status_code=200)
    async def sign_out(request: Request) -> Response[bytes]:
        op = await guard(request, action=True)
        await deps.auth.sign_out(request)
        await deps.audit.record(op, "sign-out", request)
        return _ok({"signed_out": True},
                   headers={"Set-Cookie": f"{COOKIE}=; HttpOnly; SameSite=Strict; Path=/admin; Max-Age=0"})

    @get("/api/requests")
    async def requests(request: Request) -> Response[bytes]:
        await guard(request)
        q = request.query_params
        outcome = q.get("outcome") or None
        if outcome is not None and outcome not in OUTCOMES:
            raise InvalidRequest(f"outcome is one of {', '.join(OUTCOMES)}", location=http("outcome"))
        source = q.get("source") or None
        if source is not None and source not in deps.booker.sources and source != HEALTHCLOUD:
            raise InvalidRequest("no source of that name is configured", location=http("source"))
        direction = q.get("direction") or None
        if direction not in (None, "in", "out"):
            raise InvalidRequest("direction is in (bookings from the EHRs) or out (Health Cloud's callouts)",
                                 location=http("direction"))
        if q.get("key") and source is None:
            raise InvalidRequest("searching by idempotency key needs the source too", location=http("key"))
        entries = await deps.log.search(
            source=source, outcome=outcome, since_ms=_int(q.get("since"), "since"),
            sf_id=q.get("sf_id") or None, key=q.get("key") or None, limit=_int(q.get("limit"), "limit", 50) or 50,
            direction=direction,
        )
        return _ok({"requests": _views(deps, entries)})

    @get("/api/requests/{entry_id:str}")
    async def one(request: Request, entry_id: FromPath[str]) -> Response[bytes]:
        op = await guard(request)
        entry = await deps.log.get(entry_id)
        if entry is None:
            raise NotFound("no request log entry with that id")
        view = deps.log.view(entry, phi=op.role == "phi")
        if op.role == "phi" and entry.sealed is not None:
            await deps.audit.record(op, "view-phi", request, entry=entry.id)
        return _ok(_with_time(view))

    @post("/api/requests/{entry_id:str}/replay", status_code=200)
    async def replay(request: Request, entry_id: FromPath[str]) -> Response[bytes]:
        op = await guard(request, action=True)
        entry = await deps.log.get(entry_id)
        if entry is None or not entry.has_input:
            raise NotFound("no replayable entry with that id (only failed, refused, unmapped or queued bookings keep their input)")
        if entry.replayed_by is not None:
            raise Conflict(f"this entry was replayed already, as {entry.replayed_by}")
        new = await deps.replay(entry)
        await deps.audit.record(op, "replay", request, entry=entry.id, replay=new.id)
        return _ok({"replay": _with_time(deps.log.view(new, phi=False)), "original": entry.id})

    @get("/api/audit")
    async def audit(request: Request) -> Response[bytes]:
        await guard(request)
        return _ok({"audit": await deps.audit.recent()})

    @get("/api/stats")
    async def stats(request: Request) -> Response[bytes]:
        await guard(request)
        minutes = max(1, min(_int(request.query_params.get("minutes"), "minutes", 60) or 60, 24 * 60))
        since = int(time.time() * 1000) - minutes * 60_000
        # the newest 20,000 entries of the window: enough for a clinic's hour, bounded for Redis
        entries = await deps.log.search(since_ms=since, limit=20_000, cap=20_000)
        counts: dict[tuple[int, str, str, str], int] = defaultdict(int)
        latencies: dict[int, list[float]] = defaultdict(list)
        for e in entries:
            t = e.time_ms - e.time_ms % 60_000
            # each direction counted on its own: a callout's "booked" is Health Cloud's, not an EHR's booking
            direction = "out" if e.op in CALLOUT_OPS else "in"
            counts[(t, e.source, e.outcome, direction)] += 1 + (e.suppressed or 0)  # the door's refusals not stored
            latencies[t].append(e.ms)
        return _ok({
            "bucket_seconds": 60,
            "series": [{"t": t, "source": s, "outcome": o, "direction": d, "count": n}
                       for (t, s, o, d), n in sorted(counts.items())],
            "latency": [{"t": t, **_percentiles(v)} for t, v in sorted(latencies.items())],
            "salesforce": deps.usage(),
        })

    @get("/api/queue")
    async def queue(request: Request) -> Response[bytes]:
        await guard(request)
        out: dict[str, list[dict[str, Any]]] = {}
        for source in deps.queue_sources:
            out[source] = [
                {"id": e.id, "where": e.where, "attempts": e.item.attempts, "accepted_ms": e.item.accepted_ms,
                 "due_ms": e.item.due_ms, "last_error": e.item.last_error}
                for e in await deps.queue.list(source)
            ]
        return _ok({"sources": out})

    @post("/api/queue/{source:str}/{entry_id:str}/{action:str}", status_code=200)
    async def queue_action(request: Request, source: FromPath[str], entry_id: FromPath[str],
                           action: FromPath[str]) -> Response[bytes]:
        op = await guard(request, action=True)
        if source not in deps.queue_sources:
            raise NotFound("no queue source of that name")
        if action == "replay":
            if not await deps.queue.replay(source, entry_id):
                raise NotFound("no dead-letter entry with that id")
        elif action == "drop":
            dropped = await deps.queue.drop(source, entry_id)
            if dropped is None:
                raise NotFound("no dead-letter entry with that id")
            await deps.store.unqueue(dropped.record_key)
        else:
            raise NotFound("the actions are replay and drop")
        await deps.audit.record(op, f"queue-{action}", request, source=source, entry=entry_id)
        return _ok({"ok": True})

    @get("/api/held")
    async def held(request: Request) -> Response[bytes]:
        """Bookings held for their patient, and those refused (dead letters), per source: since when,
        how many tries, why. Never whom (a list carries no patient data): see one held booking."""
        await guard(request)
        out: dict[str, list[dict[str, Any]]] = {}
        for source in deps.booker.sources:
            if rows := [_held_row(h) for h in await deps.booker.held(source)]:
                out[source] = rows
        return _ok({"sources": out})

    @get("/api/held/{source:str}/{hold:str}")
    async def held_one(request: Request, source: FromPath[str], hold: FromPath[str]) -> Response[bytes]:
        """One held (or refused) booking, and for a PHI key whom it waits for; that view is audited."""
        op = await guard(request)
        deps.booker.source(source)
        found = next((h for h in await deps.booker.held(source) if h.hold_id == hold), None)
        if found is None:
            raise NotFound("no booking of that id is held")
        row = _held_row(found)
        if op.role == "phi":
            row["patient"] = deps.booker.held_patient(found)
            await deps.audit.record(op, "view-phi", request, entry=f"held:{hold}")
        return _ok(row)

    @post("/api/held/{source:str}/{hold:str}/{action:str}", status_code=200)
    async def held_action(request: Request, source: FromPath[str], hold: FromPath[str],
                          action: FromPath[str]) -> Response[bytes]:
        """`release`: look its patient up again now; `refuse`: give it up (the EHR's retry gets the refusal)."""
        op = await guard(request, action=True)
        deps.booker.source(source)
        if action == "release":
            done = await deps.booker.release_now(source, hold)
        elif action == "refuse":
            done = await deps.booker.refuse_held(source, hold)
        else:
            raise NotFound("the actions are release and refuse")
        if not done:
            raise NotFound("no booking of that id is held")
        await deps.audit.record(op, f"held-{action}", request, source=source, entry=hold)
        return _ok({"ok": True})

    @post("/api/identity/forget", status_code=200)
    async def forget(request: Request) -> Response[bytes]:
        """Every participant's cached record dropped: the next bookings look them up in the org again
        (after records were fixed there, rather than waiting out the cache)."""
        op = await guard(request, action=True)
        dropped = await deps.forget_identities()
        await deps.audit.record(op, "identity-forget", request)
        return _ok({"forgotten": dropped})

    @post("/api/identity/{source:str}/check", status_code=200)
    async def identity_check(request: Request, source: FromPath[str]) -> Response[bytes]:
        """How each participant of a booking file resolves in the org (nothing is booked)."""
        await guard(request, action=True)
        return _ok({"participants": await deps.booker.check_identity(source, await request.body())})

    @get("/api/codemaps")
    async def maps(request: Request) -> Response[bytes]:
        await guard(request)
        versions = deps.maps.versions()
        return _ok({"sources": {
            s: {"version": versions.get(s), "files": deps.maps.files(s), "problems": deps.maps.problems(s)}
            for s in deps.booker.sources
        }})

    @post("/api/translate/{source:str}", status_code=200)
    async def translate(request: Request, source: FromPath[str]) -> Response[bytes]:
        await guard(request, action=True)
        prepared = deps.booker.prepare(source, await request.body())
        warnings = [{"code": i.code, "diagnostics": i.diagnostics, "expression": list(i.expression)}
                    for i in prepared.warnings]  # what the mapping left out, shown beside the request
        return _ok({"request": msgspec.to_builtins(prepared.mapped.request), "warnings": warnings})

    @get("/")
    async def dashboard() -> Response[bytes]:
        return Response((DASHBOARD / "index.html").read_bytes(), media_type="text/html; charset=utf-8",
                        headers=SECURITY_HEADERS)

    # the dashboard's files, listed once: a request's name is looked up, never handed to the file
    # system (a name too long for it was a 500)
    static_files = {p.name: p for p in DASHBOARD.iterdir() if p.is_file() and p.name != "index.html"}

    @get("/static/{name:str}")
    async def static(name: FromPath[str]) -> Response[bytes]:
        path = static_files.get(name)
        if path is None:
            return _fail(NotFound("no such file"))
        media = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return Response(path.read_bytes(), media_type=media, headers=SECURITY_HEADERS)

    def redis_down(_: Request, __: Exception) -> Response[bytes]:
        # sessions, the log and the audit live in Redis: without it the admin API fails closed
        return _fail(Unavailable("Redis is unavailable", retry_after=5))

    return Router(path="/admin", exception_handlers={GatewayError: lambda _, exc: _fail(exc), RedisError: redis_down},
                  route_handlers=[
        sign_in, session, sign_out, requests, one, replay, audit, stats, queue, queue_action, held, held_one, held_action,
        forget, identity_check, maps, translate, dashboard, static,
    ])


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "count": len(ordered)}
