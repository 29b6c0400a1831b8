"""The Health Cloud sandbox as an org (issue 20): it holds patients, facilities, practitioners, devices and
their EHR ids, answers the gateway's SOQL and Composite over them as Salesforce does, refuses what an org
refuses, and refuses a booking whose references are not its records. Over real HTTP, with
`require_records` on, as the gateway's side will run it once its resolver lands."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_plus

import httpx
import pytest
from litestar import Litestar, Request, get, post
from litestar.params import FromPath

from gateway.edges.server import ThreadedServer
from gateway.sandbox import SandboxConfig, create_sandbox_app
from gateway.sandbox.seed import DEMO
from gateway.sandbox.state import SandboxState

CLIENT_ID, CLIENT_SECRET, CONTROL_KEY = "org-client", "org-secret", "org-control-key"
API = "/services/data/v66.0"
BOOK = f"{API}/connect/health/appointment-management/appointment"
SLOTS = f"{API}/connect/health/appointment-management/slots"
IDENTIFIERS = (
    "SELECT Id, IdValue, SourceSystem, ParentRecordId, TYPEOF ParentRecord WHEN Account THEN IsPersonAccount "
    "WHEN Contact THEN AccountId WHEN HealthcareFacility THEN AccountId WHEN HealthcarePractitionerFacility THEN "
    "AccountId, IsActive ELSE Id END FROM Identifier WHERE SourceSystem IN ({systems}) AND IdValue IN ({values}) "
    "AND (EndDate = null OR EndDate > TODAY)"
)
HPF_FIELDS = "Id, PractitionerId, HealthcareProviderId, AccountId, EffectiveFrom, EffectiveTo"
HPF_BY = (f"SELECT {HPF_FIELDS} FROM HealthcarePractitionerFacility WHERE IsActive = true AND {{field}} IN "
          "(SELECT ParentRecordId FROM Identifier WHERE SourceSystem IN ({systems}) AND IdValue IN ({values}))")
HPF_SOURCE = (f"SELECT {HPF_FIELDS}, SourceSystem, SourceSystemIdentifier FROM HealthcarePractitionerFacility "
              "WHERE IsActive = true AND SourceSystem IN ({systems}) AND SourceSystemIdentifier IN ({values})")
PERSON_TYPE = "SELECT Id FROM RecordType WHERE SobjectType = 'Account' AND IsPersonType = true AND IsActive = true LIMIT 1"


def quoted(*values: str) -> str:
    return ",".join(f"'{v}'" for v in values)


@dataclass
class Running:
    server: ThreadedServer
    state: SandboxState
    client: httpx.Client
    _token: str | None = field(default=None)

    def auth(self) -> dict[str, str]:
        if self._token is None:
            r = self.client.post("/services/oauth2/token", data={
                "grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
            assert r.status_code == 200, r.text
            self._token = r.json()["access_token"]
        return {"Authorization": f"Bearer {self._token}"}

    def query(self, q: str, version: str = "v66.0") -> httpx.Response:
        return self.client.get(f"/services/data/{version}/query", params={"q": q}, headers=self.auth())

    def records(self, q: str) -> list[dict[str, Any]]:
        r = self.query(q)
        assert r.status_code == 200, r.text
        return r.json()["records"]  # type: ignore[no-any-return]

    def composite(self, subrequests: list[dict[str, Any]], all_or_none: bool = False,
                  headers: dict[str, str] | None = None) -> httpx.Response:
        body = {"allOrNone": all_or_none, "compositeRequest": subrequests}
        return self.client.post(f"{API}/composite", json=body, headers={**self.auth(), **(headers or {})})

    def upsert(self, value: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
        return self.client.patch(f"{API}/sobjects/Account/SourceSystemIdentifier/{value}", json=body,
                                 headers={**self.auth(), **(headers or {})})

    def create(self, sobject: str, body: Any) -> httpx.Response:
        return self.client.post(f"{API}/sobjects/{sobject}", json=body, headers=self.auth())

    @property
    def seeded(self) -> Any:
        return self.state.org.seeded


def _start(**overrides: Any) -> Running:
    config = SandboxConfig(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, control_key=CONTROL_KEY,
                           require_records=True, **overrides)
    app = create_sandbox_app(config)
    server = ThreadedServer(app).start()
    client = httpx.Client(base_url=server.url, timeout=10, headers={"Authorization": f"Bearer {CONTROL_KEY}"})
    return Running(server, app.state.sandbox, client)


@pytest.fixture(scope="module")
def _shared() -> Iterator[Running]:
    running = _start()
    yield running
    running.client.close()
    running.server.stop()


@pytest.fixture
def org(_shared: Running) -> Running:
    """The demo org with require_records on, reset: the seed and nothing else."""
    _shared.state.reset()
    _shared._token = None
    return _shared


def assert_refused(r: httpx.Response, status: int, code: str, *hidden: str, fields: list[str] | None = None) -> None:
    """Salesforce's error list with `code` (and `fields`), and none of `hidden` anywhere in the answer."""
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body, list) and code in [e["errorCode"] for e in body], body
    if fields is not None:
        assert any(e["errorCode"] == code and e.get("fields") == fields for e in body), body
    for value in hidden:
        assert value not in r.text, (value, r.text)


# --- the seed: every EHR id resolves by the gateway's own query shapes ------------------------------------


def _identified(org: Running, system: str, values: list[str]) -> dict[str, list[dict[str, Any]]]:
    rows = org.records(IDENTIFIERS.format(systems=quoted(system), values=quoted(*values)))
    found: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        found.setdefault(row["IdValue"], []).append(row)
    return found


def _account_of(row: dict[str, Any]) -> tuple[str, str | None]:
    """What an Identifier row names: its parent's type and the Account (or Asset) it stands for."""
    parent = row["ParentRecord"]
    kind = parent["attributes"]["type"]
    if kind == "Account":
        return ("patient" if parent["IsPersonAccount"] else "facility"), row["ParentRecordId"]
    if kind in ("Contact", "HealthcareFacility"):
        return kind, parent["AccountId"]
    return kind, row["ParentRecordId"]


@pytest.mark.parametrize("system", sorted(DEMO))
def test_every_seeded_patient_facility_and_device_resolves_through_its_identifier(org: Running, system: str) -> None:
    """One Identifier query per source system, all its ids in one IN list, as the gateway sends it; each id's
    parent is the right record: a person Account (on it or its PersonContact), a business Account (on it or
    its HealthcareFacility), an Asset."""
    made = org.seeded[system]
    values = [*made["patients"], *made["facilities"], *made["devices"]]
    found = _identified(org, system, values)
    for value, ids in made["patients"].items():
        rows = [_account_of(r) for r in found[value]]
        assert ("patient", ids.account) in rows or ("Contact", ids.account) in rows, (value, rows)
        person = org.state.org.get(ids.account)
        assert person["IsPersonAccount"] and person["PersonContactId"] == ids.person_contact
    for value, ids in made["facilities"].items():
        rows = [_account_of(r) for r in found[value]]
        assert ("facility", ids.account) in rows or ("HealthcareFacility", ids.account) in rows, (value, rows)
    for value, ids in made["devices"].items():
        assert ("Asset", ids.asset) in [_account_of(r) for r in found[value]]
        assert found[value][0]["ParentRecord"] == {"attributes": {
            "type": "Asset", "url": f"{API}/sobjects/Asset/{ids.asset}"}, "Id": ids.asset}


