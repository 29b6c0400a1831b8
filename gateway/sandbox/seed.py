"""The demo org's records: the corpus's and the demo's EHR ids, per source system, as an org that
integrates those EHRs would hold them (identity.md).

The ids are spread over every storage shape the gateway must read: patients identified on the person
Account or on its PersonContact; facilities on the business Account or on a HealthcareFacility;
practitioners on a Contact, on a HealthcareProvider, or only on their HealthcarePractitionerFacility
records. Every practitioner of a source system works at every facility of that system (one active HPF
each), and every HPF carries SourceSystem and SourceSystemIdentifier (what IAM sends to the EHR).

Names and birth dates are the corpus's where it has them (public sample data), else invented and
obviously fictional. The same table planted in the same order gives the same record ids at every start,
so tests read `Org.seeded` (or `GET /sandbox/org/seed`) to learn which EHR id became which record.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from gateway.sandbox.org import Made, Org


class SeedPatient(msgspec.Struct, frozen=True):
    id_value: str
    first_name: str
    last_name: str
    birth_date: str
    on: Literal["Account", "Contact"] = "Account"


class SeedFacility(msgspec.Struct, frozen=True):
    id_value: str
    name: str
    on: Literal["Account", "HealthcareFacility"] = "Account"


class SeedPractitioner(msgspec.Struct, frozen=True):
    id_value: str
    name: str
    on: Literal["Contact", "HealthcareProvider", "HealthcarePractitionerFacility"] = "Contact"


class SeedDevice(msgspec.Struct, frozen=True):
    id_value: str
    name: str


class SeedSystem(msgspec.Struct, frozen=True):
    patients: tuple[SeedPatient, ...]
    facilities: tuple[SeedFacility, ...]
    practitioners: tuple[SeedPractitioner, ...]
    devices: tuple[SeedDevice, ...] = ()


P, F, D, DEV = SeedPatient, SeedFacility, SeedPractitioner, SeedDevice
HF, HP, HPF = "HealthcareFacility", "HealthcareProvider", "HealthcarePractitionerFacility"

DEMO: dict[str, SeedSystem] = {
    "cerner": SeedSystem(
        patients=(P("12724066", "Nancy", "Smart", "1990-09-15"), P("12742400", "Wilma", "Sandbox", "1984-02-29", "Contact")),
        facilities=(F("21304876", "MX Clinic 1"), F("32216049", "Sandbox Clinic Two", HF), F("4062906", "Sandbox Clinic Three")),
        practitioners=(D("593923", "Christina Applegate"), D("709937", "Ozzie Sandbox", HP), D("1912007", "Pia Sandbox", HPF)),
    ),
    "epic": SeedSystem(
        patients=(P("efvHwbc1k1CQ9XjM1zvvefQ3", "Edna", "Sandbox", "1971-03-04"),
                  P("eq7IBvJQy2Y5wZqgZ3bRz6A3", "Ezra", "Sandbox", "1962-12-01", "Contact"),
                  P("eTplvxIxTqsb3WI4wX1bpTw3", "Etta", "Sandbox", "2001-07-19")),
        facilities=(F("e4W4rmGe9QzuGm2Dy4NBqVc0JDSNEiE3", "Sandbox Epic Clinic", HF),),
        practitioners=(D("eM5CWtq15N0WJeuCet5bJlQ3", "Emil Sandbox"), D("eivaFtl6ABQ3Vx6nQ4bmM6Q3", "Eva Sandbox", HP),
                       D("dr-y", "Dr Y", HPF)),
    ),
    "fhir": SeedSystem(
        patients=(P("example", "Peter", "Chalmers", "1974-12-25"), P("pat1", "Patty", "Sandbox", "1955-05-05", "Contact")),
        facilities=(F("1", "South Wing, second floor"), F("2", "Sandbox Location Two", HF), F("3", "Sandbox Location Three")),
        practitioners=(D("example", "Adam Careful"), D("f001", "Fay Sandbox", HP), D("f202", "Luigi Maas", HPF),
                       D("1", "Una Sandbox"), D("dr-y", "Dr Y", HP)),
        devices=(DEV("infusion-1", "Sandbox infusion pump 1"),),
    ),
    "athena": SeedSystem(
        patients=(P("70690", "Roscoe", "Hall", "1997-10-06"), P("00432", "Sang", "Thompson", "2000-07-27", "Contact"),
                  P("51544", "Herman", "Smith", "1993-09-02"), P("98371", "Theron", "Wright", "2001-11-08", "Contact"),
                  P("489671", "Michael", "Smith", "2008-02-05")),
        facilities=(F("2", "Brockton"), F("HHR", "Sandbox Athena Clinic HHR", HF)),
        practitioners=(D("medickinson2", "Medi Sandbox"), D("kmurphy2", "Kay Sandbox", HP), D("PBN", "Lisa Porter", HPF)),
    ),
}

Kind = Literal["patients", "facilities", "practitioners", "devices"]
# source system -> kind -> EHR id -> the records made for it
Seeded = dict[str, dict[Kind, dict[str, Made]]]


def plant(org: Org, table: dict[str, SeedSystem] | None = None) -> Seeded:
    """Make every record of `table` (the demo's by default) in a fixed order; what was made, by EHR id."""
    seeded: Seeded = {}
    for system, rows in (table or DEMO).items():
        made: dict[Kind, dict[str, Made]] = {"patients": {}, "facilities": {}, "practitioners": {}, "devices": {}}
        for p in rows.patients:
            made["patients"][p.id_value] = org.add_patient(system, p.id_value, first_name=p.first_name,
                                                           last_name=p.last_name, birth_date=p.birth_date, on=p.on)
        for f in rows.facilities:
            made["facilities"][f.id_value] = org.add_facility(system, f.id_value, f.name, on=f.on)
        places = [m.account for m in made["facilities"].values() if m.account]
        for d in rows.practitioners:
            made["practitioners"][d.id_value] = org.add_practitioner(system, d.id_value, d.name, facilities=places,
                                                                     on=d.on, source_on_hpf=True)
        for dev in rows.devices:
            made["devices"][dev.id_value] = org.add_device(system, dev.id_value, dev.name, account_id=places[0])
        seeded[system] = made
    return seeded
