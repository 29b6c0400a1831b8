"""The sObject REST calls, checked as an org checks them: create (`POST …/sobjects/{Obj}`), read
(`GET …/sobjects/{Obj}/{id}`) and upsert by external id (`PATCH …/sobjects/Account/SourceSystemIdentifier/
{value}`), alone or inside a Composite call (composite.py).

A write is refused for an unknown field (INVALID_FIELD), a read-only one (INVALID_FIELD_FOR_INSERT_UPDATE),
a missing required one (REQUIRED_FIELD_MISSING), a value of the wrong JSON type (JSON_PARSER_ERROR), a
reference that is not shaped like an id (MALFORMED_ID) or names no record of the sObjects the field may name
(INVALID_CROSS_REFERENCE_KEY), and, for a person Account, by the duplicate rule. Salesforce's messages
often repeat the value; these name the field only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from gateway.sandbox.org import ORG_OBJECTS, Org
from gateway.sandbox.schema import PERSON_FIELDS, Field, SObject, sobject
from gateway.sandbox.soql import Source, api_version, attributes
from gateway.sandbox.values import looks_like_id, parse_date, parse_datetime, sf_datetime

DUPLICATE_HEADER = "sforce-duplicate-rule-header"
DUPLICATE_MESSAGE = "Use one of these records?"  # the standard rules' alert text


class Result(msgspec.Struct, frozen=True):
    """One REST answer: what a plain call sends, or one entry of a Composite answer."""

    status: int
    body: Any
    headers: dict[str, str] = {}


def sf_error(code: str, message: str, *fields: str) -> dict[str, Any]:
    return {"message": message, "errorCode": code, "fields": list(fields)}


def refused(status: int, *errors: dict[str, Any]) -> Result:
    return Result(status, list(errors))


NOT_FOUND = Result(404, [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}])


def allow_save(*headers: Mapping[str, str] | None) -> bool:
    """`Sforce-Duplicate-Rule-Header: allowSave=true` in the first of `headers` that has the header
    (a subrequest's own, then its Composite call's); absent, a duplicate is refused."""
    for given in headers:
        value = next((v for k, v in (given or {}).items() if k.lower() == DUPLICATE_HEADER), None)
        if value is not None:
            pairs = dict(part.strip().partition("=")[::2] for part in value.split(";") if part.strip())
            return pairs.get("allowSave", "").strip().lower() == "true"
    return False


def _writable(version: str, name: str) -> SObject | None:
    obj = sobject(name)
    ok = obj is not None and obj.name in ORG_OBJECTS and api_version(version) >= obj.min_version
    return obj if ok else None


# values ---------------------------------------------------------------------------------------------


def _typed(field: Field, value: Any) -> Any:
    """A JSON value as the field keeps it; ValueError when its JSON type is not the field's."""
    if value is None:
        return None
    if field.type == "boolean":
        if isinstance(value, bool):
            return value
    elif field.type == "date":
        if isinstance(value, str) and (day := parse_date(value)) is not None:
            return day.isoformat()
    elif field.type == "datetime":
        if isinstance(value, str) and (moment := parse_datetime(value)) is not None:
            return sf_datetime(moment)
    elif isinstance(value, str):
        return value or None  # Salesforce keeps an empty text or reference as null
    raise ValueError(field.name)


def _reference(org: Org, field: Field, value: str) -> tuple[str | None, dict[str, Any] | None]:
    """The 18-character id a reference names, or the error it earns."""
    if not looks_like_id(value):
        return None, sf_error("MALFORMED_ID", f"{field.label or field.name}: id value of incorrect type", field.name)
    found = org.resolve(value)
    if found is None or found[0] not in field.targets:
        return None, sf_error("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", field.name)
    kind, row = found
    if kind == "RecordType" and not (row["SobjectType"] == "Account" and row["IsActive"]):
        return None, sf_error("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", field.name)
    return row["Id"], None