@pytest.mark.parametrize("system", sorted(DEMO))
def test_every_seeded_practitioner_has_an_active_hpf_at_every_facility_of_its_system(org: Running, system: str) -> None:
    made = org.seeded[system]
    places = {ids.account for ids in made["facilities"].values()}
    for value, ids in made["practitioners"].items():
        assert set(ids.practitioner_facilities) == places
        rows = org.records(HPF_SOURCE.format(systems=quoted(system), values=quoted(value)))
        assert {r["Id"] for r in rows} == set(ids.practitioner_facilities.values())
        assert {r["AccountId"] for r in rows} == places
        assert {(r["SourceSystem"], r["SourceSystemIdentifier"]) for r in rows} == {(system, value)}
        shape = DEMO[system].practitioners
        on = next(p.on for p in shape if p.id_value == value)
        if on == "HealthcarePractitionerFacility":
            assert value not in _identified(org, system, [value])  # the HPFs alone hold it
            continue
        field = "PractitionerId" if on == "Contact" else "HealthcareProviderId"
        joined = org.records(HPF_BY.format(field=field, systems=quoted(system), values=quoted(value)))
        assert {r["Id"] for r in joined} == set(ids.practitioner_facilities.values()), (value, on)
        assert all(r["PractitionerId"] == ids.contact for r in joined)


def test_the_seed_spreads_ids_over_every_storage_shape() -> None:
    shapes = {(kind, row.on) for system in DEMO.values() for kind in ("patients", "facilities", "practitioners")
              for row in getattr(system, kind)}
    assert shapes == {("patients", "Account"), ("patients", "Contact"), ("facilities", "Account"),
                      ("facilities", "HealthcareFacility"), ("practitioners", "Contact"),
                      ("practitioners", "HealthcareProvider"), ("practitioners", "HealthcarePractitionerFacility")}


def test_colliding_ids_are_told_apart_by_the_parents_type(org: Running) -> None:
    """`example` is a patient and a practitioner of `fhir`, `1` a practitioner and a facility (identity.md)."""
    found = _identified(org, "fhir", ["example", "1"])
    assert sorted(_account_of(r)[0] for r in found["example"]) == ["Contact", "patient"]
    assert sorted(_account_of(r)[0] for r in found["1"]) == ["Contact", "facility"]
    contact = next(r for r in found["example"] if r["ParentRecord"]["attributes"]["type"] == "Contact")
    assert contact["ParentRecord"]["AccountId"] is None  # a practitioner's Contact, not a PersonContact


def test_the_seed_is_the_same_at_every_start_and_after_a_reset(org: Running) -> None:
    before = org.seeded
    other = create_sandbox_app(SandboxConfig()).state.sandbox
    assert other.org.seeded == before
    org.state.reset()
    assert org.seeded == before
    assert org.records(PERSON_TYPE)[0]["Id"] == org.state.org.person_record_type
    assert create_sandbox_app(SandboxConfig(org_seed="empty")).state.sandbox.org.rows("Account") == []


def test_the_seed_is_readable_over_http(org: Running) -> None:
    r = org.client.get("/sandbox/org/seed")
    assert r.status_code == 200
    cerner = r.json()["cerner"]
    made = org.seeded["cerner"]
    assert cerner["patients"]["12724066"]["account"] == made["patients"]["12724066"].account
    assert cerner["practitioners"]["593923"]["practitionerFacilities"] == made["practitioners"]["593923"].practitioner_facilities


# --- SOQL ------------------------------------------------------------------------------------------------


