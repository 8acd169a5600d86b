"""The import rules of docs/architecture.md, read off the source with ``ast``.

- the oracle never imports fisher_fast (nor fishercheck); fisher_fast never imports the oracle
  (nor fishercheck): a shared bug would pass every property test;
- inside fisher_fast every import goes down the layers below (or sideways within one
  subpackage, or between two entry-point modules), and the module graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: fisher_fast's layers, lowest first (docs/architecture.md, "fisher_fast's layers"). A
#: module's layer is that of its subpackage, or its own name for a top-level module.
LAYERS = [
    ("foundation", {"losses", "results", "file_integrity", "progress"}),
    ("attention views", {"attention"}),
    ("batching", {"batching"}),
    ("statistics and storage", {"stats", "store"}),
    ("capture", {"capture"}),
    ("orchestration", {"run"}),
    ("entry points", {"estimators", "accumulator", "per_sample", "contributions",
                      "interference", "conflicts", "fdr", "cross_task", "distributed"}),
    ("package", {"__init__"}),
]
RANK = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}
ENTRY = LAYERS[-2][1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from x import y`` counts x and x.y)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _fisher_fast_modules() -> set[str]:
    return {_module_name(p) for p in _sources("fisher_fast")}


def _layer(module: str) -> str:
    """The layer key of a fisher_fast module: its subpackage or its top-level name."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


@pytest.mark.parametrize("package, forbidden", [
    ("fisher_ref", ("fisher_fast", "fishercheck")),
    ("fisher_fast", ("fisher_ref", "fishercheck")),
])
def test_packages_keep_apart(package, forbidden):
    bad = [f"{p.relative_to(ROOT)} imports {m}" for p in _sources(package)
           for m in sorted(_imports(p)) if m.split(".")[0] in forbidden]
    assert not bad, bad


def test_every_fisher_fast_module_has_a_layer():
    unplaced = sorted({_layer(m) for m in _fisher_fast_modules()} - set(RANK))
    assert not unplaced, f"add these to LAYERS and docs/architecture.md: {unplaced}"


def _edges() -> list[tuple[str, str]]:
    modules = _fisher_fast_modules()
    edges = []
    for path in _sources("fisher_fast"):
        src = _module_name(path)
        for m in _imports(path):
            if m in modules and m != src and m != "fisher_fast":
                edges.append((src, m))
    return sorted(set(edges))


def test_fisher_fast_imports_go_down_the_layers():
    up = []
    for src, dst in _edges():
        a, b = _layer(src), _layer(dst)
        same_package = a == b and a not in ENTRY
        if RANK[b] < RANK[a] or same_package or (a in ENTRY and b in ENTRY):
            continue
        up.append(f"{src} ({LAYERS[RANK[a]][0]}) imports {dst} ({LAYERS[RANK[b]][0]})")
    assert not up, up


def test_fisher_fast_module_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    for src, dst in _edges():
        graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_rules_catch_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a stats module importing the capture layer is reported."""
    fake = tmp_path / "fisher_fast" / "stats"
    fake.mkdir(parents=True)
    (tmp_path / "fisher_fast" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("from ..capture.hooks import Capture\n")
    (tmp_path / "fisher_fast" / "capture").mkdir()
    (tmp_path / "fisher_fast" / "capture" / "__init__.py").write_text("")
    (tmp_path / "fisher_fast" / "capture" / "hooks.py").write_text("Capture = None\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="stats.bad .*imports fisher_fast.capture.hooks"):
        test_fisher_fast_imports_go_down_the_layers()
