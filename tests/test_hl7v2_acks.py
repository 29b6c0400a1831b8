"""Every kind of ACK the gateway answers an SIU with, sent over real MLLP to a gateway built by the
fixtures, and read as a strict interface engine reads it (`tests/hl7_strict.py`: hl7apy at STRICT,
tables 0357 and 0516), in each version the corpus has (2.2 athenaNet, 2.3 Corepoint) and in 2.5.

AA: booked, rescheduled, cancelled. AE: sending the same message again cannot succeed (unreadable,
not an SIU S12-S15, no MSH-10, an unmapped code, a broken rule, Salesforce's refusal, an unknown
appointment, ids used for another one). AR: it can (Redis or Salesforce unavailable, Salesforce's
request limit, the circuit open, the appointment in flight), and the tests send it again to see it
pass where the cause can be lifted. No ACK quotes the message beyond MSH-10 and MSH-3 to 6.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import redis

from adapters.hl7v2 import normalise
from tests.conftest import CORPUS, free_port, make_settings
from tests.hl7_strict import Ack, read
from tests.test_hl7v2 import exchange as mllp_exchange

ATHENA = CORPUS / "hl7v2" / "athena-siu-s12-403.hl7"  # v2.2, LF separators, no start block
COREPOINT = CORPUS / "hl7v2" / "corepoint-siu-s14-example.hl7"  # v2.3, LF separators
VERSIONS = ("2.2", "2.3", "2.5")
# what the corpus messages carry that an ACK must never repeat: patient name, ids, phone, codes
PATIENT_DATA = ("THOMPSON", "00432", "5297 Monatiquot", "SMITH", "489671", "(832)795-8259", "HLCK", "office visit")


def siu(version: str, event: str = "S12", *, key: str, **fields: str | None) -> bytes:
    """A corpus SIU in `version` (2.2 and 2.5 from athenaNet's S12, 2.3 from Corepoint's), as `event`,
    with MSH-10 and the placer and filler ids made from `key`; `fields` set (a string) or drop (None)
    fields by name, e.g. `SCH_11="^^^200403221320"`, or a whole segment (`SCH=None`)."""
    text = normalise((COREPOINT if version == "2.3" else ATHENA).read_bytes())
    out = []
    for segment in text.split("\r"):
        parts = segment.split("|")
        name = parts[0]
        if name == "MSH":
            parts[8], parts[9], parts[11] = f"SIU^{event}", f"c-{key}", version  # parts[n] is MSH-(n+1)
        if name == "SCH":
            parts[1], parts[2] = f"p-{key}", f"f-{key}"
        for spec, value in fields.items():
            seg, _, number = spec.partition("_")
            if seg != name:
                continue
            if not number:
                parts = []
                break
            index = int(number) - (1 if name == "MSH" else 0)
            parts += [""] * (index + 1 - len(parts))
            parts[index] = value or ""
        if parts:
            out.append("|".join(parts))
    return "\r".join(out).encode()


def trigger_of(message: bytes) -> str:
    msh = normalise(message).split("\r", 1)[0].split("|")
    return msh[8].split("^")[1] if "^" in msh[8] else ""


async def exchange(port: int, *messages: bytes) -> list[bytes]:
    """Each message framed, its ACK read (frame included: the strict reader checks it), in order."""
    return await mllp_exchange(port, *messages, framed=True)


@dataclass(frozen=True)
class Err:
    location: str  # "SCH-8", "MSH-9.2", "SCH", "" when the ERR names no place
    code: str  # HL7 table 0357
    severity: str  # table 0516 (v2.5 on; "" before)


def errors(ack: Ack) -> list[Err]:
    """The ERR segments in one shape whatever the version: ERR-2/3/4 from 2.5, ERR-1 (ELD) before."""
    found = []
    for segment in ack.err:
        fields = segment.split("|")
        if ack.version in ("2.2", "2.3"):
            for eld in fields[1].split("~"):
                seg, _, field, code = (eld.split("^") + ["", "", "", ""])[:4]
                found.append(Err(seg + (f"-{field}" if field else ""), code.split("&")[0], ""))
        else:
            erl = fields[2].split("^") + ["", "", "", "", ""]
            where = erl[0] + (f"-{erl[2]}" if erl[2] else "") + (f".{erl[4]}" if erl[4] else "")
            found.append(Err(where, fields[3].split("^")[0], fields[4]))
    return found


def check(raw: bytes, *, version: str, code: str, control: str, trigger: str,
          error: tuple[str, str] | None = None) -> Ack:
    """The ACK parses strictly in `version`, answers `control` with `code`, and for an error names
    `error` (location, HL7 code) first, with MSA-3 (at most 80 characters) saying why."""
    ack = read(raw)
    assert (ack.version, ack.code, ack.control_id) == (version, code, control)
    structure = version not in ("2.2", "2.3")  # MSH-9.3 exists from 2.3.1
    assert ack.message_type == (f"ACK^{trigger}^ACK" if structure else f"ACK^{trigger}" if trigger else "ACK")
    assert re.fullmatch(r"\d{14}\+0000", ack.time), ack.time  # MSH-7 carries its offset
    text = raw.decode("ascii")
    assert not any(value in text for value in PATIENT_DATA) and "$." not in text and ".json" not in text
    if error is None:
        assert not ack.err and not ack.text
        return ack
    assert 0 < len(ack.text) <= 80, ack.text
    first = errors(ack)[0]
    where = error[0] if structure else error[0].split(".")[0]  # ELD (before 2.5) names no component
    assert (first.location, first.code) == (where, error[1]), errors(ack)
    assert first.severity == ("" if version in ("2.2", "2.3") else "F" if code == "AR" else "E")
    return ack


def sandbox_state(sandbox):
    return sandbox.app.state.sandbox


@asynccontextmanager
async def gateway_app(settings) -> AsyncIterator[tuple[object, int]]:
    """A gateway served on real ports: the app (its state: the breaker) and the athena MLLP port."""
    from gateway.app import create_app
    from gateway.edges.server import ThreadedServer, gateway_server_options

    app = create_app(settings)
    with ThreadedServer(app, **gateway_server_options(settings.file, settings.config_dir)):
        yield app, app.state.mllp_ports["athena"]


@pytest.fixture
async def mllp(settings) -> AsyncIterator[int]:
    async with gateway_app(settings) as (_, port):
        yield port


# --- AA -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
async def test_book_reschedule_and_cancel_are_aa(mllp, sandbox, version):
    book = siu(version, key=f"aa{version}")
    moved = siu(version, "S13", key=f"aa{version}", SCH_11="^^^200403231000")
    cancelled = siu(version, "S15", key=f"aa{version}", SCH_6="pat^patient request")
    acks = await exchange(mllp, book, moved, cancelled)
    for raw, message in zip(acks, (book, moved, cancelled)):
        check(raw, version=version, code="AA", control=f"c-aa{version}", trigger=trigger_of(message))
    (stored,) = sandbox_state(sandbox).appointments()
    assert stored.status == "Cancelled"


def test_the_athena_routing_fields_are_answered_back_escaped_for_v22():
    """In v2.2 MSH-3 to 6 are ST: athenaNet's MSH-4 `235^TESTPRACTIVE` comes back as one value, its
    component separator escaped (a strict v2.2 reader refuses a component there); from 2.3 (HD) the
    components are answered as they came."""
    from adapters.hl7v2 import ack, read_header

    for version, msh6 in (("2.2", "235\\S\\TESTPRACTIVE"), ("2.5", "235^TESTPRACTIVE")):
        raw = ack(read_header(siu(version, key="routing")), "AA")
        assert read(raw).version == version
        msh = raw.decode("ascii").split("\r", 1)[0].split("|")  # msh[n] is MSH-(n+1)
        assert msh[2:6] == ["ATHENA", "", "ATHENANET", msh6]  # the sender's MSH-5/6 and MSH-3/4, swapped


# --- AE -------------------------------------------------------------------------------------------

def _unknown_appointment(version: str, key: str) -> list[bytes]:
    return [siu(version, "S13", key=key, SCH_11="^^^200403231000")]


def _ids_reused(version: str, key: str) -> list[bytes]:
    first = siu(version, key=key)
    again = siu(version, key=key, SCH_11="^^^200403231000")  # the same SCH-1/SCH-2, another booking
    return [first, again.replace(f"c-{key}".encode(), f"c-{key}b".encode(), 1)]


# name -> (the messages sent, the last one answered AE; the ERR expected: location, HL7 error code)
AE_CASES: dict[str, tuple[Callable[[str, str], list[bytes]], tuple[str, str]]] = {
    "not an SIU": (lambda v, k: [siu(v, "A01", key=k, MSH_9="ADT^A01")], ("MSH-9", "200")),
    "an SIU event not taken": (lambda v, k: [siu(v, "S16", key=k)], ("MSH-9.2", "201")),
    "no SCH": (lambda v, k: [siu(v, key=k, SCH=None)], ("SCH", "100")),
    "no SCH-1 or SCH-2": (lambda v, k: [siu(v, key=k, SCH_1="", SCH_2="")], ("SCH-1", "101")),
    "an unreadable SCH-11": (lambda v, k: [siu(v, key=k, SCH_11="^^^2004xx")], ("SCH-11", "102")),
    "an SCH-11 offset out of range": (lambda v, k: [siu(v, key=k, SCH_11="^^^200403221320+9999")], ("SCH-11", "102")),
    "a duration past year 9999": (lambda v, k: [siu(v, key=k, SCH_9="1e12", SCH_11="^^^200403221320")],
                                  ("SCH-9", "102")),
    "an unmapped code": (lambda v, k: [siu(v, key=k, SCH_8="zz^unknown")], ("SCH-8", "103")),
    "the end before the start": (lambda v, k: [siu(v, key=k, SCH_11="^^^200403221320^200403221300")],
                                 ("SCH-11", "207")),
    "an S13 for an appointment never booked": (_unknown_appointment, ("SCH", "204")),
    "ids used for another booking": (_ids_reused, ("SCH", "205")),
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", list(AE_CASES))
async def test_what_cannot_pass_as_sent_is_ae(mllp, sandbox, version, case):
    make, error = AE_CASES[case]
    key = f"ae-{version}-{list(AE_CASES).index(case)}"
    messages = make(version, key)
    booked_before = len(messages) - 1  # the cases that book first, then send what is refused
    acks = await exchange(mllp, *messages)
    control = normalise(messages[-1]).split("\r", 1)[0].split("|")[9]
    check(acks[-1], version=version, code="AE", control=control, trigger=trigger_of(messages[-1]), error=error)
    assert len(sandbox_state(sandbox).appointments()) == booked_before
    if case == "an unmapped code":
        assert b"zz" not in acks[-1]  # the code itself is not quoted back


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_message_without_msh10_is_ae_and_not_booked(mllp, sandbox, version):
    (raw,) = await exchange(mllp, siu(version, key=f"noid{version}", MSH_10=""))
    check(raw, version=version, code="AE", control='""', trigger="S12", error=("MSH-10", "101"))
    assert sandbox_state(sandbox).appointments() == []


@pytest.mark.parametrize("version", VERSIONS)
async def test_salesforce_refusal_is_ae_and_so_is_its_replay(mllp, sandbox, version):
    sandbox_state(sandbox).faults.set(book_answer=1, book_answer_status=400, book_answer_body="salesforce",
                                      book_answer_before_store=True)
    message = siu(version, key=f"refused{version}")
    first, again = await exchange(mllp, message, message)
    for raw in (first, again):  # the replay is the stored refusal, said the same way
        check(raw, version=version, code="AE", control=f"c-refused{version}", trigger="S12", error=("", "207"))
    assert sandbox_state(sandbox).appointments() == []


@pytest.mark.parametrize("message", [b"", b"this is not HL7"], ids=["empty", "no MSH"])
async def test_a_block_with_no_header_is_ae_in_v25(mllp, message):
    (raw,) = await exchange(mllp, message)
    check(raw, version="2.5", code="AE", control='""', trigger="", error=("MSH", "100"))


async def test_a_message_over_the_size_cap_is_ae_in_its_version(mllp):
    for version in VERSIONS:
        message = siu(version, key=f"big{version}") + b"\rNTE|1||" + b"x" * 300_000
        (raw,) = await exchange(mllp, message)
        check(raw, version=version, code="AE", control=f"c-big{version}", trigger="S12", error=("MSH", "207"))


# --- AR -------------------------------------------------------------------------------------------

async def _ar(port: int, key: str, *, error: tuple[str, str] = ("", "207"),
              lift: Callable[[], Awaitable[None]] | None = None) -> None:
    """Each version's S12 is answered AR; once `lift` has removed the cause, the same messages pass."""
    messages = [siu(version, key=f"{key}{version}") for version in VERSIONS]
    for version, raw in zip(VERSIONS, await exchange(port, *messages)):
        check(raw, version=version, code="AR", control=f"c-{key}{version}", trigger="S12", error=error)
    if lift is not None:
        await lift()
        for version, raw in zip(VERSIONS, await exchange(port, *messages)):
            check(raw, version=version, code="AA", control=f"c-{key}{version}", trigger="S12")


