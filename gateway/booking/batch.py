"""FHIR `batch` Bundles at `POST /fhir/{source}`: each entry booked or changed on its own, each with
its own outcome, in a `batch-response` Bundle (entries in the request's order).

An entry is `request.method` POST with `request.url` `Appointment` (a booking; `request.ifNoneExist`
as the If-None-Exist header), or PUT with `Appointment/<Salesforce id>` or
`Appointment?identifier=system|value` (a reschedule or cancellation; `request.ifMatch` as If-Match).
A `transaction` is refused: Salesforce cannot book several appointments atomically, and FHIR
promises all-or-nothing for one. Entries are independent, as FHIR's batch says; they are
processed in order, one at a time, so two entries about one appointment meet Salesforce in the order
written.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

import msgspec

from adapters._keys import check_keys
from adapters._shapes import MAX_ITEMS
from gateway.errors import GatewayError, InvalidRequest, Issue, MethodNotAllowed, Unprocessable

_encoder = msgspec.json.Encoder()


class _Request(msgspec.Struct):
    method: str | None = None
    url: str | None = None
    ifMatch: str | None = None  # as the If-Match header of a PUT
    ifNoneExist: str | None = None  # as the If-None-Exist header of a POST


class _Entry(msgspec.Struct):
    resource: msgspec.Raw = msgspec.Raw(b"")  # kept as bytes: the source's adapter reads it (empty: none)
    request: _Request | None = None
    fullUrl: str | None = None


class _Bundle(msgspec.Struct):
    resourceType: str | None = None
    type: str | None = None
    entry: list[_Entry] | None = None


class Item(msgspec.Struct, frozen=True):
    """One entry to act on: `kind` book or change; for a change, the path id or the identifier query."""

    index: int
    kind: str
    body: bytes
    appointment_id: str | None = None
    identifier: str | None = None
    if_match: str | None = None
    if_none_exist: str | None = None


def parse_batch(body: bytes) -> list[Item | GatewayError]:
    """The entries, or for an entry that cannot be acted on, the error it is answered with: 405
    (`not-supported`) for an interaction the gateway does not take in a batch, 400 for an entry
    without its resource."""
    try:
        bundle = msgspec.json.decode(body, type=_Bundle)
        check_keys(body)  # the Bundle's own keys (each entry's resource is checked again by its adapter)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest("the body is not a FHIR Bundle") from None
    if bundle.resourceType != "Bundle":
        raise InvalidRequest("POST /fhir/{source} takes a Bundle of type batch", expression=("Bundle.resourceType",))
    if bundle.type == "transaction":
        raise Unprocessable(issues=[Issue(code="not-supported", expression=("Bundle.type",),
                                          diagnostics="a transaction cannot be honoured: Salesforce books appointments "
                                                      "one at a time, not all or nothing; send a batch")])
    if bundle.type != "batch":
        raise InvalidRequest("the Bundle's type must be batch", expression=("Bundle.type",))
    entries = bundle.entry or []
    if len(entries) > MAX_ITEMS:
        raise Unprocessable(issues=[Issue(code="too-costly", expression=("Bundle.entry",),
                                          diagnostics=f"a batch takes at most {MAX_ITEMS} entries")])
    items: list[Item | GatewayError] = []
    for i, entry in enumerate(entries):
        at = f"Bundle.entry[{i}]"
        method = (entry.request.method or "").upper() if entry.request else ""
        url = (entry.request.url or "").lstrip("/") if entry.request else ""
        path, _, query = url.partition("?")
        if_match, if_none_exist = (entry.request.ifMatch, entry.request.ifNoneExist) if entry.request else (None, None)
        if method == "POST" and path == "Appointment" and not query:
            kind, appointment_id, identifier = "book", None, None
        elif method == "PUT" and path.startswith("Appointment/") and path.count("/") == 1 and not query:
            kind, appointment_id, identifier = "change", path.split("/", 1)[1], None
        elif method == "PUT" and path == "Appointment" and query:
            identifiers = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "identifier"]
            kind, appointment_id, identifier = "change", None, identifiers[0] if len(identifiers) == 1 else ""
        else:
            # 405: the entry is well formed, but its interaction is not one the gateway takes in a batch
            items.append(MethodNotAllowed(
                "an entry books (POST Appointment) or changes (PUT Appointment/<id> or Appointment?identifier=…) "
                "an appointment", expression=(f"{at}.request",)))
            continue
        if not entry.resource:
            items.append(InvalidRequest("the entry has no resource", expression=(f"{at}.resource",)))
            continue
        items.append(Item(i, kind, bytes(entry.resource), appointment_id=appointment_id, identifier=identifier,
                          if_match=if_match if kind == "change" else None,
                          if_none_exist=if_none_exist if kind == "book" else None))
    return items


def response_entry(status: int, body: bytes, location: str | None, etag: str | None = None) -> dict[str, Any]:
    """One `batch-response` entry: the Appointment as `resource` on success, with its absolute
    `location` as `fullUrl`; the OperationOutcome as `response.outcome` otherwise."""
    response: dict[str, Any] = {"status": f"{status} {HTTPStatus(status).phrase}"}
    if location:
        response["location"] = location
    if etag:
        response["etag"] = etag
    resource = msgspec.json.decode(body) if body else None
    entry: dict[str, Any] = {"response": response}
    if status < 300 and resource is not None and resource.get("resourceType") == "Appointment":
        entry = {"fullUrl": location, **entry} if location else entry
        entry["resource"] = resource
    elif resource is not None:
        response["outcome"] = resource
    return entry


def batch_response(entries: list[dict[str, Any]]) -> bytes:
    return _encoder.encode({"resourceType": "Bundle", "type": "batch-response", "entry": entries})

