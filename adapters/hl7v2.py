"""HL7 v2 SIU scheduling messages -> the canonical booking (python-hl7 parses; this reads the fields).

What is read (v2.2 to v2.5): MSH-9 the event (S12 book, S13 reschedule, S14 modify, S15 cancel),
MSH-10 the control id the ACK echoes; SCH-1 / SCH-2 the placer / filler appointment ids (kept as
identifiers `urn:ehr-gateway:hl7v2:placer|<id>` and `…:filler|<id>`: the idempotency key and the link
a later S13-S15 finds the appointment by); SCH-6 the event reason (a cancellation's reason); SCH-8
the appointment type; SCH-9/10 the duration; SCH-11 the timing (component 4 start, 5 end); PID-3
(else PID-2) the patient, by its assigning authority (CX.4) when it has one, and PID-5/7/8/13 what
creating the patient would need; AIS-3 the service; AIG-3 / AIP-3 the resources (Practitioner; AIP-3's
XCN.9 its assigning authority); AIL-3 the location (Facility); NTE-3 a comment. Times without an offset are the source's `time_zone`.

A coded field maps through the group whose `source` is the coding system it names (CE/CWE component
3); without one, through `urn:ehr-gateway:hl7v2:<segment>-<field>`, e.g. `urn:ehr-gateway:hl7v2:AIS-3`.
Problems name the field (`SCH-11`, `AIS-3`), as an ACK's error can, never a value from the message.

MLLP has no authentication, and python-hl7's parse costs about 10 µs a separator (a 1 MB message of
`|` took 9 s), so the counts of segment and field separators are checked in the bytes first
(`[mllp] max_segments`, `max_fields`), and the message is parsed once: the ACK is built from the
MSH segment read without python-hl7 (`read_header`), whatever became of the parse.

The ACK (`ack`) is python-hl7 segments in the sender's delimiters, shaped for the message's version
(MSH-12; 2.5 when unknown): MSH-9 `ACK^<trigger>` before 2.3.1 and `ACK^<trigger>^ACK` from it; MSA-3
(at most 80 characters; withdrawn in 2.7) and ERR say why. Before 2.5 ERR-1 is the only field (ELD:
segment^sequence^field^code&text&HL70357); from 2.5 each error has its own ERR with ERR-2 the
location (ERL), ERR-3 the HL7 error code (table 0357), ERR-4 the severity (table 0516: E for AE, F for
AR), ERR-5 the FHIR issue-type code, ERR-7 the request log entry and ERR-8 the text. Texts are the
gateway's own, chosen by the kind of problem and naming the field: nothing of the message is quoted
back except MSH-10 (MSA-2) and the routing fields MSH-3 to 6, escaped for the ACK's delimiters.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import hl7

from gateway.canonical import CanonicalBooking, Coding, Concept, Identifier, Instant, Participant, Person
from gateway.errors import InvalidRequest, Issue, PayloadTooLarge, cut
from gateway.settings import MllpSettings

EVENTS = {"S12": "book", "S13": "reschedule", "S14": "modify", "S15": "cancel"}
PLACER, FILLER = "urn:ehr-gateway:hl7v2:placer", "urn:ehr-gateway:hl7v2:filler"
_TS = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?([+-]\d{4})?")
_UNITS = {"MIN": 1, "MINUTES": 1, "M": 1, "H": 60, "HR": 60, "HOURS": 60, "S": 1 / 60}
_ENCODING = "^~\\&"  # MSH-2 as nearly every sender writes it
_HEADER_BYTES = 4096  # the MSH segment is looked for in the message's first bytes only
_LIMITS = MllpSettings()

# The ACK
_STANDARD_DELIMITERS = "|" + _ENCODING  # when the sender's MSH-1 and MSH-2 cannot be used
# HL7 table 0104: the versions an ACK is written in; any other MSH-12 is answered in 2.5
_VERSIONS = {v: tuple(int(n) for n in v.split(".")) for v in (
    "2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2", "2.9")}
DEFAULT_VERSION = "2.5"
# HL7 table 0357, the message error condition codes the gateway answers with
_HL7_ERRORS = {"100": "Segment sequence error", "101": "Required field missing", "102": "Data type error",
               "103": "Table value not found", "200": "Unsupported message type", "201": "Unsupported event code",
               "204": "Unknown key identifier", "205": "Duplicate key identifier",
               "206": "Application record locked", "207": "Application internal error"}
# An AE's HL7 error code and text, by the FHIR issue type of the error: the kind of problem, never
# what the message said (a code, a system, Salesforce's own words, a map file's path)
_KINDS = {
    "structure": ("100", "segment missing or unreadable"),
    "not-supported": ("200", "unsupported message type: SIU S12 to S15 are taken"),
    "required": ("101", "required field missing"),
    "value": ("102", "not a valid value of its data type"),
    "code-invalid": ("103", "code not found in the source's code maps"),
    "not-found": ("204", "no appointment with these ids was booked here"),
    "conflict": ("205", "these ids were used before for another appointment"),
    "invariant": ("207", "the start must be before the end"),
    "too-long": ("207", "longer than Salesforce accepts"),
    "too-costly": ("207", "over the gateway's caps for one message"),
    "business-rule": ("207", "breaks a Salesforce booking rule"),
    "processing": ("207", "Salesforce refused it"),
}
_EVENT = ("201", "unsupported trigger event: S12 to S15 are taken")
_OTHER = ("207", "cannot be processed")
_RETRY = ("207", "not processed now; send it again")  # every AR but one in flight
_IN_FLIGHT = ("206", "the appointment is being processed; send it again")
# where a rule's path (the canonical booking of an SIU is rooted at SCH) lies in the message
_V2_PATHS = {"SCH.start": "SCH-11", "SCH.end": "SCH-11", "SCH.appointmentType": "SCH-8", "SCH.serviceType": "AIS-3",
             "SCH.participant": "PID-3, AIL-3 or AIP-3/AIG-3",
             # what names the appointment over HTTP (a query parameter or a header) is SCH-1/SCH-2 here
             "http.identifier": "SCH", "http.Idempotency-Key": "SCH"}
_LOCATION = re.compile(r"([A-Z][A-Z0-9]{2})(?:-(\d{1,3})(?:\.(\d{1,2}))?)?(?=$|[.\[])")  # SCH, SCH-8, MSH-9.2
_TRIGGER = re.compile(r"[A-Z0-9]{3}")
_HEX = re.compile(r"X(?:[0-9A-Fa-f]{2})+")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]+")
_PROCESSING_IDS, _PROCESSING_MODES = frozenset("DPT"), frozenset("AIRT")  # HL7 tables 0103 and 0207
_MSA_TEXT = 80  # MSA-3 is ST of 80 characters (2.1 to 2.6)
_USER_MESSAGE = 250  # ERR-8 is TX of 250
_MAX_ERRORS = 10


@dataclass(frozen=True)
class Header:
    """The MSH fields an ACK needs, read without python-hl7; all empty when there is no MSH."""

    separator: str = "|"
    encoding: str = _ENCODING
    sending: tuple[str, str] = ("", "")  # MSH-3, MSH-4
    receiving: tuple[str, str] = ("", "")  # MSH-5, MSH-6
    trigger: str = ""  # MSH-9.2
    control_id: str = ""  # MSH-10
    processing_id: str = ""  # MSH-11
    version: str = ""  # MSH-12.1


@dataclass(frozen=True)
class Siu:
    event: str  # book | reschedule | modify | cancel
    control_id: str
    booking: CanonicalBooking
    placer: str | None
    filler: str | None


def normalise(raw: bytes) -> str:
    """One message's text with CR segment separators (LF and CRLF senders are common)."""
    text = raw.decode("utf-8", "replace").strip("\x0b\x1c\r\n ")
    return text.replace("\r\n", "\r").replace("\n", "\r")


