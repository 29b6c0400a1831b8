"""The gateway's OpenAPI 3.1 document, built from the settings and served at `GET /openapi.json`.

Litestar's generated schema cannot describe this service: every handler reads the raw body (each EHR
dialect is parsed by its adapter), so this module writes the document by hand. It lists every route
`create_app` registers (tests/test_openapi.py fails when one is missing), the configured source
names as the `{source}` enum, the credentials each route takes, the request bodies (a loose but
honest schema of what the FHIR adapters read), and every status each route answers with its body:
an OperationOutcome for every refusal, except the SMART token endpoint's OAuth errors (RFC 6749).

The Salesforce request (the dry run's answer) and the request-log entry are derived from their
msgspec Structs, so they cannot drift from the code. The document holds no secret and no patient
data: only source names, limits and shapes, never a key or its digest.
"""

from __future__ import annotations

from typing import Any

import msgspec

from adapters._shapes import MAX_ITEMS
from adapters.r4 import APPOINTMENT_STATUSES, PARTICIPATION_STATUSES
from gateway import __version__
from gateway.operators.admin import COOKIE
from gateway.booking.fhir import FHIR_JSON, SALESFORCE_ERROR_SYSTEM, SALESFORCE_ID_SYSTEM
from gateway.state.requestlog import OUTCOMES, View
from gateway.booking.rules import COMMENT_LIMIT
from gateway.salesforce.wire import BookingRequest
from gateway.settings import Settings
from gateway.edges.smart import ASSERTION_TYPE

__all__ = ["OPENAPI_PATH", "build_openapi", "openapi_json"]

OPENAPI_PATH = "/openapi.json"
_REF = "#/components/schemas/{name}"
_JSON = "application/json"
_FHIR_MEDIA = (FHIR_JSON, _JSON)  # what the FHIR routes accept, and what `_check_media` lets in
_FORM = "application/x-www-form-urlencoded"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _array(items: dict[str, Any], *, capped: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "items": items}
    if capped:  # the adapters refuse longer arrays (400) before building anything
        schema["maxItems"] = MAX_ITEMS
    return schema


# -- FHIR shapes ----------------------------------------------------------------------------------

_STRING = {"type": "string"}
_CODING = {
    "type": "object",
    "description": "A FHIR Coding. `system` is matched exactly against the code maps' `group.source`.",
    "properties": {"system": _STRING, "code": _STRING, "display": _STRING, "version": _STRING,
                   "userSelected": {"type": "boolean"}},
}
_CODEABLE_CONCEPT = {
    "type": "object",
    "properties": {"coding": _array(_ref("Coding"), capped=True), "text": _STRING},
}
_REFERENCE = {
    "type": "object",
    "description": "A FHIR Reference: `Type/id` or an absolute URL ending so. Contained (`#id`), conditional "
                   "and display-only references are never guessed.",
    "properties": {"reference": _STRING, "display": _STRING},
}
_IDENTIFIER = {
    "type": "object",
    "description": "An identifier without a `value` is skipped; with the system, it keys idempotency when no "
                   "`Idempotency-Key` header is sent.",
    "properties": {"system": _STRING, "value": _STRING},
}

_APPOINTMENT = {
    "type": "object",
    "description": (
        "A FHIR R4 (or STU3) Appointment. Only the elements below are read; every other element (text, meta, "
        "contained, reasonCode, ...) is accepted and ignored. A present element of the wrong JSON type is a 400 "
        "naming its FHIR path; a booking that cannot be mapped or breaks a Salesforce rule is a 422 naming it. "
        "Participants: `Patient/x`, `Location/x`, `Practitioner/x`, `PractitionerRole/x` and `Device/x` actors "
        "are used; anything else is refused (422). Slots must be `Slot/<id>` references."
    ),
    "required": ["resourceType"],
    "properties": {
        "resourceType": {"const": "Appointment"},
        "id": {"type": "string", "description": "ignored by a booking; an update's must be the appointment's (400)"},
        "identifier": _array(_ref("Identifier"), capped=True),
        "status": {
            "enum": sorted(APPOINTMENT_STATUSES),
            "description": "FHIR's appointmentstatus (another code is 400). Any status books except `cancelled` "
                           "and `entered-in-error` (422).",
        },
        "serviceCategory": {
            "description": "An array (R4) or a single CodeableConcept (STU3).",
            "anyOf": [_array(_ref("CodeableConcept"), capped=True), _ref("CodeableConcept")],
        },
        "serviceType": _array(_ref("CodeableConcept"), capped=True),
        "specialty": _array(_ref("CodeableConcept"), capped=True),
        "appointmentType": _ref("CodeableConcept"),
        "start": {"type": "string", "format": "date-time",
                  "description": "A FHIR instant, sent to Salesforce as written; a time without an offset is 422."},
        "end": {"type": "string", "format": "date-time"},
        "comment": {"type": "string", "maxLength": COMMENT_LIMIT,
                    "description": f"Longer than {COMMENT_LIMIT} characters is refused (422), never cut."},
        "slot": _array(_ref("Reference"), capped=True),
        "participant": _array({
            "type": "object",
            "properties": {"actor": _ref("Reference"), "type": _array(_ref("CodeableConcept")),
                           "status": {"enum": sorted(PARTICIPATION_STATUSES),
                                      "description": "FHIR's participationstatus (another code is 400)"},
                           "required": _STRING},
        }, capped=True),
        "extension": _array({
            "type": "object",
            "description": "Cerner's action-comment extension (`valueString`) may carry the comment.",
            "properties": {"url": _STRING, "valueString": _STRING},
        }, capped=True),
    },
}

_PARAMETERS = {
    "type": "object",
    "description": (
        "FHIR Parameters for `$book` (Argonaut `appt-resource` or IHE `appointment-resource`, one only): the "
        "Appointment is read with the same rules as a plain one. A non-empty `comment` parameter replaces "
        "Appointment.comment; Argonaut's `patient-id` adds the Patient. Epic's form may carry identifiers "
        "(`valueIdentifier`) instead of a resource."
    ),
    "required": ["resourceType"],
    "properties": {
        "resourceType": {"const": "Parameters"},
        "parameter": _array({
            "type": "object",
            "properties": {
                "name": {"type": "string", "examples": ["appt-resource", "appointment-resource", "comment",
                                                        "patient-id"]},
                "valueString": _STRING,
                "valueUri": _STRING,
                "valueIdentifier": _ref("Identifier"),
                "valueReference": _ref("Reference"),
                "resource": {"type": "object", "description": "For `appt-resource`: the Appointment."},
            },
        }, capped=True),
    },
}

