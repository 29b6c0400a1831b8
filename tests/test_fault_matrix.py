"""Exactly one appointment whatever Salesforce, or anything between it and the gateway, answers a
Book: every status × Salesforce's own error body or a proxy's (HTML, empty, garbage, a dropped
connection, no answer at all) × before the org stored the booking or after. The EHR retries with
its key until it has a final answer; then the org must hold one appointment if that answer is 201
and none if it is a refusal.

The rule under test (`gateway/salesforce/client.py`): only an answer that proves nothing was stored
frees the key without a look-up: no connection made, or one of Salesforce's own pre-processing
refusals (REQUEST_LIMIT_EXCEEDED) in its error shape. Salesforce's other refusals in its shape are
final (its transactions roll back). Everything else is in doubt and looked up before anything is
sent again, the re-authenticating retry after a 401 included.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest

from gateway.sandbox import SandboxConfig, create_sandbox_app
from gateway.edges.server import ThreadedServer
from tests.conftest import CLIENT_ID, CLIENT_SECRET, CONFIG, VIDEO_VISIT, auth, corpus, make_settings, serve_gateway

STATUSES = (200, 201, 301, 302, 400, 401, 403, 404, 405, 408, 409, 412, 413, 415, 422, 429, 500, 502, 503, 504)
# Salesforce refuses in its own shape only before storing: these cells cannot happen after it
SALESFORCE_REFUSALS = {s for s in STATUSES if 400 <= s < 500} - {401, 408, 429}
NOT_PROCESSED = {429}  # Salesforce's REQUEST_LIMIT_EXCEEDED (the sandbox's body for a 429)


def _cells() -> list[tuple[int, str, bool]]:
    cells = []
    for status in STATUSES:
        for body in ("salesforce", "html"):
            for before in (True, False):
                if body == "salesforce" and not before and (status in SALESFORCE_REFUSALS | NOT_PROCESSED):
                    continue  # Salesforce does not refuse what it stored
                cells.append((status, body, before))
    for status in (200, 201, 400, 500, 503):
        for body in ("empty", "garbage"):
            cells += [(status, body, True), (status, body, False)]
    for body in ("drop", "hang"):
        cells += [(201, body, True), (201, body, False)]
    return cells


CELLS = _cells()


def expected_final(status: int, body: str, before: bool) -> int:
    if body == "salesforce" and before and status in SALESFORCE_REFUSALS:
        return 422  # Salesforce's own refusal: final, nothing stored
    return 201


@pytest.fixture(scope="module")
def org() -> ThreadedServer:
    with ThreadedServer(create_sandbox_app(SandboxConfig(client_id=CLIENT_ID, client_secret=CLIENT_SECRET))) as server:
        yield server


@pytest.fixture(scope="module")
async def gw(org, redis_url, key_prefix, tmp_path_factory) -> AsyncIterator[httpx.AsyncClient]:
    """One gateway for the whole matrix: quick settle window and timeout; the breaker out of the way
    (cells fail Book on purpose, one after another)."""
    cfg = tmp_path_factory.mktemp("matrix") / "config"
    shutil.copytree(CONFIG, cfg)
    toml = (cfg / "gateway.toml").read_text()
    toml = toml.replace("[idempotency]", "[idempotency]\nin_doubt_settle_seconds = 0.3")
    toml = toml.replace("timeout_seconds = 20", "timeout_seconds = 1.0")
    toml = toml.replace("lease_seconds = 60", "lease_seconds = 2")
    toml += "\n[breaker]\nmin_calls = 100000\n"
    (cfg / "gateway.toml").write_text(toml)
    settings = make_settings(redis_url, f"{key_prefix}:matrix", org.url, config_dir=cfg)
    async with serve_gateway(settings) as client:
        yield client


def visit(n: int) -> bytes:
    """The corpus visit on a day of its own: no look-up takes one cell's booking for another's."""
    data = msgspec.json.decode(corpus(VIDEO_VISIT))
    day = visit_day(n)
    data["start"], data["end"] = f"{day}T09:00:00Z", f"{day}T09:15:00Z"
    data["identifier"] = [{"system": "urn:oid:2.16.840.1.113883.3.13.6", "value": f"matrix-{n}"}]
    return msgspec.json.encode(data)


@pytest.mark.parametrize(("status", "body", "before"), CELLS,
                         ids=[f"{s}-{b}-{'before' if w else 'after'}" for s, b, w in CELLS])
async def test_one_appointment_whatever_book_answers(gw, org, status, body, before):
    n = CELLS.index((status, body, before))
    sandbox = org.app.state.sandbox
    sandbox.faults.set(book_answer=1, book_answer_status=status, book_answer_body=body,
                       book_answer_before_store=before)
    payload, key = visit(n), f"matrix-{n}"
    answers = []
    for _ in range(15):
        r = await gw.post("/fhir/cerner/Appointment", content=payload, headers=auth(**{"Idempotency-Key": key}))
        answers.append(r.status_code)
        assert r.headers["content-type"].startswith("application/fhir+json")
        if r.status_code in (201, 422):
            break
        assert r.status_code in (502, 503) and int(r.headers["retry-after"]) >= 1, r.text
        await asyncio.sleep(0.35)  # the settle window (0.3 s), not the Retry-After a real EHR honours
    assert sandbox.faults.snapshot().book_answer == 0  # the fault was met
    mine = [a for a in sandbox.appointments() if a.request.get("startDate", "").startswith(visit_day(n))]
    assert answers[-1] == expected_final(status, body, before), answers
    if answers[-1] == 201:
        assert [a.id for a in mine] == [r.json()["id"]], answers  # one, and the one the EHR was told
        assert r.headers["location"] == f"{gw.base_url}/fhir/cerner/Appointment/{mine[0].id}"
    else:
        assert mine == [], answers
    if not before:  # stored, then a bad answer: found at once by the look-up, not waited for
        assert answers == [201]


def visit_day(n: int) -> str:
    return f"{2027 + n // 336}-{1 + n % 336 // 28:02d}-{1 + n % 28:02d}"


@pytest.mark.parametrize("bad_id", ["08pHs0000000001\r\nX-Injected: 1", "../../admin/api/audit", "<script>alert(1)</script>",
                                    "08pHs00000000", "08pHs0000000001IAAB", ""])
async def test_an_answer_whose_id_is_not_salesforces_is_in_doubt_and_looked_up(gw, org, bad_id):
    """Only an id of Salesforce's shape (15 or 18 letters and digits) goes into Location and the body;
    anything else leaves the booking in doubt, and the look-up finds the id it really has."""
    n = 1000 + len(bad_id)
    org.app.state.sandbox.faults.set(book_answer=1, book_answer_status=201, book_answer_body="salesforce",
                                     book_answer_id=bad_id)
    r = await gw.post("/fhir/cerner/Appointment", content=visit(n), headers=auth(**{"Idempotency-Key": f"bad-id-{n}"}))
    mine = [a for a in org.app.state.sandbox.appointments() if a.request.get("startDate", "").startswith(visit_day(n))]
    assert r.status_code == 201 and len(mine) == 1, r.text
    assert r.json()["id"] == mine[0].id and r.headers["location"].endswith("/" + mine[0].id)
    replay = await gw.post("/fhir/cerner/Appointment", content=visit(n), headers=auth(**{"Idempotency-Key": f"bad-id-{n}"}))
    assert replay.status_code == 201 and replay.content == r.content


async def test_an_answer_over_the_size_bound_is_not_read_and_the_booking_is_looked_up(gw, org):
    """A 201 of 8 MiB (the bound is 4 MiB): the gateway does not hold it, and finds the booking."""
    n = 1100
    queries = org.app.state.sandbox.counters().appointment_queries
    org.app.state.sandbox.faults.set(book_answer=1, book_answer_status=201, book_answer_body="salesforce",
                                     book_answer_pad_bytes=8 * 1024 * 1024)
    r = await gw.post("/fhir/cerner/Appointment", content=visit(n), headers=auth(**{"Idempotency-Key": f"huge-{n}"}))
    mine = [a for a in org.app.state.sandbox.appointments() if a.request.get("startDate", "").startswith(visit_day(n))]
    assert r.status_code == 201 and [a.id for a in mine] == [r.json()["id"]], r.text
    assert len(r.content) < 10_000
    # not read: the answer was dropped at the bound and the booking found by its look-up
    assert org.app.state.sandbox.counters().appointment_queries == queries + 1