def read_header(raw: bytes) -> Header:
    """The message's MSH segment, split by hand: a few KB at most, whatever the message's size."""
    # bytes that are not UTF-8 are kept (as surrogates): the ACK answers MSH-10 and MSH-3 to 6 byte for byte
    head = raw[:_HEADER_BYTES].lstrip(b"\x0b\r\n ").decode("utf-8", "surrogateescape")
    end = min((i for i in (head.find("\r"), head.find("\n")) if i >= 0), default=-1)
    segment = head[:end] if end >= 0 else head
    if not segment.startswith("MSH") or len(segment) < 4:
        return Header()
    fields = segment.split(segment[3])
    if end < 0:
        fields = fields[:-1]  # the segment runs past the bytes read: its last field may be cut
    msh = ["MSH", segment[3], *fields[1:]]  # msh[n] is MSH-n (MSH-1 is the separator itself)

    def field(n: int) -> str:
        return msh[n].strip() if len(msh) > n else ""

    encoding = field(2)
    component = encoding[:1] or "^"
    trigger = field(9).split(component)
    return Header(separator=segment[3], encoding=encoding, sending=(field(3), field(4)),
                  receiving=(field(5), field(6)), trigger=trigger[1] if len(trigger) > 1 else "",
                  control_id=field(10), processing_id=field(11), version=field(12).split(component)[0])


