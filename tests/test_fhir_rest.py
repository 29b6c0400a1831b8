"""FHIR's REST rules over real HTTP (issue 13, item 11). Every FHIR body answered is checked by the
suite's R4 validator."""

from __future__ import annotations

import msgspec

from tests.conftest import VIDEO_VISIT, auth, corpus
from tests.fhir_validate import validate


def appointment(ident: str, **changes) -> bytes:
    data = msgspec.json.decode(corpus(VIDEO_VISIT))
    data["identifier"] = [{"system": "urn:oid:1.2.3", "value": ident}]
    data.update(changes)
    return msgspec.json.encode(data)


async def test_header_and_query_problems_are_located_not_expressed(gateway, sandbox):
    """A header or a query parameter is no FHIRPath: its issue says `location: http.<name>` and has no
    `expression`."""
    reused = await gateway.post("/fhir/cerner/Appointment", content=appointment("hq-1"),
                                headers=auth(**{"Idempotency-Key": "hq"}))
    assert reused.status_code == 201, reused.text
    cases = [
        ("POST", "/fhir/cerner/Appointment", appointment("hq-2"), {"Idempotency-Key": "x" * 256}, 400,
         "http.Idempotency-Key"),
        ("POST", "/fhir/cerner/Appointment", appointment("hq-2"), {"Idempotency-Key": "hq"}, 422,
         "http.Idempotency-Key"),  # the key used before with another booking
        ("PUT", "/fhir/cerner/Appointment", appointment("hq-1", status="booked"), {}, 400, "http.identifier"),
        ("PUT", "/fhir/cerner/Appointment?identifier=urn:oid:1.2.3|never", appointment("hq-1", status="booked"), {}, 404,
         "http.identifier"),
    ]
    for method, path, body, headers, status, where in cases:
        r = await gateway.request(method, path, content=body, headers=auth(**headers))
        assert r.status_code == status, (path, r.text)
        (issue,) = validate(r.content, "OperationOutcome")["issue"]
        assert issue["location"] == [where] and "expression" not in issue, issue
