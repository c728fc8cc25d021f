"""The import graph of the four packages: no cycles, and no import against the layers.

Layers, bottom up: ``ccomm`` imports none of the others; ``netsim`` imports only ``ccomm``;
the front-ends ``deco_sgd`` and ``compactfusion`` import ``ccomm`` and ``netsim`` but not each
other. The graph is built statically (``ast``) from every ``.py`` file, counting every import
wherever it sits: module level, inside functions (lazy imports), under ``TYPE_CHECKING``,
``importlib.import_module("...")`` with a literal name, and module names a package lists for
dynamic import (the lazy exports of ``netsim/__init__.py``, the CLI plugin list). An import of
a package counts as an edge to its ``__init__``, not to every module inside it. Code under
``if __name__ == "__main__":`` is left out: it runs only when the file is the script
(``python -m pkg.mod``), when the module is not being imported, so it cannot close a cycle of
partially initialised modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Package -> the packages it may import (itself included).
LAYERS: dict[str, frozenset[str]] = {
    "ccomm": frozenset({"ccomm"}),
    "netsim": frozenset({"netsim", "ccomm"}),
    "deco_sgd": frozenset({"deco_sgd", "ccomm", "netsim"}),
    "compactfusion": frozenset({"compactfusion", "ccomm", "netsim"}),
}

#: netsim's own layers (subpackage -> the subpackages it may import); the root package's
#: modules (`__init__`, `__main__`, `_lazy`) may import any of them.
ROOT_MODULES = frozenset({"netsim.__main__", "netsim._lazy"})
NETSIM_LAYERS: dict[str, frozenset[str]] = {
    "model": frozenset({"model"}),
    "emulation": frozenset({"emulation", "model"}),
    "namespaces": frozenset({"namespaces", "model"}),
    "probe": frozenset({"probe", "emulation", "namespaces", "model", "_lazy"}),
    "cli": frozenset({"cli", "probe", "emulation", "namespaces", "model"}),
}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    where: str  # "path:line"


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest known module that ``name`` is or lies inside (``a.b.attr`` -> ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _script_only(tree: ast.AST) -> set[int]:
    """Nodes under a top-level ``if __name__ == "__main__":``."""
    out: set[int] = set()
    for node in getattr(tree, "body", []):
        test = node.test if isinstance(node, ast.If) else None
        if (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
                and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def _is_dynamic_import(call: ast.Call) -> bool:
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name in ("import_module", "__import__", "lazy_exports")


def module_edges(root: Path, path: Path, modules: set[str]) -> list[Edge]:
    """Every import of ``path`` that lands on one of ``modules``."""
    me = _module_name(root, path)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(root)
    edges: list[Edge] = []

    def add(target: str | None, node: ast.AST) -> None:
        edge = Edge(me, target or "", f"{rel}:{getattr(node, 'lineno', 0)}")
        if target is not None and target != me and edge not in edges:
            edges.append(edge)

    script = _script_only(tree)
    dynamic = False
    for node in ast.walk(tree):
        if id(node) in script:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_resolve(alias.name, modules), node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            for alias in node.names:
                sub = f"{parent}.{alias.name}"
                add(sub if sub in modules else _resolve(parent, modules), node)
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            dynamic = True
            for arg in node.args[:1]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    add(_resolve(arg.value, modules), node)
    if dynamic:  # module names held in data and imported by name (lazy exports, plugin lists)
        docs = _docstring_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs | script:
                name = node.value.split(":")[0]
                if name in modules:
                    add(name, node)
    return edges


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, list[Edge]]:
    """Module -> its edges, over every ``.py`` file of ``packages`` under ``root``."""
    files = {_module_name(root, p): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    modules = set(files)
    return {m: module_edges(root, p, modules) for m, p in files.items()}


def find_cycles(graph: Mapping[str, list[Edge]]) -> list[list[Edge]]:
    """One cycle (as its chain of edges) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[set[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan; graphs here are a few hundred nodes deep at most
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for e in graph.get(v, []):
            if e.dst not in index:
                strongconnect(e.dst)
                low[v] = min(low[v], low[e.dst])
            elif e.dst in on_stack:
                low[v] = min(low[v], index[e.dst])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_cycle_in(graph, comp) for comp in comps]


def _cycle_in(graph: Mapping[str, list[Edge]], comp: set[str]) -> list[Edge]:
    """A shortest cycle through the component's smallest module (breadth-first)."""
    start = min(comp)
    prev: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in graph.get(v, []):
                if e.dst == start:
                    chain = [e]
                    while chain[0].src != start:
                        chain.insert(0, prev[chain[0].src])
                    return chain
                if e.dst in comp and e.dst not in prev:
                    prev[e.dst] = e
                    nxt.append(e.dst)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a component of size > 1 always has one


def find_upward(graph: Mapping[str, list[Edge]], layers: Mapping[str, frozenset[str]]) -> list[Edge]:
    """Edges from a package to one its layer may not import."""
    return [e for edges in graph.values() for e in edges
            if e.dst.split(".")[0] not in layers.get(e.src.split(".")[0], frozenset({e.src.split(".")[0]}))]


def _chain(edges: list[Edge]) -> str:
    return " -> ".join([edges[0].src] + [e.dst for e in edges]) + "  (" + ", ".join(e.where for e in edges) + ")"


@pytest.fixture(scope="module")
def graph() -> dict[str, list[Edge]]:
    return import_graph(REPO, LAYERS)


def test_graph_sees_the_packages(graph: dict[str, list[Edge]]) -> None:
    # The checks below mean nothing if the walk missed the tree (a moved root, a renamed package).
    for pkg in LAYERS:
        assert sum(m.split(".")[0] == pkg for m in graph) >= 5, pkg
    assert any(e.dst.startswith("ccomm") for e in graph["netsim.model.cost"])


def test_no_import_cycles(graph: dict[str, list[Edge]]) -> None:
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_chain(c) for c in cycles)


