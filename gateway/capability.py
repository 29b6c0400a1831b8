"""`GET /fhir/{source}/metadata`: the FHIR R4 CapabilityStatement of what one source may do here.

Accurate to the configuration: every source books (create, `$book`), changes (update, conditional
update by identifier), dry-runs (`$translate`) and searches Slots; the security block says how this
source authenticates (its key, and a SMART Backend Services token when it has `smart_client_id`,
with the token endpoint as SMART's `oauth-uris` extension; mutual TLS when it names client
certificates); a queue source says that a booking may be answered 202. Served without credentials,
as FHIR clients (and SMART) expect: it holds no key and no patient data.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec

from gateway.settings import SourceSettings

_SECURITY_SERVICE = "http://terminology.hl7.org/CodeSystem/restful-security-service"
_OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
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
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": "Appointments become Salesforce Health Cloud appointments; codes are mapped through "
                             "this source's code maps (FHIR ConceptMaps).",
            "security": security,
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
                        {"name": "book", "definition": "http://fhir.org/guides/argonaut/scheduling/OperationDefinition/appointment-book",
                         "documentation": "Books the `appt-resource` of a Parameters (Argonaut Scheduling, IHE ITI)."},
                        {"name": "translate", "definition": "urn:ehr-gateway:operation:translate",
                         "documentation": "Dry run: the Salesforce request the Appointment would become; nothing is "
                                          "sent or stored."},
                    ],
                },
                {
                    "type": "Slot",
                    "documentation": "Free slots from Salesforce's Get Slots; a Slot's id books with Appointment.slot.",
                    "interaction": [{"code": "search-type"}],
                    "searchParam": [
                        {"name": "start", "type": "date", "documentation": "both bounds are required: ge and le"},
                        {"name": "actor", "type": "reference",
                         "documentation": "the Practitioner or Device whose slots are wanted (required), and a Location"},
                        {"name": "service-type", "type": "token"},
                        {"name": "appointment-type", "type": "token"},
                        {"name": "specialty", "type": "token"},
                    ],
                },
            ],
        }],
    }
    return _encoder.encode(document)