_OPERATION_OUTCOME = {
    "type": "object",
    "description": "Every refusal: a FHIR OperationOutcome whose `issue.code` is from the FHIR issue-type code "
                   "system. `expression` names FHIR paths, `location` headers and query parameters; no issue "
                   "repeats a value of the patient's record.",
    "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"const": "OperationOutcome"},
        "issue": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["severity", "code", "details"],
            "properties": {
                "severity": {"enum": ["fatal", "error", "warning", "information"]},
                "code": {"type": "string", "description": "http://hl7.org/fhir/issue-type",
                         "examples": ["structure", "login", "forbidden", "not-found", "business-rule",
                                      "code-invalid", "throttled", "transient"]},
                "details": {
                    "type": "object",
                    "required": ["text"],
                    "properties": {
                        "text": _STRING,
                        "coding": _array({
                            "type": "object", "required": ["system", "code"],
                            "description": f"`{SALESFORCE_ERROR_SYSTEM}` carries Salesforce's errorCode "
                                           "when Salesforce refused.",
                            "properties": {"system": _STRING, "code": _STRING},
                        }),
                    },
                },
                "expression": _array(_STRING),
                "location": {**_array(_STRING), "description": "the HTTP part at fault, `http.` + the name of a "
                                                               "header or query parameter (`http.Idempotency-Key`)"},
            },
        }},
    },
}

_BOOKED = {
    "type": "object",
    "description": f"The booked Appointment: `id` is the Salesforce appointment id, also given as an identifier "
                   f"with system `{SALESFORCE_ID_SYSTEM}` after the EHR's own; `meta.versionId` its version (absent "
                   "in the replay of a booking answered before versions).",
    "required": ["resourceType", "id", "status"],
    "properties": {
        "resourceType": {"const": "Appointment"},
        "id": _STRING,
        "meta": {"type": "object", "required": ["versionId"],
                 "properties": {"versionId": {"type": "string", "pattern": "^[0-9]+$"}}},
        "status": {"enum": ["booked", "cancelled"]},
        "identifier": _array({"type": "object", "required": ["value"],
                              "properties": {"system": _STRING, "value": _STRING}}),
        "start": _STRING,
        "end": _STRING,
        "slot": _array({"type": "object", "required": ["reference"], "properties": {"reference": _STRING}}),
        "participant": _array({
            "type": "object", "required": ["actor", "status"],
            "properties": {"actor": {"type": "object", "required": ["reference"],
                                     "properties": {"reference": _STRING}},
                           "status": _STRING},
        }),
    },
}

_OAUTH_ERROR = {
    "type": "object",
    "description": "An OAuth 2.0 error (RFC 6749 §5.2), as SMART Backend Services clients expect.",
    "required": ["error", "error_description"],
    "properties": {
        "error": {"enum": ["invalid_request", "invalid_client", "unsupported_grant_type", "temporarily_unavailable"]},
        "error_description": _STRING,
    },
}

_TOKEN = {
    "type": "object",
    "required": ["access_token", "token_type", "expires_in", "scope"],
    "properties": {
        "access_token": _STRING,
        "token_type": {"const": "bearer"},
        "expires_in": {"type": "integer", "minimum": 1},
        "scope": _STRING,
    },
}

_NAMES = _array(_STRING)


def _msgspec_components() -> dict[str, Any]:
    """The Salesforce request and the request-log entry, from the Structs the code encodes."""
    _, components = msgspec.json.schema_components([BookingRequest, View], ref_template=_REF)
    entry = components.pop("View")
    entry["title"] = "RequestLogEntry"
    entry["description"] = ("One request-log entry. `patient` and `input` appear only for a PHI key, on "
                            "one entry; lists never carry them.")
    entry["properties"]["outcome"] = {"enum": list(OUTCOMES)}
    entry["properties"]["time"] = {"type": "string", "description": "ISO 8601, UTC, milliseconds"}
    entry["required"] = sorted({*entry.get("required", ()), "time", "replayable"})
    components["RequestLogEntry"] = entry
    return components


# -- responses ------------------------------------------------------------------------------------

_RETRY_AFTER = {"description": "seconds to wait before trying again", "schema": {"type": "integer", "minimum": 0}}
_REQUEST_ID = {"description": "this request's id: the `id` of its request-log entry and log line",
               "schema": {"type": "string", "pattern": "^[0-9a-f]{16}$"}}


def _outcome(description: str, *, retry_after: bool = False, request_id: bool = False) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    if retry_after:
        headers["Retry-After"] = _RETRY_AFTER
    if request_id:
        headers["X-Request-ID"] = _REQUEST_ID
    response: dict[str, Any] = {"description": description,
                                "content": {FHIR_JSON: {"schema": _ref("OperationOutcome")}}}
    if headers:
        response["headers"] = headers
    return response


def _json_answer(description: str, schema: dict[str, Any], **headers: Any) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {_JSON: {"schema": schema}}}
    if headers:
        response["headers"] = {name.replace("_", "-"): value for name, value in headers.items()}
    return response


def _fhir_errors(*, body: bool) -> dict[str, dict[str, Any]]:
    """The refusals of the three FHIR routes; `X-Request-ID` on each."""
    r: dict[str, dict[str, Any]] = {
        "400": _outcome("not JSON, not FHIR, the wrong resourceType, an element of the wrong JSON type, a key named "
                        "twice in one object, a status outside its FHIR value set, or a malformed Idempotency-Key",
                        request_id=True),
        "401": _outcome("no key or token, an unknown one, or a required client certificate missing", request_id=True),
        "403": _outcome("a key, token or client certificate of another source", request_id=True),
        "404": _outcome("no FHIR source of that name is configured", request_id=True),
        "408": _outcome("the body did not arrive in time"),
        "406": _outcome("neither `_format` nor `Accept` allows JSON (application/fhir+json, application/json, "
                        "`*/*`, FHIR 4.0); `_format` overrides `Accept`", request_id=True),
        "415": _outcome("a media type other than application/fhir+json or application/json", request_id=True),
        "422": _outcome("a code without a mapping, or a Salesforce rule broken; also the stored answer of a "
                        "booking Salesforce refused", request_id=True),
        "429": _outcome("the source is over its rate_limit_per_minute", retry_after=True, request_id=True),
    }
    if body:
        r["413"] = _outcome("the body is larger than [limits] max_body_bytes", request_id=True)
    return dict(sorted(r.items()))


def _admin_errors(*extra: str) -> dict[str, dict[str, Any]]:
    r: dict[str, dict[str, Any]] = {
        "401": _outcome("no admin key or session, or an unknown one"),
        "403": _outcome("a source's key or token, or a session's action without its X-CSRF-Token"),
        "429": _outcome("too many failed admin keys from this address", retry_after=True),
        "503": _outcome("Redis cannot check failed sign-in attempts now", retry_after=True),
    }
    texts = {
        "400": "a query parameter or the body is not what is expected",
        "404": "no such entry, source or action",
        "409": "this entry was replayed already",
        "413": "the body is larger than [limits] max_body_bytes",
        "422": "the booking cannot be mapped or breaks a Salesforce rule",
        "415": "the body is not application/json",
        "502": "Salesforce failed to answer (the org could not be asked)",
    }
    for status in extra:
        r[status] = _outcome(texts[status])
    return dict(sorted(r.items()))


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    """An admin filter: an empty value (`?outcome=`) is no filter, as if the parameter were absent."""
    return {"name": name, "in": "query", "description": description + "; empty: no filter",
            "allowEmptyValue": True, "schema": schema}


