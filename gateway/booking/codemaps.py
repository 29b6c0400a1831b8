"""Code maps: the integration engineers' FHIR ConceptMaps, checked and compiled once at load.

`config/codemaps/<source>/*.json|yaml`; each group maps one EHR code system (`group.source`, exactly
as in `Coding.system`) to one Salesforce category (`group.target`). Lookups at request time are
plain dict gets on the compiled form.

Both ways: Health Cloud's callouts carry the EHR's own codes (its Work Type Code Set Bundles hold each
source system's codes), and a group whose source codes list one (`holding`) gives the code system the
EHR wants it in (gateway/scheduling/to_ehr.py). A code that no group lists may be a Salesforce-side
code: the same maps read in reverse (FHIR's `$translate` has `reverse`) give the EHR's back, for the
categories the callouts carry (`REVERSE_CATEGORIES`): an element whose target is `equivalent` or
`equal` maps that target back to the element's code in the group's system. Where two such elements
map one Salesforce code back to two EHR codes, a reverse group decides (`source`
`urn:ehr-gateway:salesforce:<category>`, `target` the EHR system, an element per Salesforce code);
without one the maps are refused at load, naming the elements.
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
# what Health Cloud's callouts carry (a Slot search's appointment-type and service-type, an Appointment's)
REVERSE_CATEGORIES = ("appointmentTypes", "serviceTypes")
REVERSIBLE = frozenset({"equivalent", "equal"})  # only these say the Salesforce code means the EHR's exactly
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


class Reverse(msgspec.Struct, frozen=True):
    """A Salesforce code's EHR coding, and the map element that says so."""

    system: str
    code: str
    file: str
    where: str  # "$.group[i].element[j]"


class SourceMaps(msgspec.Struct, frozen=True):
    """All groups of one source, by category and then by EHR system URI; and the reverse, by category
    and then by Salesforce code."""

    groups: dict[str, dict[str, Group]]
    version: str  # content hash of the source's map files, so an answer can name what it used
    files: tuple[str, ...] = ()
    reverse: dict[str, dict[str, Reverse]] = {}

    def group(self, category: str, system: str) -> Group | None:
        by_system = self.groups.get(category)
        return by_system.get(system) if by_system else None

    def to_ehr(self, category: str, code: str) -> Reverse | None:
        """The EHR coding a Salesforce code of `category` maps back to, or None."""
        by_code = self.reverse.get(category)
        return by_code.get(code) if by_code else None

    def holding(self, category: str, code: str) -> list[tuple[str, Group]]:
        """(EHR system, group) of each group of `category` that lists `code` among its source codes (the
        EHR's own codes, an element each, whatever its target), in load order: files by name, groups
        as written. A group's `unmapped` takes any code in, but lists none."""
        by_system = self.groups.get(category)
        return [(system, g) for system, g in by_system.items() if code in g.mapping] if by_system else []


EMPTY = SourceMaps(groups={}, version="none")


def _read(path: Path) -> object:
    text = path.read_bytes()
    if path.suffix == ".json":
        return msgspec.json.decode(text)
    return yaml.safe_load(text)


class _Compiled(msgspec.Struct):
    forward: list[tuple[str, str, Group]] = []  # (category, EHR system, group)
    explicit: list[tuple[str, str, Reverse]] = []  # a reverse group's: (category, Salesforce code, EHR coding)
    derived: list[tuple[str, str, Reverse]] = []  # read back from forward groups' equivalent elements


def _compile_file(path: Path, shown: str, problems: list[str]) -> _Compiled:
    out = _Compiled()
    try:
        raw = _read(path)
    except (msgspec.DecodeError, yaml.YAMLError) as exc:
        problems.append(f"{shown}: not valid {path.suffix.lstrip('.').upper()}: {exc}")
        return out
    try:
        cmap = msgspec.convert(raw, _ConceptMap)
    except msgspec.ValidationError as exc:
        problems.append(f"{shown}: {element_message(exc)}")
        return out
    if cmap.resourceType != "ConceptMap":
        problems.append(f"{shown}: $.resourceType: expected 'ConceptMap', got {cmap.resourceType!r}")
        return out
    if not cmap.group:
        problems.append(f"{shown}: $.group: a code map needs at least one group")
    for gi, group in enumerate(cmap.group):
        if group.source and group.source.startswith(TARGET_PREFIX):
            out.explicit += _reverse_group(group, gi, shown, problems)
        else:
            _forward_group(group, gi, shown, problems, out)
    return out


