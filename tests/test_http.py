"""The inbound HTTP contract: keys, media types, sizes, bad bodies, the dry run, $book."""

from __future__ import annotations

import msgspec
import pytest

from tests.conftest import ADMIN_KEY, KEYS, VIDEO_VISIT, auth, corpus


def assert_outcome(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"]
    if code:
        assert body["issue"][0]["code"] == code
    assert "Traceback" not in r.text
    return body


async def test_no_key_401_unknown_key_401_other_source_403(gateway, sandbox):
    body = corpus(VIDEO_VISIT)
    assert_outcome(await gateway.post("/fhir/cerner/Appointment", content=body,
                                      headers={"Content-Type": "application/fhir+json"}), 401, "login")
    assert_outcome(await gateway.post("/fhir/cerner/Appointment", content=body,
                                      headers={**auth(), "Authorization": "Bearer nope"}), 401, "login")
    assert_outcome(await gateway.post("/fhir/cerner/Appointment", content=body, headers=auth("epic")), 403, "forbidden")
    assert sandbox.app.state.sandbox.counters().book_calls == 0


async def test_unknown_source_404(gateway):
    assert_outcome(await gateway.post("/fhir/nowhere/Appointment", content=b"{}", headers=auth()), 404, "not-found")


@pytest.mark.parametrize("media", ["text/plain", "application/xml", ""])
async def test_other_media_type_415(gateway, media):
    assert_outcome(await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT),
                                      headers={**auth(), "Content-Type": media}), 415)


async def test_json_with_charset_is_accepted(gateway):
    r = await gateway.post("/fhir/cerner/Appointment/$translate", content=corpus(VIDEO_VISIT),
                           headers={**auth(), "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


async def test_body_too_large_413(gateway):
    huge = b'{"resourceType":"Appointment","comment":"' + b"x" * 1_100_000 + b'"}'
    r = await gateway.post("/fhir/cerner/Appointment", content=huge, headers=auth())
    assert_outcome(r, 413)
    assert len(r.headers["x-request-id"]) == 16


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 400),
        (b"[1,2]", 400),
        (b'{"resourceType":"Patient"}', 400),
        (b'{"resourceType":"Appointment","participant":"Patient/1"}', 400),
        (b"", 400),
    ],
)
async def test_bad_bodies_are_4xx_outcomes(gateway, body, status):
    assert_outcome(await gateway.post("/fhir/cerner/Appointment", content=body, headers=auth()), status)


async def test_bad_idempotency_key_400(gateway):
    r = await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT),
                           headers=auth(**{"Idempotency-Key": "x" * 256}))
    (issue,) = assert_outcome(r, 400)["issue"]
    assert issue["location"] == ["http.Idempotency-Key"] and "expression" not in issue  # a header: no FHIRPath


async def test_wrong_method_and_path_are_outcomes(gateway):
    assert_outcome(await gateway.get("/fhir/cerner/Appointment", headers=auth()), 405)
    assert_outcome(await gateway.get("/nothing-here"), 404)


async def test_translate_is_a_dry_run(gateway, sandbox, redis_url, prefix):
    import redis

    r = await gateway.post("/fhir/cerner/Appointment/$translate", content=corpus(VIDEO_VISIT), headers=auth())
    assert r.status_code == 200
    request = r.json()
    assert request["workTypeId"] == "08qxx0000000002AAA" and request["sourceSystem"] == "cerner"
    assert sandbox.app.state.sandbox.counters().api_calls == 0
    assert list(redis.Redis.from_url(redis_url).scan_iter(match=f"{prefix}:idem*")) == []


async def test_translate_refusal_names_paths(gateway):
    r = await gateway.post("/fhir/cerner/Appointment/$translate",
                           content=corpus("cerner-millennium-r4/r4_appointment_create.json"), headers=auth())
    body = assert_outcome(r, 422)
    paths = {p for i in body["issue"] for p in i.get("expression", [])}
    assert {"Appointment.start", "Appointment.end", "Appointment.participant", "Appointment.slot[0]"} <= paths


async def test_book_operation_with_appt_resource(gateway, sandbox):
    appointment = msgspec.json.decode(corpus(VIDEO_VISIT))
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "appt-resource", "resource": appointment},
        {"name": "comment", "valueString": "please call first"},
    ]}
    r = await gateway.post("/fhir/cerner/Appointment/$book", content=msgspec.json.encode(params), headers=auth())
    assert r.status_code == 201, r.text
    [stored] = sandbox.app.state.sandbox.appointments()
    assert stored.request["comment"] == "please call first"