def check_counts(raw: bytes, header: Header, limits: MllpSettings = _LIMITS) -> None:
    """Refuses (AE) a message with more segments or field separators than the caps: counted in the
    bytes (a few ms for 1 MB), before python-hl7 spends its 10 µs a separator on it."""
    segments = raw.count(b"\r") + raw.count(b"\n") - raw.count(b"\r\n") + 1
    if segments > limits.max_segments:
        raise PayloadTooLarge(f"the message has more than {limits.max_segments} segments", expression=("MSH",))
    separators = {header.separator, *header.encoding[:4]} - {"\\"}  # the escape character splits nothing
    if not all(" " < c < "\x7f" for c in separators):  # else the bytes counted are not those python-hl7 splits on
        raise _invalid("value", "MSH-2", "the delimiters (MSH-1, MSH-2) must be printable ASCII characters")
    fields = sum(raw.count(c.encode()) for c in separators)
    if fields > limits.max_fields:
        raise PayloadTooLarge(f"the message has more than {limits.max_fields} fields and components",
                              expression=("MSH",))


def parse_siu(raw: bytes, time_zone: str | None, limits: MllpSettings = _LIMITS) -> Siu:
    """Raises InvalidRequest (the ACK's AE) when the message cannot be read as an SIU event, and
    PayloadTooLarge (AE too) when it is over the caps."""
    check_counts(raw, read_header(raw), limits)
    try:
        message = hl7.parse(normalise(raw))
        msh = message.segment("MSH")
    except Exception:  # python-hl7 raises bare exceptions on malformed text: one answer for all
        raise InvalidRequest("not an HL7 v2 message (no MSH segment)", expression=("MSH",)) from None
    control_id = _text(msh, 10)
    if not control_id:
        raise _invalid("required", "MSH-10", "MSH-10 (the message control id) is required")
    kind = _component(msh, 9, 1)
    trigger = _component(msh, 9, 2)
    if kind != "SIU" or trigger not in EVENTS:
        raise _invalid("not-supported", "MSH-9" if kind != "SIU" else "MSH-9.2",
                       f"not an SIU S12-S15 message ({cut(kind, 16) or '?'}^{cut(trigger, 16) or '?'})")
    sch = _segment(message, "SCH")
    if sch is None:
        raise InvalidRequest("an SIU message needs its SCH segment", expression=("SCH",))
    placer, filler = _component(sch, 1, 1), _component(sch, 2, 1)
    if not placer and not filler:
        raise InvalidRequest(issues=[Issue(code="required", expression=("SCH-1", "SCH-2"),
                                           diagnostics="SCH-1 (placer) or SCH-2 (filler) must name the appointment")])
    zone = ZoneInfo(time_zone) if time_zone else None
    start = _instant(_component(sch, 11, 4), zone, "SCH-11")
    end = _instant(_component(sch, 11, 5), zone, "SCH-11")
    if start is not None and end is None and _text(sch, 9):
        minutes = _minutes(_text(sch, 9), _component(sch, 10, 1))
        if minutes:
            try:
                end = Instant(_iso(datetime.fromisoformat(start.text) + timedelta(minutes=minutes)), "SCH-9")
            except (OverflowError, ValueError):  # NaN, infinite, or an end past year 9999
                raise _invalid("value", "SCH-9", "SCH-9/SCH-10: the duration gives no valid end") from None
    participants: list[Participant] = []
    sub = message.separators[4] if len(message.separators) > 4 else "&"
    pid = _segment(message, "PID")
    if pid is not None and (patient := _patient(pid, sub)) is not None:
        participants.append(patient)
    for name, kind_, authority in (("AIP", "Practitioner", 9), ("AIG", "Practitioner", 0), ("AIL", "Facility", 0)):
        for seg in _segments(message, name):
            ident = _component(seg, 3, 1)
            if ident:  # AIP-3 is an XCN: its component 9 is the id's assigning authority
                system = _authority(_component(seg, 3, authority), sub) if authority else None
                participants.append(Participant(kind=kind_, reference=f"{kind_}/{ident}", path=f"{name}-3",
                                                system=system))
    identifiers = tuple(Identifier(value=v, system=s) for s, v in ((PLACER, placer), (FILLER, filler)) if v)
    services = tuple(c for seg in _segments(message, "AIS") if (c := _concept(seg, 3, "AIS-3")) is not None)
    appointment_type = _concept(sch, 8, "SCH-8")
    reason = _concept(sch, 6, "SCH-6")
    nte = _segment(message, "NTE")
    comment = _component(nte, 3, 1) if nte is not None else None
    booking = CanonicalBooking(
        resource_path="SCH",
        identifiers=identifiers,
        status="cancelled" if trigger == "S15" else "booked",
        start=start, end=end,
        appointment_types=(appointment_type,) if appointment_type else (),
        service_types=services,
        participants=tuple(dict.fromkeys(participants)),
        comment=comment or None, comment_path="NTE-3" if comment else None,
        time_zone=time_zone,
        cancel_reason=reason if trigger == "S15" else None,
        patient=_person(pid) if pid is not None else None,
    )
    return Siu(EVENTS[trigger], control_id, booking, placer or None, filler or None)