def _names(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(r["Name"] for r in rows)


def test_where_with_or_parentheses_and_not(org: Running) -> None:
    athena = "SELECT Name FROM Account WHERE IsPersonAccount = true AND {} ORDER BY Name"
    both = org.records(athena.format("(LastName = 'Smith' OR FirstName = 'Roscoe')"))
    assert _names(both) == ["Herman Smith", "Michael Smith", "Roscoe Hall"]
    assert _names(org.records(athena.format("NOT LastName = 'Smith' AND LastName LIKE 'h%'"))) == ["Roscoe Hall"]
    either = org.records("SELECT Name FROM Account WHERE LastName = 'Wright' OR LastName = 'Hall'")
    assert _names(either) == ["Roscoe Hall", "Theron Wright"]
    nested = org.records("SELECT Name FROM Account WHERE (LastName = 'Smith' AND FirstName = 'Herman') OR "
                         "(LastName = 'Hall' AND (FirstName = 'Roscoe' OR FirstName = 'Nobody'))")
    assert _names(nested) == ["Herman Smith", "Roscoe Hall"]


def test_comparisons_and_literals_by_field_type(org: Running) -> None:
    born = org.records("SELECT Name, PersonBirthdate FROM Account WHERE PersonBirthdate >= 2001-01-01 "
                       "AND PersonBirthdate != null ORDER BY PersonBirthdate DESC")
    assert [r["Name"] for r in born] == ["Michael Smith", "Theron Wright", "Etta Sandbox"]
    assert born[0]["PersonBirthdate"] == "2008-02-05"
    assert org.records("SELECT Id FROM Account WHERE PersonBirthdate < TODAY AND LastName = 'Hall'")
    assert org.records("SELECT Id FROM Identifier WHERE CreatedDate <= TODAY AND CreatedDate >= TODAY LIMIT 1")
    assert not org.records("SELECT Id FROM Identifier WHERE CreatedDate > TODAY")
    assert not org.records("SELECT Id FROM Identifier WHERE EndDate != null")
    assert len(org.records("SELECT Id FROM Identifier WHERE IdValue NOT IN ('12724066') AND SourceSystem = 'cerner'")) == 6
    matched = org.records("SELECT IdValue FROM Identifier WHERE IdValue LIKE 'e%' AND SourceSystem = 'EPIC'")
    assert sorted(r["IdValue"] for r in matched) == sorted(["efvHwbc1k1CQ9XjM1zvvefQ3", "eq7IBvJQy2Y5wZqgZ3bRz6A3",
                                                            "eTplvxIxTqsb3WI4wX1bpTw3", "e4W4rmGe9QzuGm2Dy4NBqVc0JDSNEiE3",
                                                            "eM5CWtq15N0WJeuCet5bJlQ3", "eivaFtl6ABQ3Vx6nQ4bmM6Q3"])
    account = org.seeded["cerner"]["patients"]["12724066"].account
    assert [r["Id"] for r in org.records(f"SELECT Id FROM Account WHERE Id = '{account[:15]}'")] == [account]


def test_an_ended_identifier_is_not_found_by_the_gateways_query(org: Running) -> None:
    account = org.seeded["cerner"]["patients"]["12724066"].account
    org.state.org.add_identifier(account, "cerner", "old-mrn", end_date="2020-01-01T00:00:00Z")
    org.state.org.add_identifier(account, "cerner", "next-mrn", end_date="2999-01-01")
    found = _identified(org, "cerner", ["old-mrn", "next-mrn"])
    assert list(found) == ["next-mrn"]


def test_count_order_limit_offset(org: Running) -> None:
    r = org.query("SELECT COUNT() FROM Account WHERE IsPersonAccount = false")
    assert r.json() == {"totalSize": 9, "done": True, "records": []}
    page = org.records("SELECT Name FROM Account WHERE IsPersonAccount = true ORDER BY LastName, FirstName DESC "
                       "LIMIT 3 OFFSET 1")
    assert [r["Name"] for r in page] == ["Roscoe Hall", "Wilma Sandbox", "Patty Sandbox"]


def test_typeof_and_name_fields_answer_the_parent_as_an_object(org: Running) -> None:
    made = org.seeded["cerner"]
    rows = {r["IdValue"]: r for r in org.records(IDENTIFIERS.format(systems="'cerner'", values=quoted(
        "12742400", "32216049", "593923")))}
    contact = made["patients"]["12742400"]
    assert rows["12742400"]["ParentRecord"] == {"attributes": {"type": "Contact", "url": f"{API}/sobjects/Contact/"
                                                               f"{contact.person_contact}"}, "AccountId": contact.account}
    assert rows["32216049"]["ParentRecord"]["AccountId"] == made["facilities"]["32216049"].account
    assert list(rows["593923"]) == ["attributes", "Id", "IdValue", "SourceSystem", "ParentRecordId", "ParentRecord"]
    named = org.records("SELECT ParentRecord.Type, ParentRecord.Id FROM Identifier WHERE ParentRecord.Type IN "
                        "('HealthcareProvider') AND SourceSystem = 'cerner'")
    provider = made["practitioners"]["709937"].healthcare_provider
    assert named == [{"attributes": named[0]["attributes"], "ParentRecord": {"attributes": {
        "type": "Name", "url": f"{API}/sobjects/HealthcareProvider/{provider}"}, "Type": "HealthcareProvider",
        "Id": provider}}]
    assert named[0]["attributes"]["type"] == "Identifier" and named[0]["attributes"]["url"].startswith(API)


def test_typeof_else_and_a_parent_that_is_gone(org: Running) -> None:
    device = org.seeded["fhir"]["devices"]["infusion-1"]
    q = ("SELECT Id, TYPEOF ParentRecord WHEN Account THEN Name ELSE Id, Type, Name END FROM Identifier "
         f"WHERE Id = '{device.identifier}'")
    assert org.records(q)[0]["ParentRecord"] == {"attributes": {"type": "Asset", "url": f"{API}/sobjects/Asset/"
                                                                f"{device.asset}"}, "Id": device.asset,
                                                 "Type": "Asset", "Name": "Sandbox infusion pump 1"}
    org.state.org.set(device.identifier, ParentRecordId="02iHs0000000zzzAAA")  # a parent deleted since
    assert org.records(q)[0]["ParentRecord"] is None
    assert org.records(f"SELECT ParentRecord.Type FROM Identifier WHERE Id = '{device.identifier}'")[0] == {
        "attributes": {"type": "Identifier", "url": f"{API}/sobjects/Identifier/{device.identifier}"},
        "ParentRecord": None}


def test_semi_and_anti_joins(org: Running) -> None:
    made = org.seeded["cerner"]
    joined = org.records(HPF_BY.format(field="PractitionerId", systems="'cerner'", values="'593923'"))
    assert len(joined) == 3
    others = org.records("SELECT Id FROM HealthcarePractitionerFacility WHERE AccountId IN (SELECT ParentRecordId "
                         "FROM Identifier WHERE SourceSystem = 'cerner' AND IdValue = '21304876') AND PractitionerId "
                         "NOT IN (SELECT ParentRecordId FROM Identifier WHERE IdValue IN ('593923'))")
    place = made["facilities"]["21304876"].account
    assert {r["Id"] for r in others} == {made["practitioners"][p].practitioner_facilities[place]
                                         for p in ("709937", "1912007")}
    accounts = org.records("SELECT Id FROM Account WHERE Id IN (SELECT AccountId FROM HealthcareFacility)")
    assert len(accounts) == 4


@pytest.mark.parametrize(("q", "code"), [
    # semi-joins only at the top level of the outer WHERE, never under OR, NOT or parentheses
    ("SELECT Id FROM HealthcarePractitionerFacility WHERE IsActive = true OR PractitionerId IN "
     "(SELECT ParentRecordId FROM Identifier)", "MALFORMED_QUERY"),
    ("SELECT Id FROM HealthcarePractitionerFacility WHERE IsActive = true AND (PractitionerId IN "
     "(SELECT ParentRecordId FROM Identifier) OR IsActive = false)", "MALFORMED_QUERY"),
    ("SELECT Id FROM HealthcarePractitionerFacility WHERE (IsActive = true AND PractitionerId IN "
     "(SELECT ParentRecordId FROM Identifier)) AND IsActive = true", "MALFORMED_QUERY"),
    ("SELECT Id FROM HealthcarePractitionerFacility WHERE NOT PractitionerId IN "
     "(SELECT ParentRecordId FROM Identifier)", "MALFORMED_QUERY"),
    # at most two
    ("SELECT Id FROM HealthcarePractitionerFacility WHERE PractitionerId IN (SELECT ParentRecordId FROM Identifier) "
     "AND AccountId IN (SELECT AccountId FROM Contact) AND HealthcareProviderId NOT IN "
     "(SELECT ParentRecordId FROM Identifier)", "EXCEEDED_MAX_SEMIJOIN_SUBSELECTS"),
    # no semi-join inside a semi-join, no TYPEOF, one Id or reference field, another object, no ORDER BY
    ("SELECT Id FROM Account WHERE Id IN (SELECT AccountId FROM Contact WHERE Id IN "
     "(SELECT ParentRecordId FROM Identifier))", "MALFORMED_QUERY"),
    ("SELECT Id FROM Account WHERE Id IN (SELECT TYPEOF ParentRecord WHEN Account THEN Id END FROM Identifier)",
     "MALFORMED_QUERY"),
    ("SELECT Id FROM Account WHERE Id IN (SELECT AccountId, Id FROM Contact)", "MALFORMED_QUERY"),
    ("SELECT Id FROM Account WHERE Id IN (SELECT LastName FROM Contact)", "MALFORMED_QUERY"),
    ("SELECT Id FROM Account WHERE Id IN (SELECT Id FROM Account)", "MALFORMED_QUERY"),
    ("SELECT Id FROM Account WHERE Id IN (SELECT AccountId FROM Contact ORDER BY AccountId)", "MALFORMED_QUERY"),
    ("SELECT Id FROM Account WHERE Name IN (SELECT AccountId FROM Contact)", "MALFORMED_QUERY"),
    # TYPEOF: on a polymorphic relationship, for a type it can name, not with the same relationship's fields
    ("SELECT TYPEOF ParentRecord WHEN Contact THEN AccountId END, ParentRecord.Type FROM Identifier",
     "MALFORMED_QUERY"),
    ("SELECT TYPEOF Account WHEN Account THEN Name END FROM HealthcareFacility", "MALFORMED_QUERY"),
    ("SELECT TYPEOF ParentRecord WHEN RecordType THEN Name END FROM Identifier", "INVALID_TYPE"),
    ("SELECT TYPEOF ParentRecord WHEN Contact THEN IsActive END FROM Identifier", "INVALID_FIELD"),
    ("SELECT TYPEOF ParentRecord ELSE Id END FROM Identifier", "MALFORMED_QUERY"),
    ("SELECT Id FROM Identifier WHERE TYPEOF ParentRecord WHEN Contact THEN AccountId END = null", "MALFORMED_QUERY"),
    # fields of the sObject, literals of the field's type
    ("SELECT IdValue FROM Account", "INVALID_FIELD"),
    ("SELECT Id FROM Identifier WHERE IsActive = true", "INVALID_FIELD"),
    ("SELECT Id FROM Identifier WHERE IdValue = true", "INVALID_QUERY_FILTER_OPERATOR"),
    ("SELECT Id FROM HealthcarePractitionerFacility WHERE IsActive = 'true'", "INVALID_QUERY_FILTER_OPERATOR"),
    ("SELECT Id FROM HealthcarePractitionerFacility WHERE IsActive > false", "INVALID_QUERY_FILTER_OPERATOR"),
    ("SELECT Id FROM Account WHERE PersonBirthdate = '1997-10-06'", "INVALID_QUERY_FILTER_OPERATOR"),
    ("SELECT Id FROM Account WHERE PersonBirthdate = 1997-10-06T00:00:00Z", "INVALID_QUERY_FILTER_OPERATOR"),
    ("SELECT Id FROM Identifier WHERE EndDate > 2026-01-01", "INVALID_QUERY_FILTER_OPERATOR"),
    ("SELECT Id FROM Identifier WHERE IdValue = 12724066", "INVALID_QUERY_FILTER_OPERATOR"),
    ("SELECT Id FROM Identifier WHERE ParentRecordId = '12724066'", "INVALID_QUERY_FILTER_OPERATOR"),
    ("SELECT Id FROM Account WHERE IsPersonAccount LIKE 'true'", "INVALID_QUERY_FILTER_OPERATOR"),
    ("SELECT Id FROM Identifier WHERE EndDate = YESTERDAY", "MALFORMED_QUERY"),
    ("SELECT Id FROM Identifier WHERE IdValue = 'a' AND SourceSystem = 'b' OR SourceSystem = 'c'", "MALFORMED_QUERY"),
    ("SELECT Id FROM Contact WHERE Account.Name = 'x'", "MALFORMED_QUERY"),
    ("SELECT Id FROM Contact WHERE Nothing.Name = 'x'", "INVALID_FIELD"),
    ("SELECT Id, Id FROM Contact", "MALFORMED_QUERY"),
    ("SELECT Id FROM Opportunity", "INVALID_TYPE"),
])
def test_soql_refusals(org: Running, q: str, code: str) -> None:
    assert_refused(org.query(q), 400, code, "12724066", "1997-10-06")


def test_api_versions_gate_identifier_and_typeof(org: Running) -> None:
    assert_refused(org.query("SELECT Id FROM Identifier", "v50.0"), 400, "INVALID_TYPE")
    assert org.query("SELECT Id FROM Identifier LIMIT 1", "v51.0").status_code == 200
    typeof = "SELECT Id, TYPEOF ParentRecord WHEN Contact THEN AccountId END FROM Identifier LIMIT 1"
    assert org.query(typeof, "v51.0").status_code == 200
    r = org.query(typeof, "v45.0")  # TYPEOF is 46.0 and later: refused before FROM is read
    assert_refused(r, 400, "MALFORMED_QUERY")
    assert "TYPEOF" in r.json()[0]["message"]


# --- sObject create, read, upsert, and the duplicate rule ---------------------------------------------


def _person(org: Running, **fields: Any) -> dict[str, Any]:
    return {"RecordTypeId": org.state.org.person_record_type, "FirstName": "Dora", "LastName": "Sandbox-Newpatient",
            "PersonBirthdate": "1966-06-06", **fields}


def test_upsert_creates_then_updates_a_person_account(org: Running) -> None:
    created = org.upsert("cerner-5550001", _person(org))
    assert created.status_code == 201, created.text
    new_id = created.json()["id"]
    assert created.json() == {"id": new_id, "success": True, "errors": [], "created": True}
    assert created.headers["Location"] == f"{API}/sobjects/Account/{new_id}"
    assert created.headers["Sforce-Limit-Info"].startswith("api-usage=")
    record = org.state.org.get(new_id)
    assert record["IsPersonAccount"] and record["Name"] == "Dora Sandbox-Newpatient"
    assert record["SourceSystemIdentifier"] == "cerner-5550001" and record["PersonBirthdate"] == "1966-06-06"
    contact = org.state.org.get(record["PersonContactId"])
    assert contact["AccountId"] == new_id and contact["IsPersonAccount"]

    updated = org.upsert("cerner-5550001", {"FirstName": "Dorothy"})
    assert updated.status_code == 200, updated.text
    assert updated.json() == {"id": new_id, "success": True, "errors": [], "created": False}
    assert org.state.org.get(new_id)["Name"] == "Dorothy Sandbox-Newpatient"
    assert org.state.org.get(record["PersonContactId"])["FirstName"] == "Dorothy"
    read = org.client.get(f"{API}/sobjects/Account/{new_id[:15]}", params={"fields": "Name,PersonContactId"},
                          headers=org.auth())
    assert read.json() == {"attributes": {"type": "Account", "url": f"{API}/sobjects/Account/{new_id}"},
                           "Name": "Dorothy Sandbox-Newpatient", "PersonContactId": record["PersonContactId"]}
    assert org.state.counters().sobject_calls == 3


def test_upsert_with_several_matches_answers_300(org: Running) -> None:
    made = org.seeded["athena"]["patients"]
    for value in ("70690", "51544"):
        org.state.org.set(made[value].account, SourceSystemIdentifier="shared-key")
    r = org.upsert("shared-key", {"FirstName": "X"})
    assert r.status_code == 300
    assert sorted(r.json()) == sorted(f"{API}/sobjects/Account/{made[v].account}" for v in ("70690", "51544"))
    assert org.state.org.get(made["70690"].account)["FirstName"] == "Roscoe"


def test_upsert_takes_only_its_external_id(org: Running) -> None:
    assert_refused(org.client.patch(f"{API}/sobjects/Account/Name/x", json={}, headers=org.auth()), 404, "NOT_FOUND")
    assert_refused(org.upsert("k-1", _person(org, SourceSystemIdentifier="k-2")), 400, "INVALID_FIELD", "k-2")


@pytest.mark.parametrize(("sobject", "body", "code", "fields"), [
    ("Account", {"FirstName": "Ann"}, "INVALID_FIELD_FOR_INSERT_UPDATE", ["FirstName"]),  # a business Account
    ("Account", {"Industry": "x", "Name": "Clinic"}, "INVALID_FIELD", ["Industry"]),
    ("Account", {}, "REQUIRED_FIELD_MISSING", ["Name"]),
    ("Account", {"Name": "Clinic", "IsPersonAccount": True}, "INVALID_FIELD_FOR_INSERT_UPDATE", ["IsPersonAccount"]),
    ("Account", {"Name": "Clinic", "RecordTypeId": "not-an-id"}, "MALFORMED_ID", ["RecordTypeId"]),
    ("Account", {"Name": "x" * 256}, "STRING_TOO_LONG", ["Name"]),
    ("Contact", {"FirstName": "Ann"}, "REQUIRED_FIELD_MISSING", ["LastName"]),
    ("Contact", {"LastName": "Roe", "AccountId": "SEED:cerner:practitioners:593923:contact"},
     "INVALID_CROSS_REFERENCE_KEY", ["AccountId"]),
    ("Contact", {"LastName": "Roe", "AccountId": "001Hs0000000zzzAAA"}, "INVALID_CROSS_REFERENCE_KEY", ["AccountId"]),
    ("Identifier", {"Name": "MRN", "SourceSystem": "cerner"}, "REQUIRED_FIELD_MISSING", ["IdValue", "ParentRecordId"]),
    ("Identifier", {"IdValue": "5550002", "ParentRecordId": "SEED:cerner:patients:12724066:account"},
     "REQUIRED_FIELD_MISSING", ["Name"]),
    ("Identifier", {"Name": "MRN", "IdValue": "5550002", "ParentRecordId": "SEED:cerner:patients:12724066:identifier"},
     "INVALID_CROSS_REFERENCE_KEY", ["ParentRecordId"]),
    ("Identifier", {"Name": "MRN", "IdValue": "5550002", "ParentRecordId": "12724066"}, "MALFORMED_ID",
     ["ParentRecordId"]),
    ("Identifier", {"Name": "MRN", "IdValue": 5550002, "ParentRecordId": "SEED:cerner:patients:12724066:account"},
     "JSON_PARSER_ERROR", ["IdValue"]),
    ("Identifier", {"Name": "MRN", "IdValue": "5550002", "EndDate": "someday",
                    "ParentRecordId": "SEED:cerner:patients:12724066:account"}, "JSON_PARSER_ERROR", ["EndDate"]),
    ("HealthcarePractitionerFacility", {"Name": "x", "IsActive": "yes"}, "JSON_PARSER_ERROR", ["IsActive"]),
    ("Asset", {"Name": "Pump"}, "FIELD_INTEGRITY_EXCEPTION", []),
])
def test_creates_are_checked_as_an_org_checks_them(org: Running, sobject: str, body: dict[str, Any], code: str,
                                                   fields: list[str]) -> None:
    def seeded(value: Any) -> Any:  # "SEED:system:kind:ehr id:attribute" -> that seeded record's id
        if isinstance(value, str) and value.startswith("SEED:"):
            _, system, kind, ehr, attribute = value.split(":")
            return getattr(org.seeded[system][kind][ehr], attribute)
        return value

    before = len(org.state.org.rows(sobject))
    r = org.create(sobject, {k: seeded(v) for k, v in body.items()})
    assert_refused(r, 400, code, "5550002", "12724066", "someday", fields=fields)
    assert len(org.state.org.rows(sobject)) == before


def test_creates_that_pass_are_records_of_the_org(org: Running) -> None:
    account = org.seeded["cerner"]["patients"]["12724066"].account
    r = org.create("Identifier", {"Name": "MRN", "IdValue": "5550003", "SourceSystem": "cerner-mrn",
                                  "ParentRecordId": account[:15], "EndDate": "2999-01-01T00:00:00Z"})
    assert r.status_code == 201, r.text
    stored = org.state.org.get(r.json()["id"])
    assert stored["ParentRecordId"] == account and stored["EndDate"] == "2999-01-01T00:00:00.000+0000"
    found = _identified(org, "cerner-mrn", ["5550003"])
    assert _account_of(found["5550003"][0]) == ("patient", account)
    place = org.create("Account", {"Name": "Sandbox Clinic Four"})
    hpf = org.create("HealthcarePractitionerFacility", {"Name": "x", "AccountId": place.json()["id"]})
    assert org.state.org.get(hpf.json()["id"])["IsActive"] is False  # defaulted on create
    assert_refused(org.create("RecordType", {"Name": "x"}), 405, "METHOD_NOT_ALLOWED")
    assert_refused(org.create("Opportunity", {"Name": "x"}), 404, "NOT_FOUND")


def test_reads_name_the_record_of_that_sobject_only(org: Running) -> None:
    made = org.seeded["cerner"]["patients"]["12724066"]
    r = org.client.get(f"{API}/sobjects/Account/{made.account}", headers=org.auth())
    assert r.status_code == 200 and r.json()["IsPersonAccount"] is True and r.json()["Name"] == "Nancy Smart"
    assert_refused(org.client.get(f"{API}/sobjects/Contact/{made.account}", headers=org.auth()), 404, "NOT_FOUND")
    assert_refused(org.client.get(f"{API}/sobjects/Account/{made.account}", params={"fields": "Nope"},
                                  headers=org.auth()), 400, "INVALID_FIELD")


@pytest.mark.parametrize("header", [None, "allowSave=false", "allowSave=false; includeRecordDetails=true"])
def test_the_duplicate_rule_refuses_a_second_person_with_the_same_names_and_birth_date(
        org: Running, header: str | None) -> None:
    """Nancy Smart is a seeded patient; the same names in other case with the same birth date are her."""
    twin = _person(org, FirstName="NANCY", LastName="smart", PersonBirthdate="1990-09-15")
    headers = {"Sforce-Duplicate-Rule-Header": header} if header else {}
    r = org.upsert("cerner-5550004", twin, headers)
    assert_refused(r, 400, "DUPLICATES_DETECTED", "NANCY", "smart", "Nancy", "1990-09-15", "5550004")
    (refusal,) = r.json()
    match = refusal["duplicateResult"]["matchResults"][0]["matchRecords"][0]["record"]
    assert match["Id"] == org.seeded["cerner"]["patients"]["12724066"].account
    assert not [a for a in org.state.org.rows("Account") if a["SourceSystemIdentifier"] == "cerner-5550004"]
    assert org.create("Account", twin).status_code == 400  # a plain create meets the same rule


def test_the_duplicate_rule_lets_allow_save_through(org: Running) -> None:
    twin = _person(org, FirstName="Nancy", LastName="Smart", PersonBirthdate="1990-09-15")
    r = org.upsert("cerner-5550005", twin, {"Sforce-Duplicate-Rule-Header": "allowSave=true"})
    assert r.status_code == 201, r.text
    other_day = _person(org, FirstName="Nancy", LastName="Smart", PersonBirthdate="1990-09-16")
    assert org.upsert("cerner-5550006", other_day).status_code == 201


# --- Composite -------------------------------------------------------------------------------------------


def _sub(ref: str, method: str, path: str, body: Any = None, **extra: Any) -> dict[str, Any]:
    sub = {"method": method, "url": f"{API}/{path}", "referenceId": ref, **extra}
    return sub | ({"body": body} if body is not None else {})


def _create_patient(org: Running, key: str, **person: Any) -> list[dict[str, Any]]:
    """The gateway's `create` choice (identity.md): upsert the Account, then its Identifier."""
    return [_sub("patient", "PATCH", f"sobjects/Account/SourceSystemIdentifier/{key}", _person(org, **person)),
            _sub("mrn", "POST", "sobjects/Identifier", {"Name": "MRN", "IdValue": key, "SourceSystem": "cerner",
                                                        "ParentRecordId": "@{patient.id}"})]


def _statuses(r: httpx.Response) -> list[tuple[str, int]]:
    assert r.status_code == 200, r.text
    return [(e["referenceId"], e["httpStatusCode"]) for e in r.json()["compositeResponse"]]


def test_composite_uses_earlier_answers_and_counts_one_api_call(org: Running) -> None:
    org.auth()
    before = org.state.counters()
    lookup = _sub("found", "GET", "query?q=" + quote_plus("SELECT Id FROM Account WHERE SourceSystemIdentifier = 'c-777'"))
    r = org.composite([*_create_patient(org, "c-777"), lookup,
                       _sub("read", "GET", "sobjects/Account/@{found.records[0].Id}?fields=Name,IsPersonAccount")],
                      all_or_none=True, headers={"Sforce-Duplicate-Rule-Header": "allowSave=false"})
    assert _statuses(r) == [("patient", 201), ("mrn", 201), ("found", 200), ("read", 200)]
    patient, mrn, found, read = r.json()["compositeResponse"]
    assert patient["body"]["created"] is True and patient["httpHeaders"]["Location"].endswith(patient["body"]["id"])
    assert org.state.org.get(mrn["body"]["id"])["ParentRecordId"] == patient["body"]["id"]
    assert found["body"]["records"][0]["Id"] == patient["body"]["id"]
    assert read["body"]["Name"] == "Dora Sandbox-Newpatient" and read["body"]["IsPersonAccount"] is True
    after = org.state.counters()
    assert after.api_calls - before.api_calls == 1 and after.composite_calls - before.composite_calls == 1
    assert after.query_calls - before.query_calls == 1
    assert r.headers["Sforce-Limit-Info"] == f"api-usage={after.api_calls}/15000"


def test_all_or_none_rolls_every_write_back(org: Running) -> None:
    subs = _create_patient(org, "c-778")
    subs[1]["body"].pop("IdValue")  # the Identifier fails: REQUIRED_FIELD_MISSING
    subs.append(_sub("later", "GET", "query?q=SELECT+Id+FROM+RecordType"))
    r = org.composite(subs, all_or_none=True)
    assert _statuses(r) == [("patient", 400), ("mrn", 400), ("later", 400)]
    patient, mrn, later = r.json()["compositeResponse"]
    assert mrn["body"][0]["errorCode"] == "REQUIRED_FIELD_MISSING"
    for halted in (patient, later):
        assert halted["body"] == [{"errorCode": "PROCESSING_HALTED", "message": "The transaction was rolled back "
                                   "since another operation in the same transaction failed."}]
    assert not [a for a in org.state.org.rows("Account") if a["SourceSystemIdentifier"] == "c-778"]
    assert not [c for c in org.state.org.rows("Contact") if c["LastName"] == "Sandbox-Newpatient"]


def test_without_all_or_none_only_the_dependents_of_a_failure_fail(org: Running) -> None:
    subs = _create_patient(org, "c-779", FirstName="Nancy", LastName="Smart", PersonBirthdate="1990-09-15")
    subs.append(_sub("other", "POST", "sobjects/Account", {"Name": "Sandbox Clinic Five"}))
    r = org.composite(subs)
    assert _statuses(r) == [("patient", 400), ("mrn", 400), ("other", 201)]
    patient, mrn, _ = r.json()["compositeResponse"]
    assert patient["body"][0]["errorCode"] == "DUPLICATES_DETECTED"
    assert mrn["body"][0]["errorCode"] == "PROCESSING_HALTED" and "@{patient.id}" in mrn["body"][0]["message"]
    assert "c-779" not in r.text and "1990-09-15" not in r.text
    assert [a["Name"] for a in org.state.org.rows("Account") if a["Name"] == "Sandbox Clinic Five"]


def test_the_duplicate_header_of_a_subrequest_or_of_the_call(org: Running) -> None:
    twin = {"FirstName": "Nancy", "LastName": "Smart", "PersonBirthdate": "1990-09-15"}
    allowed = _create_patient(org, "c-780", **twin)
    allowed[0]["httpHeaders"] = {"Sforce-Duplicate-Rule-Header": "allowSave=true"}
    assert _statuses(org.composite(allowed, all_or_none=True)) == [("patient", 201), ("mrn", 201)]
    by_call = org.composite(_create_patient(org, "c-781", **twin), all_or_none=True,
                            headers={"Sforce-Duplicate-Rule-Header": "allowSave=true"})
    assert _statuses(by_call) == [("patient", 201), ("mrn", 201)]
    refused = _create_patient(org, "c-782", **twin)
    refused[0]["httpHeaders"] = {"Sforce-Duplicate-Rule-Header": "allowSave=false"}  # the subrequest's wins
    r = org.composite(refused, all_or_none=True, headers={"Sforce-Duplicate-Rule-Header": "allowSave=true"})
    assert _statuses(r) == [("patient", 400), ("mrn", 400)]


def test_a_reference_to_a_missing_value_fails_its_subrequest(org: Running) -> None:
    r = org.composite([_sub("none", "GET", "query?q=SELECT+Id+FROM+Account+WHERE+Name+=+'nobody'"),
                       _sub("read", "GET", "sobjects/Account/@{none.records[0].Id}"),
                       _sub("typo", "GET", "sobjects/Account/@{nowhere.id}")])
    assert _statuses(r) == [("none", 200), ("read", 400), ("typo", 400)]
    assert [e["body"][0]["errorCode"] for e in r.json()["compositeResponse"][1:]] == ["PROCESSING_HALTED"] * 2


def test_composite_caps_25_subrequests_and_5_queries(org: Running) -> None:
    reads = [_sub(f"r{i}", "POST", "sobjects/Account", {"Name": f"Sandbox Clinic {i}"}) for i in range(26)]
    queries = [_sub(f"q{i}", "GET", "query?q=SELECT+Id+FROM+RecordType") for i in range(6)]
    accounts = len(org.state.org.rows("Account"))
    for subs, cap in ((reads, "25 operations"), (queries, "5 query operations")):
        r = org.composite(subs)
        assert r.status_code == 200, r.text
        (entry,) = r.json()["compositeResponse"]
        assert entry["httpStatusCode"] == 400 and entry["referenceId"] is None
        assert entry["body"][0]["errorCode"] == "LIMIT_EXCEEDED" and cap in entry["body"][0]["message"]
    assert len(org.state.org.rows("Account")) == accounts
    assert _statuses(org.composite(reads[:25])) == [(f"r{i}", 201) for i in range(25)]
    assert org.state.counters().query_calls == 0


@pytest.mark.parametrize(("change", "message"), [
    ({"referenceId": None}, "'referenceId' is a required field."),
    ({"referenceId": "has-dash"}, "letters, digits and underscores"),
    ({"method": "get"}, "Invalid method"),
    ({"url": "/services/data/v65.0/sobjects/Account"}, "must begin with"),
])
def test_composite_refuses_a_malformed_body_before_running_anything(org: Running, change: dict[str, Any],
                                                                    message: str) -> None:
    sub = _sub("one", "POST", "sobjects/Account", {"Name": "Sandbox Clinic Six"}) | change
    sub = {k: v for k, v in sub.items() if v is not None}
    r = org.composite([sub, _sub("two", "POST", "sobjects/Account", {"Name": "Sandbox Clinic Seven"})])
    assert_refused(r, 400, "JSON_PARSER_ERROR")
    assert message in r.json()[0]["message"]
    assert not [a for a in org.state.org.rows("Account") if a["Name"].startswith("Sandbox Clinic S")]
    duplicate = org.composite([_sub("one", "GET", "query?q=SELECT+Id+FROM+RecordType")] * 2)
    assert_refused(duplicate, 400, "JSON_PARSER_ERROR")


def test_composite_needs_a_session_and_answers_unsupported_resources_404(org: Running) -> None:
    r = org.client.post(f"{API}/composite", json={"compositeRequest": []}, headers={"Authorization": "Bearer x"})
    assert_refused(r, 401, "INVALID_SESSION_ID")
    book = _sub("book", "POST", "connect/health/appointment-management/appointment", {})
    assert _statuses(org.composite([book])) == [("book", 404)]


# --- Book, Update and Get Slots take records of the org ---------------------------------------------------


def _refs(org: Running, system: str = "cerner", patient: str = "12724066", facility: str = "21304876",
          practitioner: str = "593923") -> dict[str, str]:
    made = org.seeded[system]
    place = made["facilities"][facility].account
    return {"Patient": made["patients"][patient].account, "Facility": place,
            "Practitioner": made["practitioners"][practitioner].practitioner_facilities[place]}


def booking(refs: dict[str, str], **changes: Any) -> dict[str, Any]:
    body = {
        "startDate": "2030-01-07T09:00:00Z", "endDate": "2030-01-07T09:30:00Z", "sourceSystem": "cerner",
        "appointmentTypes": ["FOLLOWUP"],
        "participants": [{"reference": f"{kind}/{ident}"} for kind, ident in refs.items()],
    }
    if "Practitioner" in refs:
        body["slots"] = [{"id": "24477854-21304876-62852027-2", "reference": f"Practitioner/{refs['Practitioner']}"}]
    return body | changes


def test_a_booking_of_records_is_stored_with_their_full_ids(org: Running) -> None:
    refs = _refs(org)
    short = {kind: ident[:15] for kind, ident in refs.items()}  # a 15-character id names its record
    r = org.client.post(BOOK, json=booking(short), headers=org.auth())
    assert r.status_code == 201, r.text
    (stored,) = org.state.appointments()
    assert stored.request == booking(short)  # the body as sent
    record = stored.service_appointment()
    assert (record["ParentRecordId"], record["ServiceTerritoryId"], record["PractitionerId__c"]) == (
        refs["Patient"], refs["Facility"], refs["Practitioner"])
    found = org.records(f"SELECT Id FROM ServiceAppointment WHERE ParentRecordId = '{refs['Patient']}'")
    assert [f["Id"] for f in found] == [stored.id]
    assert_refused(org.query("SELECT Id FROM ServiceAppointment WHERE ParentRecordId = '12724066'"), 400,
                   "INVALID_QUERY_FILTER_OPERATOR", "12724066")


def _wrong(org: Running, case: str) -> tuple[dict[str, Any], str]:
    """A booking with one wrong reference, and the value that must not be echoed."""
    refs = _refs(org)
    made = org.seeded["cerner"]
    elsewhere = made["practitioners"]["593923"].practitioner_facilities[made["facilities"]["32216049"].account]
    replace = {
        "ehr patient": ("Patient", "12724066"),
        "business account as patient": ("Patient", refs["Facility"]),
        "person account as facility": ("Facility", refs["Patient"]),
        "contact as practitioner": ("Practitioner", made["practitioners"]["593923"].contact),
        "hpf of another facility": ("Practitioner", elsewhere),
        "ehr practitioner": ("Practitioner", "593923"),
        "unknown record id": ("Patient", "001Hs0000000zzzAAA"),
    }[case]
    refs[replace[0]] = replace[1]
    return booking(refs), replace[1]


@pytest.mark.parametrize("case", ["ehr patient", "business account as patient", "person account as facility",
                                  "contact as practitioner", "hpf of another facility", "ehr practitioner",
                                  "unknown record id"])
def test_book_refuses_references_that_are_not_the_right_records(org: Running, case: str) -> None:
    body, value = _wrong(org, case)
    r = org.client.post(BOOK, json=body, headers=org.auth())
    assert_refused(r, 400, "INVALID_ID_FIELD", value, fields=["participants"])
    if case.endswith("practitioner") or case.startswith("hpf"):
        assert_refused(r, 400, "INVALID_ID_FIELD", value, fields=["slots"])
    assert org.state.appointments() == []


def test_an_inactive_hpf_and_a_device_that_is_no_asset_are_refused(org: Running) -> None:
    refs = _refs(org)
    org.state.org.set(refs["Practitioner"], IsActive=False)
    assert_refused(org.client.post(BOOK, json=booking(refs), headers=org.auth()), 400, "INVALID_ID_FIELD",
                   refs["Practitioner"], fields=["participants"])
    device = org.seeded["fhir"]["devices"]["infusion-1"]
    fhir = _refs(org, "fhir", "example", "1", "example")
    with_device = {"Patient": fhir["Patient"], "Facility": fhir["Facility"], "Device": device.asset}
    body = booking(with_device, sourceSystem="fhir")
    assert org.client.post(BOOK, json=body, headers=org.auth()).status_code == 201
    body = booking({**with_device, "Device": device.identifier})
    assert_refused(org.client.post(BOOK, json=body, headers=org.auth()), 400, "INVALID_ID_FIELD",
                   device.identifier, fields=["participants"])


def test_update_takes_records_too(org: Running) -> None:
    refs = _refs(org)
    appt = org.client.post(BOOK, json=booking(refs), headers=org.auth()).json()["id"]
    body, value = _wrong(org, "ehr patient")
    r = org.client.put(f"{BOOK}/{appt}", json=body | {"id": appt}, headers=org.auth())
    assert_refused(r, 400, "INVALID_ID_FIELD", value, fields=["participants"])
    moved = _refs(org, patient="12742400", facility="4062906", practitioner="709937")
    r = org.client.put(f"{BOOK}/{appt}", json=booking(moved) | {"id": appt}, headers=org.auth())
    assert r.status_code == 200, r.text
    assert org.state.appointments()[0].service_appointment()["ParentRecordId"] == moved["Patient"]


def test_get_slots_takes_hpfs_and_assets(org: Running) -> None:
    refs = _refs(org)
    device = org.seeded["fhir"]["devices"]["infusion-1"].asset
    body = {"startDate": "2030-01-07T00:00:00Z", "endDate": "2030-01-08T00:00:00Z",
            "resources": [{"resourceId": refs["Practitioner"][:15], "resourceType": "Provider"},
                          {"resourceId": device, "resourceType": "Device"}]}
    assert org.client.post(BOOK, json=booking(refs), headers=org.auth()).status_code == 201
    r = org.client.post(SLOTS, json=body, headers=org.auth())
    assert r.status_code == 200, r.text
    provider, asset = r.json()["resourceSlotDetails"]
    assert provider["resourceId"] == refs["Practitioner"][:15] and len(provider["availableSlots"]) == 15  # 09:00 booked
    assert len(asset["availableSlots"]) == 16
    for wrong in ({"resourceId": "593923"}, {"resourceId": refs["Patient"], "resourceType": "Provider"},
                  {"resourceId": refs["Practitioner"], "resourceType": "Device"}):
        r = org.client.post(SLOTS, json=body | {"resources": [wrong]}, headers=org.auth())
        assert_refused(r, 400, "INVALID_ID_FIELD", wrong["resourceId"], fields=["resources"])
    org.state.org.set(refs["Practitioner"], IsActive=False)
    r = org.client.post(SLOTS, json=body, headers=org.auth())
    assert_refused(r, 400, "INVALID_ID_FIELD", refs["Practitioner"], fields=["resources"])


# --- the sandbox's own endpoints for the org -------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/sandbox/org/patients"), ("POST", "/sandbox/org/identifiers"), ("GET", "/sandbox/org/Account"),
    ("GET", "/sandbox/org/seed"), ("PATCH", "/sandbox/org/records/001Hs0000000001IAA"),
])
def test_the_org_endpoints_need_the_control_key(org: Running, method: str, path: str) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, org.auth()):
        r = org.client.request(method, path, json={}, headers=headers)
        assert r.status_code == 401, (headers, r.text)


