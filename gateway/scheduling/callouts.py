"""What Health Cloud's callouts send, read into the gateway's terms: the Find search (one
form-encoded line), and the Appointment of a create or a cancel (FHIR R4 JSON).

Ids and codes name their source system as `<sourceSystem>|<value>` when the org has several; with one,
values come bare (scheduling-out.md §1). A value is kept as Health Cloud sent it, so the answer can
carry the very ids it asked about.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from urllib.parse import parse_qsl

import msgspec

from adapters._keys import check_keys
from gateway.canonical import Coding
from gateway.errors import InvalidRequest, cut, http

PRACTITIONER_ID = "schedule:Schedule.actor:Practitioner._id"
LOCATION_ID = "schedule:Schedule.actor:Location._id"
PRACTITIONER_IDENTIFIER = "schedule:Schedule.actor:Practitioner.identifier"
# what Find sends beside the criteria, accepted as the only values it documents
_FIXED = {"status": "free", "_include": "Slot:schedule", "_sort": "start"}
_CRITERIA = (PRACTITIONER_ID, LOCATION_ID, "appointment-type", "service-type")
# the instants Salesforce's Date and DateTime fields hold: a slot outside could never become a
# ServiceAppointment, and the arithmetic on a bound (its whole day, its offset) stays far from the
# years 1 and 9999 past which Python's datetime overflows
EARLIEST = datetime(1700, 1, 1, tzinfo=timezone.utc)
LATEST = datetime(4000, 12, 31, tzinfo=timezone.utc)


class SourceCriteria(msgspec.Struct, kw_only=True):
    """One source system's share of a search, its values bare (the EHR's ids, Health Cloud's codes)."""

    practitioners: list[str] = msgspec.field(default_factory=list)
    locations: list[str] = msgspec.field(default_factory=list)
    service_types: list[str] = msgspec.field(default_factory=list)
    appointment_types: list[str] = msgspec.field(default_factory=list)


class Search(msgspec.Struct, kw_only=True):
    start: str  # ISO 8601 instants, [start, end)
    end: str
    # source system -> its criteria; a source system no value names is searched with none
    criteria: dict[str, SourceCriteria]
    unsupported: list[str] = msgspec.field(default_factory=list)  # parameters read but not searched by


def _instant(value: str, *, end: bool) -> datetime:
    """A search date or date-time as an aware instant in UTC; a date is its whole day (UTC). One
    outside what Salesforce holds (EARLIEST to LATEST) is refused, and so is one past what datetime
    can hold once its day or offset is applied (OverflowError)."""
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
            moment = moment + timedelta(days=1) if end else moment
        else:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            moment = (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    except ValueError:
        raise InvalidRequest(f"start: not a FHIR date or dateTime ({cut(value, 40)})", location=http("start")) from None
    except OverflowError:
        moment = None
    if moment is None or not EARLIEST <= moment <= LATEST:
        raise InvalidRequest(f"start: outside the dates Salesforce holds ({EARLIEST:%Y-%m-%d} to {LATEST:%Y-%m-%d})",
                             location=http("start"))
    return moment


def _window(values: list[str], max_days: int) -> tuple[str, str]:
    """`start=ge…` and `start=le…` (or gt / lt): the window [start, end)."""
    lower = upper = None
    for value in values:
        prefix, bound = value[:2], value[2:]
        if prefix in ("ge", "gt") and lower is None:
            lower = _instant(bound, end=prefix == "gt" and len(bound) == 10)
        elif prefix in ("le", "lt") and upper is None:
            upper = _instant(bound, end=prefix == "le")
        else:
            raise InvalidRequest("start: one lower bound (ge or gt) and one upper bound (le or lt)",
                                 location=http("start"))
    if lower is None or upper is None:
        raise InvalidRequest("start: both bounds are required (start=ge…&start=le…)", location=http("start"))
    if upper <= lower:
        raise InvalidRequest("start: the upper bound is not after the lower", location=http("start"))
    if upper - lower > timedelta(days=max_days):
        raise InvalidRequest(f"start: a search spans at most {max_days} days", location=http("start"))
    return lower.strftime("%Y-%m-%dT%H:%M:%SZ"), upper.strftime("%Y-%m-%dT%H:%M:%SZ")  # UTC already


def read_search(body: bytes, systems: list[str], *, max_days: int, max_values: int) -> Search:
    """Find's form. `systems`: the source systems with an EHR. Raises InvalidRequest."""
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=4 * max_values)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the search is not a form of at most the allowed parameters") from None
    starts, criteria, unsupported = [], {}, []
    count = 0
    for name, value in pairs:
        if name == "start":
            starts.append(value)
        elif name in _FIXED:
            if value != _FIXED[name]:
                raise InvalidRequest(f"{name}: only {_FIXED[name]} is served", location=http(name))
        elif name in _CRITERIA:
            for item in filter(None, value.split(",")):
                count += 1
                system, value_of = _owner(item, systems, name)
                found = criteria.setdefault(system, SourceCriteria())
                getattr(found, _FIELDS[name]).append(value_of)
        elif name == PRACTITIONER_IDENTIFIER:
            unsupported.append(name)  # an NPI means nothing to the EHRs' slot searches: their own ids do
        elif not name.startswith("_"):
            raise InvalidRequest(f"{cut(name, 64)}: not a search parameter Find sends", location=http(cut(name, 64)))
    if count > max_values:
        raise InvalidRequest(f"a search names at most {max_values} ids and codes")
    start, end = _window(starts, max_days)
    if not criteria:  # nothing names a source system: every EHR is asked
        criteria = {system: SourceCriteria() for system in systems}
    return Search(start=start, end=end, criteria=criteria, unsupported=unsupported)


