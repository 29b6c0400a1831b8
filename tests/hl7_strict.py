"""HL7 v2 acknowledgements read as a strict interface engine reads them: hl7apy (which the gateway's
code never imports) parses at STRICT validation for the version the ACK names in MSH-12, finds the
segment groups, and validates the whole message (segment order, cardinality, field and component
counts, data types, tables it knows).

`parse_ack(raw)` raises on any problem and returns the hl7apy message; `fields(message)` gives what
the tests compare as plain strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import get_message_info, parse_segments

MLLP_START, MLLP_END = b"\x0b", b"\x1c\r"


def parse_ack(raw: bytes):  # noqa: ANN201 - hl7apy's Message
    """`raw`: one ACK, with or without its MLLP frame."""
    if raw.startswith(MLLP_START):
        assert raw.endswith(MLLP_END), "an MLLP frame ends with FS CR"
        raw = raw[1:-2]
    text = raw.decode("ascii")  # the ACK is ASCII: nothing of the message's text is echoed
    assert "\n" not in text, "segments are separated by CR only"
    assert text.endswith("\r"), "the last segment ends with CR"
    segments = text[:-1].split("\r")
    assert all(re.fullmatch(r"[A-Z][A-Z0-9]{2}", s[:3]) and (len(s) == 3 or s[3] == text[3]) for s in segments), \
        f"every segment starts with its id: {[s[:8] for s in segments]}"
    body = text[:-1]
    encoding, structure, version = get_message_info(body)
    msh9 = body.split("\r", 1)[0].split(body[3])[8].split(encoding["COMPONENT"])
    assert msh9[0] == "ACK", f"MSH-9 is {msh9[0]!r}, not ACK"
    if version in ("2.1", "2.2", "2.3"):
        # MSH-9 has no message structure component before 2.3.1, and hl7apy then looks for an
        # `ACK_<trigger>` structure no version defines: the general acknowledgement is `ACK`
        assert len(msh9) <= 2, "MSH-9 has no third component before v2.3.1"
        structure = "ACK"
    else:
        assert structure == "ACK", f"MSH-9.3 (message structure) is {structure!r}, not ACK"
    message = Message(structure, version=version, validation_level=VALIDATION_LEVEL.STRICT,
                      encoding_chars=encoding)
    message.children = parse_segments(body, message.version, encoding, VALIDATION_LEVEL.STRICT,
                                      message.reference, True)
    message.validate()
    found = [child.name for child in message.children]
    assert found == [s[:3] for s in segments], f"segments outside the ACK's structure: {found}"
    return message


# HL7 tables the ERR segment's codes come from (v2.5 chapter 2; hl7apy does not check table values)
TABLE_0357 = frozenset({"0", "100", "101", "102", "103", "200", "201", "202", "203", "204", "205", "206", "207"})
TABLE_0516 = frozenset({"W", "I", "E", "F"})  # ERR-4 severity: warning, information, error, fatal


@dataclass(frozen=True)
class Ack:
    version: str
    message_type: str  # MSH-9 as sent, components joined by the sender's separator
    time: str  # MSH-7
    code: str  # MSA-1
    control_id: str  # MSA-2
    text: str  # MSA-3 (empty when absent)
    err: tuple[str, ...]  # each ERR segment as sent


def read(raw: bytes) -> Ack:
    """The strictly parsed ACK's fields the tests compare."""
    message = parse_ack(raw)
    msh, msa = message.msh, message.msa
    text = msa.msa_3.value if msa.msa_3 and msa.msa_3.value else ""
    errs = tuple(seg.to_er7() for seg in message.children if seg.name == "ERR")
    if message.version not in ("2.1", "2.2", "2.3", "2.3.1", "2.4"):  # ERR-3 and ERR-4 exist from v2.5
        for seg in (s for s in message.children if s.name == "ERR"):
            assert seg.err_3.cwe_1.value in TABLE_0357, f"ERR-3 {seg.err_3.to_er7()!r} is not from table 0357"
            assert seg.err_3.cwe_3.value == "HL70357", "ERR-3's coding system is HL70357"
            assert seg.err_4.value in TABLE_0516, f"ERR-4 {seg.err_4.to_er7()!r} is not from table 0516"
    return Ack(version=msh.msh_12.to_er7(), message_type=msh.msh_9.to_er7(), time=msh.msh_7.to_er7(),
               code=msa.msa_1.value, control_id=msa.msa_2.value, text=text, err=errs)