def test_no_upward_imports(graph: dict[str, list[Edge]]) -> None:
    bad = find_upward(graph, LAYERS)
    allowed = {p: sorted(v) for p, v in LAYERS.items()}
    assert not bad, "imports against the layers (package: may import):\n" + "\n".join(
        f"{_chain([e])}; {e.src.split('.')[0]} may import only {allowed[e.src.split('.')[0]]}" for e in bad)


def test_netsim_subpackages_keep_their_layers(graph: dict[str, list[Edge]]) -> None:
    inner = {m.removeprefix("netsim."): [Edge(e.src.removeprefix("netsim."), e.dst.removeprefix("netsim."), e.where)
                                         for e in edges if e.dst.startswith("netsim.")]
             for m, edges in graph.items() if m.startswith("netsim.") and m not in ROOT_MODULES}
    # Every module lives in a layer: a new top-level module must pick one (or join ROOT_MODULES).
    assert {m.split(".")[0] for m in inner} == set(NETSIM_LAYERS)
    bad = find_upward(inner, NETSIM_LAYERS)
    assert not bad, "netsim imports against its layers:\n" + "\n".join(_chain([e]) for e in bad)


# ---------------------------------------------------------------- the checker fails when it must
def _write(root: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_checker_detects_a_lazy_cycle_and_an_upward_import(tmp_path: Path) -> None:
    _write(tmp_path, {
        "low/__init__.py": "",
        "low/a.py": "from . import b\n",
        "low/b.py": "def f():\n    from low.c import g\n",  # lazy, inside a function
        "low/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n",
        "low/d.py": "import importlib\nimportlib.import_module('high.top')\n",  # upward, by name
        "low/e.py": "if __name__ == '__main__':\n    from high import top\n",  # script only: no edge
        "high/__init__.py": "",
        "high/top.py": "import low.b\n",
    })
    g = import_graph(tmp_path, ["low", "high"])
    cycles = find_cycles(g)
    assert [_chain(c).split("  (")[0] for c in cycles] == ["low.a -> low.b -> low.c -> low.a"]
    assert "low/b.py:2" in _chain(cycles[0])
    up = find_upward(g, {"low": frozenset({"low"}), "high": frozenset({"high", "low"})})
    assert [(e.src, e.dst, e.where) for e in up] == [("low.d", "high.top", "low/d.py:2")]


def test_checker_follows_lazy_export_tables(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "from ._lazy import lazy_exports\n_EXPORTS = {'f': 'pkg.impl', 'm': 'pkg.impl:'}\n"
                           "__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())\n",
        "pkg/_lazy.py": "",
        "pkg/impl.py": "from pkg import f\n",
    })
    cycles = find_cycles(import_graph(tmp_path, ["pkg"]))
    assert [_chain(c).split("  (")[0] for c in cycles] == ["pkg -> pkg.impl -> pkg"]