def _operation(summary: str, tag: str, responses: dict[str, Any], **more: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "operationId": more.pop("operation_id")}
    op.update(more)
    op["responses"] = responses
    return op


_HELD = {"type": "object", "required": ["hold", "state", "since_ms", "deadline_ms", "due_ms", "attempts", "why"],
         "properties": {
             "hold": {"type": "string"}, "state": {"enum": ["held", "refused"]},
             "since_ms": {"type": "integer"}, "deadline_ms": {"type": "integer"},
             "due_ms": {"type": ["integer", "null"]}, "attempts": {"type": "integer"},
             "why": {"type": ["string", "null"], "description": "why it waits (patient-unknown, a Salesforce error "
                                                                "code, a duplicate to decide) or was refused"},
             "patient": {"type": ["string", "null"], "description": "whom it waits for: one booking's, a PHI key only"}}}
_CHECKED = {"type": "object", "required": ["element", "kind", "source_system", "by", "record", "problem", "why"],
            "properties": {
                "element": {"type": "string"}, "kind": {"enum": ["patient", "location", "practitioner", "role", "device"]},
                "source_system": {"type": "string"}, "by": {"enum": ["id", "identifier"]},
                "record": {"type": ["string", "null"], "description": "the org's record the Book body would name"},
                "problem": {"type": ["string", "null"], "enum": [None, "not-found", "multiple-matches"]},
                "why": {"type": ["string", "null"]}}}


def _identity_paths(source: dict[str, Any], admin_read: list[dict[str, list[str]]],
                    admin_action: list[dict[str, list[str]]]) -> dict[str, Any]:
    """The operators' routes of identity (contract v3): held bookings, the cache, a file checked."""
    ok = _json_answer("done", {"type": "object", "required": ["ok"], "properties": {"ok": {"const": True}}})
    return {
        "/admin/api/held": {"get": _operation(
            "Bookings held for their patient, and those refused, per source (no patient data)",
            "Admin", {"200": _json_answer("per source with any", {"type": "object", "required": ["sources"],
                                                                   "properties": {"sources": {
                                                                       "type": "object",
                                                                       "additionalProperties": _array(_HELD)}}}),
                      **_admin_errors()},
            operation_id="held", security=admin_read)},
        "/admin/api/held/{source}/{hold}": {"get": _operation(
            "One held booking; whom it waits for with a PHI key (the view is audited)", "Admin",
            {"200": _json_answer("the held booking", _HELD), **_admin_errors("404")}, operation_id="heldOne",
            security=admin_read,
            parameters=[source, {"name": "hold", "in": "path", "required": True, "schema": {"type": "string"},
                                 "description": "a held booking's id (`hold` in the list)"}])},
        "/admin/api/held/{source}/{hold}/{action}": {"post": _operation(
            "Release a held booking now (its patient looked up again at once), or refuse it", "Admin",
            {"200": ok, **_admin_errors("404", "409")}, operation_id="heldAction", security=admin_action,
            parameters=[source, {"name": "hold", "in": "path", "required": True, "schema": {"type": "string"},
                                 "description": "a held booking's id (`hold` in the list)"},
                        {"name": "action", "in": "path", "required": True, "description": "any other is 404",
                         "schema": {"type": "string", "enum": ["release", "refuse"]}}])},
        "/admin/api/identity/forget": {"post": _operation(
            "Forget every cached record of the EHRs' ids (after the org's records were fixed)", "Admin",
            {"200": _json_answer("how many cache keys were dropped", {
                "type": "object", "required": ["forgotten"], "properties": {"forgotten": {"type": "integer"}}}),
             **_admin_errors()}, operation_id="identityForget", security=admin_action)},
        "/admin/api/identity/{source}/check": {"post": _operation(
            "Dry run: how each participant of a booking (FHIR, or HL7 v2 for an hl7v2 source) resolves in the org",
            "Admin", {"200": _json_answer("each participant", {"type": "object", "required": ["participants"],
                                                                "properties": {"participants": _array(_CHECKED)}}),
                      **_admin_errors("400", "404", "413", "422", "502")},
            operation_id="identityCheck", security=admin_action, parameters=[source],
            requestBody={"required": True, "description": "the EHR's body (the Content-Type is not checked here)",
                         "content": {"application/octet-stream": {"schema": {"type": "string"}}}})},
    }


def _healthcloud_paths(prefix: str) -> dict[str, Any]:
    """Health Cloud's callouts (scheduling-out.md §1): the gateway as its external scheduling system."""
    security: list[dict[str, list[str]]] = [{"healthCloudBasic": []}, {"healthCloudBearer": []}]
    errors = {
        "400": _outcome("a search Find would not send, a window over [healthcloud] max_search_days or outside "
                        "1700-4000, an Appointment that is not one (a key named twice, nested too deep), an id "
                        "that is no FHIR id, or a create without its ServiceAppointment id"),
        "401": _outcome("no credential, or not Health Cloud's"),
        "403": _outcome("a source's key or token: it opens only that source's routes"),
        "404": _outcome("no EHR has it, no EHR is configured for that source system, the appointment is not one "
                        "the gateway booked (`[healthcloud] scope`), or a create's patient is not the EHR's"),
        "415": _outcome("Find is a form (application/x-www-form-urlencoded); the others FHIR JSON"),
        "502": _outcome("the EHR failed"),
        "503": _outcome("the EHR (or Redis) cannot answer now", retry_after=True),
    }

    def fhir(kind: str, description: str) -> dict[str, Any]:
        return {"description": description, "content": {FHIR_JSON: {"schema": {
            "type": "object", "required": ["resourceType"], "properties": {"resourceType": {"const": kind}}}}}}

    def path_param(name: str, text: str) -> dict[str, Any]:
        return {"name": name, "in": "path", "required": True, "description": text, "schema": _STRING}

    system = path_param("system", "a source system (`source_system` of a source with an `ehr` table)")
    appointment_body = {"required": True, "content": {FHIR_JSON: {"schema": {"type": "object"}},
                                                      _JSON: {"schema": {"type": "object"}}}}
    slot_read = _operation("Get slot status: the slot's status now, from its EHR", "Health Cloud",
                           {"200": fhir("Slot", "the Slot"), **errors}, operation_id="healthcloudSlot",
                           security=security, parameters=[path_param("slot_id", "the slot's id as Find gave it")])
    read = _operation("Get appointment: read from its EHR, answered as its create was", "Health Cloud",
                      {"200": fhir("Appointment", "the Appointment"), **errors}, operation_id="healthcloudRead",
                      security=security, parameters=[path_param("appointment_id", "the EHR's appointment id")])
    post_text = ("Create: `POST …/Appointment/{sourceSystem}` books the Appointment's slot in that EHR, once per "
                 "ServiceAppointment id (its identifier); an Appointment that cannot be booked is answered 200 "
                 "with status `proposed` and the reason in `comment`. Cancel: a body with `status: cancelled` "
                 "cancels the appointment named by the path (`…/Appointment/{id}` or `…/{sourceSystem}/{id}`).")
    return {
        f"{prefix}/Slot/_search": {"post": _operation(
            "Find available slots across the EHRs", "Health Cloud",
            {"200": fhir("Bundle", "a searchset of Slots and their Schedules, by start; a failing EHR is an "
                                   "OperationOutcome entry tagged with its source system"), **errors},
            operation_id="healthcloudFind", security=security,
            requestBody={"required": True, "content": {_FORM: {"schema": {"type": "object"}}}})},
        f"{prefix}/Slot/{{slot_id}}": {"get": slot_read},
        f"{prefix}/Slot/{{system}}/{{slot_id}}": {"get": {**slot_read, "operationId": "healthcloudSystemSlot",
                                                          "parameters": [system, *slot_read["parameters"]]}},
        f"{prefix}/Appointment/{{first}}": {
            "post": _operation("Create, or cancel", "Health Cloud", {"200": fhir("Appointment", "the Appointment"),
                                                                     **errors},
                               operation_id="healthcloudPost", security=security, description=post_text,
                               requestBody=appointment_body,
                               parameters=[path_param("first", "a source system (create) or an appointment id "
                                                               "(cancel)")])},
        f"{prefix}/Appointment/{{first}}/{{second}}": {
            "post": _operation("Cancel", "Health Cloud", {"200": fhir("Appointment", "the cancelled Appointment"),
                                                          **errors},
                               operation_id="healthcloudCancel", security=security, description=post_text,
                               requestBody=appointment_body,
                               parameters=[path_param("first", "the source system"),
                                           path_param("second", "the EHR's appointment id")])},
        f"{prefix}/Appointment/{{appointment_id}}": {"get": read},
        f"{prefix}/Appointment/{{system}}/{{appointment_id}}": {"get": {
            **read, "operationId": "healthcloudSystemRead", "parameters": [system, *read["parameters"]]}},
        f"{prefix}/metadata": {"get": _operation(
            "What this base serves (CapabilityStatement)", "Health Cloud",
            {"200": fhir("CapabilityStatement", "the CapabilityStatement")}, operation_id="healthcloudMetadata",
            security=[])},
    }


