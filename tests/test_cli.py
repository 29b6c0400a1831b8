"""The command line as a newcomer meets it: `serve --help` says what each option does and its default,
`healthcloud cancel --help` says which reason it sends, `requests` piped to another program prints
one JSON object a line, not a table drawn for a terminal, and `mllp-send` sends a corpus SIU and prints
the ACK."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import VIDEO_VISIT, auth, corpus, make_settings, serve_gateway, warm
from tests.test_exactly_once import config_dir

EXE = Path(sys.executable).with_name("ehr-gateway")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_serve_help_describes_each_option_with_its_default():
    shown = _run("serve", "--help")
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "Health Cloud sandbox" in text  # what serve does with nothing configured
    for option, default in (("--host", "127.0.0.1"), ("--port", "8000"), ("--workers", "1")):
        assert option in text and f"(default: {default})" in text, option
    assert "the config directory" in text


def test_healthcloud_cancel_help_says_the_reason_it_sends():
    shown = _run("healthcloud", "cancel", "--help")
    assert shown.returncode == 0 and "pat-mv" in shown.stdout and "cancelationReason" in shown.stdout


async def test_requests_piped_prints_one_json_object_a_line(redis_url, prefix, sandbox, tmp_path):
    config = config_dir(tmp_path, prefix)
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=config)
    async with serve_gateway(settings) as gw:
        await warm(gw)
        booked = await gw.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT),
                               headers=auth(**{"Idempotency-Key": "cli-1"}))
        assert booked.status_code == 201
        request_id = booked.headers["x-request-id"]
        for _ in range(100):  # the request log is written a moment after the answer
            shown = await asyncio.to_thread(_run, "requests", "--config", str(config), env={"REDIS_URL": redis_url})
            lines = [json.loads(line) for line in shown.stdout.splitlines()]
            if any(e["id"] == request_id for e in lines):
                break
            await asyncio.sleep(0.1)
    assert shown.returncode == 0 and "┃" not in shown.stdout and "│" not in shown.stdout  # no table drawing
    entry = next(e for e in lines if e["id"] == request_id)
    assert (entry["outcome"], entry["source"], entry["sf_id"]) == ("booked", "cerner", booked.json()["id"])
    assert "patient" not in entry  # what the table shows: no patient data


async def test_mllp_send_sends_a_corpus_siu_and_prints_the_ack(redis_url, prefix, sandbox):
    from tests.hl7_strict import read
    from tests.test_hl7v2 import mllp_gateway

    siu = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "hl7v2" / "athena-siu-s12-403.hl7"
    settings = make_settings(redis_url, prefix, sandbox.url)
    async with mllp_gateway(settings) as (port, _):
        sent = await asyncio.to_thread(_run, "mllp-send", str(siu), "--port", str(port))
        stopped = await asyncio.to_thread(_run, "mllp-send", str(siu), "--port", str(free_port_closed()))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    ack = read((sent.stdout.strip().replace("\n", "\r") + "\r").encode("ascii"))  # parsed strictly, as an engine would
    assert ack.code == "AA"
    assert stopped.returncode != 0 and "nothing was sent" in stopped.stderr


def free_port_closed() -> int:
    """A port nothing listens on."""
    from tests.conftest import free_port
    return free_port()
