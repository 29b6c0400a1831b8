"""The org's records: patients (person Accounts and their PersonContacts), facilities (business
Accounts, HealthcareFacility), practitioners (Contacts, HealthcareProvider, HealthcarePractitionerFacility),
devices (Asset) and the Identifier records that hold each EHR's ids (identity.md).

Thread-safe like `SandboxState`: one lock; a record is a dict replaced on every write, never changed in
place, so `rows()` can hand out the stored dicts to readers that only read (SOQL), while `get()` and
`records()` hand out copies. The `add_*` methods are fixtures for tests and the demo's seed (a real org
gets these records from its own data loads); the checked writes of the REST API are `sobjects.py`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, timezone
from typing import Any, Literal

import msgspec

from gateway.sandbox.schema import SOBJECTS, Field
from gateway.sandbox.values import parse_date, parse_datetime, salesforce_id, sf_datetime

PatientOn = Literal["Account", "Contact"]
FacilityOn = Literal["Account", "HealthcareFacility"]
PractitionerOn = Literal["Contact", "HealthcareProvider", "HealthcarePractitionerFacility"]
ORG_OBJECTS = tuple(name for name in SOBJECTS if name != "ServiceAppointment")  # bookings live in state.py
PERSON_RECORD_TYPE = "PersonAccount"


class Made(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True, rename="camel"):
    """The ids a fixture made (JSON: camelCase, as `POST /sandbox/org/*` answers them)."""

    account: str | None = None  # a patient's person Account, a facility's business Account
    person_contact: str | None = None
    contact: str | None = None  # a practitioner's Contact
    healthcare_provider: str | None = None
    healthcare_facility: str | None = None
    practitioner_facilities: dict[str, str] = {}  # facility Account id -> the practitioner's HPF there
    asset: str | None = None
    identifier: str | None = None  # the Identifier holding the EHR id (none for an id kept on the HPF)


def stored_value(field: Field, value: Any) -> Any:
    """A value as the org keeps it and REST answers it: dates `YYYY-MM-DD`, dateTimes
    `…T…+0000`. ValueError names the field, never the value."""
    if value is None:
        return None
    kind = field.type
    if kind == "boolean" and isinstance(value, bool):
        return value
    if kind == "date":
        day = value if isinstance(value, date) and not isinstance(value, datetime) else \
            parse_date(value) if isinstance(value, str) else None
        if day is not None:
            return day.isoformat()
    elif kind == "datetime":
        if isinstance(value, str) and (day := parse_date(value)) is not None:
            value = day  # a fixture's date for a dateTime field: its first instant, UTC
        moment = value if isinstance(value, datetime) else parse_datetime(value) if isinstance(value, str) else \
            datetime(value.year, value.month, value.day, tzinfo=timezone.utc) if isinstance(value, date) else None
        if moment is not None:
            return sf_datetime(moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc))
    elif kind in ("string", "reference", "id") and isinstance(value, str):
        return value
    raise ValueError(f"{field.name} takes a {kind}")


class Org:
    """The records of one org. `planter` fills a fresh org (the demo's seed, `seed.plant`); `reset()`
    brings back exactly that org, with the same ids."""

    def __init__(self, planter: Callable[[Org], Any] | None = None) -> None:
        self._lock = threading.RLock()
        self._planter = planter
        self.seeded: Any = None  # what the planter made (seed.Seeded), for tests to read ids from
        self._fresh()

    def _fresh(self) -> None:
        with self._lock:
            self._tables: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in ORG_OBJECTS}
            self._kinds: dict[str, str] = {}  # 18-character id -> sObject
            self._short: dict[str, str] = {}  # 15-character id -> 18-character id
            self._numbers: dict[str, int] = {}
            self.person_record_type = self._insert("RecordType", {
                "Name": "Person Account", "DeveloperName": PERSON_RECORD_TYPE, "SobjectType": "Account",
                "IsPersonType": True, "IsActive": True})
            self.seeded = self._planter(self) if self._planter is not None else None

    def reset(self) -> None:
        """Forget what was added: the org as it was made (seeded again, with the same ids)."""
        self._fresh()

    # reading ------------------------------------------------------------------------------------
    def resolve(self, record_id: str) -> tuple[str, dict[str, Any]] | None:
        """The sObject and stored record an id names; a 15-character id names the record whose
        18-character id it begins (case-sensitive, as Salesforce's 15-character ids are)."""
        with self._lock:
            full = self._short.get(record_id) if len(record_id) == 15 else record_id
            kind = self._kinds.get(full or "")
            return (kind, self._tables[kind][full]) if kind and full else None

    def rows(self, sobject: str) -> list[dict[str, Any]]:
        """The stored records of one sObject. Read them, never change them."""
        with self._lock:
            return list(self._tables[sobject].values())

    def get(self, record_id: str) -> dict[str, Any] | None:
        found = self.resolve(record_id)
        return dict(found[1]) if found else None

    def records(self, sobject: str) -> list[dict[str, Any]]:
        if sobject not in self._tables:
            raise ValueError("the org holds no such sObject")
        return [dict(r) for r in self.rows(sobject)]

    def identifiers_of(self, *parents: str | None) -> list[dict[str, Any]]:
        wanted = {p for p in parents if p}
        return [r for r in self.rows("Identifier") if r["ParentRecordId"] in wanted]

    def person_duplicates(self, first: str | None, last: str | None, birth: str | None,
                          exclude: str | None = None) -> list[str]:
        """Person Accounts with the same names (case-insensitive) and birth date. Blank fields never
        match, as a matching rule's default is (inference from the standard person-account rule)."""
        if not last or not birth:
            return []
        key = ((first or "").lower(), last.lower(), birth)
        return [r["Id"] for r in self.rows("Account") if r["IsPersonAccount"] and r["Id"] != exclude
                and ((r["FirstName"] or "").lower(), (r["LastName"] or "").lower(), r["PersonBirthdate"]) == key]

    # writing ------------------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the org for a series of writes that must see no one else's (a Composite call)."""
        with self._lock:
            yield

    def savepoint(self) -> Any:
        with self._lock:  # records are replaced, never changed: copying the maps copies the state
            return {k: dict(v) for k, v in self._tables.items()}, dict(self._kinds), dict(self._short)

    def rollback(self, point: Any) -> None:
        """Back to a savepoint. Numbers are not given back: ids a rolled-back insert used stay used."""
        with self._lock:
            tables, kinds, short = point
            self._tables, self._kinds, self._short = {k: dict(v) for k, v in tables.items()}, dict(kinds), dict(short)

    def _insert(self, sobject: str, values: dict[str, Any]) -> str:
        obj = SOBJECTS[sobject]
        with self._lock:
            number = self._numbers.get(obj.prefix, 0) + 1
            self._numbers[obj.prefix] = number
            new_id = salesforce_id(obj.prefix, number)
            record = {f.name: f.default for f in obj.fields}
            record.update(values, Id=new_id, CreatedDate=sf_datetime(datetime.now(timezone.utc)))
            self._tables[sobject][new_id] = record
            self._kinds[new_id] = sobject
            self._short[new_id[:15]] = new_id
            return new_id

    def _replace(self, record_id: str, changes: dict[str, Any]) -> None:
        with self._lock:
            kind = self._kinds[record_id]
            self._tables[kind][record_id] = {**self._tables[kind][record_id], **changes}

    def create(self, sobject: str, values: dict[str, Any]) -> str:
        """Insert checked values (sobjects.py checks them). A person Account gets its PersonContact."""
        if sobject == "Account" and self.is_person_type(values.get("RecordTypeId")):
            return self._insert_person(values)
        if sobject == "Contact":
            values = {**values, "IsPersonAccount": False, "Name": _full_name(values)}
        elif sobject == "Account":
            values = {**values, "IsPersonAccount": False}
        return self._insert(sobject, values)

    def update(self, record_id: str, values: dict[str, Any]) -> None:
        """Apply checked values; a person Account's Name and PersonContact follow its names."""
        with self._lock:
            kind, current = self.resolve(record_id) or (None, None)
            if kind is None or current is None:
                raise KeyError("no such record")
            full_id = current["Id"]
            merged = {**current, **values}
            if kind == "Account" and current["IsPersonAccount"]:
                values = {**values, "Name": _full_name(merged)}
                contact = {k: merged[k] for k in ("FirstName", "LastName")}
                self._replace(current["PersonContactId"], {**contact, "Name": values["Name"]})
            elif kind == "Contact":
                values = {**values, "Name": _full_name(merged)}
            self._replace(full_id, values)

    def is_person_type(self, record_type_id: Any) -> bool:
        found = self.resolve(record_type_id) if isinstance(record_type_id, str) else None
        return bool(found and found[0] == "RecordType" and found[1]["IsPersonType"])

    def _insert_person(self, values: dict[str, Any]) -> str:
        with self._lock:
            name = _full_name(values)
            account = self._insert("Account", {**values, "Name": name, "IsPersonAccount": True})
            contact = self._insert("Contact", {"FirstName": values.get("FirstName"), "LastName": values.get("LastName"),
                                               "Name": name, "AccountId": account, "IsPersonAccount": True})
            self._replace(account, {"PersonContactId": contact})
            return account

    # fixtures -----------------------------------------------------------------------------------
    def add_patient(self, source_system: str, id_value: str, *, first_name: str, last_name: str,
                    birth_date: date | str | None = None, on: PatientOn = "Account") -> Made:
        """A person Account (with its PersonContact) and an Identifier holding the EHR id on the
        Account or on the PersonContact."""
        _one_of("on", on, ("Account", "Contact"))
        birth = stored_value(SOBJECTS["Account"].field("PersonBirthdate"), birth_date)  # type: ignore[arg-type]
        with self._lock:
            account = self._insert_person({"RecordTypeId": self.person_record_type, "FirstName": first_name,
                                           "LastName": last_name, "PersonBirthdate": birth})
            contact = self.resolve(account)[1]["PersonContactId"]  # type: ignore[index]
            identifier = self._identifier(account if on == "Account" else contact, source_system, id_value, "Patient")
        return Made(account=account, person_contact=contact, identifier=identifier)

    def add_facility(self, source_system: str, id_value: str, name: str, *, on: FacilityOn = "Account") -> Made:
        """A business Account, with a HealthcareFacility of it when the EHR id is kept there."""
        _one_of("on", on, ("Account", "HealthcareFacility"))
        with self._lock:
            account = self._insert("Account", {"Name": name, "IsPersonAccount": False})
            facility = self._insert("HealthcareFacility", {"Name": name, "AccountId": account}) \
                if on == "HealthcareFacility" else None
            identifier = self._identifier(facility or account, source_system, id_value, "Facility")
        return Made(account=account, healthcare_facility=facility, identifier=identifier)

    def add_practitioner(self, source_system: str, id_value: str, name: str, *, facilities: list[str],
                         on: PractitionerOn = "Contact", source_on_hpf: bool | None = None) -> Made:
        """A Contact (and a HealthcareProvider of it when the EHR id is kept there) with one active
        HealthcarePractitionerFacility per facility Account. The EHR id: an Identifier on the Contact
        or the HealthcareProvider, or the HPFs' SourceSystem/SourceSystemIdentifier (always there with
        `source_on_hpf`, as the demo's seed has it)."""
        _one_of("on", on, ("Contact", "HealthcareProvider", "HealthcarePractitionerFacility"))
        first, _, last = name.rpartition(" ")
        with self._lock:
            places = [self._facility_account(f) for f in facilities]
            contact = self._insert("Contact", {"FirstName": first or None, "LastName": last, "Name": name,
                                               "IsPersonAccount": False})
            provider = self._insert("HealthcareProvider", {"Name": name, "PractitionerId": contact}) \
                if on == "HealthcareProvider" else None
            on_hpf = on == "HealthcarePractitionerFacility" if source_on_hpf is None else source_on_hpf
            hpfs = {place["Id"]: self._insert("HealthcarePractitionerFacility", {
                "Name": f"{name} at {place['Name']}", "PractitionerId": contact, "HealthcareProviderId": provider,
                "AccountId": place["Id"], "HealthcareFacilityId": self._facility_of(place["Id"]), "IsActive": True,
                "SourceSystem": source_system if on_hpf else None, "SourceSystemIdentifier": id_value if on_hpf else None,
            }) for place in places}
            identifier = None if on == "HealthcarePractitionerFacility" else \
                self._identifier(provider or contact, source_system, id_value, "Practitioner")
        return Made(contact=contact, healthcare_provider=provider, practitioner_facilities=hpfs, identifier=identifier)

    def add_device(self, source_system: str, id_value: str, name: str, *, account_id: str | None = None) -> Made:
        """An Asset (of `account_id`, a facility's Account, when given) and an Identifier on it."""
        with self._lock:
            owner = self._facility_account(account_id)["Id"] if account_id else None
            asset = self._insert("Asset", {"Name": name, "AccountId": owner})
            identifier = self._identifier(asset, source_system, id_value, "Device")
        return Made(asset=asset, identifier=identifier)

    def add_identifier(self, parent_id: str, source_system: str, id_value: str,
                       end_date: date | datetime | str | None = None) -> Made:
        """One more Identifier: a second record for an id (multiple matches), or an ended one."""
        found = self.resolve(parent_id)
        parents = SOBJECTS["Identifier"].field("ParentRecordId").targets  # type: ignore[union-attr]
        if found is None or found[0] not in parents:
            raise ValueError("parentId names no record an Identifier may belong to")
        end = stored_value(SOBJECTS["Identifier"].field("EndDate"), end_date)  # type: ignore[arg-type]
        return Made(identifier=self._identifier(found[1]["Id"], source_system, id_value, found[0], end))

    def set(self, record_id: str, **fields: Any) -> dict[str, Any]:
        """Change fields of a record as a data load would (`IsActive=False`), unchecked but typed."""
        found = self.resolve(record_id)
        if found is None:
            raise KeyError("no such record")
        obj = SOBJECTS[found[0]]
        values = {}
        for name, value in fields.items():
            field = obj.field(name)
            if field is None or field.name in ("Id", "CreatedDate"):
                raise ValueError(f"{obj.name} has no settable field {name}")
            values[field.name] = stored_value(field, value)
        self.update(found[1]["Id"], values)
        return self.get(record_id) or {}

    def _identifier(self, parent: str, system: str, value: str, kind: str, end: str | None = None) -> str:
        return self._insert("Identifier", {"Name": f"{kind} id ({system})", "IdValue": value, "SourceSystem": system,
                                           "ParentRecordId": parent, "IdUsageType": "Official", "EndDate": end})

    def _facility_account(self, account_id: Any) -> dict[str, Any]:
        found = self.resolve(account_id) if isinstance(account_id, str) else None
        if found is None or found[0] != "Account" or found[1]["IsPersonAccount"]:
            raise ValueError("a facility is a business Account id")
        return found[1]

    def _facility_of(self, account_id: str) -> str | None:
        return next((r["Id"] for r in self.rows("HealthcareFacility") if r["AccountId"] == account_id), None)


def _full_name(values: dict[str, Any]) -> str:
    return " ".join(v for v in (values.get("FirstName"), values.get("LastName")) if v)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}")
