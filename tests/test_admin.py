"""Operators: the request log, the admin API (keys, sessions, CSRF, PHI and its audit), replays after
a map is fixed, and /metrics; gateway on a real port, real Redis, the sandbox over real HTTP."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aredis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_KEY, CONFIG, KEYS, PHI_KEY, VIDEO_VISIT, auth, corpus, make_settings, serve_gateway

PATIENT = "12724066"
# the Cerner map entry the Video Visit's serviceType needs
SERVICE_TYPE_CODE = "2572307911"


def admin(key: str = ADMIN_KEY, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


def state(sandbox):
    return sandbox.app.state.sandbox


def config_copy(tmp_path: Path, prefix: str, **toml_tables: str) -> Path:
    target = tmp_path / "config"
    shutil.copytree(CONFIG, target)
    extra = "".join(f"\n[{name}]\n{body}\n" for name, body in toml_tables.items())
    (target / "gateway.toml").write_text((target / "gateway.toml").read_text() + extra)
    return target


def map_file_with(config: Path, code: str) -> Path:
    """The Cerner map file that maps `code`."""
    return next(p for p in (config / "codemaps" / "cerner").iterdir() if code in p.read_text())


async def wait_for_entries(gw, n: int, **params: str) -> list[dict]:
    for _ in range(100):
        r = await gw.get("/admin/api/requests", params=params, headers=admin())
        assert r.status_code == 200, r.text
        found = r.json()["requests"]
        if len(found) >= n:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {n} entries: {found}")


async def test_keys_decide_who_sees_what(gateway, sandbox):
    assert (await gateway.get("/admin/api/requests")).status_code == 401
    assert (await gateway.get("/admin/api/requests", headers=admin("nope"))).status_code == 401
    r = await gateway.get("/admin/api/requests", headers=admin(KEYS["cerner"]))
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    booked = await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth())
    assert booked.status_code == 201
    [entry] = await wait_for_entries(gateway, 1)
    assert entry["id"] == booked.headers["x-request-id"]
    assert (entry["outcome"], entry["status"], entry["source"], entry["idempotency"]) == ("booked", 201, "cerner", "new")
    assert entry["sf_id"] == booked.json()["id"] and entry["sf_status"] in (200, 201)
    assert entry["maps_version"] and any(SERVICE_TYPE_CODE in used for used in entry["maps_used"])
    assert entry["time"].endswith("Z") and entry["ms"] > 0
    assert "patient" not in entry and "input" not in entry
    # the admin key: no patient data; the PHI key: the patient, and the view is audited
    plain = (await gateway.get(f"/admin/api/requests/{entry['id']}", headers=admin())).json()
    assert "patient" not in plain and PATIENT not in str(plain)
    def views(audit: list[dict]) -> list[dict]:  # the two refused keys above are audited too
        return [a for a in audit if a["action"] != "key-refused"]

    assert views((await gateway.get("/admin/api/audit", headers=admin())).json()["audit"]) == []
    phi = (await gateway.get(f"/admin/api/requests/{entry['id']}", headers=admin(PHI_KEY))).json()
    assert phi["patient"] == f"Patient/{PATIENT}"
    assert "input" not in phi  # a booked booking's input is not kept
    [audit] = views((await gateway.get("/admin/api/audit", headers=admin())).json()["audit"])
    assert audit["action"] == "view-phi" and audit["entry"] == entry["id"] and audit["role"] == "phi"


async def test_search_by_source_outcome_time_salesforce_id_and_key(gateway, sandbox):
    ok = await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth(**{"Idempotency-Key": "k-find"}))
    assert ok.status_code == 201
    assert (await gateway.post("/fhir/cerner/Appointment", content=b"{", headers=auth())).status_code == 400
    assert (await gateway.post("/fhir/epic/Appointment", content=b"{}", headers=auth("epic"))).status_code == 400
    await wait_for_entries(gateway, 3)
    by_source = (await gateway.get("/admin/api/requests", params={"source": "epic"}, headers=admin())).json()["requests"]
    assert [e["source"] for e in by_source] == ["epic"]
    rejected = (await gateway.get("/admin/api/requests", params={"outcome": "rejected"}, headers=admin())).json()["requests"]
    assert sorted((e["source"], e["status"]) for e in rejected) == [("cerner", 400), ("epic", 400)]
    by_sf = (await gateway.get("/admin/api/requests", params={"sf_id": ok.json()["id"]}, headers=admin())).json()["requests"]
    assert [e["id"] for e in by_sf] == [ok.headers["x-request-id"]]
    by_key = (await gateway.get("/admin/api/requests", params={"source": "cerner", "key": "k-find"}, headers=admin())).json()
    assert [e["id"] for e in by_key["requests"]] == [ok.headers["x-request-id"]]
    newest = (await gateway.get("/admin/api/requests", params={"limit": "1"}, headers=admin())).json()["requests"]
    later = (await gateway.get("/admin/api/requests", params={"since": str(newest[0]["time_ms"] + 1)}, headers=admin())).json()
    assert later["requests"] == []
    bad = await gateway.get("/admin/api/requests", params={"outcome": "weird"}, headers=admin())
    assert bad.status_code == 400 and bad.json()["issue"][0]["location"] == ["http.outcome"]


async def test_fix_the_map_then_replay_books_once(redis_url, prefix, sandbox, tmp_path):
    config = config_copy(tmp_path, prefix, codemaps="reload_seconds = 0.05")
    map_file = map_file_with(config, SERVICE_TYPE_CODE)
    good = map_file.read_text()
    map_file.write_text(good.replace(f'"{SERVICE_TYPE_CODE}"', '"0000000000"'))  # the code loses its mapping
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=config)
    async with serve_gateway(settings) as gw:
        refused = await gw.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth(**{"Idempotency-Key": "fix-1"}))
        assert refused.status_code == 422
        [entry] = await wait_for_entries(gw, 1, outcome="unmapped")
        assert entry["replayable"] and entry["issues"] and entry["issues"][0]["expression"]
        assert "input" not in entry
        # the kept input is sealed: neither the patient nor the body is readable in Redis
        raw = aredis.Redis.from_url(redis_url)
        dumped = b"".join([await raw.dump(k) or b"" async for k in raw.scan_iter(match=f"{prefix}:log*")])
        await raw.aclose()
        assert dumped and PATIENT.encode() not in dumped and b"Video Visit" not in dumped
        phi = (await gw.get(f"/admin/api/requests/{entry['id']}", headers=admin(PHI_KEY))).json()
        assert msgspec.json.decode(phi["input"]) == msgspec.json.decode(corpus(VIDEO_VISIT))

        map_file.write_text(good)  # the engineer fixes the map; no restart
        for _ in range(100):
            versions = (await gw.get("/admin/api/codemaps", headers=admin())).json()["sources"]["cerner"]
            if versions["version"] != entry["maps_version"]:
                break
            await asyncio.sleep(0.05)
        replay = await gw.post(f"/admin/api/requests/{entry['id']}/replay", headers=admin())
        assert replay.status_code == 200, replay.text
        new = replay.json()["replay"]
        assert (new["outcome"], new["status"], new["op"], new["replay_of"]) == ("booked", 201, "replay", entry["id"])
        assert [a.id for a in state(sandbox).appointments()] == [new["sf_id"]]
        again = await gw.post(f"/admin/api/requests/{entry['id']}/replay", headers=admin())
        assert again.status_code == 409  # one replay per entry
        original = (await gw.get(f"/admin/api/requests/{entry['id']}", headers=admin())).json()
        assert original["replayed_by"] == new["id"] and not original["replayable"]
        # the replay is an audited action: who, which entry, and what it became
        [audited] = [a for a in (await gw.get("/admin/api/audit", headers=admin())).json()["audit"]
                     if a["action"] == "replay"]
        assert (audited["entry"], audited["replay"], audited["role"]) == (entry["id"], new["id"], "admin")
        assert len(audited["who"]) == 12 and audited["who"] not in ADMIN_KEY
        # the EHR's own retry now gets the booking, not a second one
        retry = await gw.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth(**{"Idempotency-Key": "fix-1"}))
        assert retry.status_code == 201 and retry.json()["id"] == new["sf_id"]
        assert len(state(sandbox).appointments()) == 1


@pytest.mark.parametrize("sandbox_config", [{"require_channel_id": True}], indirect=True)
async def test_replay_of_a_salesforce_refusal_tries_again(redis_url, prefix, sandbox, tmp_path):
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=config_copy(tmp_path, prefix))
    async with serve_gateway(settings) as gw:
        refused = await gw.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth())
        assert refused.status_code == 422  # Salesforce wants a channel id
        [entry] = await wait_for_entries(gw, 1, outcome="refused")
        state(sandbox).config = msgspec.structs.replace(state(sandbox).config, require_channel_id=False)
        replay = await gw.post(f"/admin/api/requests/{entry['id']}/replay", headers=admin())
        assert replay.json()["replay"]["outcome"] == "booked"
        assert len(state(sandbox).appointments()) == 1


async def test_dashboard_session_cookie_and_csrf(gateway, sandbox):
    page = await gateway.get("/admin/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert (await gateway.post("/admin/api/session", json={"key": KEYS["cerner"]})).status_code == 403
    assert (await gateway.post("/admin/api/session", json={"key": "wrong"})).status_code == 401
    signed = await gateway.post("/admin/api/session", json={"key": ADMIN_KEY})
    assert signed.status_code == 200
    cookie = signed.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/admin" in cookie
    csrf = signed.json()["csrf"]
    assert (await gateway.get("/admin/api/session")).json() == {"role": "admin", "csrf": csrf}
    assert (await gateway.get("/admin/api/requests")).status_code == 200  # the cookie reads
    forged = await gateway.post("/admin/api/requests/anything/replay")  # an action without the token
    assert forged.status_code == 403 and "CSRF" in forged.text
    with_token = await gateway.post("/admin/api/requests/anything/replay", headers={"X-CSRF-Token": csrf})
    assert with_token.status_code == 404
    assert (await gateway.delete("/admin/api/session", headers={"X-CSRF-Token": csrf})).status_code == 200
    assert (await gateway.get("/admin/api/requests")).status_code == 401
    audit = (await gateway.get("/admin/api/audit", headers=admin())).json()["audit"]
    # newest first: the refused keys (a source's and a wrong one), the sign-in, the sign-out
    assert [a["action"] for a in audit] == ["sign-out", "sign-in", "sign-in-refused", "sign-in-refused"]
    assert audit[0]["who"] == audit[1]["who"] != "" and audit[2]["who"] == "" and audit[0]["ip"] == "127.0.0.1"


async def test_failed_admin_keys_are_throttled_per_address(gateway):
    for _ in range(10):  # the burst: ten wrong keys are answered as wrong
        assert (await gateway.post("/admin/api/session", json={"key": "guess"})).status_code == 401
    throttled = await gateway.post("/admin/api/session", json={"key": ADMIN_KEY})
    # the eleventh try waits, even with the right key: a guesser learns nothing while it waits
    assert throttled.status_code == 429 and throttled.json()["issue"][0]["code"] == "throttled"
    assert 1 <= int(throttled.headers["retry-after"]) <= 6
    assert (await gateway.get("/admin/api/requests", headers=admin())).status_code == 429  # bearer keys too


async def test_metrics_count_requests_without_patient_data(gateway, sandbox):
    assert (await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth())).status_code == 201
    assert (await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth())).status_code == 201
    r = await gateway.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(r.text) for s in fam.samples}
    booked = {k: v for k, v in samples.items() if k[0] == "ehrgw_requests_total" and ("outcome", "booked") in k[1]}
    replayed = {k: v for k, v in samples.items() if k[0] == "ehrgw_requests_total" and ("outcome", "replayed") in k[1]}
    assert sum(booked.values()) == 1 and sum(replayed.values()) == 1
    assert any(k[0] == "ehrgw_salesforce_call_seconds_count" and v >= 1 for k, v in samples.items())
    assert samples[("ehrgw_circuit_open", ())] == 0
    assert PATIENT not in r.text


async def test_retention_by_count(redis_url, prefix, sandbox, tmp_path):
    config = config_copy(tmp_path, prefix, request_log="max_entries = 3\nflush_seconds = 0.02")
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=config)
    async with serve_gateway(settings) as gw:
        for _ in range(5):
            assert (await gw.post("/fhir/cerner/Appointment", content=b"{", headers=auth())).status_code == 400
            await asyncio.sleep(0.05)
        entries = (await gw.get("/admin/api/requests", params={"limit": "10"}, headers=admin())).json()["requests"]
        assert len(entries) == 3
        raw = aredis.Redis.from_url(redis_url)
        kept = [k async for k in raw.scan_iter(match=f"{prefix}:log:*:e:*")]
        await raw.aclose()
        assert len(kept) == 3


async def test_requests_command_lists_shows_and_follows(redis_url, prefix, sandbox, tmp_path, monkeypatch, capsys):
    import os
    import signal
    import subprocess
    import sys

    from gateway.cli import main as cli

    config = config_copy(tmp_path, prefix, redis=f'key_prefix = "{prefix}"')
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=config)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("COLUMNS", "250")
    async with serve_gateway(settings) as gw:
        ok = await gw.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth())
        bad = await gw.post("/fhir/cerner/Appointment", content=b"{", headers=auth())
        await wait_for_entries(gw, 2)
    capsys.readouterr()
    assert await asyncio.to_thread(cli, ["requests", "--config", str(config), "--outcome", "booked"]) == 0
    listed = capsys.readouterr().out
    assert ok.headers["x-request-id"] in listed and bad.headers["x-request-id"] not in listed
    assert PATIENT not in listed
    assert await asyncio.to_thread(cli, ["requests", "--config", str(config), "show", bad.headers["x-request-id"]]) == 0
    shown = capsys.readouterr().out
    assert '"outcome": "rejected"' in shown and '"status": 400' in shown
    # --follow keeps a live table up: a booking made while it runs appears in it
    exe = Path(sys.executable).with_name("ehr-gateway")
    follow = subprocess.Popen([str(exe), "requests", "--config", str(config), "--follow"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "250"})
    try:
        await asyncio.sleep(1.5)
        async with serve_gateway(settings) as gw:
            late = await gw.post("/fhir/cerner/Appointment", content=b"[]", headers=auth())
            await wait_for_entries(gw, 3)  # written to Redis
            await asyncio.sleep(3)  # the table refreshes every second
    finally:
        follow.send_signal(signal.SIGINT)
        out = follow.communicate(timeout=10)[0].decode()
    assert late.headers["x-request-id"] in out and ok.headers["x-request-id"] in out


async def test_queued_booking_is_sealed_at_rest_and_its_delivery_is_logged(redis_url, prefix, sandbox, tmp_path):
    config = config_copy(tmp_path, prefix, queue="backoff_base_seconds = 0.05\nbackoff_max_seconds = 0.1\npoll_seconds = 0.05")
    toml = (config / "gateway.toml").read_text().replace('adapter = "cerner"', 'adapter = "cerner"\ndelivery = "queue"', 1)
    (config / "gateway.toml").write_text(toml)
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=config)
    state(sandbox).faults.set(request_limit_exceeded=1)
    # the gateway's own worker stays off until the stream has been looked at
    async with serve_gateway(settings, run_queue_workers=False) as gw:
        accepted = await gw.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth())
        assert accepted.status_code == 202
        raw = aredis.Redis.from_url(redis_url)
        [stream] = [k async for k in raw.scan_iter(match=f"{prefix}:queue:*") if not k.endswith((b":delayed", b":dead"))]
        [(_, fields)] = await raw.xrange(stream)
        await raw.aclose()
        assert b'"sealed":true' in fields[b"e"] and PATIENT.encode() not in fields[b"e"]
    async with serve_gateway(settings) as gw:
        [delivered] = await wait_for_entries(gw, 1, outcome="booked")
        assert delivered["op"] == "deliver" and delivered["sf_id"] == state(sandbox).appointments()[0].id
        [queued] = (await gw.get("/admin/api/requests", params={"outcome": "queued"}, headers=admin())).json()["requests"]
        assert queued["id"] == accepted.headers["x-request-id"] and queued["replayable"]


async def test_a_refused_bearer_key_is_audited(gateway):
    for key in ("wrong-key", KEYS["cerner"]):
        r = await gateway.get("/admin/api/requests", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code in (401, 403)
    audit = (await gateway.get("/admin/api/audit", headers={"Authorization": f"Bearer {ADMIN_KEY}"})).json()["audit"]
    refused = [a for a in audit if a["action"] == "key-refused"]
    assert len(refused) == 2 and all(a["ip"] == "127.0.0.1" and a["who"] == "" for a in refused)
    assert not any("wrong-key" in str(a) or KEYS["cerner"] in str(a) for a in audit)  # the key itself: never


async def test_sign_in_is_json_from_this_origin_only(gateway):
    """Another site's page can post a form or text/plain without asking: signing a browser in with
    the attacker's key (login CSRF) must fail, whatever the body says."""
    body = msgspec.json.encode({"key": ADMIN_KEY})
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}):
        r = await gateway.post("/admin/api/session", content=body, headers=headers)
        assert r.status_code == 415 and "set-cookie" not in r.headers, headers
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "null"}, {"Sec-Fetch-Site": "same-site"}):
        r = await gateway.post("/admin/api/session", content=body, headers={"Content-Type": "application/json", **headers})
        assert r.status_code == 403 and "set-cookie" not in r.headers, headers
    own = str(gateway.base_url).rstrip("/")
    r = await gateway.post("/admin/api/session", content=body, headers={
        "Content-Type": "application/json", "Origin": own, "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 200 and "set-cookie" in r.headers


async def test_sign_in_from_the_published_origin_is_taken_behind_a_proxy_that_rewrites_host(redis_url, prefix, sandbox):
    settings = make_settings(redis_url, prefix, sandbox.url)
    server = msgspec.structs.replace(settings.file.server, public_urls=("https://ops.example.org",))
    settings = msgspec.structs.replace(settings, file=msgspec.structs.replace(settings.file, server=server))
    async with serve_gateway(settings) as gw:
        body = msgspec.json.encode({"key": ADMIN_KEY})
        r = await gw.post("/admin/api/session", content=body, headers={
            "Content-Type": "application/json", "Origin": "https://ops.example.org", "Host": "gateway:8000"})
        assert r.status_code == 200, r.text
        r = await gw.post("/admin/api/session", content=body, headers={
            "Content-Type": "application/json", "Origin": "https://ops.example.org.evil.example"})
        assert r.status_code == 403