def test_records_added_over_http_are_found_by_the_gateways_queries(org: Running) -> None:
    place = org.client.post("/sandbox/org/facilities", json={"sourceSystem": "acme", "idValue": "L-1",
                                                             "name": "Acme Clinic", "on": "HealthcareFacility"})
    assert place.status_code == 201, place.text
    assert set(place.json()) == {"account", "healthcareFacility", "identifier"}
    patient = org.client.post("/sandbox/org/patients", json={
        "sourceSystem": "acme", "idValue": "P-1", "firstName": "Ada", "lastName": "Sandbox", "birthDate": "1950-01-01",
        "on": "Contact"}).json()
    doctor = org.client.post("/sandbox/org/practitioners", json={
        "sourceSystem": "acme", "idValue": "D-1", "name": "Doc Sandbox", "facilities": [place.json()["account"]],
        "on": "HealthcareProvider"}).json()
    device = org.client.post("/sandbox/org/devices", json={"sourceSystem": "acme", "idValue": "X-1",
                                                           "name": "Scanner", "accountId": place.json()["account"]})
    again = org.client.post("/sandbox/org/identifiers", json={"parentId": patient["account"], "sourceSystem": "acme",
                                                              "idValue": "P-1"})
    assert device.status_code == again.status_code == 201
    found = _identified(org, "acme", ["L-1", "P-1", "D-1", "X-1"])
    assert len(found["P-1"]) == 2  # two records for one id: what multiple-matches tests need
    assert {_account_of(r) for r in found["P-1"]} == {("Contact", patient["account"]), ("patient", patient["account"])}
    joined = org.records(HPF_BY.format(field="HealthcareProviderId", systems="'acme'", values="'D-1'"))
    assert [r["Id"] for r in joined] == list(doctor["practitionerFacilities"].values())
    listed = org.client.get("/sandbox/org/HealthcareProvider").json()
    assert doctor["healthcareProvider"] in [r["Id"] for r in listed]
    changed = org.client.patch(f"/sandbox/org/records/{joined[0]['Id']}", json={"IsActive": False})
    assert changed.status_code == 200 and changed.json()["IsActive"] is False
    assert not org.records(HPF_BY.format(field="HealthcareProviderId", systems="'acme'", values="'D-1'"))


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/sandbox/org/patients", {"sourceSystem": "a", "idValue": "1", "firstName": "A"}, 400),
    ("/sandbox/org/patients", {"sourceSystem": "a", "idValue": "1", "firstName": "A", "lastName": "B", "on": "Asset"}, 400),
    ("/sandbox/org/patients", {"sourceSystem": "a", "idValue": "1", "firstName": "A", "lastName": "B", "age": 3}, 400),
    ("/sandbox/org/practitioners", {"sourceSystem": "a", "idValue": "1", "name": "N", "facilities": ["nope"]}, 400),
    ("/sandbox/org/identifiers", {"parentId": "012Hs0000000001IAA", "sourceSystem": "a", "idValue": "1"}, 400),
    ("/sandbox/org/nurses", {}, 404),
    ("/sandbox/org/records/001Hs0000000zzzAAA", {"Name": "x"}, 404),
    ("/sandbox/org/records/001Hs0000000001IAA", {"Nope": "x"}, 400),
])
def test_the_org_endpoints_refuse_what_they_cannot_make(org: Running, path: str, body: dict[str, Any],
                                                         status: int) -> None:
    method = "PATCH" if "/records/" in path else "POST"
    accounts = len(org.state.org.rows("Account"))
    assert org.client.request(method, path, json=body).status_code == status
    assert org.client.get("/sandbox/org/Nothing").status_code == 404
    assert len(org.state.org.rows("Account")) == accounts


