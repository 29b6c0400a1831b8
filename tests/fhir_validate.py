"""The suite's FHIR R4 validator, which the gateway's code never imports.

Structure, cardinality, data types, primitive formats and unknown elements come from the
`fhir.resources` models (its R4B package: version 8 ships no R4, and R4B changed none of the
resources the gateway answers). The models leave code bindings unchecked, so the required bindings
of those resources are checked here: from the R4 code systems in the shared corpus where it has them,
else from the R4 value sets written out below (each names its page of the specification). A few
Bundle invariants (bdl-1, -2, -3, -4, -7) are checked by hand too.

`validate(body)` raises `AssertionError` naming every problem; it returns the decoded resource.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

TERMINOLOGY = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "fhir-r4-terminology"

# R4 value sets bound `required` that the corpus has no code system for (hl7.org/fhir/R4/valueset-*.html)
_VALUE_SETS: dict[str, frozenset[str]] = {
    # valueset-bundle-type.html
    "bundle-type": frozenset({"document", "message", "transaction", "transaction-response", "batch",
                              "batch-response", "history", "searchset", "collection"}),
    # valueset-search-entry-mode.html
    "search-entry-mode": frozenset({"match", "include", "outcome"}),
    # valueset-http-verb.html
    "http-verb": frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"}),
    # valueset-publication-status.html
    "publication-status": frozenset({"draft", "active", "retired", "unknown"}),
    # valueset-capability-statement-kind.html
    "capability-statement-kind": frozenset({"instance", "capability", "requirements"}),
    # valueset-restful-capability-mode.html
    "restful-capability-mode": frozenset({"client", "server"}),
    # valueset-type-restful-interaction.html
    "type-restful-interaction": frozenset({"read", "vread", "update", "patch", "delete", "history-instance",
                                           "history-type", "create", "search-type"}),
    # valueset-system-restful-interaction.html
    "system-restful-interaction": frozenset({"transaction", "batch", "search-system", "history-system"}),
    # valueset-versioning-policy.html
    "versioning-policy": frozenset({"no-version", "versioned", "versioned-update"}),
    # valueset-conditional-read-status.html, valueset-conditional-delete-status.html
    "conditional-read-status": frozenset({"not-supported", "modified-since", "not-match", "full-support"}),
    "conditional-delete-status": frozenset({"not-supported", "single", "multiple"}),
    # valueset-search-param-type.html
    "search-param-type": frozenset({"number", "date", "string", "token", "reference", "composite", "quantity",
                                    "uri", "special"}),
    # valueset-operation-kind.html, valueset-operation-parameter-use.html
    "operation-kind": frozenset({"operation", "query"}),
    "operation-parameter-use": frozenset({"in", "out"}),
    # valueset-FHIR-version.html (the R4 releases)
    "FHIR-version": frozenset({"4.0.0", "4.0.1"}),
    # valueset-participantrequired.html (also in the corpus; kept here so both agree)
    "participantrequired": frozenset({"required", "optional", "information-only"}),
}


@cache
def _code_system(name: str) -> frozenset[str]:
    if name in _VALUE_SETS:
        return _VALUE_SETS[name]
    document = json.loads((TERMINOLOGY / f"CodeSystem-{name}.json").read_text())

    def codes(concepts: list[dict[str, Any]]) -> Iterator[str]:
        for concept in concepts:
            yield concept["code"]
            yield from codes(concept.get("concept", []))

    return frozenset(codes(document["concept"]))


# resourceType -> (path of a coded element, the code system or value set its required binding names)
_BINDINGS: dict[str, tuple[tuple[str, str], ...]] = {
    "Appointment": (("status", "appointmentstatus"), ("participant.status", "participationstatus"),
                    ("participant.required", "participantrequired")),
    "Slot": (("status", "slotstatus"),),
    "OperationOutcome": (("issue.severity", "issue-severity"), ("issue.code", "issue-type")),
    "Bundle": (("type", "bundle-type"), ("entry.search.mode", "search-entry-mode"),
               ("entry.request.method", "http-verb")),
    "CapabilityStatement": (
        ("status", "publication-status"), ("kind", "capability-statement-kind"), ("fhirVersion", "FHIR-version"),
        ("rest.mode", "restful-capability-mode"), ("rest.interaction.code", "system-restful-interaction"),
        ("rest.resource.interaction.code", "type-restful-interaction"),
        ("rest.resource.versioning", "versioning-policy"),
        ("rest.resource.conditionalRead", "conditional-read-status"),
        ("rest.resource.conditionalDelete", "conditional-delete-status"),
        ("rest.resource.searchParam.type", "search-param-type"),
        ("rest.searchParam.type", "search-param-type"),
    ),
    "OperationDefinition": (("status", "publication-status"), ("kind", "operation-kind"),
                            ("parameter.use", "operation-parameter-use")),
}


def _values(node: Any, path: list[str]) -> Iterator[Any]:
    if not path:
        yield node
        return
    if isinstance(node, list):
        for item in node:
            yield from _values(item, path)
    elif isinstance(node, dict) and path[0] in node:
        yield from _values(node[path[0]], path[1:])


def _model(resource_type: str) -> Any:
    module = importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}")
    return getattr(module, resource_type)


def problems(resource: Any, where: str = "") -> list[str]:
    """Every problem found in one decoded resource (and the resources a Bundle holds)."""
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        return [f"{where or 'body'}: not a FHIR resource"]
    kind = resource["resourceType"]
    found: list[str] = []
    try:
        _model(kind).model_validate(resource)
    except ModuleNotFoundError:
        return [f"{where}{kind}: no such resource type in FHIR R4"]
    except Exception as exc:  # pydantic's ValidationError lists each field
        found.append(f"{where}{kind}: {exc}")
    for path, system in _BINDINGS.get(kind, ()):
        allowed = _code_system(system)
        for value in _values(resource, path.split(".")):
            if value not in allowed:
                found.append(f"{where}{kind}.{path}: {value!r} is not in the required value set {system}")
    if kind == "Bundle":
        found += _bundle_problems(resource, where)
    return found


def _bundle_problems(bundle: dict[str, Any], where: str) -> list[str]:
    found: list[str] = []
    kind = bundle.get("type")
    entries = bundle.get("entry") or []
    if "total" in bundle and kind not in ("searchset", "history"):
        found.append(f"{where}Bundle: bdl-1 total only when a search or history")
    full_urls = [e["fullUrl"] for e in entries if "fullUrl" in e]
    if len(full_urls) != len(set(full_urls)) and kind != "history":
        found.append(f"{where}Bundle: bdl-7 fullUrl must be unique")
    for i, entry in enumerate(entries):
        at = f"{where}Bundle.entry[{i}]"
        if "search" in entry and kind != "searchset":
            found.append(f"{at}: bdl-2 entry.search only when a search")
        if kind in ("batch", "transaction", "history") and "request" not in entry:
            found.append(f"{at}: bdl-3 entry.request mandatory for batch/transaction/history")
        if kind in ("batch-response", "transaction-response", "history") and "response" not in entry:
            found.append(f"{at}: bdl-4 entry.response mandatory for batch/transaction/history responses")
        if "/_history/" in entry.get("fullUrl", ""):
            found.append(f"{at}: bdl-8 fullUrl cannot be a version specific reference")
        if "resource" in entry:
            found += problems(entry["resource"], f"{at}.resource: ")
        if isinstance(entry.get("response"), dict) and "outcome" in entry["response"]:
            found += problems(entry["response"]["outcome"], f"{at}.response.outcome: ")
    return found


def validate(body: bytes | str | dict[str, Any], resource_type: str | None = None) -> dict[str, Any]:
    """The decoded resource, once it is valid FHIR R4 (of `resource_type` when given)."""
    resource = body if isinstance(body, dict) else json.loads(body)
    found = problems(resource)
    if resource_type is not None and resource.get("resourceType") != resource_type:
        found.insert(0, f"expected a {resource_type}, got {resource.get('resourceType')!r}")
    assert not found, "not valid FHIR R4:\n" + "\n".join(found)
    return resource
