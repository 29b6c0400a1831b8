"""A patient the org does not know, created from the EHR's own data (`unknown_patient = "create"`).

Never blindly (identity.md): the person Account is upserted on its external id, `SourceSystemIdentifier`
(`<SourceSystem>|<EHR id>`, so two EHRs' equal ids stay two people), and its Identifier is created
with it, in one Composite with `allOrNone` (one API call; both or neither), under Salesforce's duplicate
rules (`Sforce-Duplicate-Rule-Header: allowSave=false`). Sent again after a lost answer, the upsert
finds the Account it made instead of making a second; and the lease holder looks the patient up before
creating at all, so a retry finds what the first attempt made. A duplicate-rule hit, or an external id
that matches several Accounts, is no new patient: it goes to the operators (`NeedsOperator`).

Demographics: HL7 v2's PID (the canonical booking's `patient`), else the EHR's FHIR Patient read
through the source's EHR client (`[sources.<name>.ehr]`). A patient without a family name cannot be
created (Salesforce requires LastName): that too is for the operators.
"""

from __future__ import annotations

from urllib.parse import quote

from gateway.canonical import CanonicalBooking, Participant, Person
from gateway.ehr.base import EhrClient
from gateway.errors import GatewayError, NotFound, SalesforceFailed
from gateway.identity.model import EhrId, IdentityRecord
from gateway.identity.queries import query_string
from gateway.outbound.calls import CallRecord
from gateway.salesforce.client import SALESFORCE_ID, SalesforceClient, error_codes
from gateway.salesforce.wire import CompositeSub, CompositeSubAnswer
from gateway.settings import SourceSettings

_RECORD_TYPE = ("SELECT Id FROM RecordType WHERE SobjectType = 'Account' AND IsPersonType = true "
                "AND IsActive = true LIMIT 1")
_GENDERS = {"male": "Male", "female": "Female", "other": "Other", "unknown": "Unknown"}
# codes that say the org holds the patient already, in a way the gateway must not decide for it
_FOR_OPERATORS = frozenset({"DUPLICATES_DETECTED", "DUPLICATE_VALUE", "MULTIPLE_CHOICES"})
# why a held booking waits for the operators: its patient is not created again on its next tries
OPERATORS_DECIDE = _FOR_OPERATORS | {"NO_FAMILY_NAME", "NO_EHR_CLIENT", "NOT_IN_EHR"}


class NeedsOperator(GatewayError):
    """The patient cannot be created without a person deciding (a likely duplicate, several matches,
    too little data): the booking waits, held, for the operators."""

    status, code = 409, "duplicate"

    def __init__(self, reason: str) -> None:
        super().__init__(f"the patient cannot be created without an operator ({reason})", details_code=reason)
        self.reason = reason


class PatientCreator:
    def __init__(self, sources: dict[str, SourceSettings], client: SalesforceClient,
                 ehrs: dict[str, EhrClient]) -> None:
        self._sources, self._client, self._ehrs = sources, client, ehrs

    async def create(self, source: str, booking: CanonicalBooking, patient: Participant, ehr: EhrId,
                     record: IdentityRecord) -> str:
        """The new (or found) person Account's id. Raises NeedsOperator, or Unavailable and
        SalesforceFailed (and the EHR's failures) when it can be tried again later."""
        person = booking.patient if booking.patient is not None else await self._from_ehr(source, patient)
        if not person.family:
            raise NeedsOperator("NO_FAMILY_NAME")
        call = CallRecord()
        try:
            answers = await self._client.composite(
                self._plan(source, person, ehr), call, all_or_none=True, counted=True,
                headers={"Sforce-Duplicate-Rule-Header": "allowSave=false"})
        finally:
            record.calls += 1
            record.call = call
        return _account(answers)

    async def _from_ehr(self, source: str, patient: Participant) -> Person:
        ehr = self._ehrs.get(source)
        if ehr is None:  # the settings check refuses `create` without an EHR client for a FHIR source
            raise NeedsOperator("NO_EHR_CLIENT")
        try:
            return await ehr.patient(patient.value, patient.system, CallRecord())
        except NotFound:
            raise NeedsOperator("NOT_IN_EHR") from None

    def _plan(self, source: str, person: Person, ehr: EhrId) -> list[CompositeSub]:
        settings = self._sources[source].identity
        data = self._client.data_path
        subs = []
        record_type: str = settings.person_record_type_id or "@{recordType.records[0].Id}"
        if settings.person_record_type_id is None:
            subs.append(CompositeSub(method="GET", url=f"{data}/query?{query_string(_RECORD_TYPE)}",
                                     referenceId="recordType"))
        account: dict[str, object] = {"RecordTypeId": record_type, "LastName": person.family}
        for field, value in (("FirstName", person.given), ("PersonBirthdate", person.birth_date),
                             ("PersonGender", _GENDERS.get(person.gender or "")), ("PersonHomePhone", person.phone)):
            if value:
                account[field] = value
        key = quote(f"{ehr.system}|{ehr.value}", safe="")
        rule = {"Sforce-Duplicate-Rule-Header": "allowSave=false"}
        subs.append(CompositeSub(method="PATCH", url=f"{data}/sobjects/Account/SourceSystemIdentifier/{key}",
                                 referenceId="patient", body=account, httpHeaders=rule))
        subs.append(CompositeSub(method="POST", url=f"{data}/sobjects/Identifier", referenceId="identifier",
                                 body={"Name": f"{ehr.system} patient id", "IdValue": ehr.value,
                                       "SourceSystem": ehr.system, "ParentRecordId": "@{patient.id}",
                                       "IdUsageType": "Official"}, httpHeaders=rule))
        return subs


def _account(answers: list[CompositeSubAnswer]) -> str:
    """The Account the upsert made or found; a refusal for operators raises NeedsOperator, any other
    SalesforceFailed (the Composite rolled back: nothing was made)."""
    by_ref = {a.referenceId: a for a in answers}
    patient = by_ref.get("patient")
    if patient is not None and patient.httpStatusCode == 300:
        raise NeedsOperator("MULTIPLE_CHOICES")
    codes = [c for a in answers if a.httpStatusCode >= 400 for c in error_codes(a.body)]
    if reason := next((c for c in codes if c in _FOR_OPERATORS), None):
        raise NeedsOperator(reason)
    if codes or patient is None or patient.httpStatusCode not in (200, 201):
        first = next((c for c in codes if c != "PROCESSING_HALTED"), codes[0] if codes else None)
        raise SalesforceFailed("Salesforce did not create the patient", details_code=first)
    body = patient.body if isinstance(patient.body, dict) else {}
    account = body.get("id")
    if not isinstance(account, str) or not SALESFORCE_ID.fullmatch(account):
        raise SalesforceFailed("Salesforce's answer to the patient's creation cannot be read")
    return account
