"""HL7 v2 SIU over MLLP, end to end: the corpus's messages sent to the gateway's MLLP listener over a
real socket, booked, rescheduled and cancelled in the Health Cloud sandbox over real HTTP, each
answered with its ACK."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import hl7
import httpx
import pytest

from adapters.hl7v2 import normalise, parse_siu
from gateway.errors import InvalidRequest
from tests.conftest import CORPUS
from tests.hl7_strict import read

ATHENA = CORPUS / "hl7v2" / "athena-siu-s12-403.hl7"
COREPOINT = CORPUS / "hl7v2" / "corepoint-siu-s14-example.hl7"


def state(sandbox):
    return sandbox.app.state.sandbox


async def exchange(mllp_port: int, *messages: bytes, start_block: bool = True, framed: bool = False) -> list:
    """Send each message framed (with or without the start byte) and read its ACK, in order: the
    ACK's text, or with `framed` its whole block as it came (the strict reader checks the frame)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port)
    acks: list = []
    try:
        for message in messages:
            message = message.removesuffix(b"\x1c\r")  # a corpus file's own end block: framed once
            writer.write((b"\x0b" if start_block else b"") + message + b"\x1c\r")
            await writer.drain()
            block = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 60)  # a loaded machine is slow
            assert block.startswith(b"\x0b")
            acks.append(block if framed else block[1:-2].decode())
    finally:
        writer.close()
    return acks


def msa(ack: str) -> list[str]:
    """The ACK's MSA fields by index (MSA-1 is [1], MSA-3 the text), read as a strict interface engine
    reads it (tests/hl7_strict.py: hl7apy at STRICT for the ACK's version); an error says why in MSA-3
    and ERR, an AA has neither."""
    answer = read(ack.encode("ascii"))
    assert bool(answer.text) == bool(answer.err) == (answer.code != "AA"), answer
    return ["MSA", answer.code, answer.control_id, answer.text]


