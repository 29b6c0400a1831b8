"""HL7 v2 SIU scheduling messages -> the canonical booking (python-hl7 parses; this reads the fields).

What is read (v2.2 to v2.5): MSH-9 the event (S12 book, S13 reschedule, S14 modify, S15 cancel),
MSH-10 the control id the ACK echoes; SCH-1 / SCH-2 the placer / filler appointment ids (kept as
identifiers `urn:ehr-gateway:hl7v2:placer|<id>` and `…:filler|<id>`: the idempotency key and the link
a later S13-S15 finds the appointment by); SCH-6 the event reason (a cancellation's reason); SCH-8
the appointment type; SCH-9/10 the duration; SCH-11 the timing (component 4 start, 5 end); PID-3
(else PID-2) the patient; AIS-3 the service; AIG-3 / AIP-3 the resources (Practitioner); AIL-3 the
location (Facility); NTE-3 a comment. Times without an offset are the source's `time_zone`.

A coded field maps through the group whose `source` is the coding system it names (CE/CWE component
3); without one, through `urn:ehr-gateway:hl7v2:<segment>-<field>`, e.g. `urn:ehr-gateway:hl7v2:AIS-3`.
Problems name the field (`SCH-11`, `AIS-3`), as an ACK's error can, never a value from the message.

MLLP has no authentication, and python-hl7's parse costs about 10 µs a separator (a 1 MB message of
`|` took 9 s), so the counts of segment and field separators are checked in the bytes first
(`[mllp] max_segments`, `max_fields`), and the message is parsed once: the ACK is built from the
MSH segment read without python-hl7 (`read_header`), whatever became of the parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import hl7

from gateway.canonical import CanonicalBooking, Coding, Concept, Identifier, Instant, Participant
from gateway.errors import InvalidRequest, Issue, PayloadTooLarge, cut
from gateway.settings import MllpSettings

EVENTS = {"S12": "book", "S13": "reschedule", "S14": "modify", "S15": "cancel"}
PLACER, FILLER = "urn:ehr-gateway:hl7v2:placer", "urn:ehr-gateway:hl7v2:filler"
_TS = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?([+-]\d{4})?")
_UNITS = {"MIN": 1, "MINUTES": 1, "M": 1, "H": 60, "HR": 60, "HOURS": 60, "S": 1 / 60}
_ENCODING = "^~\\&"  # MSH-2 as nearly every sender writes it, and as the ACK does
_HEADER_BYTES = 4096  # the MSH segment is looked for in the message's first bytes only
_LIMITS = MllpSettings()


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
    version: str = ""  # MSH-12


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
    head = raw[:_HEADER_BYTES].lstrip(b"\x0b\r\n ").decode("utf-8", "replace")
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
                  control_id=field(10), processing_id=field(11), version=field(12))


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
    pid = _segment(message, "PID")
    patient = (_component(pid, 3, 1) or _component(pid, 2, 1)) if pid is not None else None
    if patient:
        participants.append(Participant(kind="Patient", reference=f"Patient/{patient}", path="PID-3"))
    for name, kind_ in (("AIP", "Practitioner"), ("AIG", "Practitioner"), ("AIL", "Facility")):
        for seg in _segments(message, name):
            ident = _component(seg, 3, 1)
            if ident:
                participants.append(Participant(kind=kind_, reference=f"{kind_}/{ident}", path=f"{name}-3"))
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
    )
    return Siu(EVENTS[trigger], control_id, booking, placer or None, filler or None)


def ack(header: Header, code: str, issues: tuple[Issue, ...] = ()) -> bytes:
    """The ACK: MSA-1 `code` (AA, AE or AR), MSA-2 the message's MSH-10 (empty when it had none), and
    for an error MSA-3 the first issue's text and ERR the field it names. Written with the standard
    separators; the header's values are copied as they are when the sender used them too."""
    copy = (lambda v: v) if (header.separator, header.encoding[:4]) == ("|", _ENCODING) else _escape
    now = datetime.now(timezone.utc)
    msh = ["MSH", _ENCODING, *map(copy, header.receiving), *map(copy, header.sending), f"{now:%Y%m%d%H%M%S}", "",
           f"ACK^{copy(header.trigger)}^ACK" if header.trigger else "ACK", f"{now:%Y%m%d%H%M%S%f}",
           copy(header.processing_id) or "P", copy(header.version) or "2.5"]
    msa = ["MSA", code, copy(header.control_id)]
    segments = ["|".join(msh)]
    if issues:
        first = issues[0]
        where = first.expression[0] if first.expression else ""
        segments += ["|".join((*msa, _escape(first.diagnostics)[:200])), f"ERR|{_escape(where)}^^^{_escape(first.code)}"]
    else:
        segments.append("|".join(msa))
    return ("\r".join(segments) + "\r").encode()


def _escape(value: str) -> str:
    return (value.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\")
            .replace("~", "\\R\\").replace("\r", " ").replace("\n", " "))


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
