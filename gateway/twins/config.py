"""An EHR twin's configuration: its dialect, the credentials it accepts, its calendar and its patients."""

from __future__ import annotations

from typing import Literal

import msgspec

Dialect = Literal["cerner", "epic", "fhir"]
CERNER_TENANT = "ec2458f2-1e24-41c8-b71b-0e701af7583d"  # the tenant of the corpus's Millennium codes


def key_pair() -> tuple[str, str]:
    """A new RSA key pair as PEM (private PKCS#8, public SubjectPublicKeyInfo): the private key signs
    a client's RS384 assertions, the public one is what a twin checks them with (`public_key_pem`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


class TwinSchedule(msgspec.Struct, frozen=True, kw_only=True):
    """One practitioner's calendar at one location, offering these services (system, code)."""

    id: str
    practitioner: str
    location: str
    service_types: tuple[tuple[str, str], ...]
    appointment_types: tuple[tuple[str, str], ...] = ()


def default_schedules(dialect: Dialect) -> tuple[TwinSchedule, ...]:
    """Two practitioners at two locations, with service codes in the dialect's own systems."""
    if dialect == "cerner":
        services = ((f"https://fhir.cerner.com/{CERNER_TENANT}/codeSet/14249", "2572307911"),)
        ids = (("4817572", "593923", "32216049"), ("4817573", "1912007", "32216049"))
    elif dialect == "epic":
        services = (("urn:oid:1.2.840.114350.1.13.861.1.7.3.808267.11", "40111223"),)
        ids = (("e-s1", "eM5CWtq15N0WJeuCet5bJlQ3", "e4W4rmGe9QzuGm2Dy4NBqVc0JDSNEiE3"),
               ("e-s2", "eivaFtl6ABQ3Vx6nQ4bmM6Q3", "e4W4rmGe9QzuGm2Dy4NBqVc0JDSNEiE3"))
    else:
        services = (("http://terminology.hl7.org/CodeSystem/service-type", "124"),)
        ids = (("s1", "example", "1"), ("s2", "f001", "2"))
    return tuple(TwinSchedule(id=s, practitioner=p, location=loc, service_types=services) for s, p, loc in ids)


class TwinBooking(msgspec.Struct, frozen=True, kw_only=True):
    """An appointment the EHR holds from the start, on a slot of its own outside the calendar's grid:
    what the EHR booked before the gateway saw it (the corpus's bookings, which the demo posts)."""

    appointment_id: str
    slot_id: str
    schedule: TwinSchedule
    start: str  # ISO 8601 instants
    end: str
    patient: str


def corpus_bookings(dialect: Dialect) -> tuple[TwinBooking, ...]:
    """What the README's first booking is on the EHR's side: the corpus's Cerner video visit
    (`cerner-millennium-r4/r4_appointment_video_visit_entry.json`), booked on its slot for its patient,
    with its practitioner at its location. The demo's Cerner twin holds it, so that the org's callouts
    for that booking (IAM configured) find it there, as they would in the real EHR."""
    if dialect != "cerner":
        return ()
    services = ((f"https://fhir.cerner.com/{CERNER_TENANT}/codeSet/14249", "2572307911"),)
    schedule = TwinSchedule(id="21265426", practitioner="593923", location="21304876", service_types=services)
    return (TwinBooking(appointment_id="4817572", slot_id="21265426-633867-6828001-60", schedule=schedule,
                        start="2020-07-10T13:00:00Z", end="2020-07-10T13:15:00Z", patient="12724066"),)