@asynccontextmanager
async def mllp_gateway(settings):
    """The gateway on real ports: its athena listener's MLLP port, and an HTTP client for the rest."""
    from gateway.app import create_app
    from gateway.edges.server import ThreadedServer, gateway_server_options

    app = create_app(settings)
    with ThreadedServer(app, **gateway_server_options(settings.file, settings.config_dir)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            yield app.state.mllp_ports["athena"], client


@pytest.fixture
async def mllp(settings):
    """The athena listener's port (the gateway's HTTP side unused here)."""
    async with mllp_gateway(settings) as (port, _):
        yield port


def with_event(raw: bytes, event: str, *, control: str, timing: str | None = None, reason: str | None = None) -> bytes:
    """The corpus message as another SIU event, with its own control id (and new times, or a reason)."""
    segments = normalise(raw).split("\r")
    out = []
    for seg in segments:
        fields = seg.split("|")
        if fields[0] == "MSH":
            fields[8], fields[9] = f"SIU^{event}", control
        if fields[0] == "SCH":
            if timing:
                fields[11] = f"^^^{timing}"
            if reason:
                fields[6] = reason
        out.append("|".join(fields))
    return "\r".join(out).encode()


async def test_an_athena_s12_without_a_start_block_books_and_acks(mllp, sandbox):
    raw = ATHENA.read_bytes()
    assert not raw.startswith(b"\x0b")  # as the corpus has it: end block, no start block
    (ack,) = await exchange(mllp, raw, start_block=False)
    assert msa(ack)[1:3] == ["AA", "403"]  # MSA-2 echoes MSH-10
    (stored,) = state(sandbox).appointments()
    sent = stored.request
    assert sent["startDate"] == "2004-03-22T13:20:00-05:00" and sent["endDate"] == "2004-03-22T13:30:00-05:00"
    seeded = state(sandbox).org.seeded["athena"]  # the org's records of PID-3 00432, AIG-3 kmurphy2, AIL-3 2
    place = seeded["facilities"]["2"].account
    assert {p["reference"] for p in sent["participants"]} == {
        f"Patient/{seeded['patients']['00432'].account}", f"Facility/{place}",
        f"Practitioner/{seeded['practitioners']['kmurphy2'].practitioner_facilities[place]}"}
    assert sent["workTypeId"] == "08qxx0000000001AAA" and sent["appointmentTypes"] == ["ROUTINE"]
    assert sent["sourceSystem"] == "athena"
    # the same message again (a sender's retry): acknowledged, not booked twice
    (again,) = await exchange(mllp, raw)
    assert msa(again)[1] == "AA" and len(state(sandbox).appointments()) == 1


async def test_s13_reschedules_and_s15_cancels_the_same_appointment(mllp, sandbox):
    raw = ATHENA.read_bytes()
    moved = with_event(raw, "S13", control="404", timing="200403231000")
    cancelled = with_event(raw, "S15", control="405", reason="pat^patient request")
    acks = await exchange(mllp, raw, moved, cancelled)
    assert [msa(a)[1:3] for a in acks] == [["AA", "403"], ["AA", "404"], ["AA", "405"]]
    (stored,) = state(sandbox).appointments()
    assert stored.status == "Cancelled" and stored.cancellation_reason == "pat"  # SCH-6, passed through
    assert stored.request["startDate"] == "2004-03-23T10:00:00-05:00"  # the S13's new time
    counters = state(sandbox).counters()
    assert (counters.update_calls, counters.cancel_calls) == (1, 1)


async def test_an_lf_separated_s14_for_an_unknown_appointment_is_ae(mllp, sandbox):
    raw = COREPOINT.read_bytes()
    assert b"\r" not in raw.rstrip(b"\r\n")  # LF separators, as the corpus has it
    (ack,) = await exchange(mllp, raw)
    fields = msa(ack)
    assert fields[1:3] == ["AE", "20080306953450"] and "ERR|" in ack
    assert state(sandbox).appointments() == []


async def test_unreadable_messages_are_ae_and_the_connection_goes_on(mllp, sandbox):
    """AE, not AR: sending the same message again cannot succeed."""
    not_siu = b"MSH|^~\\&|A|B|C|D|200401010000||ADT^A01|77|P|2.3\rPID|||1\r"
    garbage = b"this is not HL7"
    acks = await exchange(mllp, not_siu, garbage, ATHENA.read_bytes())
    assert msa(acks[0])[1:3] == ["AE", "77"] and "\rERR|MSH^1^9^200&" in acks[0]  # 200: unsupported message type
    assert msa(acks[1])[1:3] == ["AE", '""']  # no MSH: no control id to echo (HL7's null)
    assert msa(acks[2])[1:3] == ["AA", "403"]  # the same connection still books


async def test_a_message_without_msh10_is_ae_and_not_booked(mllp, sandbox):
    fields = normalise(ATHENA.read_bytes()).split("|")
    fields[9] = ""  # MSH-10 (fields[0] is MSH, fields[1] MSH-2)
    (ack,) = await exchange(mllp, "|".join(fields).encode())
    assert msa(ack)[1:3] == ["AE", '""'] and "\rERR|MSH^1^10^101&" in ack  # 101: required field missing
    assert state(sandbox).appointments() == []


async def test_an_error_ack_parses_strictly_and_echoes_the_header(mllp, sandbox):
    """MSA-3 is inside MSA (not a stray segment after its terminator); the ACK answers the sender's
    MSH-3/4 in its MSH-5/6 (v2.2's are ST: a component separator in them is escaped) and keeps the
    trigger, processing id and version (v2.2's MSH-9 has no third component)."""
    raw = normalise(ATHENA.read_bytes()).replace("ov^office visit", "zz^unknown").encode()
    (ack,) = await exchange(mllp, raw)
    assert msa(ack)[1:3] == ["AE", "403"] and msa(ack)[3]
    msh = hl7.parse(ack).segment("MSH")
    assert [str(msh[n]) for n in (3, 5, 6, 9, 11, 12)] == [
        "ATHENA", "ATHENANET", "235\\S\\TESTPRACTIVE", "ACK^S12", "T", "2.2"]
    assert str(hl7.parse(ack).segment("ERR")[1]).startswith("SCH^1^8^103&")


async def test_an_unmapped_appointment_type_is_ae_naming_the_field(mllp, sandbox):
    raw = normalise(ATHENA.read_bytes()).replace("ov^office visit", "zz^unknown").encode()
    (ack,) = await exchange(mllp, raw)
    assert msa(ack)[1] == "AE" and "ERR|SCH^1^8^103&" in ack
    assert state(sandbox).appointments() == []


def test_the_corpus_messages_parse():
    for path in sorted((CORPUS / "hl7v2").glob("*.hl7")):
        siu = parse_siu(path.read_bytes(), "America/New_York")
        assert siu.booking.start is not None and siu.booking.end is not None, path.name
        assert any(p.kind == "Patient" for p in siu.booking.participants), path.name
        assert siu.placer or siu.filler


async def test_the_corepoint_s14_modifies_what_its_s12_booked(mllp, sandbox):
    """The corpus's S14 (v2.3, LF separators, a NTE comment) after the S12 that booked it."""
    raw = COREPOINT.read_bytes()
    booked, modified = await exchange(mllp, with_event(raw, "S12", control="cp-1"), raw)
    assert msa(booked)[1:3] == ["AA", "cp-1"] and msa(modified)[1:3] == ["AA", "20080306953450"]
    (stored,) = state(sandbox).appointments()
    assert stored.status == "Scheduled" and state(sandbox).counters().update_calls == 1
    assert stored.request["comment"] == "1MONTH HLCK" and stored.request["appointmentTypes"] == ["CHECKUP"]


def test_an_hl7v2_source_without_time_zone_is_refused_at_start(tmp_path):
    """v2 times rarely carry an offset: an hl7v2 source must name the zone they are in. The shipped
    configuration has it (and loads)."""
    import shutil

    from gateway.settings import ConfigError, load_file_settings
    from tests.conftest import CONFIG

    assert load_file_settings(CONFIG).sources["athena"].time_zone == "America/New_York"
    config = tmp_path / "config"
    shutil.copytree(CONFIG, config)
    toml = (config / "gateway.toml").read_text()
    athena = toml.index("[sources.athena]")
    without = toml[:athena] + toml[athena:].replace('time_zone = "America/New_York"\n', "", 1)
    assert without != toml
    (config / "gateway.toml").write_text(without)
    with pytest.raises(ConfigError, match=r"\$\.sources\.athena\.time_zone: required with adapter 'hl7v2'"):
        load_file_settings(config)


@pytest.mark.parametrize(("fields", "where"), [
    ({11: "^^^200403221320+9999"}, "SCH-11"),  # an offset past 24 hours
    ({9: "1e12", 11: "^^^200403221320"}, "SCH-9"),  # an end past year 9999
    ({9: "nan", 11: "^^^200403221320"}, "SCH-9"),
    ({9: "10", 11: "^^^999912312359"}, "SCH-9"),
])
def test_an_unreadable_time_or_duration_is_refused_as_sent(fields, where):
    """Refused as the message's fault (InvalidRequest: AE), naming the field; these raised
    OverflowError or ValueError, which the MLLP path answered AR: the sender would resend for ever."""
    segments = normalise(ATHENA.read_bytes()).split("\r")
    sch = next(i for i, s in enumerate(segments) if s.startswith("SCH|"))
    parts = segments[sch].split("|")
    for n, value in fields.items():
        parts[n] = value
    segments[sch] = "|".join(parts)
    with pytest.raises(InvalidRequest) as refused:
        parse_siu("\r".join(segments).encode(), "America/New_York")
    assert refused.value.issues[0].expression == (where,) and refused.value.issues[0].code == "value"