def test_reset_keeps_the_seed_and_forgets_the_rest(org: Running) -> None:
    seeded = org.client.get("/sandbox/org/Account").json()
    org.client.post("/sandbox/org/patients", json={"sourceSystem": "a", "idValue": "1", "firstName": "A",
                                                    "lastName": "Sandbox"})
    org.state.org.set(seeded[0]["Id"], Name="Changed")
    assert len(org.client.get("/sandbox/org/Account").json()) == len(seeded) + 1
    assert org.client.post("/sandbox/reset").status_code == 200
    again = org.client.get("/sandbox/org/Account").json()
    assert [(a["Id"], a["Name"]) for a in again] == [(a["Id"], a["Name"]) for a in seeded]


# --- the IAM org sends the EHR's ids ---------------------------------------------------------------------


def _scheduling_system() -> tuple[Litestar, list[tuple[str, str, Any]]]:
    """A stand-in for the external scheduling system IAM calls (the gateway, in the product): it keeps
    what each callout sent and answers as scheduling-out.md says the middleware answers."""
    seen: list[tuple[str, str, Any]] = []

    @get("/iam/Slot/{system:str}/{slot:str}")
    async def status(system: FromPath[str], slot: FromPath[str]) -> dict[str, Any]:
        seen.append(("status", system, slot))
        return {"resourceType": "Slot", "id": slot, "status": "free"}

    @post("/iam/Appointment/{system:str}", status_code=200)
    async def create(request: Request[Any, Any, Any], system: FromPath[str]) -> dict[str, Any]:
        seen.append(("create", system, await request.json()))
        return {"resourceType": "Appointment", "id": f"ehr-{len(seen)}", "status": "booked"}

    return Litestar([status, create]), seen