async def test_long_comment_is_refused_not_cut(gateway, sandbox):
    appointment = msgspec.json.decode(corpus(VIDEO_VISIT))
    appointment["comment"] = "c" * 257
    r = await gateway.post("/fhir/cerner/Appointment", content=msgspec.json.encode(appointment), headers=auth())
    body = assert_outcome(r, 422, "too-long")
    assert body["issue"][0]["expression"] == ["Appointment.comment"]
    assert "c" * 20 not in r.text
    assert sandbox.app.state.sandbox.counters().book_calls == 0


async def test_time_without_zone_is_refused(gateway):
    appointment = msgspec.json.decode(corpus(VIDEO_VISIT))
    appointment["start"] = "2020-07-10T13:00:00"
    r = await gateway.post("/fhir/cerner/Appointment", content=msgspec.json.encode(appointment), headers=auth())
    body = assert_outcome(r, 422)
    assert any(i["expression"] == ["Appointment.start"] and "zone" in i["details"]["text"] for i in body["issue"])


async def test_end_before_start_is_refused(gateway):
    appointment = msgspec.json.decode(corpus(VIDEO_VISIT))
    appointment["end"] = "2020-07-10T12:00:00Z"
    r = await gateway.post("/fhir/cerner/Appointment", content=msgspec.json.encode(appointment), headers=auth())
    assert any(i["code"] == "invariant" for i in assert_outcome(r, 422)["issue"])


async def test_offsets_keep_their_instant(gateway, sandbox):
    appointment = msgspec.json.decode(corpus(VIDEO_VISIT))
    appointment["start"], appointment["end"] = "2026-03-08T01:30:00-06:00", "2026-03-08T03:30:00-05:00"
    r = await gateway.post("/fhir/cerner/Appointment", content=msgspec.json.encode(appointment), headers=auth())
    assert r.status_code == 201
    sent = sandbox.app.state.sandbox.appointments()[0].request
    assert (sent["startDate"], sent["endDate"]) == ("2026-03-08T01:30:00-06:00", "2026-03-08T03:30:00-05:00")
    assert r.json()["start"] == "2026-03-08T01:30:00-06:00"


async def test_health_live_and_ready(gateway):
    assert (await gateway.get("/health/live")).status_code == 200
    ready = await gateway.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"redis": "pass", "salesforce_auth": "pass", "salesforce_instance": "pass"}


async def test_keys_never_leave_in_answers(gateway):
    r = await gateway.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth("epic"))
    assert KEYS["epic"] not in r.text and KEYS["cerner"] not in r.text


async def test_bearer_scheme_is_case_insensitive(gateway):
    r = await gateway.post("/fhir/cerner/Appointment/$translate", content=corpus(VIDEO_VISIT),
                           headers={**auth(), "Authorization": f"bearer {KEYS['cerner']}"})
    assert r.status_code == 200
    assert_outcome(await gateway.post("/fhir/cerner/Appointment/$translate", content=corpus(VIDEO_VISIT),
                                      headers={**auth(), "Authorization": f"Basic {KEYS['cerner']}"}), 401)


async def test_redis_down_fails_closed(prefix, sandbox):
    """No idempotency record, no booking: 503 with Retry-After, and Salesforce never called."""
    from tests.conftest import make_settings, serve_gateway

    settings = make_settings("redis://127.0.0.1:9/0", prefix, sandbox.url)  # nothing listens there
    async with serve_gateway(settings) as client:
        r = await client.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth())
        body = assert_outcome(r, 503, "transient")
        assert int(r.headers["retry-after"]) > 0 and "nothing was sent" in body["issue"][0]["details"]["text"]
        assert (await client.get("/health/ready")).status_code == 503
        # the admin API too: its sessions, log and audit are in Redis
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        for call in (client.get("/admin/api/requests", headers=admin), client.get("/admin/api/session", headers={"Cookie": "ehrgw_admin=x"}),
                     client.post("/admin/api/session", json={"key": ADMIN_KEY})):
            assert_outcome(await call, 503, "transient")
    assert sandbox.app.state.sandbox.counters().book_calls == 0


async def test_deeply_nested_json_is_a_400_not_a_crash(gateway):
    """msgspec stops at its depth limit with RecursionError: every decoder of untrusted JSON turns
    that into a 400 (found past the fuzzing's 40 levels)."""
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in ("/fhir/cerner/Appointment", "/fhir/epic/Appointment/$book", "/fhir/fhir/Appointment/$translate"):
        source = path.split("/")[2]
        body = b'{"resourceType":"Appointment","participant":' + deep + b"}"
        r = await gateway.post(path, content=body, headers=auth(source))
        assert r.status_code == 400, (path, r.status_code)
        assert r.json()["resourceType"] == "OperationOutcome" and "too deeply" in r.text
    signin = await gateway.post("/admin/api/session", content=b'{"key":' + deep + b"}",
                                headers={"Content-Type": "application/json"})
    assert signin.status_code == 400
    token = await gateway.post("/auth/token", data={"grant_type": "client_credentials", "client_assertion": "x"})
    assert token.status_code < 500
