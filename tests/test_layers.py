"""The house rules, read from ovdet's own imports: no cycle, no import up the layers, no module over 450 lines.

LAYERS is the one place the layer order is declared (ARCHITECTURE.md explains it); every ovdet module must belong to
one of them. An import may go to its own layer or any lower one; type-only and function-level imports count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ovdet"
MAX_LINES = 450

# bottom to top; a name is a module or a package (then every module under it)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("helpers", ("ovdet.errors", "ovdet.options", "ovdet.version", "ovdet.util")),
    ("media, weights", ("ovdet.media", "ovdet.weights")),
    ("text, backends", ("ovdet.text", "ovdet.backends")),
    ("model, tiling, masks", ("ovdet.model", "ovdet.tiling", "ovdet.masks")),
    ("facade", ("ovdet.config", "ovdet.detector")),
    ("runs, datasets", ("ovdet.runs", "ovdet.datasets")),
    ("engines", ("ovdet.engines",)),
    ("jobs, video", ("ovdet.jobs", "ovdet.video")),
    ("report, service", ("ovdet.report", "ovdet.service")),
    ("commands", ("ovdet.cli",)),
    ("public API", ("ovdet",)),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imported(module: str, path: Path) -> set[str]:
    """The ovdet modules `module` imports anywhere in its text (a name imported from a package that is a module
    counts as that module)."""
    found: set[str] = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != module:
                found.add(target)
    return found


GRAPH = {module: _imported(module, path) for module, path in MODULES.items()}


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest name that is `module` or a package above it."""
    best, best_len = None, -1
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = index, len(name)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_imports_only_point_down():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in sorted(GRAPH.items()) for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert upward == []


def test_no_module_is_over_the_line_limit():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, f"split these modules (over {MAX_LINES} lines): {long}"


def test_every_module_opens_with_a_line_on_its_job():
    missing = [m for m, p in MODULES.items() if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert missing == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"a"}, "b": set()}, []),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c", "a"}}, [["a", "b"], ["c", "d"]]),
])
def test_the_cycle_finder_finds_cycles(graph, expected):
    """The guard itself bites: a planted cycle is reported."""
    assert sorted(cycles(graph)) == expected


def test_the_layer_check_sees_function_level_and_type_only_imports(tmp_path):
    """Imports hidden in functions or under TYPE_CHECKING are read like any other."""
    path = tmp_path / "mod.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ovdet.jobs.annotate import x\n"
                    "def f():\n    import ovdet.cli\n    from ovdet.media import sources\n")
    assert _imported("ovdet.util.fake", path) == {"ovdet.jobs.annotate", "ovdet.cli", "ovdet.media.sources"}


def test_the_layout_trees_name_every_subpackage():
    """README's Layout and ARCHITECTURE.md show the package tree; a new subpackage missing from either fails here."""
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    for doc in ("README.md", "ARCHITECTURE.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        assert [p for p in packages if f"── {p}/" not in text] == [], doc
