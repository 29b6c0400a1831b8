"""What the identity step works with: an EHR's id as the org keeps it (`EhrId`), and what the org
holds for it (`Found`, the cached value)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import msgspec

from gateway.canonical import Participant
from gateway.outbound.calls import CallRecord
from gateway.settings import SourceSettings

Kind = Literal["patient", "location", "practitioner", "role", "device"]
# a participant's kind -> the identity kind (a PractitionerRole is its own: it names the HPF itself)
KINDS: dict[str, Kind] = {"Patient": "patient", "Facility": "location", "Practitioner": "practitioner",
                          "Device": "device"}
# the `[sources.<name>.identity]` setting whose SourceSystem a kind's literal ids are kept under
SYSTEM_SETTING = {"patient": "patient", "location": "location", "practitioner": "practitioner",
                  "role": "practitioner", "device": "device"}
# the words operators and messages use for each kind
WORDS = {"patient": "patient", "location": "location", "practitioner": "practitioner",
         "role": "practitioner role", "device": "device"}


class EhrId(msgspec.Struct, frozen=True, array_like=True):
    """One id of an EHR's as the org would keep it: `system` is the `Identifier.SourceSystem`."""

    kind: Kind
    system: str
    value: str


def ehr_id(participant: Participant, source: SourceSettings) -> EhrId:
    """A literal reference is looked up under its kind's SourceSystem; an identifier under the one its
    system maps to in `systems`, else its system as sent (contract v3)."""
    kind: Kind = "role" if participant.role else KINDS[participant.kind]
    if participant.system is None:
        system = source.id_system(SYSTEM_SETTING[kind])
    else:
        system = source.identity.systems.get(participant.system, participant.system)
    return EhrId(kind, system, participant.value)


class Hpf(msgspec.Struct, frozen=True, array_like=True):
    """A HealthcarePractitionerFacility: a practitioner at one facility (its Account)."""

    id: str
    account: str
    start: str | None = None  # EffectiveFrom, YYYY-MM-DD
    end: str | None = None  # EffectiveTo

    def covers(self, day: str | None) -> bool:
        """Effective on `day` (YYYY-MM-DD; None: no date to check)."""
        return day is None or ((self.start is None or self.start <= day) and (self.end is None or day <= self.end))


class Found(msgspec.Struct, frozen=True, array_like=True):
    """What the org holds for one EHR id. `records`: the distinct records the id names (a patient's
    person Account, a facility's Account, a device's Asset; a practitioner's Contact or
    HealthcareProvider); `hpfs`: a practitioner's (or a role's) active HPFs. Empty: the org holds
    nothing for it (cached too, for at most a minute)."""

    records: tuple[str, ...] = ()
    hpfs: tuple[Hpf, ...] = ()

    @property
    def known(self) -> bool:
        return bool(self.records or self.hpfs)


@dataclass(slots=True)
class IdentityRecord:
    """What the identity step did for one request, for its log line and metrics (no patient data)."""

    cached: int = 0  # ids answered from the cache
    looked_up: int = 0  # ids asked of the org
    calls: int = 0  # Salesforce API calls made for them (each Composite is one)
    waited: int = 0  # ids another worker was already looking up, waited for
    unmatched: tuple[str, ...] = ()  # kinds of the participants the org does not hold (or holds twice)
    patient_unknown: bool = False
    created: bool = False  # the patient was created in the org (unknown_patient = "create")
    call: CallRecord = field(default_factory=CallRecord)
