"""Dependencies point one way (docs/architecture.md): each part of the gateway imports only the parts
below it, and no module imports itself back through others. Read from the source (the AST of every
module's imports, those inside functions too), so a new import that reaches back up fails here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the parts, lowest first: a module may import its own part and any part before it
LAYERS = [
    ("leaves", {"gateway", "gateway.canonical", "gateway.errors", "gateway.settings", "gateway.ids", "gateway.logs"}),
    ("adapters", {"adapters"}),
    ("state", {"gateway.state"}),
    ("outbound", {"gateway.outbound"}),
    ("called systems", {"gateway.salesforce", "gateway.ehr"}),
    ("identity", {"gateway.identity"}),
    ("booking", {"gateway.booking"}),
    ("scheduling", {"gateway.scheduling"}),
    ("operators", {"gateway.operators"}),
    ("edges", {"gateway.edges"}),
    ("root", {"gateway.runtime", "gateway.app", "gateway.cli"}),
]
# the Health Cloud sandbox is a twin of Salesforce, not a part of the gateway: it may be served by
# the gateway's server helper, and may import nothing else of it (tests/test_sandbox_twin.py says
# the same of the Salesforce client)
TWINS = {"gateway.sandbox": {"gateway.sandbox", "gateway.edges.server"},
         "gateway.twins": {"gateway.twins", "gateway.edges.server"}}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in [*(ROOT / "gateway").rglob("*.py"), *(ROOT / "adapters").rglob("*.py")]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from gateway.x import y` imports gateway.x.y when y is a module, else gateway.x
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[_module(path)] = {n for n in names if n.split(".")[0] in ("gateway", "adapters")}
    modules = set(found)

    def resolve(name: str) -> str:  # the module a name lives in: the longest that exists
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    return {m: {resolve(n) for n in names} - {m} for m, names in found.items()}


def _layer(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + ".") and prefix != "gateway":
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} belongs to no part: add it to LAYERS"
    return best[0]


def test_every_part_imports_only_the_parts_below_it():
    upward = []
    for module, imported in sorted(_imports().items()):
        twin = next((allowed for prefix, allowed in TWINS.items() if module.startswith(prefix)), None)
        for name in sorted(imported):
            if twin is not None:
                if not any(name == a or name.startswith(a + ".") for a in twin):
                    upward.append(f"{module} -> {name} (a twin imports nothing of the gateway)")
            elif not any(name.startswith(prefix) for prefix in TWINS) and _layer(name) > _layer(module):
                upward.append(f"{module} ({LAYERS[_layer(module)][0]}) -> {name} ({LAYERS[_layer(name)][0]})")
    assert upward == []


def test_no_module_imports_itself_back():
    edges = _imports()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_layers_name_every_module():
    for module in _imports():
        if not any(module.startswith(prefix) for prefix in TWINS):
            _layer(module)
