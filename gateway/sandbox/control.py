"""The org's fixtures over HTTP, behind the control key like every `/sandbox/*` endpoint: what a test or
the demo adds to the org (`org.py`'s `add_*`, camelCase bodies) and what it holds. Never part of
Salesforce: a real org gets these records from its own data loads.

| call | body | answers |
|---|---|---|
| `POST /sandbox/org/patients` | `{sourceSystem, idValue, firstName, lastName, birthDate?, on?}` | 201 the ids made |
| `POST /sandbox/org/facilities` | `{sourceSystem, idValue, name, on?}` | 201 |
| `POST /sandbox/org/practitioners` | `{sourceSystem, idValue, name, facilities: [Account ids], on?}` | 201 |
| `POST /sandbox/org/devices` | `{sourceSystem, idValue, name, accountId?}` | 201 |
| `POST /sandbox/org/identifiers` | `{parentId, sourceSystem, idValue, endDate?}` | 201 |
| `PATCH /sandbox/org/records/{id}` | `{Field: value, …}` (`{"IsActive": false}`) | 200 the record |
| `GET /sandbox/org/seed` | | the seed's EHR ids and the records made for them |
| `GET /sandbox/org/{sObject}` | | that sObject's records |
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from litestar import Request, get, patch, post
from litestar.types import ASGIApp

from gateway.sandbox.answers import controlled, json_answer, sandbox_of
from gateway.sandbox.org import Made, Org


class _Body(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    pass


class PatientBody(_Body):
    source_system: str
    id_value: str
    first_name: str
    last_name: str
    birth_date: str | None = None
    on: Literal["Account", "Contact"] = "Account"


class FacilityBody(_Body):
    source_system: str
    id_value: str
    name: str
    on: Literal["Account", "HealthcareFacility"] = "Account"


class PractitionerBody(_Body):
    source_system: str
    id_value: str
    name: str
    facilities: list[str]
    on: Literal["Contact", "HealthcareProvider", "HealthcarePractitionerFacility"] = "Contact"


class DeviceBody(_Body):
    source_system: str
    id_value: str
    name: str
    account_id: str | None = None


class IdentifierBody(_Body):
    parent_id: str
    source_system: str
    id_value: str
    end_date: str | None = None


def _add(org: Org, body: Any) -> Made:
    if isinstance(body, PatientBody):
        return org.add_patient(body.source_system, body.id_value, first_name=body.first_name,
                               last_name=body.last_name, birth_date=body.birth_date, on=body.on)
    if isinstance(body, FacilityBody):
        return org.add_facility(body.source_system, body.id_value, body.name, on=body.on)
    if isinstance(body, PractitionerBody):
        return org.add_practitioner(body.source_system, body.id_value, body.name, facilities=body.facilities,
                                    on=body.on)
    if isinstance(body, DeviceBody):
        return org.add_device(body.source_system, body.id_value, body.name, account_id=body.account_id)
    return org.add_identifier(body.parent_id, body.source_system, body.id_value, end_date=body.end_date)


_KINDS: dict[str, type[_Body]] = {"patients": PatientBody, "facilities": FacilityBody,
                                  "practitioners": PractitionerBody, "devices": DeviceBody,
                                  "identifiers": IdentifierBody}


@post("/sandbox/org/{name:str}")
@controlled
async def add_records(request: Request[Any, Any, Any]) -> ASGIApp:
    kind = _KINDS.get(request.path_params["name"])
    if kind is None:
        return json_answer(404, {"error": "POST /sandbox/org/ takes patients, facilities, practitioners, devices "
                                          "or identifiers"})
    try:
        made = _add(sandbox_of(request).org, msgspec.json.decode(await request.body(), type=kind))
    except (msgspec.DecodeError, ValueError) as exc:
        return json_answer(400, {"error": str(exc)})
    return json_answer(201, made)


@patch("/sandbox/org/records/{record_id:str}")
@controlled
async def set_record(request: Request[Any, Any, Any]) -> ASGIApp:
    try:
        fields = msgspec.json.decode(await request.body())
        if not isinstance(fields, dict):
            raise ValueError("the body is an object of fields")
        return json_answer(200, sandbox_of(request).org.set(request.path_params["record_id"], **fields))
    except KeyError:
        return json_answer(404, {"error": "no such record"})
    except (msgspec.DecodeError, ValueError) as exc:
        return json_answer(400, {"error": str(exc)})


@get("/sandbox/org/{name:str}")
@controlled
async def list_records(request: Request[Any, Any, Any]) -> ASGIApp:
    """An sObject's records; `seed` answers what the seed made for each EHR id."""
    org = sandbox_of(request).org
    name = request.path_params["name"]
    if name == "seed":
        return json_answer(200, org.seeded or {})
    try:
        return json_answer(200, org.records(name))
    except ValueError as exc:
        return json_answer(404, {"error": str(exc)})


ROUTES = [add_records, set_record, list_records]
