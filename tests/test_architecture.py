"""The layout as a contract (README "Architecture"): imports go one way, no module imports a cycle, no module grows
past 600 lines, no private name crosses a module boundary, and the README lists every module.

Imports are read from the source (``ast``), those inside functions included: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "analysis", "workers", "benchmarks")
MAX_LINES = 600

# What each package may import of the project's packages (README "Architecture": pipeline -> analysis -> workers;
# benchmarks measure the three). The CLI (pipeline.cli) is the one entry point above everything: its `bench` verb
# runs the benchmarks package.
ALLOWED = {
    "workers": {"workers"},
    "analysis": {"analysis", "workers"},
    "pipeline": {"pipeline", "analysis", "workers"},
    "benchmarks": {"benchmarks", "pipeline", "analysis", "workers"},
}
ENTRY_POINTS = {"pipeline.cli": {"benchmarks"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every module of the four packages, by dotted name (a package by its ``__init__``)."""
    return {_module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imported_names(path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) of every project import in ``path``, at any depth of the file."""
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names
                      if alias.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                # `from workers.models import mixer` imports a module; `from workers.config import X` a name of one.
                found.append((submodule, None, node.lineno) if submodule in modules
                             else (node.module, alias.name, node.lineno))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {target for target, _, _ in imported_names(path, modules) if target != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a set of modules that import one
    another round a loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_imports_go_one_way() -> None:
    wrong = []
    for module, targets in import_graph().items():
        allowed = ALLOWED[module.split(".")[0]] | ENTRY_POINTS.get(module, set())
        wrong += [f"{module} imports {t}" for t in sorted(targets) if t.split(".")[0] not in allowed]
    assert wrong == []


def test_no_private_name_crosses_a_module() -> None:
    modules = project_modules()
    crossing = [f"{_module_name(path)}:{line} imports {name} from {module}"
                for path in modules.values() for module, name, line in imported_names(path, modules)
                if name and name.startswith("_") and not name.startswith("__")]
    crossing += [f"tests/{path.name}:{line} imports {name} from {module}"
                 for path in sorted((REPO / "tests").glob("*.py"))
                 for module, name, line in imported_names(path, modules)
                 if name and name.startswith("_") and not name.startswith("__")]
    assert crossing == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_over_the_limit(package: str) -> None:
    long = {str(p.relative_to(REPO)): n for p in (REPO / package).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def readme_tree() -> set[str]:
    """The module paths of the README's Architecture tree: folders (``name/``) and modules (``name.py``), nested by
    two spaces of indentation per level."""
    readme = (REPO / "README.md").read_text()
    section = re.search(r"^## Architecture\n(.*?)^## ", readme, re.S | re.M)
    assert section, "README.md has no '## Architecture' section"
    block = re.search(r"^```\n(.*?)^```", section.group(1), re.S | re.M)
    assert block, "the Architecture section has no tree"
    folders: list[str] = []
    paths = set()
    for line in block.group(1).splitlines():
        entry = re.match(r"( *)([\w.]+/|[\w]+\.py)(\s|$)", line)
        if not entry:
            continue
        depth, name = len(entry.group(1)) // 2, entry.group(2)
        del folders[depth:]
        if name.endswith("/"):
            folders.append(name)
        else:
            paths.add("".join(folders) + name)
    return paths


def test_readme_lists_every_module() -> None:
    """The README's Architecture tree names every module where it is, and nothing that is not there."""
    listed = readme_tree()
    modules = {str(p.relative_to(REPO)) for p in project_modules().values() if p.name != "__init__.py"}
    assert sorted(modules - listed) == []  # in the tree, not in the README
    assert sorted(listed - modules) == []  # in the README, not in the tree
