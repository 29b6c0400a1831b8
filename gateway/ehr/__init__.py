"""The EHR side: a client per dialect (Cerner, Epic, plain FHIR R4) that speaks the EHR's own API, for
Health Cloud's callouts. Each turns the neutral shapes of `gateway/ehr/model.py` into its EHR's
requests and its answers back, through the same call machinery as Salesforce's (gateway/outbound)."""

from __future__ import annotations

import importlib

from gateway.ehr.base import EhrClient

_CLASSES = {"cerner": "CernerClient", "epic": "EpicClient", "fhir": "FhirClient"}


def client_class(dialect: str) -> type[EhrClient]:
    """The client of a dialect (`gateway.ehr.<dialect>`)."""
    return getattr(importlib.import_module(f"gateway.ehr.{dialect}"), _CLASSES[dialect])