class TwinPatient(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A person the twin holds, with one MRN in the dialect's system (`MRN_SYSTEMS`). The JSON of
    `POST /twin/patients` (`given` there a list or one string)."""

    id: str
    family: str
    given: tuple[str, ...]
    birthDate: str  # YYYY-MM-DD
    gender: Literal["male", "female", "other", "unknown"]
    mrn: str
    phone: str | None = None


# each dialect's MRN system: Cerner's and Epic's as their public sandboxes name them
MRN_SYSTEMS: dict[str, str] = {"cerner": "urn:oid:2.16.840.1.113883.6.1000",
                               "epic": "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14",
                               "fhir": "urn:mrn:example"}


def default_patients(dialect: Dialect) -> tuple[TwinPatient, ...]:
    """Four obviously fictional people per dialect (the sandboxes' test families, HL7's examples),
    their phones in the 555-01xx range kept for fiction: the same at every start."""
    if dialect == "cerner":  # 12724066 is the corpus's patient (its appointments name "Smart II, Nancy")
        rows = (("12724066", "Smart", ("Nancy",), "1980-08-11", "female", "7000101", "8165550101"),
                ("12742400", "Smart", ("Fredrick",), "1975-03-02", "male", "7000102", "8165550102"),
                ("12742401", "Smart", ("Wilma",), "1990-11-23", "female", "7000103", "8165550103"),
                ("12742402", "Smart", ("Hailey",), "2015-06-30", "female", "7000104", "8165550104"))
    elif dialect == "epic":
        rows = (("efvHwbc1k1CQ9XjM1zvvefQ3", "Mychart", ("Theodore",), "1962-04-17", "male", "203001", "608-555-0111"),
                ("eq7IBvJQy2Y5wZqgZ3bRz6A3", "Mychart", ("Alison",), "1987-09-05", "female", "203002", "608-555-0112"),
                ("eTplvxIxTqsb3WI4wX1bpTw3", "Mychart", ("Derrick",), "1971-01-14", "male", "203003", "608-555-0113"),
                ("eNEWpatient0000000000001", "Newpatient", ("Nova",), "2001-02-28", "female", "203004", "608-555-0114"))
    else:
        rows = (("example", "Chalmers", ("Peter", "James"), "1974-12-25", "male", "12345", "555-555-0121"),
                ("pat1", "Duck", ("Donald",), "1934-06-09", "male", "654321", "555-555-0122"),
                ("pat2", "Duck", ("Daisy",), "1940-06-07", "female", "123456", "555-555-0123"),
                ("pat3", "Notsowell", ("Simon",), "1982-01-23", "male", "123457", "555-555-0124"))
    return tuple(TwinPatient(id=i, family=f, given=g, birthDate=b, gender=s, mrn=m, phone=t)  # type: ignore[arg-type]
                 for i, f, g, b, s, m, t in rows)


class TwinConfig(msgspec.Struct, frozen=True, kw_only=True):
    dialect: Dialect
    control_key: str  # opens the twin's own endpoints (/twin/…)
    client_id: str = "ehr-twin-client"
    client_secret: str | None = None  # client credentials (Cerner's system account: Basic)
    public_key_pem: str | None = None  # verifies signed JWT assertions (RS384: Epic's backend services)
    require_auth: bool = True
    schedules: tuple[TwinSchedule, ...] | None = None  # None: default_schedules(dialect)
    start_date: str | None = None  # the calendar's first day (YYYY-MM-DD, UTC); None: today
    days: int = 14
    slot_minutes: int = 30
    day_start_hour: int = 9  # UTC
    day_end_hour: int = 17
    token_seconds: int = 570  # what a token lives (expires_in)
    mllp_port: int | None = None  # epic: its incoming HL7 v2 scheduling interface (0: any free port)
    conditional_create: bool = True  # fhir: If-None-Exist honoured and said so in its CapabilityStatement
    return_minimal: bool = False  # fhir: creates and updates answer no body, whatever Prefer asks
    permissive: bool = False  # fhir: enforces nothing beyond the spec (no occupancy, no reference checks)
    # its appointments are numbered from this (ids 10000000 + n): `serve` starts each twin from the clock,
    # in an id space of its own, so no id repeats across twins or across starts on the same data
    first_number: int = 1
    booked: tuple[TwinBooking, ...] = ()  # held from the start (`corpus_bookings`: the demo's)
    patients: tuple[TwinPatient, ...] | None = None  # None: default_patients(dialect)

    def all_schedules(self) -> tuple[TwinSchedule, ...]:
        return self.schedules if self.schedules is not None else default_schedules(self.dialect)

    def all_patients(self) -> tuple[TwinPatient, ...]:
        return self.patients if self.patients is not None else default_patients(self.dialect)