@pytest.fixture
def iam_org() -> Iterator[tuple[Running, list[tuple[str, str, Any]]]]:
    app, seen = _scheduling_system()
    with ThreadedServer(app) as system:
        running = _start(iam_url=f"{system.url}/iam", iam_authorization="Basic aGM6cHc=")
        try:
            yield running, seen
        finally:
            running.client.close()
            running.server.stop()


def _called(org: Running, appointment: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while not (called := [c for c in org.client.get("/sandbox/iam-callouts").json()
                          if c["service_appointment"] == appointment]):
        assert time.monotonic() < deadline, "the org made no callout"
        time.sleep(0.05)
    return called[0]  # type: ignore[no-any-return]


def _sent(seen: list[tuple[str, str, Any]]) -> tuple[list[str], str]:
    """The participants' references and the Salesforce patient id of the last Create."""
    body = [s for s in seen if s[0] == "create"][-1][2]
    account = next(i["value"] for i in body["identifier"] if i["system"] == "urn:salesforce:Account")
    return [p["actor"]["reference"] for p in body["participant"]], account


@pytest.mark.parametrize(("patient", "practitioner"), [("12724066", "593923"), ("12742400", "709937"),
                                                       ("12724066", "1912007")])
def test_the_iam_org_sends_the_ehr_ids_its_records_hold(iam_org: Any, patient: str, practitioner: str) -> None:
    org, seen = iam_org
    refs = _refs(org, patient=patient, practitioner=practitioner)
    appointment = org.client.post(BOOK, json=booking(refs), headers=org.auth()).json()["id"]
    called = _called(org, appointment)
    assert (called["create_status"], called["appointment_status"]) == (200, "booked"), called
    assert _sent(seen) == ([f"Patient/{patient}", f"Practitioner/{practitioner}"], refs["Patient"])
    assert ("status", "cerner", "24477854-21304876-62852027-2") in seen


def test_the_iam_org_reads_an_identifier_when_the_hpf_holds_no_ehr_id(iam_org: Any) -> None:
    org, seen = iam_org
    place = org.seeded["cerner"]["facilities"]["21304876"].account
    doctor = org.state.org.add_practitioner("cerner", "4122622", "Nova Sandbox", facilities=[place])
    elsewhere = org.state.org.add_patient("cerner-mrn", "MRN-9", first_name="Mo", last_name="Sandbox")
    refs = {"Patient": elsewhere.account, "Facility": place, "Practitioner": doctor.practitioner_facilities[place]}
    appointment = org.client.post(BOOK, json=booking(refs), headers=org.auth()).json()["id"]
    assert _called(org, appointment)["create_status"] == 200
    # no Identifier of the booking's source system: any of the patient's
    assert _sent(seen) == (["Patient/MRN-9", "Practitioner/4122622"], elsewhere.account)


def test_the_iam_org_calls_nothing_without_an_ehr_id_to_send(iam_org: Any) -> None:
    org, seen = iam_org
    created = org.upsert("no-identifier", _person(org)).json()["id"]
    refs = _refs(org) | {"Patient": created}
    appointment = org.client.post(BOOK, json=booking(refs), headers=org.auth()).json()["id"]
    assert _called(org, appointment) == {"service_appointment": appointment, "source_system": "cerner",
                                         "slot": "24477854-21304876-62852027-2", "error": "no EHR patient id"}
    assert seen == []
