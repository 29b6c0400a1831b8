"""The org's records for a set of EHR ids, asked in one Composite call, and its answer read.

Where an org keeps an EHR's ids (identity.md): an `Identifier` (SourceSystem, IdValue) on the
patient's person Account or its Contact, on the facility's Account or a HealthcareFacility, on the
practitioner's Contact or HealthcareProvider, on a HealthcarePractitionerFacility (HPF), or on an
Asset; and an HPF may carry the practitioner's id itself (SourceSystem, SourceSystemIdentifier).
So, at most four queries, all in one Composite (one API call, up to five queries allowed):

1. the Identifiers of every id, with their parent's type and, by TYPEOF, what the parent adds (the
   Account a Contact, HealthcareFacility or HPF belongs to; whether an Account is a person's);
2. and 3. the active HPFs of the practitioners identified on a Contact, then on a HealthcareProvider
   (semi-joins on Identifier: SOQL allows two per WHERE, only at its top level, never under OR);
4. the active HPFs that carry the id themselves.

Ids from different domains can share a value (patient 123, practitioner 123): each id takes only
parents of its kind's types. SOQL compares strings without case; ids are matched exactly here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from gateway.identity.model import EhrId, Found, Hpf
from gateway.salesforce.client import SALESFORCE_ID, error_codes, soql_string
from gateway.salesforce.wire import CompositeSubAnswer

# at most this many values in one IN list: a Composite's query stays far under SOQL's 100,000 characters
MAX_VALUES = 100
_PRACTITIONER_KINDS = ("practitioner", "role")
_IDENTIFIERS = (
    "SELECT Id, IdValue, SourceSystem, ParentRecordId, TYPEOF ParentRecord WHEN Account THEN IsPersonAccount "
    "WHEN Contact THEN AccountId WHEN HealthcareFacility THEN AccountId WHEN HealthcarePractitionerFacility THEN "
    "AccountId, IsActive, EffectiveFrom, EffectiveTo ELSE Id END FROM Identifier WHERE SourceSystem IN ({systems}) "
    "AND IdValue IN ({values}) AND (EndDate = null OR EndDate > TODAY)"
)
_HPF_FIELDS = "Id, PractitionerId, HealthcareProviderId, AccountId, EffectiveFrom, EffectiveTo"
_HPF_BY_PARENT = (
    f"SELECT {_HPF_FIELDS} FROM HealthcarePractitionerFacility WHERE IsActive = true AND {{field}} IN "
    "(SELECT ParentRecordId FROM Identifier WHERE SourceSystem IN ({systems}) AND IdValue IN ({values}))"
)
_HPF_BY_OWN_ID = (
    f"SELECT {_HPF_FIELDS}, SourceSystem, SourceSystemIdentifier FROM HealthcarePractitionerFacility "
    "WHERE IsActive = true AND SourceSystem IN ({systems}) AND SourceSystemIdentifier IN ({values})"
)
# the parent types each kind takes (anything else is another domain's record with the same value)
_PARENTS = {
    "patient": ("Account", "Contact"),
    "location": ("Account", "HealthcareFacility"),
    "practitioner": ("Contact", "HealthcareProvider", "HealthcarePractitionerFacility"),
    "role": ("HealthcarePractitionerFacility",),
    "device": ("Asset",),
}


class LookupFailed(Exception):
    """A subrequest did not answer as a query does: nothing it was to find can be believed."""

    def __init__(self, code: str | None) -> None:
        super().__init__(code or "unreadable")
        self.code = code


def _in(values: Iterable[str]) -> str:
    return ",".join(soql_string(v) for v in sorted(set(values)))


def plan(ids: list[EhrId]) -> list[tuple[str, str]]:
    """The queries for `ids` (at most MAX_VALUES distinct values), each with its Composite referenceId."""
    queries = [("ids", _IDENTIFIERS.format(systems=_in(i.system for i in ids), values=_in(i.value for i in ids)))]
    people = [i for i in ids if i.kind == "practitioner"]
    if people:
        systems, values = _in(i.system for i in people), _in(i.value for i in people)
        queries.append(("byContact", _HPF_BY_PARENT.format(field="PractitionerId", systems=systems, values=values)))
        queries.append(("byProvider", _HPF_BY_PARENT.format(field="HealthcareProviderId", systems=systems,
                                                            values=values)))
    own = [i for i in ids if i.kind in _PRACTITIONER_KINDS]
    if own:
        queries.append(("byOwnId", _HPF_BY_OWN_ID.format(systems=_in(i.system for i in own),
                                                         values=_in(i.value for i in own))))
    return queries


def query_string(soql: str) -> str:
    """A query as a Composite subrequest's url carries it."""
    return "q=" + quote(soql, safe="")