async def test_redis_unavailable_is_ar(prefix, sandbox):
    settings = make_settings(f"redis://127.0.0.1:{free_port()}", prefix, sandbox.url)  # nothing listens there
    async with gateway_app(settings) as (_, port):
        await _ar(port, "noredis")
    assert sandbox_state(sandbox).counters().book_calls == 0


async def test_salesforce_unreachable_is_ar(redis_url, prefix):
    settings = make_settings(redis_url, prefix, "http://127.0.0.1:9")  # the discard port: refused
    async with gateway_app(settings) as (_, port):
        await _ar(port, "nosf")


async def test_salesforce_request_limit_is_ar_and_passes_when_sent_again(mllp, sandbox):
    faults = sandbox_state(sandbox).faults
    faults.set(request_limit_exceeded=len(VERSIONS))  # Salesforce's 429, for each version's S12

    async def lift() -> None:
        assert faults.snapshot().request_limit_exceeded == 0  # each was answered by the limit

    await _ar(mllp, "limit", lift=lift)
    assert len(sandbox_state(sandbox).appointments()) == len(VERSIONS)


async def test_the_circuit_open_is_ar_and_passes_once_closed(settings, sandbox, redis_url):
    client = redis.Redis.from_url(redis_url)
    async with gateway_app(settings) as (app, port):
        breaker = app.state.breaker
        client.set(breaker.keys["state"], "1", px=120_000)  # opened, as by another worker's failures
        client.set(breaker.keys["tripped"], "1", px=240_000)
        await _until(lambda: breaker.state == "open")

        async def close() -> None:
            assert sandbox_state(sandbox).counters().book_calls == 0  # refused before any call
            client.delete(breaker.keys["state"], breaker.keys["tripped"])
            await _until(lambda: breaker.state == "closed")

        await _ar(port, "circuit", lift=close)
    client.close()


