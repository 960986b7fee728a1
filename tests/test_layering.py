"""The package's layers, read from the source with `ast`: no import cycle, nothing imports upward.

    tools        compare/ bench/ exercises/, and every package's cli.py and __main__.py
    train        train/        one run: the Hydra entry, the loop, evaluation, --help pages
    planner      planner/      the prediction before a run, the search, the check after it
    reliability  reliability/  checkpoints, the run lock, pre-flight, watchdog, guard, caps
    runtime      runtime/      execution only: engine, executor, comm, grad sync
    observe      observe/      trace, timeline pictures, the memory meter, nvml, graph picture
    partition    partition/    where to cut the graph: the strategies and their registry
    cost         cost/         the cost model: bytes, FLOPs, times, the link
    schedule     schedule/     the action lists: built, validated, simulated
    core         config/ and the loose modules (model, data, plan, errors, units, ...)

The rule: a module imports, at module level or inside a function, only its own package and
the packages on lower layers (core's modules import each other freely; the tools import each
other). A console entry (`<package>/cli.py`, `<package>/__main__.py`) sits on the tools layer
wherever it lives: it is a door, and nothing imports it. Imports under `if TYPE_CHECKING:` count
for the layers too. Module-level imports form no cycle, inside a package or across packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "splitgraph"

#: low to high; a package on layer k imports packages on layers <= k only (its own, or lower)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # "": the loose modules and splitgraph/__init__.py; conf: Hydra's YAML (a link to ../conf)
    ("core", ("", "config", "conf")),
    ("schedule", ("schedule",)),
    ("cost", ("cost",)),
    ("partition", ("partition",)),
    ("observe", ("observe",)),
    ("runtime", ("runtime",)),
    ("reliability", ("reliability",)),
    ("planner", ("planner",)),
    ("train", ("train",)),
    ("tools", ("compare", "bench", "exercises")),
]
#: layers whose packages may import each other (the rest import only their own package below
#: their layer): core's loose modules are one package already; the tools use each other
SHARED_LAYERS = ("core", "tools")

#: upward imports that exist today, each with why and what removes it; a new one fails, and
#: so does one listed here that is gone (then delete its line)
KNOWN_UPWARD: dict[tuple[str, str], str] = {
    ("splitgraph.config", "splitgraph.partition"): (
        "config.validate checks partition.strategy against the STRATEGIES registry; "
        "goes when validate's checks move above the registries (issue 16, typed config)"
    ),
    ("splitgraph.config", "splitgraph.schedule"): "config.validate reads SCHEDULES (as above)",
    ("splitgraph.config", "splitgraph.schedule.interop"): (
        "config.validate reads and validates a schedule=csv file before anything starts (as above)"
    ),
    ("splitgraph.config", "splitgraph.runtime.allocator"): (
        "config.validate prices a GPU memory cap (as above)"
    ),
    ("splitgraph.config", "splitgraph.train.usage"): (
        "the `splitgraph_help` Hydra resolver renders splitgraph-train's --help page"
    ),
    ("splitgraph.train.torchrun", "splitgraph.train.cli"): (
        "the launcher runs splitgraph-check in its own process (--check, launch/train.sh); "
        "goes when check_main's body moves to a train-layer module (train/check.py)"
    ),
    ("splitgraph.data", "splitgraph.reliability.preflight"): (
        "data loading refuses a data set over the machine's limit with pre-flight's wording"
    ),
}

MAX_LOOSE = 10


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str) -> list[tuple[str, bool]]:
    """(imported splitgraph module, at module level?) for every import in module `name`."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def target(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        # `from pkg import mod` imports the module; `from mod import name`, the module
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for t in target(node):
                while t and t not in MODULES:  # `import splitgraph.x.attr` -> splitgraph.x
                    t = t.rpartition(".")[0]
                if t.startswith("splitgraph") and t != name:
                    found.append((t, top))
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            top = False
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            top = False  # never runs: no cycle, but the layers still apply
        for child in ast.iter_child_nodes(node):
            visit(child, top)

    visit(tree, True)
    return found


IMPORTS = {name: _imports(name) for name in MODULES}


def _package(name: str) -> str:
    """'' for the loose modules and splitgraph itself, else the first package under it."""
    parts = name.split(".")
    if len(parts) == 1 or (len(parts) == 2 and not _is_package(name)):
        return ""
    return parts[1]


def layer_of(name: str) -> int:
    if name.rpartition(".")[2] in ("cli", "__main__") and name.count(".") >= 2:
        return len(LAYERS) - 1  # a console entry: the tools layer
    package = _package(name)
    for i, (_, packages) in enumerate(LAYERS):
        if package in packages:
            return i
    raise AssertionError(f"{name}: package {package!r} is on no layer; add it to LAYERS")


def upward_imports() -> list[tuple[str, str]]:
    bad = []
    for name, imported in IMPORTS.items():
        mine, own = layer_of(name), _package(name)
        for target, _ in imported:
            theirs = layer_of(target)
            same_package = _package(target) == own and theirs == mine
            shared = theirs == mine and LAYERS[mine][0] in SHARED_LAYERS
            if theirs > mine or (theirs == mine and not (same_package or shared)):
                bad.append((name, target))
    return sorted(set(bad))


def module_level_cycles() -> list[list[str]]:
    """Strongly connected components of the module-level import graph (Tarjan).

    Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` first, so an edge to a
    module is an edge to its packages too (those the importer is not inside already)."""
    graph: dict[str, set[str]] = {}
    for name, imported in IMPORTS.items():
        edges = graph.setdefault(name, set())
        for target, top in imported:
            if not top:
                continue
            edges.add(target)
            parent = target.rpartition(".")[0]
            while parent and name != parent and not name.startswith(parent + "."):
                edges.add(parent)
                parent = parent.rpartition(".")[0]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return cycles


def loose_modules() -> list[str]:
    return sorted(p.stem for p in PKG.glob("*.py") if p.name != "__init__.py")


def test_every_package_is_on_a_layer() -> None:
    for name in MODULES:
        layer_of(name)  # raises for a package on no layer
    listed = {p for _, packages in LAYERS for p in packages if p}
    on_disk = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert listed == on_disk, f"LAYERS names {listed - on_disk}, misses {on_disk - listed}"


def test_no_import_cycle_among_module_level_imports() -> None:
    assert module_level_cycles() == []


def test_nothing_imports_upward() -> None:
    found = upward_imports()
    new = [
        f"{a} imports {b} ({LAYERS[layer_of(a)][0]} -> {LAYERS[layer_of(b)][0]})"
        for a, b in found
        if (a, b) not in KNOWN_UPWARD
    ]
    assert new == [], "upward imports:\n  " + "\n  ".join(new)
    stale = sorted(set(KNOWN_UPWARD) - set(found))
    assert stale == [], f"no longer imported upward, delete from KNOWN_UPWARD: {stale}"


def test_at_most_ten_loose_modules() -> None:
    loose = loose_modules()
    assert len(loose) <= MAX_LOOSE, f"{len(loose)} loose modules in splitgraph/: {loose}"


def test_the_reader_sees_real_imports() -> None:
    """What the checks above read: a module-level edge, a lazy one, a `from pkg import mod`."""
    assert ("splitgraph.runtime.executor", True) in IMPORTS["splitgraph.runtime.engine"]
    assert ("splitgraph.partition.costed", False) in IMPORTS["splitgraph.partition"]
    assert ("splitgraph.reliability.runlock", True) in IMPORTS["splitgraph.train.run"]
    assert len(MODULES) > 80
