"""Code maps: the integration engineers' FHIR ConceptMaps, checked and compiled once at load.

`config/codemaps/<source>/*.json|yaml`; each group maps one EHR code system (`group.source`, exactly
as in `Coding.system`) to one Salesforce category (`group.target`). Lookups at request time are
plain dict gets on the compiled form.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import msgspec
import yaml

from gateway.settings import element_message

TARGET_PREFIX = "urn:ehr-gateway:salesforce:"
CATEGORIES = (
    "appointmentTypes",
    "serviceTypes",
    "serviceCategories",
    "specialties",
    "workTypeId",
    "channelId",
    "cancellationReason",
)
# One value per booking: a code that maps to two of them is ambiguous.
SCALAR_CATEGORIES = frozenset({"workTypeId", "channelId", "cancellationReason"})
NO_MAPPING = frozenset({"unmatched", "disjoint"})
EQUIVALENCES = frozenset(
    {"relatedto", "equivalent", "equal", "wider", "subsumes", "narrower", "specializes", "inexact"}
    | NO_MAPPING
)


class CodeMapError(Exception):
    """One or more code maps are invalid: `problems` lists `file: element: what`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


# --- the FHIR ConceptMap shape (only what the gateway reads; other elements are allowed) ---


class _Target(msgspec.Struct):
    code: str | None = None
    equivalence: str | None = None


class _Element(msgspec.Struct):
    code: str | None = None
    target: list[_Target] = []


class _Unmapped(msgspec.Struct):
    mode: str
    code: str | None = None


class _Group(msgspec.Struct):
    source: str | None = None
    target: str | None = None
    element: list[_Element] = []
    unmapped: _Unmapped | None = None


class _ConceptMap(msgspec.Struct):
    resourceType: str
    group: list[_Group] = []
    url: str | None = None
    version: str | None = None


# --- the compiled form ---


class Group(msgspec.Struct, frozen=True):
    """One (EHR system -> Salesforce category) mapping, ready for lookups."""

    file: str
    index: int
    mapping: dict[str, tuple[str, ...]]
    unmapped_mode: Literal["provided", "fixed"] | None = None
    unmapped_code: str | None = None

    def lookup(self, code: str) -> tuple[str, ...] | None:
        """The Salesforce codes for `code`; () for an explicit no-mapping; None when unknown."""
        hit = self.mapping.get(code)
        if hit is not None:
            return hit
        if self.unmapped_mode == "provided":
            return (code,)
        if self.unmapped_mode == "fixed":
            return (self.unmapped_code,)  # type: ignore[return-value]
        return None


class SourceMaps(msgspec.Struct, frozen=True):
    """All groups of one source, by category and then by EHR system URI."""

    groups: dict[str, dict[str, Group]]
    version: str  # content hash of the source's map files, so an answer can name what it used
    files: tuple[str, ...] = ()

    def group(self, category: str, system: str) -> Group | None:
        by_system = self.groups.get(category)
        return by_system.get(system) if by_system else None


EMPTY = SourceMaps(groups={}, version="none")


def _read(path: Path) -> object:
    text = path.read_bytes()
    if path.suffix == ".json":
        return msgspec.json.decode(text)
    return yaml.safe_load(text)