# -- the document ---------------------------------------------------------------------------------


def build_openapi(settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway `create_app(settings)` builds."""
    cfg = settings.file
    fhir_sources = sorted(name for name, s in settings.sources.items() if s.adapter != "hl7v2")
    all_sources = sorted(settings.sources)
    queue_sources = sorted(name for name, s in settings.sources.items() if s.delivery == "queue")
    mtls_sources = sorted(name for name, s in settings.sources.items() if s.client_cert_names)
    max_body = cfg.limits.max_body_bytes

    def source_param(names: list[str], description: str) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string", "enum": names} if names else {"type": "string"}
        return {"name": "source", "in": "path", "required": True, "description": description, "schema": schema}

    fhir_source = source_param(fhir_sources, "a configured source (its `[sources.<name>]` table); an unknown one "
                                             "is 404")
    entry_id = {"name": "entry_id", "in": "path", "required": True, "description": "a request-log entry's id",
                "schema": {"type": "string"}}

    fhir_security: list[dict[str, list[str]]] = [{"sourceKey": []}, {"smartToken": []}]
    admin_read: list[dict[str, list[str]]] = [{"adminKey": []}, {"adminSession": []}]
    admin_action: list[dict[str, list[str]]] = [{"adminKey": []}, {"adminSession": [], "csrfToken": []}]

    mtls_note = (f" Sources {', '.join(mtls_sources)} must also call over mutual TLS with a client certificate "
                 "that names them (401 without one, 403 with another source's)." if mtls_sources else "")
    fhir_body_note = f" Bodies over {max_body} bytes are refused (413)."

    def fhir_body(schema: dict[str, Any]) -> dict[str, Any]:
        return {"required": True, "description": "JSON, with `Content-Type: application/fhir+json` or "
                                                 "`application/json` (parameters such as charset allowed)."
                                                 + fhir_body_note,
                "content": {media: {"schema": schema} for media in _FHIR_MEDIA}}

    idempotency_key = {
        "name": "Idempotency-Key", "in": "header", "required": False,
        "description": "1 to 255 printable ASCII characters, optionally as a quoted string. Without it, the key "
                       "is the source plus every Appointment.identifier, else a fingerprint of the booking. The "
                       "same key with another booking is 422.",
        "schema": {"type": "string", "pattern": '^([ -~]{1,255}|"[ -~]{1,255}")$', "not": {"const": '""'}},
    }
    etag_header = {"description": "the appointment's version this answer shows, as `meta.versionId` does: `W/\"<n>\"` "
                                  "(1 when booked, one more per change); If-Match takes it",
                   "schema": {"type": "string", "pattern": '^W/"[0-9]+"$'}}
    replayed_headers = {
        "Location": {"description": "[base]/Appointment/{id}, absolute: the source's FHIR base at the first "
                                    "[server] public_urls", "schema": {"type": "string", "format": "uri"}},
        "Idempotent-Replayed": {"description": "`true` when this is the first attempt's answer, byte for byte",
                                "schema": {"const": "true"}},
        "ETag": etag_header,
        "X-Request-ID": _REQUEST_ID,
    }
    if_none_exist = {
        "name": "If-None-Exist", "in": "header", "required": False,
        "description": "FHIR's conditional create: `identifier=system|value` (`|value`: no system; `value`: any). An "
                       "appointment this source booked under it is answered 200 and nothing is booked; several are "
                       "412; none, the booking goes on. Any other search parameter is 400.",
        "schema": {"type": "string"},
    }
    if_match_header = {
        "name": "If-Match", "in": "header", "required": False,
        "description": "the ETag of the version this change is based on (`W/\"<n>\"`, a list, or `*`): another "
                       "version is 412 and nothing is changed; not an entity tag, 400",
        "schema": {"type": "string"},
    }
    book_responses: dict[str, Any] = {
        "201": {"description": "booked (or a retry of a booked request: the first answer again)",
                "headers": replayed_headers,
                "content": {FHIR_JSON: {"schema": _ref("BookedAppointment")}}},
        "200": {"description": "with If-None-Exist: the appointment this source booked under that identifier, as last "
                               "answered (nothing is booked); an informational OperationOutcome when its answer is not "
                               "kept (no data key)",
                "headers": {"Location": replayed_headers["Location"], "ETag": etag_header, "X-Request-ID": _REQUEST_ID},
                "content": {FHIR_JSON: {"schema": {"oneOf": [_ref("BookedAppointment"), _ref("OperationOutcome")]}}}},
        "202": _outcome("a `delivery = \"queue\"` source while Salesforce is down: the booking is in the durable "
                        "queue (severity information); the same request again answers 202 until it is booked, "
                        "then the 201", retry_after=True, request_id=True),
        **_fhir_errors(body=True),
        "409": _outcome("a booking with this idempotency key is still being processed", retry_after=True,
                        request_id=True),
        "412": _outcome("If-None-Exist matches more than one appointment of this source; nothing was booked",
                        request_id=True),
        "502": _outcome("Salesforce failed (a 5xx, or an answer that cannot be read), or the answer was lost "
                        "after sending: the booking is in doubt and is looked up before any new attempt",
                        retry_after=True, request_id=True),
        "503": _outcome("Redis or Salesforce unavailable, Salesforce's request limit reached, or the circuit "
                        "breaker open", retry_after=True, request_id=True),
    }
    book_responses = dict(sorted(book_responses.items()))
    book_description = ("Books the Appointment in Salesforce Health Cloud, exactly once per idempotency key. A "
                        "retry of a finished booking gets the first attempt's status and body, byte for byte, "
                        "with `Idempotent-Replayed: true`." + mtls_note)

    change_responses: dict[str, Any] = {
        "200": {"description": "rescheduled or cancelled (or a retry of a finished change: the first answer again)",
                "headers": replayed_headers,
                "content": {FHIR_JSON: {"schema": _ref("BookedAppointment")}}},
        **_fhir_errors(body=True),
        "409": _outcome("a change with this idempotency key is still being processed", retry_after=True,
                        request_id=True),
        "412": _outcome("If-Match names another version, or the identifier matches more than one appointment of "
                        "this source; nothing was changed", request_id=True),
        "502": _outcome("Salesforce failed (a 5xx, or an answer that cannot be read), or the answer was lost; "
                        "the change may be sent again", retry_after=True, request_id=True),
        "503": _outcome("Redis or Salesforce unavailable, Salesforce's request limit reached, or the circuit "
                        "breaker open", retry_after=True, request_id=True),
    }
    change_responses = dict(sorted(change_responses.items()))
    change_description = ("`status: cancelled` cancels the appointment in Salesforce (its `cancelationReason` "
                          "mapped through the `…:cancellationReason` code-map group, else its text); a booked "
                          "Appointment with other times, slot or participants reschedules it. Exactly once per "
                          "idempotency key; a cancelled appointment cannot be changed (422); an unknown one is "
                          "404. The body's `id` is the appointment's: by id it is required, by identifier optional; "
                          "another is 400, and nothing is changed." + mtls_note)
    appointment_id = {"name": "appointment_id", "in": "path", "required": True,
                      "description": "the Salesforce id the gateway answered the booking with",
                      "schema": {"type": "string"}}
    identifier_param = {"name": "identifier", "in": "query", "required": True,
                        "description": "the EHR's identifier of the appointment, as a FHIR token: system|value "
                                       "(`|value`: no system; `value`: any system); more than one match is 412",
                        "schema": {"type": "string"}}

    slot_responses = {
        "200": {"description": "a FHIR searchset Bundle of free Slots (status `free`); a Slot's id books with "
                               "`Appointment.slot`; with `_count`, a page of them and a `next` link while more are "
                               "left", "headers": {"X-Request-ID": _REQUEST_ID},
                "content": {FHIR_JSON: {"schema": {"type": "object", "required": ["resourceType", "type", "entry"],
                                                   "properties": {"resourceType": {"const": "Bundle"},
                                                                  "type": {"const": "searchset"},
                                                                  "total": {"type": "integer"},
                                                                  "link": {"type": "array"},
                                                                  "entry": {"type": "array"}}}}}},
        **_fhir_errors(body=False),
        "502": _outcome("Salesforce failed (a 5xx, or an answer that cannot be read)", retry_after=True,
                        request_id=True),
        "503": _outcome("Redis or Salesforce unavailable, Salesforce's request limit reached, or the circuit "
                        "breaker open", retry_after=True, request_id=True),
    }
    slot_responses = dict(sorted(slot_responses.items()))

    def query_param(name: str, description: str, *, required: bool = False) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": required, "description": description,
                "schema": {"type": "array", "items": {"type": "string"}}, "style": "form", "explode": True}

    # the searches' parameters, in the query of a GET or the form body of a POST …/_search
    page_size = {"type": "integer", "minimum": 0, "maximum": 999_999_999}
    slot_params = {
        "start": ("both bounds: ge<from> (or gt) and le<to> (or lt); a date, or a date-time with its offset", None),
        "actor": ("Practitioner/<id> or Device/<id> (one at least), Location/<id>", None),
        "service-type": ("system|code tokens", None),
        "appointment-type": ("system|code tokens", None),
        "specialty": ("system|code tokens", None),
        "_count": ("the page size (all when absent; 0: the total alone)", page_size),
        "_offset": ("where the page starts: what a `next` link sets (each page asks Get Slots again)", page_size),
    }

    translate_responses = {
        "200": _json_answer("the Salesforce request the booking would become; nothing is sent or stored",
                            _ref("BookingRequest"), X_Request_ID=_REQUEST_ID),
        **_fhir_errors(body=True),
    }
    translate_responses = dict(sorted(translate_responses.items()))

    paths: dict[str, Any] = {
        "/fhir/{source}/Appointment": {"post": _operation(
            "Book a FHIR Appointment", "FHIR", book_responses, operation_id="bookAppointment",
            description=book_description, parameters=[fhir_source, idempotency_key, if_none_exist],
            requestBody=fhir_body(_ref("Booking")), security=fhir_security,
        ), "put": _operation(
            "Reschedule or cancel the appointment an EHR identifier names (conditional update)", "FHIR",
            change_responses, operation_id="changeAppointmentByIdentifier", description=change_description,
            parameters=[fhir_source, identifier_param, idempotency_key, if_match_header],
            requestBody=fhir_body(_ref("Booking")), security=fhir_security,
        )},
        "/fhir/{source}/Appointment/{appointment_id}": {"put": _operation(
            "Reschedule or cancel a booked appointment", "FHIR", change_responses,
            operation_id="changeAppointment", description=change_description,
            parameters=[fhir_source, appointment_id, idempotency_key, if_match_header],
            requestBody=fhir_body(_ref("Booking")), security=fhir_security,
        )},
        "/fhir/{source}/Appointment/$book": {"post": _operation(
            "Book the appt-resource of $book Parameters", "FHIR", book_responses, operation_id="bookOperation",
            description=book_description, parameters=[fhir_source, idempotency_key, if_none_exist],
            requestBody=fhir_body(_ref("Booking")), security=fhir_security,
        )},
        "/fhir/{source}": {"post": _operation(
            "A FHIR batch Bundle of bookings and changes", "FHIR",
            {"200": {"description": "a batch-response Bundle: each entry's own status, its Appointment or its "
                                    "OperationOutcome, in the request's order",
                     "headers": {"X-Request-ID": _REQUEST_ID},
                     "content": {FHIR_JSON: {"schema": {"type": "object", "required": ["resourceType", "type"],
                                                        "properties": {"resourceType": {"const": "Bundle"},
                                                                       "type": {"const": "batch-response"}}}}}},
             **_fhir_errors(body=True)},
            operation_id="batch",
            description="Entries: POST Appointment (book; `request.ifNoneExist` as If-None-Exist), PUT "
                        "Appointment/<id> or Appointment?identifier=… (reschedule or cancel; `request.ifMatch` as "
                        "If-Match); any other entry is answered `405` (not-supported) in its place, and an entry "
                        "holding an Appointment has its absolute `fullUrl`. A transaction is 422. With "
                        "`Idempotency-Key`, entry i's key is `<key>#i`." + mtls_note,
            parameters=[fhir_source, idempotency_key],
            requestBody=fhir_body({"type": "object", "required": ["resourceType", "type"],
                                   "properties": {"resourceType": {"const": "Bundle"},
                                                  "type": {"enum": ["batch", "transaction"]},
                                                  "entry": {"type": "array", "maxItems": 100}}}),
            security=fhir_security,
        )},
        "/fhir/{source}/metadata": {"get": _operation(
            "The source's FHIR CapabilityStatement", "FHIR",
            {"200": {"description": "a FHIR R4 CapabilityStatement of what this source may do",
                     "content": {FHIR_JSON: {"schema": {"type": "object", "required": ["resourceType", "fhirVersion"],
                                                        "properties": {"resourceType": {"const": "CapabilityStatement"}}}}}},
             "404": _outcome("no FHIR source of that name is configured"),
             "406": _fhir_errors(body=False)["406"]},
            operation_id="capabilities", parameters=[fhir_source], security=[],
        )},
        "/fhir/{source}/OperationDefinition/{name}": {"get": _operation(
            "The definition of the gateway's own $translate, as the CapabilityStatement names it", "FHIR",
            {"200": {"description": "a FHIR R4 OperationDefinition",
                     "content": {FHIR_JSON: {"schema": {"type": "object", "required": ["resourceType", "url", "code"],
                                                        "properties": {"resourceType": {"const": "OperationDefinition"},
                                                                       "code": {"const": "translate"}}}}}},
             "404": _outcome("no FHIR source of that name, or no definition of that name"),
             "406": _fhir_errors(body=False)["406"]},
            operation_id="operationDefinition", security=[],
            parameters=[fhir_source, {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                                      "description": "`appointment-translate`; any other is 404",
                                      "examples": {"translate": {"value": "appointment-translate"}}}],
        )},
        "/fhir/{source}/Slot": {"get": _operation(
            "Search free slots (Salesforce Get Slots)", "FHIR", slot_responses, operation_id="searchSlots",
            description="The codes map through the source's code maps as a booking's would; the actors are the "
                        "Practitioners or Devices whose slots are wanted (and at most one Location)." + mtls_note,
            parameters=[fhir_source, *(
                {"name": name, "in": "query", "required": False, "description": text, "schema": schema}
                if schema is not None else query_param(name, text, required=name in ("start", "actor"))
                for name, (text, schema) in slot_params.items())],
            security=fhir_security,
        )},
        "/fhir/{source}/Slot/_search": {"post": _operation(
            "Search free slots by POST (FHIR search with a form body)", "FHIR",
            dict(sorted({**slot_responses, **_fhir_errors(body=True)}.items())), operation_id="searchSlotsByPost",
            description="The same search as GET …/Slot, its parameters form-encoded in the body (and any in the "
                        "query too); the same answer." + mtls_note,
            parameters=[fhir_source],
            requestBody={"required": True, "content": {_FORM: {"schema": {"type": "object", "properties": {
                name: schema if schema is not None else {"type": "array", "items": _STRING}
                for name, (text, schema) in slot_params.items()} | {"_format": _STRING}}}}},
            security=fhir_security,
        )},
        "/fhir/{source}/Appointment/$translate": {"post": _operation(
            "Dry run: the Salesforce request a booking would become", "FHIR", translate_responses,
            operation_id="translateAppointment",
            description="Parses, maps and checks the Appointment (or $book Parameters) as a booking would; "
                        "nothing is forwarded or stored." + mtls_note,
            parameters=[fhir_source],
            requestBody=fhir_body(_ref("Booking")), security=fhir_security,
        )},
        "/health/live": {"get": _operation(
            "Liveness", "Health",
            {"200": _json_answer("the process serves", {"type": "object", "required": ["status"],
                                                        "properties": {"status": {"const": "pass"}}})},
            operation_id="live", security=[],
        )},
        "/health/ready": {"get": _operation(
            "Readiness: Redis and Salesforce authentication", "Health",
            {"200": _json_answer("ready", _ref("Readiness")),
             "503": _json_answer("Redis or Salesforce authentication fails", _ref("Readiness"),
                                 Retry_After=_RETRY_AFTER)},
            operation_id="ready", security=[],
        )},
        "/metrics": {"get": _operation(
            "Prometheus metrics", "Operators",
            {"200": {"description": "the Prometheus text exposition format; labels carry no patient data",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}},
            operation_id="metrics", security=[],
        )},
        OPENAPI_PATH: {"get": _operation(
            "This document", "Meta",
            {"200": _json_answer("the OpenAPI 3.1 document of this gateway's configuration", {"type": "object"})},
            operation_id="openapi", security=[],
        )},
        "/auth/token": {"post": _operation(
            "SMART Backend Services access token", "SMART",
            {"200": _json_answer("a bearer token good for five minutes on the client's source only",
                                 _ref("AccessToken"), Cache_Control={"schema": {"const": "no-store"}}),
             "400": _json_answer("the grant type or assertion type is not the one expected", _ref("OAuthError")),
             "401": _json_answer("the client assertion is not valid (unknown client, key, algorithm, audience, "
                                 "lifetime, or a jti used before)", _ref("OAuthError")),
             "408": _outcome("the body did not arrive in time"),
             "413": _outcome("the body is larger than [limits] max_body_bytes"),
             "503": _json_answer("the token store is unavailable", _ref("OAuthError"))},
            operation_id="token", security=[],
            description="Client credentials with a signed JWT client assertion (RS384 or ES384) from a source "
                        "that has `smart_client_id` and its public keys (`jwks` or `jwks_url`). The assertion's "
                        "`aud` is this endpoint's URL as the client reaches it. Refusals are OAuth errors, not "
                        "OperationOutcomes.",
            requestBody={"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
                "type": "object",
                "required": ["grant_type", "client_assertion_type", "client_assertion"],
                "properties": {
                    "grant_type": {"const": "client_credentials"},
                    "client_assertion_type": {"const": ASSERTION_TYPE},
                    "client_assertion": {"type": "string", "description": "the signed JWT"},
                    "scope": {"type": "string", "examples": ["system/Appointment.write"]},
                },
            }}}},
        )},
        # -- the operators' side --
        "/admin/api/session": {
            "post": _operation(
                "Sign in with an admin key: a session cookie and its CSRF token", "Admin",
                {"200": _json_answer("signed in; the cookie is HttpOnly, SameSite=Strict, Path=/admin",
                                     _ref("Session"),
                                     Set_Cookie={"schema": {"type": "string"}, "description": f"`{COOKIE}=...`"}),
                 **_admin_errors("400", "413", "415")},
                operation_id="signIn", security=[],
                requestBody={"required": True, "content": {_JSON: {"schema": {
                    "type": "object", "required": ["key"], "properties": {"key": {"type": "string", "minLength": 1}},
                }}}},
            ),
            "get": _operation("Who is signed in", "Admin",
                              {"200": _json_answer("the caller's role", _ref("Session")), **_admin_errors()},
                              operation_id="session", security=admin_read),
            "delete": _operation(
                "Sign out", "Admin",
                {"200": _json_answer("signed out; the cookie is cleared",
                                     {"type": "object", "required": ["signed_out"],
                                      "properties": {"signed_out": {"const": True}}}),
                 **_admin_errors()},
                operation_id="signOut", security=admin_action,
            ),
        },
        "/admin/api/requests": {"get": _operation(
            "The request log, newest first (no patient data)", "Admin",
            {"200": _json_answer("matching entries", {"type": "object", "required": ["requests"], "properties": {
                "requests": _array(_ref("RequestLogEntry"))}}), **_admin_errors("400")},
            operation_id="listRequests", security=admin_read,
            parameters=[_query(*p) for p in (
                ("source", "a configured source", {"type": "string", "enum": all_sources} if all_sources
                 else {"type": "string"}),
                ("outcome", "the request's outcome", {"type": "string", "enum": list(OUTCOMES)}),
                ("since", "Unix time in milliseconds", {"type": "integer"}),
                ("limit", "at most 1000; below 1 counts as 1", {"type": "integer", "default": 50}),
                ("sf_id", "a Salesforce appointment id", {"type": "string"}),
                ("key", "an idempotency key (needs `source`)", {"type": "string"}),
            )],
        )},
        "/admin/api/requests/{entry_id}": {"get": _operation(
            "One request-log entry (with the patient and kept input for a PHI key, audited)", "Admin",
            {"200": _json_answer("the entry", _ref("RequestLogEntry")), **_admin_errors("404")},
            operation_id="getRequest", security=admin_read, parameters=[entry_id],
        )},
        "/admin/api/requests/{entry_id}/replay": {"post": _operation(
            "Replay a failed, refused, unmapped or queued booking from its sealed input", "Admin",
            {"200": _json_answer("the replay's new entry", {
                "type": "object", "required": ["replay", "original"],
                "properties": {"replay": _ref("RequestLogEntry"), "original": _STRING}}),
             **_admin_errors("404", "409")},
            operation_id="replayRequest", security=admin_action, parameters=[entry_id],
        )},
        "/admin/api/audit": {"get": _operation(
            "The audit stream, newest first", "Admin",
            {"200": _json_answer("who did what, when (keys only as 12 hex digits of their digest)", {
                "type": "object", "required": ["audit"], "properties": {"audit": _array({
                    "type": "object", "required": ["id", "t", "who", "role", "action", "ip"],
                    "additionalProperties": _STRING,
                    "properties": {name: _STRING for name in ("id", "t", "who", "role", "action", "ip")},
                })}}),
             **_admin_errors()},
            operation_id="audit", security=admin_read,
        )},
        "/admin/api/stats": {"get": _operation(
            "Counts per minute by source, outcome and direction, latency percentiles, Salesforce usage", "Admin",
            {"200": _json_answer("the window's statistics", _ref("Stats")), **_admin_errors("400")},
            operation_id="stats", security=admin_read,
            parameters=[_query("minutes", "the window, 1 to 1440 (clamped)", {"type": "integer", "default": 60})],
        )},
        "/admin/api/queue": {"get": _operation(
            "The durable queues: ready, delayed and dead-letter entries (no patient data)", "Admin",
            {"200": _json_answer("per queue source", {"type": "object", "required": ["sources"], "properties": {
                "sources": {"type": "object", "propertyNames": {"enum": queue_sources} if queue_sources else {},
                            "additionalProperties": _array(_ref("QueueEntry"))}}}),
             **_admin_errors()},
            operation_id="queue", security=admin_read,
        )},
        "/admin/api/queue/{source}/{entry_id}/{action}": {"post": _operation(
            "Replay or drop a dead-letter entry", "Admin",
            {"200": _json_answer("done", {"type": "object", "required": ["ok"],
                                          "properties": {"ok": {"const": True}}}),
             **_admin_errors("404")},
            operation_id="queueAction", security=admin_action,
            parameters=[
                source_param(queue_sources, "a source with `delivery = \"queue\"`; any other is 404"),
                {"name": "entry_id", "in": "path", "required": True, "description": "a dead-letter entry's id",
                 "schema": {"type": "string"}},
                {"name": "action", "in": "path", "required": True, "description": "any other is 404",
                 "schema": {"type": "string", "enum": ["replay", "drop"]}},
            ],
        )},
        "/admin/api/codemaps": {"get": _operation(
            "The code maps in use per source: version, files, and why files on disk were refused", "Admin",
            {"200": _json_answer("per source", {"type": "object", "required": ["sources"], "properties": {
                "sources": {"type": "object", "additionalProperties": {
                    "type": "object", "required": ["version", "files", "problems"],
                    "properties": {"version": {"type": ["string", "null"]}, "files": _NAMES,
                                   "problems": _NAMES}}}}}),
             **_admin_errors()},
            operation_id="codemaps", security=admin_read,
        )},
        "/admin/api/translate/{source}": {"post": _operation(
            "Dry run for operators: the Salesforce request a body would become", "Admin",
            {"200": _json_answer("the Salesforce request", {"type": "object", "required": ["request"],
                                                            "properties": {"request": _ref("BookingRequest")}}),
             **_admin_errors("400", "404", "413", "422")},
            operation_id="adminTranslate", security=admin_action,
            parameters=[{**fhir_source, "description": "a configured FHIR source; any other is 404"}],
            requestBody={"required": True, "description": "the EHR's body, as the dashboard sends it (the "
                                                           "Content-Type is not checked here)",
                         "content": {FHIR_JSON: {"schema": _ref("Booking")}}},
        )},
        "/admin/": {"get": _operation(
            "The operators' dashboard", "Admin",
            {"200": {"description": "the dashboard's page (static; it signs in through /admin/api/session)",
                     "content": {"text/html": {"schema": {"type": "string"}}}}},
            operation_id="dashboard", security=[],
        )},
        "/admin/static/{name}": {"get": _operation(
            "The dashboard's script and style sheet", "Admin",
            {"200": {"description": "the file", "content": {
                "text/css": {"schema": {"type": "string"}}, "text/javascript": {"schema": {"type": "string"}}}},
             "404": _outcome("no such file")},
            operation_id="dashboardFile", security=[],
            parameters=[{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                         "examples": {"script": {"value": "app.js"}, "style": {"value": "app.css"}}}],
        )},
    }

    schemas: dict[str, Any] = {
        "Booking": {"description": "What every booking route reads: an Appointment, or $book Parameters carrying "
                                   "one (told apart by resourceType; the route's name says which is usual).",
                    "oneOf": [_ref("Appointment"), _ref("Parameters")]},
        "Appointment": _APPOINTMENT,
        "Parameters": _PARAMETERS,
        "Coding": _CODING,
        "CodeableConcept": _CODEABLE_CONCEPT,
        "Reference": _REFERENCE,
        "Identifier": _IDENTIFIER,
        "OperationOutcome": _OPERATION_OUTCOME,
        "BookedAppointment": _BOOKED,
        "OAuthError": _OAUTH_ERROR,
        "AccessToken": _TOKEN,
        "Readiness": {
            "type": "object", "required": ["status", "checks", "circuit", "salesforce_api_usage"],
            "properties": {
                "status": {"enum": ["pass", "fail"]},
                "checks": {"type": "object", "required": ["redis", "salesforce_auth", "salesforce_instance"],
                           "properties": {"redis": {"enum": ["pass", "fail"]},
                                          "salesforce_auth": {"enum": ["pass", "fail", "unknown"]},
                                          "salesforce_instance": {"enum": ["pass", "fail", "unknown"]}}},
                "circuit": {"enum": ["closed", "open", "half_open"]},
                "salesforce_api_usage": {"type": "object", "required": ["used", "limit"], "properties": {
                    "used": {"type": "integer"}, "limit": {"type": "integer"}}},
            },
        },
        "Session": {"type": "object", "required": ["role", "csrf"], "properties": {
            "role": {"enum": ["admin", "phi"]},
            "csrf": {"type": ["string", "null"], "description": "the session's CSRF token; null for a bearer key"}}},
        "Stats": {"type": "object", "required": ["bucket_seconds", "series", "latency", "salesforce"], "properties": {
            "bucket_seconds": {"const": 60},
            "series": _array({"type": "object", "required": ["t", "source", "outcome", "direction", "count"],
                              "properties": {
                "t": {"type": "integer"}, "source": _STRING, "outcome": {"enum": list(OUTCOMES)},
                "direction": {"enum": ["in", "out"], "description": "in: bookings from the EHRs; out: Health "
                                                                     "Cloud's callouts"},
                "count": {"type": "integer"}}}),
            "latency": _array({"type": "object", "required": ["t", "p50", "p95", "p99", "count"], "properties": {
                "t": {"type": "integer"}, "p50": {"type": "number"}, "p95": {"type": "number"},
                "p99": {"type": "number"}, "count": {"type": "integer"}}}),
            "salesforce": {"type": "object", "required": ["api_used", "api_limit", "circuit"], "properties": {
                "api_used": {"type": "integer"}, "api_limit": {"type": "integer"},
                "circuit": {"enum": ["closed", "open", "half_open"]}}},
        }},
        "QueueEntry": {"type": "object",
                       "required": ["id", "where", "attempts", "accepted_ms", "due_ms", "last_error"],
                       "properties": {
                           "id": {"type": "string", "description": "the stream id; `-` while delayed"},
                           "where": {"enum": ["ready", "delayed", "dead"]},
                           "attempts": {"type": "integer"}, "accepted_ms": {"type": "integer"},
                           "due_ms": {"type": "integer"}, "last_error": {"type": ["string", "null"]}}},
        **_msgspec_components(),
    }

    paths.update(_healthcloud_paths(cfg.healthcloud.path_prefix))
    paths.update(_identity_paths(source_param(all_sources, "a configured source; an unknown one is 404"),
                                 admin_read, admin_action))
    for item in paths.values():  # the server refuses a path in another spelling before any routing
        for op in item.values():
            if any(p["in"] == "path" for p in op.get("parameters", ())) and "400" not in op["responses"]:
                op["responses"] = dict(sorted({**op["responses"], "400": _outcome(
                    "the path is not in its canonical spelling (a character percent-encoded that needs no encoding, "
                    "an encoded / or control character, an empty or dot segment)")}.items()))

    format_param = {"name": "_format", "in": "query", "required": False, "schema": {"type": "string"},
                    "description": "overrides `Accept` (FHIR): `json`, `application/fhir+json` or `application/json`; "
                                   "anything else is 406"}
    for path, item in paths.items():
        for op in item.values():
            if path.startswith("/fhir/{source}"):  # FHIR's content negotiation on every route of a source
                op["parameters"] = [*op.get("parameters", ()), format_param]
            for response in op["responses"].values():  # every answer names its request
                response["headers"] = {**response.get("headers", {}), "X-Request-ID": _REQUEST_ID}

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ehr-gateway",
            "version": __version__,
            "summary": "Books EHR appointments (FHIR R4 and its Cerner and Epic dialects) in Salesforce Health Cloud.",
            "description": (
                "Every refusal is a FHIR OperationOutcome (`application/fhir+json`), except the token endpoint's "
                "OAuth errors. Any route may also answer 400 (an unparsable request, a path not in its canonical "
                "spelling, a Host header missing or repeated), 408 (the request head or "
                "body too slow) or 431 (headers over [limits] max_header_bytes) from the server itself, as "
                "OperationOutcomes, and 405 (with `Allow`) for a method it does not serve. Sources configured: "
                + (", ".join(fhir_sources) or "none") + "."
            ),
        },
        "tags": [{"name": name} for name in ("FHIR", "Health Cloud", "SMART", "Health", "Operators", "Admin", "Meta")],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "sourceKey": {"type": "http", "scheme": "bearer",
                              "description": "an inbound key of the source named in the path (kept by the gateway "
                                             "only as its SHA-256 digest)"},
                # SMART Backend Services is OAuth 2.0 client credentials with a JWT assertion; the token
                # URL is relative to wherever the gateway is reached, which an `oauth2` scheme cannot say
                "smartToken": {
                    "type": "http", "scheme": "bearer", "bearerFormat": "SMART Backend Services access token",
                    "description": "a five-minute token from POST /auth/token (client credentials with a signed "
                                   "JWT assertion), issued to a source's `smart_client_id`; good on that source only",
                },
                "healthCloudBasic": {"type": "http", "scheme": "basic",
                                     "description": "Health Cloud's Appointment_Management named credential, "
                                                    "password authentication ([healthcloud] basic_sha256)"},
                "healthCloudBearer": {"type": "http", "scheme": "bearer",
                                      "description": "the same named credential by OAuth 2.0 "
                                                     "([healthcloud] bearer_keys_sha256)"},
                "adminKey": {"type": "http", "scheme": "bearer",
                             "description": "an admin key (no patient data) or a PHI key (patient data, audited)"},
                "adminSession": {"type": "apiKey", "in": "cookie", "name": COOKIE,
                                 "description": "the dashboard's session, from POST /admin/api/session"},
                "csrfToken": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token",
                              "description": "the session's CSRF token, required with the cookie for actions"},
            },
        },
    }


def openapi_json(settings: Settings) -> bytes:
    """The document, encoded once: `create_app` serves these bytes."""
    return msgspec.json.encode(build_openapi(settings))