_FIELDS = {PRACTITIONER_ID: "practitioners", LOCATION_ID: "locations", "service-type": "service_types",
           "appointment-type": "appointment_types"}


def _owner(item: str, systems: list[str], name: str) -> tuple[str, str]:
    """`<sourceSystem>|<value>`, or a bare value when the org has one source system."""
    system, bar, value = item.partition("|")
    if bar:
        if not value:
            raise InvalidRequest(f"{name}: an empty value", location=http(name))
        return system, value
    if len(systems) == 1:
        return systems[0], item
    raise InvalidRequest(f"{name}: with several source systems, each value is <sourceSystem>|<value>",
                         location=http(name))


# -- an Appointment from Health Cloud ----------------------------------------------------------------

class Concept(msgspec.Struct, omit_defaults=True):
    coding: list[Coding] = []
    text: str | None = None


class Identifier(msgspec.Struct, omit_defaults=True):
    system: str | None = None
    value: str | None = None


class Reference(msgspec.Struct, omit_defaults=True):
    reference: str | None = None
    identifier: Identifier | None = None
    display: str | None = None


class Participant(msgspec.Struct, omit_defaults=True):
    actor: Reference | None = None
    status: str | None = None


class Callout(msgspec.Struct, omit_defaults=True, kw_only=True):
    """The Appointment of a create or a cancel, as Health Cloud sends it (unknown elements ignored)."""

    resourceType: str
    id: str | None = None
    status: str | None = None
    identifier: list[Identifier] = []
    serviceType: list[Concept] = []
    appointmentType: Concept | None = None
    cancelationReason: Concept | None = None
    slot: list[Reference] = []
    participant: list[Participant] = []
    start: str | None = None
    end: str | None = None
    comment: str | None = None

    def actor(self, kind: str) -> str | None:
        """The id of the first participant of `kind` (Patient, Practitioner, Location)."""
        for p in self.participant:
            ref = p.actor.reference if p.actor else None
            if ref and ref.startswith(kind + "/"):
                return ref[len(kind) + 1:]
        return None

    def slot_id(self) -> str | None:
        ref = self.slot[0].reference if self.slot else None
        return ref.rpartition("/")[2] or None if ref else None


_callout = msgspec.json.Decoder(Callout)


def read_callout(body: bytes) -> Callout:
    """The Appointment of a create or a cancel. InvalidRequest for a body that is not one, nests
    arrays or objects past msgspec's depth limit (RecursionError), or names a key twice in one object
    (`adapters._keys.check_keys`, as the first direction refuses it: `"status"` twice must not cancel
    what a reader keeping the first one would book)."""
    try:
        callout = _callout.decode(body)
        if callout.resourceType != "Appointment":
            raise InvalidRequest("resourceType: Appointment expected", expression=("Appointment.resourceType",))
        check_keys(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # msgspec names the path, never a value: safe to pass on
        raise InvalidRequest(f"not a FHIR Appointment: {cut(str(exc), 200)}") from None
    except UnicodeDecodeError:  # msgspec's, for bad UTF-8 inside a string; its position says nothing
        raise InvalidRequest("not a FHIR Appointment: a string in it is not UTF-8") from None
    except RecursionError:  # msgspec's own depth guard
        raise InvalidRequest("not a FHIR Appointment: the body nests arrays or objects too deeply") from None
    return callout