def _compile_file(path: Path, shown: str, problems: list[str]) -> list[tuple[str, str, Group]]:
    try:
        raw = _read(path)
    except (msgspec.DecodeError, yaml.YAMLError) as exc:
        problems.append(f"{shown}: not valid {path.suffix.lstrip('.').upper()}: {exc}")
        return []
    try:
        cmap = msgspec.convert(raw, _ConceptMap)
    except msgspec.ValidationError as exc:
        problems.append(f"{shown}: {element_message(exc)}")
        return []
    if cmap.resourceType != "ConceptMap":
        problems.append(f"{shown}: $.resourceType: expected 'ConceptMap', got {cmap.resourceType!r}")
        return []
    if not cmap.group:
        problems.append(f"{shown}: $.group: a code map needs at least one group")
    out = []
    for gi, group in enumerate(cmap.group):
        at = f"{shown}: $.group[{gi}]"
        before = len(problems)
        if not group.source:
            problems.append(f"{at}.source: required (the EHR code system URI as sent in Coding.system)")
        category = None
        if not group.target or not group.target.startswith(TARGET_PREFIX):
            problems.append(f"{at}.target: must be {TARGET_PREFIX}<category>, one of {', '.join(CATEGORIES)}")
        else:
            category = group.target[len(TARGET_PREFIX):]
            if category not in CATEGORIES:
                problems.append(f"{at}.target: unknown category {category!r}; one of {', '.join(CATEGORIES)}")
        mapping: dict[str, tuple[str, ...]] = {}
        for ei, element in enumerate(group.element):
            eat = f"{at}.element[{ei}]"
            if not element.code:
                problems.append(f"{eat}.code: required")
                continue
            if element.code in mapping:
                problems.append(f"{eat}.code: {element.code!r} appears twice in this group")
                continue
            codes: list[str] = []
            for ti, target in enumerate(element.target):
                tat = f"{eat}.target[{ti}]"
                if target.equivalence not in EQUIVALENCES:
                    problems.append(f"{tat}.equivalence: required, one of {', '.join(sorted(EQUIVALENCES))}")
                    continue
                if target.equivalence in NO_MAPPING:
                    continue
                if not target.code:
                    problems.append(f"{tat}.code: required unless equivalence is unmatched or disjoint")
                    continue
                if target.code not in codes:
                    codes.append(target.code)
            if category in SCALAR_CATEGORIES and len(codes) > 1:
                problems.append(f"{eat}.target: {category} takes one value; {len(codes)} are mapped")
            mapping[element.code] = tuple(codes)
        mode = code = None
        if group.unmapped is not None:
            mode, code = group.unmapped.mode, group.unmapped.code
            if mode not in ("provided", "fixed"):
                problems.append(f"{at}.unmapped.mode: {mode!r} is not supported; use 'provided' or 'fixed'")
            elif mode == "fixed" and not code:
                problems.append(f"{at}.unmapped.code: required with mode 'fixed'")
        if len(problems) == before and category and group.source:
            out.append((category, group.source, Group(shown, gi, mapping, mode, code)))  # type: ignore[arg-type]
    return out


def load_source_maps(folder: Path, shown_root: Path | None = None) -> SourceMaps:
    """Load and check every map of one source. Raises CodeMapError listing every problem."""
    problems: list[str] = []
    groups: dict[str, dict[str, Group]] = {}
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".yaml", ".yml")) if folder.is_dir() else []
    for path in files:
        shown = str(path.relative_to(shown_root)) if shown_root else str(path)
        digest.update(shown.encode() + b"\0" + path.read_bytes() + b"\0")
        for category, system, group in _compile_file(path, shown, problems):
            existing = groups.setdefault(category, {}).get(system)
            if existing is not None:
                problems.append(
                    f"{shown}: $.group[{group.index}]: {system} -> {category} is already mapped in "
                    f"{existing.file} $.group[{existing.index}]"
                )
                continue
            groups[category][system] = group
    if problems:
        raise CodeMapError(problems)
    return SourceMaps(groups=groups, version=digest.hexdigest()[:12], files=tuple(str(p.name) for p in files))


def load_all(config_dir: Path, sources: list[str]) -> dict[str, SourceMaps]:
    """Maps for every configured source; a folder for an unknown source is a problem too."""
    root = config_dir / "codemaps"
    problems: list[str] = []
    out: dict[str, SourceMaps] = {}
    for source in sources:
        try:
            out[source] = load_source_maps(root / source, config_dir)
        except CodeMapError as exc:
            problems.extend(exc.problems)
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if folder.name not in sources:
                problems.append(f"{folder.relative_to(config_dir)}: no source named {folder.name!r} in gateway.toml")
    if problems:
        raise CodeMapError(problems)
    return out
