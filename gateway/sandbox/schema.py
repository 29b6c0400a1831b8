"""The sObjects the sandbox's org holds, described the way Salesforce's object reference describes
them: each field's type, whether it can be written, whether a create needs it, and what a reference
field may name. SOQL (`soql.py`) and the sObject REST calls (`sobjects.py`) both read these, so a field
is known, typed and checked in one place.

Fields and properties come from the Health Cloud object reference (`hc_r4_api_objects_Identifier`,
`sforce-api-objects-healthcarepractitionerfacility`, `sforce_api_objects_healthcareprovider`, the
Account's Health Cloud fields) and the platform's Account, Contact, RecordType and Asset. Only the fields
the gateway and its tests need are here; a field an org has but this table lacks answers INVALID_FIELD,
which is stricter than an org, never kinder. Where a property is an inference, the field says so.
"""

from __future__ import annotations

from typing import Literal

import msgspec

FieldType = Literal["id", "reference", "string", "boolean", "date", "datetime"]

# the person-account fields an org with person accounts adds to Account; a business Account may not
# carry them (inference from how orgs refuse them; see sobjects.py)
PERSON_FIELDS = ("FirstName", "LastName", "PersonBirthdate", "PersonGender", "PersonHomePhone", "PersonEmail")


class Field(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    type: FieldType
    targets: tuple[str, ...] = ()  # a reference: the sObjects it may name (several: polymorphic)
    create: bool = True  # writable on create
    update: bool = True  # writable on update
    required: bool = False  # a create must give it (not nillable, not defaulted)
    default: object = None  # "Defaulted on create"
    length: int = 255  # strings: Salesforce answers STRING_TOO_LONG past it
    label: str = ""  # what Salesforce's messages call it ("Account ID")

    @property
    def relationship(self) -> str | None:
        """The relationship name SOQL traverses (`ParentRecordId` -> `ParentRecord`)."""
        if self.type == "reference" and self.name.endswith("Id"):
            return self.name[:-2]
        return None

    @property
    def polymorphic(self) -> bool:
        return len(self.targets) > 1


class SObject(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    prefix: str  # the key prefix of its ids
    fields: tuple[Field, ...]
    createable: bool = True
    min_version: tuple[int, int] = (20, 0)  # the first API version that has it

    def field(self, name: str) -> Field | None:
        """Field names are case-insensitive in SOQL and in REST bodies' keys (inference for bodies)."""
        return _FIELD_INDEX[self.name].get(name.lower())

    def relationship(self, name: str) -> Field | None:
        """The reference field behind a relationship name (`ParentRecord` -> `ParentRecordId`)."""
        return next((f for f in self.fields if f.relationship and f.relationship.lower() == name.lower()), None)


def _f(name: str, type: FieldType = "string", *targets: str, **props: object) -> Field:
    return Field(name=name, type=type, targets=targets, **props)  # type: ignore[arg-type]


def _system(name: str, label: str) -> tuple[Field, ...]:
    """Fields every record has and no call writes."""
    return (_f("Id", "id", create=False, update=False, label=label), _f("CreatedDate", "datetime", create=False, update=False))


# the parents an Identifier may name (identity.md, `hc_r4_api_objects_Identifier`)
IDENTIFIER_PARENTS = ("Account", "Contact", "HealthcareProvider", "HealthcareFacility",
                      "HealthcarePractitionerFacility", "Asset")

ACCOUNT = SObject(name="Account", prefix="001", fields=(
    *_system("Account", "Account ID"),
    # required for a business Account only; a person Account's Name is made of its names (sobjects.py)
    _f("Name"),
    _f("IsPersonAccount", "boolean", create=False, update=False),
    _f("PersonContactId", "reference", "Contact", create=False, update=False, label="Person Contact ID"),
    _f("FirstName", length=40), _f("LastName", length=80),
    _f("PersonBirthdate", "date"), _f("PersonGender"), _f("PersonHomePhone", length=40), _f("PersonEmail", length=80),
    _f("RecordTypeId", "reference", "RecordType", label="Record Type ID"),
    # idLookup on Account (Health Cloud's fields on Account): an upsert may key on it. Not unique in the
    # docs, so several Accounts may share a value and an upsert then answers 300.
    _f("SourceSystemIdentifier"),
))
CONTACT = SObject(name="Contact", prefix="003", fields=(
    *_system("Contact", "Contact ID"),
    _f("Name", create=False, update=False),  # compound: FirstName LastName
    _f("FirstName", length=40), _f("LastName", required=True, length=80),
    _f("AccountId", "reference", "Account", label="Account ID"),
    _f("IsPersonAccount", "boolean", create=False, update=False),
))
RECORD_TYPE = SObject(name="RecordType", prefix="012", createable=False, fields=(
    *_system("RecordType", "Record Type ID"),
    _f("Name"), _f("DeveloperName"), _f("SobjectType"), _f("IsPersonType", "boolean"), _f("IsActive", "boolean"),
))
HEALTHCARE_PROVIDER = SObject(name="HealthcareProvider", prefix="0cm", fields=(
    *_system("HealthcareProvider", "Healthcare Provider ID"),
    _f("Name", required=True),  # inference: a record name, not nillable like every Name field
    _f("PractitionerId", "reference", "Contact", label="Practitioner ID"),
    _f("AccountId", "reference", "Account", label="Account ID"),
))
HEALTHCARE_FACILITY = SObject(name="HealthcareFacility", prefix="0cf", fields=(
    *_system("HealthcareFacility", "Healthcare Facility ID"),
    _f("Name", required=True),
    _f("AccountId", "reference", "Account", label="Account ID"),
))
PRACTITIONER_FACILITY = SObject(name="HealthcarePractitionerFacility", prefix="0bS", fields=(
    *_system("HealthcarePractitionerFacility", "Healthcare Practitioner Facility ID"),
    _f("Name", required=True),
    _f("PractitionerId", "reference", "Contact", label="Practitioner ID"),
    _f("HealthcareProviderId", "reference", "HealthcareProvider", label="Healthcare Provider ID"),
    _f("AccountId", "reference", "Account", label="Account ID"),
    _f("HealthcareFacilityId", "reference", "HealthcareFacility", label="Healthcare Facility ID"),
    # "Create, Defaulted on create": an HPF made without it is inactive (the object reference)
    _f("IsActive", "boolean", default=False),
    _f("EffectiveFrom", "date"), _f("EffectiveTo", "date"),
    _f("SourceSystem"), _f("SourceSystemIdentifier"),
))
ASSET = SObject(name="Asset", prefix="02i", fields=(
    *_system("Asset", "Asset ID"),
    _f("Name", required=True),
    _f("AccountId", "reference", "Account", label="Account ID"),
    _f("ContactId", "reference", "Contact", label="Contact ID"),
    _f("SerialNumber", length=80),
))
IDENTIFIER = SObject(name="Identifier", prefix="0ci", min_version=(51, 0), fields=(
    *_system("Identifier", "Identifier ID"),
    _f("Name", required=True),
    # the object reference lists IdValue as nillable; the sandbox requires it, as an Identifier without
    # a value identifies nothing (stricter than the docs, never kinder)
    _f("IdValue", required=True),
    _f("SourceSystem"),
    _f("ParentRecordId", "reference", *IDENTIFIER_PARENTS, required=True, label="Parent Record ID"),
    _f("IdUsageType"),  # picklist: Official, Old, Secondary, Temp, Usual (not restricted in the docs)
    # dateTime in the object reference (not date)
    _f("EffectiveDate", "datetime"), _f("EndDate", "datetime"),
))
# Bookings, as the appointment API stores them (state.py). Fields ending in `__c` are the sandbox's own.
SERVICE_APPOINTMENT = SObject(name="ServiceAppointment", prefix="08p", createable=False, fields=(
    _f("Id", "id", create=False), _f("AppointmentNumber"), _f("Status"),
    _f("SchedStartTime", "datetime"), _f("SchedEndTime", "datetime"), _f("Comments", length=32000),
    _f("WorkTypeId", "reference", "WorkType"), _f("ParentRecordId", "reference", "Account"),
    _f("ServiceTerritoryId", "reference", "ServiceTerritory"), _f("AppointmentType"),
    _f("EngagementChannelTypeId", "reference", "EngagementChannelType"), _f("CancellationReason"),
    _f("CreatedDate", "datetime"), _f("LastModifiedDate", "datetime"),
    _f("SourceSystem__c"), _f("PractitionerId__c"), _f("DeviceId__c"), _f("ExternalSlotId__c"), _f("TimeZone__c"),
))

SOBJECTS: dict[str, SObject] = {o.name: o for o in (
    ACCOUNT, CONTACT, RECORD_TYPE, HEALTHCARE_PROVIDER, HEALTHCARE_FACILITY, PRACTITIONER_FACILITY, ASSET, IDENTIFIER,
    SERVICE_APPOINTMENT,
)}
_FIELD_INDEX = {o.name: {f.name.lower(): f for f in o.fields} for o in SOBJECTS.values()}
_BY_LOWER = {name.lower(): o for name, o in SOBJECTS.items()}
BY_PREFIX = {o.prefix: o for o in SOBJECTS.values()}
# the fields of the `Name` object a polymorphic relationship answers with (`ParentRecord.Type`)
NAME_FIELDS = ("Id", "Name", "Type")


def sobject(name: str) -> SObject | None:
    """sObject names are case-insensitive in SOQL and in REST paths."""
    return _BY_LOWER.get(name.lower())
