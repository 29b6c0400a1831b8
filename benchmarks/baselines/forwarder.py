"""(b) The minimal forwarder, the ceiling: a Litestar handler that passes the request bytes to
Salesforce's Book endpoint through aiohttp and answers what came back. No Redis, no parsing, no
authentication of the caller, no idempotency: the least any Litestar service on this path can do.

The one piece of work outside the request path: at start it gets an access token from
`SALESFORCE_LOGIN_URL` (client credentials), as anything that calls Salesforce must.

    SALESFORCE_LOGIN_URL=http://127.0.0.1:8700 SALESFORCE_CLIENT_ID=x SALESFORCE_CLIENT_SECRET=y \\
        .venv/bin/python -m benchmarks.baselines.forwarder --port 8001
"""

from __future__ import annotations

import contextlib
from typing import Any

import aiohttp
from litestar import Litestar, Request, Response, post

from benchmarks.baselines.common import env, run

API_VERSION = env("SALESFORCE_API_VERSION", "66.0")
BOOK_PATH = f"/services/data/v{API_VERSION}/connect/health/appointment-management/appointment"

state: dict[str, Any] = {}


@contextlib.asynccontextmanager
async def lifespan(app: Litestar):
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100),
        timeout=aiohttp.ClientTimeout(total=20, sock_connect=3),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    grant = {"grant_type": "client_credentials", "client_id": env("SALESFORCE_CLIENT_ID"),
             "client_secret": env("SALESFORCE_CLIENT_SECRET")}
    async with session.post(env("SALESFORCE_LOGIN_URL").rstrip("/") + "/services/oauth2/token", data=grant) as r:
        r.raise_for_status()
        token = await r.json(content_type=None)
    state["url"] = token["instance_url"].rstrip("/") + BOOK_PATH
    state["headers"] = {"Authorization": f"Bearer {token['access_token']}", "Content-Type": "application/json",
                        "Accept": "application/json"}
    state["session"] = session
    try:
        yield
    finally:
        await session.close()


@post("/fhir/{source:str}/Appointment")
async def forward(request: Request, source: str) -> Response[bytes]:
    async with state["session"].post(state["url"], data=await request.body(), headers=state["headers"]) as r:
        return Response(await r.read(), status_code=r.status, media_type="application/json")


app = Litestar(route_handlers=[forward], lifespan=[lifespan], logging_config=None, openapi_config=None, debug=False)

if __name__ == "__main__":
    run(app, "(b) minimal forwarder: Litestar + aiohttp, request bytes passed through")
