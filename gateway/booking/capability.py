"""`GET /fhir/{source}/metadata`: the FHIR R4 CapabilityStatement of what one source may do here,
and `GET /fhir/{source}/OperationDefinition/appointment-translate`, the definition it names for
`$translate`.

Accurate to the configuration: every source books (create, `$book`), changes (update, conditional
update by identifier), takes batches, dry-runs (`$translate`) and searches Slots (GET or POST
`_search`, paged by `_count`); the security block says how this source authenticates (its key, and
a SMART Backend Services token when it has `smart_client_id`, with the token endpoint as SMART's
`oauth-uris` extension; mutual TLS when it names client certificates); a queue source says that a
booking may be answered 202. `$translate` is the gateway's own operation on Appointment, not FHIR's
`ConceptMap/$translate`: its `definition` is served here, so it resolves. Served without
credentials, as FHIR clients (and SMART) expect: they hold no key and no patient data.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec

from gateway.settings import SourceSettings

_SECURITY_SERVICE = "http://terminology.hl7.org/CodeSystem/restful-security-service"
_OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
# Argonaut Scheduling's canonical URL of $book (its OperationDefinition-appointment-book.json `url`)
ARGONAUT_BOOK = "http://fhir.org/guides/argonaut-scheduling/OperationDefinition/appointment-book"
TRANSLATE = "appointment-translate"  # the id of the $translate OperationDefinition under a source's base
# what content negotiation accepts (gateway/booking/fhir.py `negotiate`), as the CapabilityStatement lists it
FORMATS = ["application/fhir+json", "application/json", "json"]
_encoder = msgspec.json.Encoder()

try:
    _VERSION = version("ehr-gateway")
except PackageNotFoundError:  # run from a source tree that was not installed
    _VERSION = "0+unknown"


def capability_statement(name: str, source: SourceSettings, base: str, published: str) -> bytes:
    """`base`: this gateway's published URL (`[server] public_urls`), without a trailing slash; `published`:
    an ISO date for `date` (when the configuration was loaded)."""
    fhir_base = f"{base}/fhir/{name}"
    auth = ["a bearer key issued for this source (`Authorization: Bearer <key>`)"]
    security: dict[str, Any] = {"cors": False}
    if source.smart_client_id is not None:
        auth.append("or a SMART Backend Services access token (client credentials with a signed JWT assertion)")
        security["service"] = [{"coding": [{"system": _SECURITY_SERVICE, "code": "SMART-on-FHIR"}]}]
        security["extension"] = [{"url": _OAUTH_URIS, "extension": [{"url": "token", "valueUri": f"{base}/auth/token"}]}]
    if source.client_cert_names:
        auth.append("over mutual TLS, with a client certificate that names this source")
    security["description"] = "; ".join(auth) + "."
    booking_note = ("Booked in Salesforce Health Cloud exactly once per idempotency key (`Idempotency-Key`, else "
                    "the Appointment's identifiers, else its content).")
    if source.delivery == "queue":
        booking_note += " While Salesforce is unavailable a booking is queued and answered 202 until it is made."
    document = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": published,
        "publisher": "ehr-gateway",
        "kind": "instance",
        "software": {"name": "ehr-gateway", "version": _VERSION},
        "implementation": {"description": f"ehr-gateway: the {name} source's FHIR endpoint", "url": fhir_base},
        "fhirVersion": "4.0.1",
        "format": FORMATS,
        "rest": [{
            "mode": "server",
            "documentation": "Appointments become Salesforce Health Cloud appointments; codes are mapped through "
                             "this source's code maps (FHIR ConceptMaps).",
            "security": security,
            "interaction": [{"code": "batch",
                             "documentation": "bookings (POST Appointment) and changes (PUT Appointment/<id> or "
                                              "Appointment?identifier=…), each entry on its own; a transaction is "
                                              "refused (422), other entries are 405 not-supported"}],
            "resource": [
                {
                    "type": "Appointment",
                    "documentation": booking_note + " Update: `status: cancelled` cancels, other times, slot or "
                                     "participants reschedule; a cancelled appointment cannot be changed.",
                    "interaction": [{"code": "create"}, {"code": "update"}],
                    "versioning": "versioned-update",  # meta.versionId and ETag; If-Match checked
                    "updateCreate": False,
                    "conditionalCreate": True,
                    "conditionalUpdate": True,
                    "searchParam": [{"name": "identifier", "type": "token",
                                     "documentation": "only to name the appointment of a conditional update "
                                                      "or create (If-None-Exist)"}],
                    "operation": [
                        {"name": "book", "definition": ARGONAUT_BOOK,
                         "documentation": "Books the `appt-resource` of a Parameters (Argonaut Scheduling, IHE ITI)."},
                        {"name": "translate", "definition": f"{fhir_base}/OperationDefinition/{TRANSLATE}",
                         "documentation": "Dry run: the Salesforce request the Appointment would become; nothing is "
                                          "sent or stored. The gateway's own operation, not ConceptMap/$translate."},
                    ],
                },
                {
                    "type": "Slot",
                    "documentation": "Free slots from Salesforce's Get Slots; a Slot's id books with Appointment.slot.",
                    "interaction": [{"code": "search-type",
                                     "documentation": "GET [base]/Slot?… or POST [base]/Slot/_search with the "
                                                      "parameters form-encoded (the same answer); `_count` pages it"}],
                    "searchParam": [
                        {"name": "start", "type": "date", "documentation": "both bounds are required: ge and le"},
                        {"name": "actor", "type": "reference",
                         "documentation": "the Practitioner or Device whose slots are wanted (required), and a Location"},
                        {"name": "service-type", "type": "token"},
                        {"name": "appointment-type", "type": "token"},
                        {"name": "specialty", "type": "token"},
                        {"name": "_count", "type": "number",
                         "documentation": "the page size (all when absent; 0: the total only); `next` links page on"},
                        {"name": "_offset", "type": "number",
                         "documentation": "where a page starts in Get Slots' answer, as `next` links set it: each "
                                          "page asks Salesforce again, nothing is held between pages"},
                    ],
                },
                {
                    "type": "OperationDefinition",
                    "documentation": f"The definition of $translate: OperationDefinition/{TRANSLATE}.",
                    "interaction": [{"code": "read"}],
                },
            ],
        }],
    }
    return _encoder.encode(document)


def translate_definition(fhir_base: str, published: str) -> bytes:
    """The OperationDefinition of `$translate` at `[fhir_base]/OperationDefinition/appointment-translate`.
    Its input is $book's (Argonaut's parameter names); its output is not FHIR but the Salesforce
    request, answered as its own JSON: hence a Binary `return` (a Binary is read in its own media type)."""
    def param(name: str, use: str, kind: str, documentation: str, max_: str = "1") -> dict[str, Any]:
        return {"name": name, "use": use, "min": 0, "max": max_, "documentation": documentation, "type": kind}

    document = {
        "resourceType": "OperationDefinition",
        "id": TRANSLATE,
        "url": f"{fhir_base}/OperationDefinition/{TRANSLATE}",
        "version": _VERSION,
        "name": "AppointmentTranslate",
        "title": "Appointment $translate: the Salesforce request a booking would become",
        "status": "active",
        "kind": "operation",
        "date": published,
        "publisher": "ehr-gateway",
        "description": "A dry run of a booking: the Appointment (alone as the body, or in Parameters as `$book` takes "
                       "it) is parsed, its codes mapped through this source's code maps and Salesforce's rules "
                       "checked, as a booking would be; nothing is sent to Salesforce or stored. Not FHIR's "
                       "ConceptMap/$translate.",
        "affectsState": False,
        "code": "translate",
        "resource": ["Appointment"],
        "system": False,
        "type": True,
        "instance": False,
        "parameter": [
            param("appt-resource", "in", "Appointment", "the Appointment to translate (IHE's `appointment-resource` "
                                                        "is read too); one of the two is required"),
            param("comment", "in", "string", "replaces Appointment.comment, as in $book"),
            param("patient-id", "in", "uri", "adds the Patient participant when the Appointment has none", "*"),
            param("return", "out", "Binary", "the Salesforce Book Appointment request the booking would become, "
                                             "answered as its own JSON (application/json), not wrapped; a refusal "
                                             "is an OperationOutcome with its status"),
        ],
    }
    return _encoder.encode(document)