def ack(header: Header, code: str, issues: tuple[Issue, ...] = (), reference: str | None = None) -> bytes:
    """The ACK to a message: MSA-1 `code` (AA, AE or AR), MSA-2 the message's MSH-10 (`""`, HL7's null,
    when it had none), and for AE and AR the errors of `issues` (MSA-3 the first one's text, an ERR
    for each). `reference`: the request log entry, named in ERR-7 (v2.5 on) since the texts quote
    nothing of the message. Written in the sender's delimiters (the standard ones when MSH-1/2 are
    not usable) and in the version of its MSH-12 (2.5 when unknown)."""
    version = header.version if header.version in _VERSIONS else DEFAULT_VERSION
    v = _VERSIONS[version]
    w = _writer(header.separator + header.encoding[:4])
    routing = 3 if v >= (2, 3) else 1  # MSH-3 to 6 are HD from 2.3, ST before
    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%d%H%M%S")
    trigger = header.trigger if _TRIGGER.fullmatch(header.trigger) else ""
    msh: list[_Value] = [
        *(w.copy(raw, routing) for raw in (*header.receiving, *header.sending)),  # MSH-3 to 6: answered back
        # MSH-7 in UTC with its offset: unambiguous, and the same for every source (2.1 requires TS-2, the precision)
        stamp + "+0000" if v >= (2, 2) else [stamp + "+0000", "S"], "",
        ["ACK", trigger, "ACK"] if v >= (2, 3, 1) else ["ACK", trigger],  # MSH-9.3 exists from 2.3.1
        f"{stamp}{now.microsecond:06d}", _processing(header.processing_id.split(w.component), v), version,
    ]
    errors = _errors(code, issues) if code != "AA" else []
    msa: list[_Value] = [code, w.value(header.control_id) or '""']
    if errors and v < (2, 7):  # MSA-3 is withdrawn in 2.7
        msa.append(w.fit(errors[0].text, _MSA_TEXT))
    return w.message([("MSH", msh), ("MSA", msa), *(("ERR", err) for err in _err_segments(errors, v, w, reference))])


@dataclass(frozen=True)
class _Error:
    """One error as an ACK states it."""

    hl7_code: str  # table 0357
    location: tuple[str, ...]  # ERL: segment, sequence[, field[, repetition, component]]; () when unknown
    text: str  # where and what, never a value from the message
    fhir_code: str  # the FHIR issue type
    severity: str  # table 0516: E (AE) or F (AR: not processed, for a failure of the gateway or Salesforce)


