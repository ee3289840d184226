"""The layers of docs/architecture.md: every module imports, imports flow one way
(cli -> export -> core -> inference -> data/registry/recipe/plugins -> components -> kernels,
all of them -> the foundation modules) and no two modules import each other, directly or
through others. Imports inside functions count like the others: a lazy import only delays a
dependency, it does not remove it."""

from __future__ import annotations

import ast
import importlib
import pathlib
import sys

import pytest

import phase7fw
from phase7fw._moved import MOVED

PACKAGE = pathlib.Path(phase7fw.__file__).parent

#: (module prefix, rank): a module may import modules of a lower rank, of its own package
#: folder and the foundation. Most specific prefix first.
LAYERS = [
    ("phase7fw.__main__", 7),
    ("phase7fw.cli", 6),
    ("phase7fw.export", 5),
    ("phase7fw.core", 4),
    ("phase7fw.inference", 3),
    ("phase7fw.data", 2),
    ("phase7fw.registry", 2),
    ("phase7fw.recipe", 2),
    ("phase7fw.plugins", 2),
    ("phase7fw.components", 1),
    ("phase7fw.interfaces", 1),  # what components implement (the base classes call the ops)
    ("phase7fw.kernels", 0),
]
#: Imported by every layer; they import only each other (the vocabulary a plugin uses:
#: errors, the hook markers, the declared interfaces, recipe options, atomic file writes).
FOUNDATION = {"phase7fw.errors", "phase7fw.hookspecs", "phase7fw.recipe.options",
              "phase7fw.fileio", "phase7fw._moved"}
#: Modules that are files shipped with the package, not imported by it.
NOT_IMPORTED = {"phase7fw.components.phase7.hf.modeling_phase7fw"}

def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return [n for n in names if n not in NOT_IMPORTED]


def _path(name: str) -> pathlib.Path:
    base = PACKAGE.parent.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def imports_of(name: str, known: set[str]) -> set[str]:
    """Every phase7fw module ``name`` imports, at the top or inside functions."""
    path = _path(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            # `from pkg import module` imports the module; `from module import name` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            if base == "phase7fw" and all(a.name == "__version__" for a in node.names):
                continue  # the version string, set before the package imports anything
        else:
            continue
        found.update(t for t in targets if t == "phase7fw" or t.startswith("phase7fw."))
    return found - {name}


def rank(name: str) -> int | None:
    for prefix, r in LAYERS:
        if name == prefix or name.startswith(prefix + "."):
            return r
    return None


def folder(name: str) -> str:
    return ".".join(name.split(".")[:2])


def graph() -> dict[str, set[str]]:
    known = set(module_names())
    return {name: imports_of(name, known) for name in known}


def violations(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    bad = set()
    for a, targets in edges.items():
        if a == "phase7fw":  # the public facade (Engine, load_recipe, ...) sits above everything
            continue
        for b in targets:
            if b == "phase7fw":  # only __version__ may come from the facade (left out when parsing)
                bad.add((a, b))
            elif a in FOUNDATION:
                if b not in FOUNDATION:
                    bad.add((a, b))
            elif b in FOUNDATION or folder(a) == folder(b):
                continue
            elif rank(a) is None or rank(b) is None or rank(b) > rank(a):
                bad.add((a, b))
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("name", [n for n in module_names() if not n.endswith("__main__")])
def test_every_module_imports(name):
    importlib.import_module(name)


def test_every_module_has_a_layer():
    assert [n for n in module_names() if n != "phase7fw" and n not in FOUNDATION and rank(n) is None] == []


def test_imports_flow_one_way():
    assert sorted(violations(graph())) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_only_components_import_components():
    """The core, inference, data and the command line reach components through the registry."""
    edges = graph()
    bad = {(a, b) for a, targets in edges.items() for b in targets
           if b.startswith("phase7fw.components") and not a.startswith("phase7fw.components")}
    assert sorted(bad) == []


def test_the_checker_sees_a_bad_import():
    edges = {"phase7fw.kernels.x": {"phase7fw.components.y"}, "phase7fw.components.y": {"phase7fw.kernels.x"},
             "phase7fw.core.a": {"phase7fw.cli.app", "phase7fw.errors"}, "phase7fw.errors": {"phase7fw.core.a"}}
    assert violations(edges) == {("phase7fw.kernels.x", "phase7fw.components.y"), ("phase7fw.core.a", "phase7fw.cli.app"),
                                 ("phase7fw.errors", "phase7fw.core.a")}
    assert cycles(edges) == [["phase7fw.components.y", "phase7fw.kernels.x"], ["phase7fw.core.a", "phase7fw.errors"]]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_import_with_a_warning(old, monkeypatch):
    new = MOVED[old]
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new if isinstance(new, str) else new[0]}"):
        module = importlib.import_module(old)
    if isinstance(new, str):
        assert module is importlib.import_module(new) and module.__spec__.name == new
    else:  # split: every public name of the new modules is found through the old path (first module first)
        seen = set()
        for target in new:
            names = vars(importlib.import_module(target))
            for name, value in names.items():
                if not name.startswith("_") and name not in seen:
                    assert getattr(module, name) is value, (target, name)
            seen |= set(names)
        with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
            module.nothing_here


def test_moved_targets_exist_and_old_files_are_gone():
    for old, new in MOVED.items():
        assert not _path(old).exists(), old
        for target in (new,) if isinstance(new, str) else new:
            assert _path(target).exists(), target
