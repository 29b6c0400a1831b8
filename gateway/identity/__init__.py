"""Identity: every participant of a booking as the org's own record (contract v3, identity.md).

An EHR names people and places by its own ids; Salesforce's Book takes the org's record ids. The
`Resolver` finds, for each participant, the record the org keeps its id on (`Identifier`,
`HealthcarePractitionerFacility`), through a cache in Redis shared by every worker and instance, with
all of a booking's misses asked in one Composite call (`queries.py`). A patient the org does not know
yet is the source's `unknown_patient` policy's to decide (`PatientUnknown`); any other participant the
org does not hold, or holds twice, is a gap in configuration (`Unmatched`), refused at once.
"""

from gateway.identity.model import EhrId, Found, Hpf, IdentityRecord
from gateway.identity.resolver import Resolver

__all__ = ["EhrId", "Found", "Hpf", "IdentityRecord", "Resolver"]