def _errors(code: str, issues: tuple[Issue, ...]) -> list[_Error]:
    found: list[_Error] = []
    for issue in issues:
        if issue.severity in ("error", "fatal") and (error := _describe(issue, code)) not in found:
            found.append(error)
    return found[:_MAX_ERRORS] or [_describe(Issue(code="exception", diagnostics=""), code)]


def _describe(issue: Issue, code: str) -> _Error:
    where, location = _where(next(iter(issue.expression or issue.location), ""))
    if code == "AR":
        hl7_code, what = _IN_FLIGHT if issue.code == "conflict" else _RETRY
    elif issue.code == "not-supported" and location[2:] == ("9", "1", "2"):  # MSH-9.2, the trigger event
        hl7_code, what = _EVENT
    else:
        hl7_code, what = _KINDS.get(issue.code, _OTHER)
    return _Error(hl7_code, location, f"{where}: {what}" if where else what, issue.code, "F" if code == "AR" else "E")


def _where(expression: str) -> tuple[str, tuple[str, ...]]:
    """The place an issue's path names, for a text and as an ERL; a path that is no v2 field keeps its name."""
    path = _V2_PATHS.get(expression, expression)
    found = _LOCATION.match(path)
    if found is None:
        return path, ()
    segment, field, component = found.groups()
    return found.group(0), (segment, "1", *((field,) if field else ()), *(("1", component) if component else ()))


def _err_segments(errors: list[_Error], v: tuple[int, ...], w: _Writer, reference: str | None) -> list[list[_Value]]:
    if not errors:
        return []
    if v >= (2, 5):
        return [["", list(e.location), [e.hl7_code, _HL7_ERRORS[e.hl7_code], "HL70357"], e.severity,
                 [e.fhir_code, "", "HL70533"], "", f"request {reference}" if reference else "",
                 w.fit(e.text, _USER_MESSAGE)] for e in errors]
    if v >= (2, 2):  # ERR-1 only, repeated: ELD, its fourth component a CE written in subcomponents
        return [[tuple([*(e.location[:3] + ("", "", ""))[:3], [e.hl7_code, _HL7_ERRORS[e.hl7_code], "HL70357"]]
                       for e in errors)]]
    return [[tuple([e.hl7_code] for e in errors)]]  # 2.1: ERR-1 is an ID


def _processing(parts: list[str], v: tuple[int, ...]) -> _Value:
    """MSH-11 answered back when it is one of table 0103's (and, from 2.3, PT-2 one of table 0207's); P otherwise."""
    processing = parts[0] if parts[0] in _PROCESSING_IDS else "P"
    if v >= (2, 3) and len(parts) > 1 and parts[1] in _PROCESSING_MODES:
        return [processing, parts[1]]
    return processing


# A field: one value, a list of components (each a value or a list of subcomponents), or a tuple of
# repetitions (each a list of components). Values are text: escaped as they are written.
_Value = str | list[Any] | tuple[list[Any], ...]