def read(ids: list[EhrId], answers: list[CompositeSubAnswer]) -> dict[EhrId, Found]:
    """What the org holds for each of `ids`, from the Composite's answers (in `plan`'s order)."""
    rows = {a.referenceId: _records(a) for a in answers}
    wanted: dict[tuple[str, str], list[EhrId]] = {}
    for i in ids:  # one value may be ids of several kinds (patient 123, practitioner 123)
        wanted.setdefault((i.system.casefold(), i.value), []).append(i)
    records: dict[EhrId, list[str]] = {i: [] for i in ids}
    hpfs: dict[EhrId, list[Hpf]] = {i: [] for i in ids}
    for row in rows.get("ids", []):
        parent = row.get("ParentRecord") if isinstance(row.get("ParentRecord"), dict) else {}
        kind = (parent.get("attributes") or {}).get("type") if isinstance(parent.get("attributes"), dict) else None
        for ehr in _matching(wanted, row.get("SourceSystem"), row.get("IdValue")):
            if kind not in _PARENTS[ehr.kind] or not _is_id(row.get("ParentRecordId")):
                continue
            _take_parent(ehr, kind, row["ParentRecordId"], parent, records[ehr], hpfs[ehr])
    for ref in ("byContact", "byProvider"):
        for row in rows.get(ref, []):
            owner = row.get("PractitionerId" if ref == "byContact" else "HealthcareProviderId")
            for ehr in ids:
                if ehr.kind == "practitioner" and owner in records[ehr]:
                    _add_hpf(hpfs[ehr], row)
    for row in rows.get("byOwnId", []):
        for ehr in _matching(wanted, row.get("SourceSystem"), row.get("SourceSystemIdentifier")):
            if ehr.kind in _PRACTITIONER_KINDS:
                _add_hpf(hpfs[ehr], row)
    return {i: Found(records=tuple(dict.fromkeys(records[i])), hpfs=tuple(dict.fromkeys(hpfs[i]))) for i in ids}


def _records(answer: CompositeSubAnswer) -> list[dict[str, Any]]:
    body = answer.body
    if answer.httpStatusCode == 200 and isinstance(body, dict) and isinstance(body.get("records"), list):
        if body.get("done") is False:  # over 2,000 records for a handful of ids: not an org to guess in
            raise LookupFailed("QUERY_TOO_LARGE")
        return [r for r in body["records"] if isinstance(r, dict)]
    raise LookupFailed(next(iter(error_codes(body)), None))


def _matching(wanted: dict[tuple[str, str], list[EhrId]], system: Any, value: Any) -> list[EhrId]:
    if not isinstance(system, str) or not isinstance(value, str):
        return []
    return wanted.get((system.casefold(), value), [])  # the value exactly: SOQL matched it without case


def _take_parent(ehr: EhrId, kind: str, parent_id: str, parent: dict[str, Any], records: list[str],
                 hpfs: list[Hpf]) -> None:
    """One Identifier's parent, as what it means for the id's kind."""
    if kind == "Account":
        # a patient's is a person Account, a facility's a business one: the other is another domain's
        if parent.get("IsPersonAccount") is (ehr.kind == "patient"):
            records.append(parent_id)
    elif kind in ("Contact", "HealthcareFacility") and ehr.kind in ("patient", "location"):
        if _is_id(parent.get("AccountId")):
            records.append(parent["AccountId"])
    elif kind == "HealthcarePractitionerFacility":
        if parent.get("IsActive") is True:
            _add_hpf(hpfs, {"Id": parent_id, **parent})
    else:  # a practitioner's Contact or HealthcareProvider (its HPFs come from queries 2 and 3), an Asset
        records.append(parent_id)


def _add_hpf(hpfs: list[Hpf], row: dict[str, Any]) -> None:
    if _is_id(row.get("Id")) and _is_id(row.get("AccountId")):
        hpfs.append(Hpf(row["Id"], row["AccountId"], _date(row.get("EffectiveFrom")), _date(row.get("EffectiveTo"))))


def _date(value: Any) -> str | None:
    return value[:10] if isinstance(value, str) and len(value) >= 10 else None


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and SALESFORCE_ID.fullmatch(value) is not None
