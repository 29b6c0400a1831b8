"""Adapters: each EHR dialect's request body -> one CanonicalBooking.

    adapter = get_adapter("cerner")
    booking = adapter.parse(body)   # bytes of a FHIR Appointment or $book Parameters

`parse` raises `gateway.errors.InvalidRequest` (400) for a body that is not JSON, not an object,
has no or the wrong resourceType, is a Bundle entry, or has a field of the wrong JSON type (the issue
names the FHIR path); `Unprocessable` (422) for $book Parameters without an Appointment resource and
for a slot reference that is not a Slot. Adapters are stateless and shared; `get_adapter` raises
ValueError for an unknown name.
"""

from __future__ import annotations

from typing import Protocol

from gateway.canonical import CanonicalBooking

from .cerner import CernerAdapter
from .epic import EpicAdapter
from .r4 import FhirAdapter, R4Adapter


class Adapter(Protocol):
    name: str

    def parse(self, body: bytes) -> CanonicalBooking: ...


_REGISTRY: dict[str, R4Adapter] = {a.name: a for a in (FhirAdapter(), CernerAdapter(), EpicAdapter())}

ADAPTERS: tuple[str, ...] = tuple(_REGISTRY)


def get_adapter(name: str) -> Adapter:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown adapter {name!r}; known: {', '.join(ADAPTERS)}") from None


__all__ = ["ADAPTERS", "Adapter", "CernerAdapter", "EpicAdapter", "FhirAdapter", "get_adapter"]