class _Writer:
    """One set of delimiters (the sender's MSH-1 and MSH-2 when they are five distinct printable
    ASCII marks, else the standard ones) and what writes in it: python-hl7 containers hold the
    structure and render it; each value is escaped as it is put in."""

    def __init__(self, declared: str) -> None:
        usable = len(declared) == 5 and len(set(declared)) == 5 and all(
            c.isascii() and c.isprintable() and not c.isalnum() and c != " " for c in declared)
        self.field, self.component, self.repetition, self.escape, self.subcomponent = (
            declared if usable else _STANDARD_DELIMITERS)
        self.encoding = self.component + self.repetition + self.escape + self.subcomponent  # MSH-2
        self._kw = {"esc": self.escape,  # python-hl7's order: segment, field, repetition, component, subcomponent
                    "separators": "\r" + self.field + self.repetition + self.component + self.subcomponent}
        marks = {"F": self.field, "S": self.component, "T": self.subcomponent, "R": self.repetition, "E": self.escape}
        self._marks = marks
        self._escapes = {ord(c): f"{self.escape}{letter}{self.escape}" for letter, c in marks.items()}
        self._special = re.compile(f"[{re.escape(''.join(marks.values()))}]|[^\\x20-\\x7e]")
        esc = re.escape(self.escape)
        self._sequence = re.compile(f"{esc}([^{esc}]*){esc}")

    def text(self, value: str) -> str:
        """`value` as HL7 text: delimiters as escape sequences, anything but printable ASCII as \\Xhh..\\
        of its UTF-8 bytes (bytes that were not UTF-8 as they came). Not python-hl7's `escape`: it
        writes code points, not bytes, and pads a control character with a space (`\\X 9\\`)."""
        if self._special.search(value) is None:
            return value
        return _NOT_PRINTABLE.sub(
            lambda m: f"{self.escape}X{m.group().encode('utf-8', 'surrogateescape').hex().upper()}{self.escape}",
            value.translate(self._escapes))

    def value(self, raw: str) -> str:
        """A field's text as its value: delimiter and hex escape sequences read, any other (highlighting,
        character sets) kept as text. Not python-hl7's `unescape`: it logs the value on a sequence it
        cannot read, and raises on some."""
        return self._sequence.sub(self._read, raw) if self.escape in raw else raw

    def _read(self, match: re.Match[str]) -> str:
        inner = match.group(1)
        if inner in self._marks:
            return self._marks[inner]
        if _HEX.fullmatch(inner):
            return bytes.fromhex(inner[1:]).decode("utf-8", "surrogateescape")
        return match.group(0)

    def copy(self, raw: str, parts: int) -> _Value:
        """A field of the message as its value in at most `parts` components: what the sender wrote
        beyond them stays in the last, as text."""
        if parts == 1:
            return self.value(raw)
        pieces = [self.value(p) for p in raw.split(self.component, parts - 1)]
        return pieces if len(pieces) > 1 else pieces[0]

    def fit(self, text: str, limit: int) -> str:
        """`text` cut so that, escaped, it has at most `limit` characters (the field's length in HL7)."""
        text = text[:limit]
        while len(self.text(text)) > limit:
            text = text[:-1]
        return text

    def message(self, segments: list[tuple[str, list[_Value]]]) -> bytes:
        message = hl7.Message(**self._kw)
        for name, fields in segments:
            while fields and not fields[-1]:
                fields.pop()  # trailing empty fields are left out
            head = [name, self.field, self.encoding] if name == "MSH" else [name]  # MSH-1 and 2 are not escaped
            message.append(hl7.Segment(sequence=[*head, *map(self._field, fields)], **self._kw))
        return str(message).encode("ascii")

    def _field(self, value: _Value) -> str | hl7.Field:
        if isinstance(value, str):
            return self.text(value)
        return hl7.Field(sequence=[hl7.Repetition(sequence=[
            self.text(c) if isinstance(c, str) else hl7.Component(sequence=[self.text(s) for s in c], **self._kw)
            for c in _trimmed(r)], **self._kw) for r in (value if isinstance(value, tuple) else (value,))], **self._kw)


@functools.lru_cache(maxsize=16)
def _writer(declared: str) -> _Writer:
    return _Writer(declared)


def _trimmed(components: list[Any]) -> list[Any]:
    end = len(components)
    while end and not components[end - 1]:
        end -= 1
    return components[:end]


def _invalid(code: str, field: str, diagnostics: str) -> InvalidRequest:
    """A message that cannot be read as sent (AE); `code`, the FHIR issue type, chooses the ACK's HL7 error code."""
    return InvalidRequest(issues=[Issue(code=code, diagnostics=diagnostics, expression=(field,))])


def _segment(message: hl7.Message, name: str) -> hl7.Segment | None:
    found = _segments(message, name)
    return found[0] if found else None


def _segments(message: hl7.Message, name: str) -> list[hl7.Segment]:
    return [s for s in message if str(s[0]) == name]


def _text(segment: hl7.Segment | None, field: int) -> str:
    if segment is None or len(segment) <= field:
        return ""
    return str(segment[field]).strip()