async def test_the_same_appointment_in_flight_is_ar(settings, sandbox, redis_url, prefix):
    """While one connection's S12 waits on a slow Salesforce, the same S12 on another connection is
    AR (206, record locked); the first is then AA, and so is the second sent again (a replay)."""
    client = redis.Redis.from_url(redis_url)

    def records() -> int:
        return sum(1 for _ in client.scan_iter(match=f"{prefix}:idem:*"))

    sandbox_state(sandbox).faults.set(latency_ms=5000)
    async with gateway_app(settings) as (_, port):
        for version in VERSIONS:
            message, before = siu(version, key=f"inflight{version}"), records()
            first = asyncio.create_task(exchange(port, message))
            await _until(lambda: records() > before)  # its record is claimed: Salesforce is being called
            (second,) = await exchange(port, message)
            check(second, version=version, code="AR", control=f"c-inflight{version}", trigger="S12",
                  error=("", "206"))
            (answer,) = await first
            (again,) = await exchange(port, message)
            for raw in (answer, again):
                check(raw, version=version, code="AA", control=f"c-inflight{version}", trigger="S12")
    client.close()
    assert len(sandbox_state(sandbox).appointments()) == len(VERSIONS)


async def _until(condition: Callable[[], object], timeout: float = 30.0) -> None:
    """Polls `condition` (a generous bound: the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