def _forward_group(group: _Group, gi: int, shown: str, problems: list[str], out: _Compiled) -> None:
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
    derived: list[tuple[str, str, Reverse]] = []
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
            if category in REVERSE_CATEGORIES and target.equivalence in REVERSIBLE and group.source:
                derived.append((category, target.code,
                                Reverse(group.source, element.code, shown, f"$.group[{gi}].element[{ei}]")))
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
        out.forward.append((category, group.source, Group(shown, gi, mapping, mode, code)))  # type: ignore[arg-type]
        out.derived += derived


def _reverse_group(group: _Group, gi: int, shown: str, problems: list[str]) -> list[tuple[str, str, Reverse]]:
    """A group from Salesforce's codes back to an EHR system: each element one code, one target."""
    at = f"{shown}: $.group[{gi}]"
    category = (group.source or "")[len(TARGET_PREFIX):]
    found: list[tuple[str, str, Reverse]] = []
    if category not in REVERSE_CATEGORIES:
        problems.append(f"{at}.source: a reverse group maps from {TARGET_PREFIX}<category>, one of "
                        f"{', '.join(REVERSE_CATEGORIES)} (what Health Cloud's callouts carry)")
        return found
    if not group.target or group.target.startswith(TARGET_PREFIX):
        problems.append(f"{at}.target: the EHR code system URI the codes go back to")
        return found
    if group.unmapped is not None:
        problems.append(f"{at}.unmapped: a reverse group names each code it maps back")
    seen: set[str] = set()
    for ei, element in enumerate(group.element):
        eat = f"{at}.element[{ei}]"
        targets = [t for t in element.target if t.equivalence not in NO_MAPPING]
        if not element.code or element.code in seen:
            problems.append(f"{eat}.code: required, once in this group")
        elif len(targets) != 1 or not targets[0].code or targets[0].equivalence not in EQUIVALENCES:
            problems.append(f"{eat}.target: one target with its code and equivalence")
        else:
            seen.add(element.code)
            found.append((category, element.code,
                          Reverse(group.target, targets[0].code or "", shown, f"$.group[{gi}].element[{ei}]")))
    return found


def load_source_maps(folder: Path, shown_root: Path | None = None) -> SourceMaps:
    """Load and check every map of one source. Raises CodeMapError listing every problem."""
    problems: list[str] = []
    groups: dict[str, dict[str, Group]] = {}
    explicit: dict[tuple[str, str], Reverse] = {}
    derived: dict[tuple[str, str], list[Reverse]] = {}
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".yaml", ".yml")) if folder.is_dir() else []
    for path in files:
        shown = str(path.relative_to(shown_root)) if shown_root else str(path)
        digest.update(shown.encode() + b"\0" + path.read_bytes() + b"\0")
        compiled = _compile_file(path, shown, problems)
        for category, system, group in compiled.forward:
            existing = groups.setdefault(category, {}).get(system)
            if existing is not None:
                problems.append(
                    f"{shown}: $.group[{group.index}]: {system} -> {category} is already mapped in "
                    f"{existing.file} $.group[{existing.index}]"
                )
                continue
            groups[category][system] = group
        for category, code, back in compiled.explicit:
            if (first := explicit.get((category, code))) is not None:
                problems.append(f"{shown}: {back.where}: {category} {code!r} is already mapped back in "
                                f"{first.file} {first.where}")
                continue
            explicit[(category, code)] = back
        for category, code, back in compiled.derived:
            derived.setdefault((category, code), []).append(back)
    reverse = _reverse(explicit, derived, problems)
    if problems:
        raise CodeMapError(problems)
    return SourceMaps(groups=groups, version=digest.hexdigest()[:12], files=tuple(str(p.name) for p in files),
                      reverse=reverse)


def _reverse(explicit: dict[tuple[str, str], Reverse], derived: dict[tuple[str, str], list[Reverse]],
             problems: list[str]) -> dict[str, dict[str, Reverse]]:
    """Each Salesforce code's EHR coding: a reverse group's, else the one its equivalent elements
    give; two different ones with no reverse group to decide are a problem named at each element."""
    reverse: dict[str, dict[str, Reverse]] = {}
    for (category, code), backs in derived.items():
        if (category, code) in explicit:
            continue
        codings = {(b.system, b.code) for b in backs}
        if len(codings) > 1:
            where = "; ".join(f"{b.file} {b.where}" for b in backs)
            problems.append(f"{backs[0].file}: {backs[0].where}: {category} {code!r} maps back to {len(codings)} "
                            f"EHR codes ({where}): add a reverse group (source {TARGET_PREFIX}{category}) "
                            "that names the one Health Cloud's callouts should use")
            continue
        reverse.setdefault(category, {})[code] = backs[0]
    for (category, code), back in explicit.items():
        reverse.setdefault(category, {})[code] = back
    return reverse


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