def _component(segment: hl7.Segment | None, field: int, component: int) -> str:
    """One component (1-based) of a field's first repetition; a simple field is its own component 1."""
    if segment is None or len(segment) <= field:
        return ""
    value = segment[field]
    if isinstance(value, hl7.Field) and len(value) and isinstance(value[0], hl7.Repetition):
        value = value[0]
    if isinstance(value, (hl7.Field, hl7.Repetition)) and len(value) and isinstance(value[0], hl7.Component):
        return str(value[component - 1]).strip() if len(value) >= component else ""
    if isinstance(value, (hl7.Field, hl7.Repetition)) and len(value) > 1:
        return str(value[component - 1]).strip() if len(value) >= component else ""
    return str(value).strip() if component == 1 else ""


def _authority(hd: str, sub: str) -> str | None:
    """An assigning authority (HD: namespace id & universal id & its type) as the system its ids are
    kept under: the namespace id, else the universal id (an OID)."""
    parts = hd.split(sub)
    return (parts[0] or (parts[1] if len(parts) > 1 else "")).strip() or None


def _patient(pid: hl7.Segment, sub: str) -> Participant | None:
    """PID-3's first identifier (CX: id ^ ^ ^ assigning authority), else PID-2 (the external id of
    v2.2 senders); with its assigning authority, an identifier of that system."""
    for field in (3, 2):
        value = _component(pid, field, 1)
        if value:
            return Participant(kind="Patient", reference=f"Patient/{value}", path="PID-3",
                               system=_authority(_component(pid, field, 4), sub))
    return None


_GENDERS = {"M": "male", "F": "female", "O": "other", "U": "unknown", "A": "other", "N": "unknown"}


def _person(pid: hl7.Segment) -> Person | None:
    """PID-5 (family ^ given), PID-7 (birth date), PID-8 (sex, HL7 table 0001) and PID-13 (phone): what
    creating the patient needs. A date that is not one is left out, never guessed."""
    birth = _component(pid, 7, 1)[:8]
    try:
        born = datetime.strptime(birth, "%Y%m%d").date().isoformat() if len(birth) == 8 else None
    except ValueError:
        born = None
    person = Person(family=_component(pid, 5, 1) or None, given=_component(pid, 5, 2) or None, birth_date=born,
                    gender=_GENDERS.get(_component(pid, 8, 1).upper()), phone=_component(pid, 13, 1) or None)
    return person if person != Person() else None


def _concept(segment: hl7.Segment, field: int, name: str) -> Concept | None:
    """A CE/CWE field: code (1), text (2), coding system (3); with no system, the field's own URN."""
    code = _component(segment, field, 1)
    if not code:
        return None
    system = _component(segment, field, 3) or f"urn:ehr-gateway:hl7v2:{name}"
    text = _component(segment, field, 2) or None
    return Concept(path=name, codings=(Coding(system=system, code=code, display=text),), text=text)


def _instant(value: str, zone: ZoneInfo | None, field: str) -> Instant | None:
    if not value:
        return None
    m = _TS.fullmatch(value)
    if m is None or m.group(4) is None:  # a time needs at least the hour
        raise _invalid("value", field, f"{field}: not an HL7 date-time (YYYYMMDDHHMM[SS][+ZZZZ])")
    year, month, day, hour, minute, second, offset = m.groups()
    try:
        moment = datetime(int(year), int(month or 1), int(day or 1), int(hour), int(minute or 0), int(second or 0))
    except ValueError:
        raise _invalid("value", field, f"{field}: not a valid date-time") from None
    if offset and not (int(offset[1:3]) < 24 and int(offset[3:5]) < 60):
        raise _invalid("value", field, f"{field}: the offset is not a valid one (+/-HHMM)")
    if offset:
        sign = 1 if offset[0] == "+" else -1
        moment = moment.replace(tzinfo=timezone(timedelta(minutes=sign * (int(offset[1:3]) * 60 + int(offset[3:5])))))
    elif zone is not None:
        moment = moment.replace(tzinfo=zone)
    else:
        raise _invalid("value", field, f"{field}: a time without an offset needs the source's time_zone")
    return Instant(_iso(moment), field)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _minutes(amount: str, unit: str) -> float | None:
    try:
        value = float(amount)
    except ValueError:
        return None
    factor = _UNITS.get((unit or "MIN").upper())
    return value * factor if factor else None
