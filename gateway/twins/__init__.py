"""Twins of the EHRs' scheduling APIs (Oracle Health/Cerner Millennium R4, Epic's STU3 `$find` and
`$book` with its HL7 v2 cancel interface, a plain FHIR R4 server), written from the spec for the tests,
the demo and the benchmarks. They share no types with the gateway's EHR clients (gateway/ehr)."""

from gateway.twins.app import create_ehr_twin
from gateway.twins.config import TwinConfig, TwinSchedule

__all__ = ["TwinConfig", "TwinSchedule", "create_ehr_twin"]
