"""The FHIR JSON shapes the adapters read, as msgspec Structs.

Only the elements a booking needs are declared; everything else in the body (text, meta, contained,
reasonCode, requestedPeriod, ...) is skipped by the decoder without being built. Every field is
optional and accepts JSON null as "absent", so the Structs describe R4 and STU3 alike; a present
field of the wrong JSON type fails the decode, and the adapter turns msgspec's `$.a[0].b` location
into the FHIR path of the element.

`Coding` is decoded straight into the canonical `Coding` (its unknown keys such as `userSelected`
are ignored), so a CodeableConcept's codings go into the canonical booking without a copy.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec

from gateway.canonical import Coding

_OPTS = {"frozen": True, "gc": False, "forbid_unknown_fields": False}

# Every array the adapters read is capped, checked by the decoder as it reads: a body with a million
# participants is refused before one is built. (Arrays the adapters skip cost no more than their
# bytes, which the body size limit bounds.)
MAX_ITEMS = 100
_T = TypeVar("_T")
Items = Annotated[tuple[_T, ...], msgspec.Meta(max_length=MAX_ITEMS)]


class CodeableConcept(msgspec.Struct, **_OPTS):
    coding: Items[Coding] | None = None
    text: str | None = None


class Identifier(msgspec.Struct, **_OPTS):
    system: str | None = None
    value: str | None = None


class Reference(msgspec.Struct, **_OPTS):
    reference: str | None = None
    # a logical reference (R4; STU3 had `identifier` too): the actor named by its identifier, its kind by `type`
    type: str | None = None
    identifier: Identifier | None = None


class Participant(msgspec.Struct, **_OPTS):
    # `type` is not needed: a participant counts only through its actor's reference
    actor: Reference | None = None
    status: str | None = None  # only checked against its required binding


class Extension(msgspec.Struct, **_OPTS):
    url: str | None = None
    valueString: str | None = None


class Param(msgspec.Struct, **_OPTS):
    """One Parameters.parameter. `resource` stays raw: only the appointment resource is decoded,
    so another parameter's resource (IHE's patient-resource, say) is never read."""

    name: str | None = None
    valueString: str | None = None
    valueUri: str | None = None
    valueIdentifier: Identifier | None = None
    valueReference: Reference | None = None
    resource: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


class Body(msgspec.Struct, **_OPTS):
    """A request body: an Appointment (R4 or STU3) or a Parameters, told apart by resourceType.

    The two resources share no element names, so one Struct decodes either in a single pass.
    `fullUrl` and `resource` are only there to recognise a Bundle entry sent by mistake.
    """

    resourceType: str | None = None
    id: str | None = None  # an update's must be the URL's
    # Appointment
    identifier: Items[Identifier] | None = None
    status: str | None = None
    serviceCategory: Items[CodeableConcept] | CodeableConcept | None = None  # R4 array, STU3 single
    serviceType: Items[CodeableConcept] | None = None
    specialty: Items[CodeableConcept] | None = None
    appointmentType: CodeableConcept | None = None
    start: str | None = None
    end: str | None = None
    comment: str | None = None
    cancelationReason: CodeableConcept | None = None  # FHIR spells it with one "l"
    slot: Items[Reference] | None = None
    participant: Items[Participant] | None = None
    # Parameters
    parameter: Items[Param] | None = None
    # a Bundle entry ({"fullUrl", "resource"}) is not a resource
    fullUrl: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    resource: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


class CernerBody(Body, **_OPTS):
    """Cerner adds its extensions (action-comment may carry a comment)."""

    extension: Items[Extension] | None = None


class Head(msgspec.Struct, **_OPTS):
    """Only decoded on the error path, to say what kind of body failed."""

    resourceType: object = None
    fullUrl: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    resource: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