def _values(org: Org, obj: SObject, body: Any, updating: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if not isinstance(body, dict):
        return {}, [sf_error("JSON_PARSER_ERROR", "The request body must be a JSON object.")]
    values: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for key, raw in body.items():
        if key == "attributes":  # REST bodies may name their type; it changes nothing
            continue
        field = obj.field(key)
        if field is None:
            errors.append(sf_error("INVALID_FIELD", f"No such column '{key}' on sobject of type {obj.name}", key))
            continue
        if not (field.update if updating else field.create):
            errors.append(sf_error("INVALID_FIELD_FOR_INSERT_UPDATE", f"Unable to create/update fields: {field.name}. "
                                   "Please check the security settings of this field and verify that it is "
                                   "read/write for your profile or permission set.", field.name))
            continue
        try:
            value = _typed(field, raw)
        except ValueError:
            errors.append(sf_error("JSON_PARSER_ERROR", f"Cannot deserialize the value of {field.name} as {field.type}",
                                   field.name))
            continue
        if field.type == "string" and value is not None and len(value) > field.length:
            errors.append(sf_error("STRING_TOO_LONG", f"{field.name}: data value too large (max length={field.length})",
                                   field.name))
        elif field.type == "reference" and value is not None:
            value, problem = _reference(org, field, value)
            errors += [problem] if problem else []
        values[field.name] = value
    return values, errors


def _required(obj: SObject, values: dict[str, Any], current: dict[str, Any] | None) -> list[dict[str, Any]]:
    merged = {**(current or {}), **values}
    missing = [f.name for f in obj.fields if f.required and merged.get(f.name) in (None, "")]
    if not missing:
        return []
    return [sf_error("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(missing)}]", *missing)]


def _account_rules(org: Org, values: dict[str, Any], current: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A person Account (the person-account record type) is named by FirstName and LastName, which it
    needs; a business Account needs Name and may not carry person fields. Inference from how orgs with
    person accounts refuse these (`bad field names on insert/update call`)."""
    person = bool(current["IsPersonAccount"]) if current else org.is_person_type(values.get("RecordTypeId"))
    merged = {**(current or {}), **values}
    errors = []
    if current is not None and "RecordTypeId" in values and org.is_person_type(values["RecordTypeId"]) != person:
        errors.append(sf_error("INVALID_FIELD_FOR_INSERT_UPDATE", "Changing an Account between person and business "
                               "is outside the sandbox", "RecordTypeId"))
    if person:
        if "Name" in values:
            errors.append(sf_error("INVALID_FIELD_FOR_INSERT_UPDATE", "Account: bad field names on insert/update "
                                   "call: Name", "Name"))
        if not merged.get("LastName"):
            errors.append(sf_error("REQUIRED_FIELD_MISSING", "Required fields are missing: [LastName]", "LastName"))
        return errors
    wrong = [f for f in PERSON_FIELDS if values.get(f) is not None]
    if wrong:
        errors.append(sf_error("INVALID_FIELD_FOR_INSERT_UPDATE", "Account: bad field names on insert/update call: "
                               + ", ".join(wrong), *wrong))
    if not merged.get("Name"):
        errors.append(sf_error("REQUIRED_FIELD_MISSING", "Required fields are missing: [Name]", "Name"))
    return errors


def _rules(org: Org, obj: SObject, values: dict[str, Any], current: dict[str, Any] | None) -> list[dict[str, Any]]:
    merged = {**(current or {}), **values}
    if obj.name == "Account":
        return _account_rules(org, values, current)
    if obj.name == "Contact" and values.get("AccountId"):
        owner = org.resolve(values["AccountId"])
        if owner and owner[1]["IsPersonAccount"]:  # a person Account has its one PersonContact (inference)
            return [sf_error("FIELD_INTEGRITY_EXCEPTION", "A contact can't be added to a person account", "AccountId")]
    if obj.name == "Asset" and not merged.get("AccountId") and not merged.get("ContactId"):
        return [sf_error("FIELD_INTEGRITY_EXCEPTION", "Every asset needs an account, a contact, or both.")]
    return []


def _duplicates(org: Org, values: dict[str, Any], version: str) -> Result | None:
    """The duplicate rule on person Accounts (inference from Salesforce's standard person-account rule):
    same first and last names, case-insensitive, and the same birth date. Its body names the matching
    records' ids, never the values that matched."""
    if not org.is_person_type(values.get("RecordTypeId")):
        return None
    ids = org.person_duplicates(values.get("FirstName"), values.get("LastName"), values.get("PersonBirthdate"))
    if not ids:
        return None
    matches = [{"additionalInformation": [], "fieldDiffs": [], "matchConfidence": 100.0,
                "record": {"attributes": attributes(version, "Account", i), "Id": i}} for i in ids]
    result = {"entityType": "PersonAccount", "errors": [], "matchEngine": "ExactMatchEngine", "matchRecords": matches,
              "rule": "Standard_Person_Account_Match_Rule_v1_0", "size": len(ids), "success": True}
    # allowSave: the rule alerts, so the header could save it (which is why it was refused without it)
    duplicate = {"allowSave": True, "duplicateRule": "Standard_Person_Account_Duplicate_Rule",
                 "duplicateRuleEntityType": "PersonAccount", "errorMessage": DUPLICATE_MESSAGE, "matchResults": [result]}
    return refused(400, {"duplicateResult": duplicate, "errorCode": "DUPLICATES_DETECTED", "message": DUPLICATE_MESSAGE})


def _saved(version: str, kind: str, record_id: str, status: int, created: bool | None = None) -> Result:
    body: dict[str, Any] = {"id": record_id, "success": True, "errors": []}
    if created is not None:
        body["created"] = created
    headers = {"Location": f"/services/data/{version}/sobjects/{kind}/{record_id}"} if status == 201 else {}
    return Result(status, body, headers)


# the calls -------------------------------------------------------------------------------------------


def create(org: Org, version: str, name: str, body: Any, *, allow_duplicates: bool) -> Result:
    """`POST …/sobjects/{name}`: 201 `{"id", "success": true, "errors": []}`, or the errors."""
    obj = _writable(version, name)
    if obj is None:
        return NOT_FOUND
    if not obj.createable:
        return refused(405, {"errorCode": "METHOD_NOT_ALLOWED", "message": f"The sandbox creates no {obj.name} records."})
    with org.locked():
        values, errors = _values(org, obj, body, updating=False)
        errors += _required(obj, values, None) + _rules(org, obj, values, None)
        if errors:
            return refused(400, *errors)
        if not allow_duplicates and (duplicate := _duplicates(org, values, version)) is not None:
            return duplicate
        new_id = org.create(obj.name, values)
    return _saved(version, obj.name, new_id, 201)


def upsert(org: Org, version: str, name: str, field_name: str, value: str, body: Any, *,
           allow_duplicates: bool) -> Result:
    """`PATCH …/sobjects/Account/SourceSystemIdentifier/{value}`: no Account with it, a create (201,
    `created: true`); one, an update (200, `created: false`); several, 300 with their URLs."""
    obj = _writable(version, name)
    field = obj.field(field_name) if obj is not None else None
    if obj is None:
        return NOT_FOUND
    if field is None or (obj.name, field.name) != ("Account", "SourceSystemIdentifier"):
        return refused(404, sf_error("NOT_FOUND", "Provided external ID field does not exist or is not accessible: "
                                     + field_name))
    if isinstance(body, dict) and any(k.lower() == field.name.lower() for k in body):
        # inference: the URL names the key; the body may not set it as well
        return refused(400, sf_error("INVALID_FIELD", f"{field.name} is in the URL and may not be in the body", field.name))
    with org.locked():
        # matched exactly, case included (inference: the docs do not say how this idLookup field compares)
        matches = [r for r in org.rows("Account") if r["SourceSystemIdentifier"] == value]
        if len(matches) > 1:
            return Result(300, [f"/services/data/{version}/sobjects/Account/{r['Id']}" for r in matches])
        current = matches[0] if matches else None
        values, errors = _values(org, obj, body, updating=current is not None)
        errors += _required(obj, values, current) + _rules(org, obj, values, current)
        if errors:
            return refused(400, *errors)
        if current is not None:
            org.update(current["Id"], values)
            return _saved(version, "Account", current["Id"], 200, created=False)
        values[field.name] = value
        if not allow_duplicates and (duplicate := _duplicates(org, values, version)) is not None:
            return duplicate
        new_id = org.create("Account", values)
    return _saved(version, "Account", new_id, 201, created=True)


def read(source: Source, version: str, name: str, record_id: str, fields: str | None = None) -> Result:
    """`GET …/sobjects/{name}/{id}[?fields=a,b]`: the record with its `attributes`."""
    obj = sobject(name)
    if obj is None or api_version(version) < obj.min_version:
        return NOT_FOUND
    found = source.find(record_id)
    if found is None or found[0] != obj.name:
        return NOT_FOUND
    names = [f.name for f in obj.fields]
    if fields is not None:
        wanted = [n.strip() for n in fields.split(",") if n.strip()]
        unknown = [n for n in wanted if obj.field(n) is None]
        if unknown:
            return refused(400, sf_error("INVALID_FIELD", f"No such column '{unknown[0]}' on entity '{obj.name}'"))
        names = [obj.field(n).name for n in wanted]  # type: ignore[union-attr]
    row = found[1]
    return Result(200, {"attributes": attributes(version, obj.name, row["Id"]), **{n: row.get(n) for n in names}})
