"""The package's layout holds: subpackages import each other in one direction only, and every
module stays short enough to read top to bottom."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dyngraph"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 400

#: what must never be imported from where (besides no cycles at all): the lower layers know
#: nothing of the upper ones
FORBIDDEN = {
    "core": {"blocks", "constructs", "spec", "compiler", "runtime", "training", "profiler", "data"},
    "spec": {"compiler", "runtime", "training", "profiler"},
    "runtime": {"constructs", "compiler", "spec", "training", "profiler", "data"},
    "constructs": {"compiler", "spec", "training", "profiler"},
    "compiler": {"training", "profiler"},
    "training": {"profiler"},
    "blocks": {"constructs", "spec", "compiler", "runtime", "training", "profiler"},
    "data": {"constructs", "spec", "compiler", "runtime", "training", "profiler"},
}


def _part(path: Path) -> str:
    """The subpackage (or top-level module) a file belongs to."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """The subpackages and top-level modules of dyngraph that `path` imports (anywhere in it,
    inside functions too)."""
    pkg = path.relative_to(PACKAGE).parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg)[: len(pkg) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
                names = [a.name for a in node.names] if not target else [target[0]]
            elif node.module and node.module.split(".")[0] == "dyngraph":
                parts = node.module.split(".")[1:]
                names = parts[:1] or [a.name for a in node.names]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("dyngraph.")]
        else:
            continue
        found.update(n.removesuffix(".py") for n in names)
    return found - {_part(path)}


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in MODULES:
        for target in _imports(path):
            if (PACKAGE / target).is_dir() or (PACKAGE / f"{target}.py").is_file():
                g.add_edge(_part(path), target)
    return g


def test_the_subpackage_import_graph_is_acyclic():
    g = _graph()
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"import cycles between subpackages: {cycles}"
    assert {"spec", "compiler", "runtime", "training", "constructs"} <= set(g)


@pytest.mark.parametrize("low", sorted(FORBIDDEN))
def test_a_lower_layer_never_imports_an_upper_one(low):
    g = _graph()
    bad = sorted(set(g.successors(low)) & FORBIDDEN[low]) if low in g else []
    assert not bad, f"{low} imports {bad}"


def test_the_checks_see_imports_inside_functions(tmp_path):
    """The scan finds an import hidden in a function (how cycles used to hide)."""
    mod = PACKAGE / "spec" / "load.py"
    assert "data" in _imports(mod)  # `from ..data.sets import is_file_name`, inside a function


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_reads_top_to_bottom(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {n} lines (at most {MAX_LINES})"
