"""Imports point one way: the packages in the order the README draws, and no import cycle between modules.

Every ``import`` and ``from ... import`` anywhere in a module counts: at module level, inside a
function, under ``if TYPE_CHECKING``. A function-level import hides a circle from import errors, so
it is checked like any other. ``import slimkit`` (the lazy facade) counts by what is used from it:
``slimkit.NAME`` and ``from slimkit import NAME`` reach the module ``slimkit._EXPORTS`` names for NAME.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# bottom to top; a package may import packages on a lower line and itself. models and data share a
# line: neither may import the other (where networks come from and where images come from are apart).
ORDER = (("core",), ("models", "data"), ("engine",), ("deploy",), ("methods",), ("cli",))
RANK = {pkg: i for i, line in enumerate(ORDER) for pkg in line}
FACADE, ENTRY = "slimkit", "slimkit.__main__"  # `import slimkit`'s lazy names; `python -m slimkit` (imports cli)


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under ``root``."""
    out = {}
    for path in sorted((root / "slimkit").rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _exports(root: Path) -> dict[str, str]:
    """The facade's public names -> the module each lives in (its ``_EXPORTS`` table)."""
    tree = ast.parse((root / "slimkit" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return {k: v.partition(":")[0] for k, v in ast.literal_eval(node.value).items()}
    return {}


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(root: Path) -> list[tuple[str, int, str]]:
    """(module, line, module it imports) for every slimkit import in the tree, function-level ones included."""
    mods, exports = _modules(root), _exports(root)

    def named(name: str) -> str:  # the module a dotted import name loads (its longest prefix that is one)
        parts = name.split(".")
        while parts and ".".join(parts) not in mods:
            parts.pop()
        return ".".join(parts)

    def facade_name(attr: str) -> str | None:
        if attr in exports:
            return exports[attr]
        return None if f"{FACADE}.{attr}" in mods else FACADE  # a subpackage is imported by name; else the facade's own

    edges = []
    for module, path in mods.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        aliases = set()  # local names bound to the facade by `import slimkit [as x]`
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == FACADE:
                        aliases.add(a.asname or FACADE)
                    elif a.name.startswith(FACADE + "."):
                        edges.append((module, node.lineno, named(a.name)))
                        if a.asname is None:  # `import slimkit.x.y` binds `slimkit` too
                            aliases.add(FACADE)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, is_package, node)
                if base == FACADE:
                    edges += [(module, node.lineno, facade_name(a.name) or f"{FACADE}.{a.name}") for a in node.names]
                elif base.startswith(FACADE + "."):
                    edges.append((module, node.lineno, named(base)))  # the names are read off this module
                    edges += [(module, node.lineno, f"{base}.{a.name}") for a in node.names if f"{base}.{a.name}" in mods]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                if (t := facade_name(node.attr)) is not None:
                    edges.append((module, node.lineno, t))
    return sorted((m, line, t) for m, line, t in edges if t and t != m)


def _package(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else module


def upward_imports(root: Path) -> list[str]:
    mods = _modules(root)
    bad = []
    for module, line, target in import_edges(root):
        where = f"{mods[module].relative_to(root)}:{line} imports {target}"
        if target == FACADE:
            continue  # the facade's own names (__version__): it imports nothing itself (test below)
        if module == ENTRY:
            if _package(target) != "cli":
                bad.append(f"{where}: `python -m slimkit` only runs the command line (slimkit.cli)")
            continue
        src, dst = _package(module), _package(target)
        if src == dst:
            continue
        if src not in RANK or dst not in RANK:
            bad.append(f"{where}: {src if src not in RANK else dst} is not in the package order {ORDER}")
        elif RANK[dst] >= RANK[src]:
            below = [p for line_ in ORDER[: RANK[src]] for p in line_]
            bad.append(f"{where}: {src} may import only {', '.join([src, *below])}")
    return bad


def import_cycles(root: Path) -> list[str]:
    """One cycle per strongly connected set of modules, each step with the line that makes it."""
    graph: dict[str, dict[str, int]] = {}
    for module, line, target in import_edges(root):
        graph.setdefault(module, {}).setdefault(target, line)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    sccs = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in sccs:
        start = min(comp)
        path, seen = [start], {start}
        while True:  # walk inside the component until it closes
            nxt = sorted(w for w in graph[path[-1]] if w in comp)
            back = [w for w in nxt if w == start]
            w = back[0] if back else next((w for w in nxt if w not in seen), nxt[0])
            path.append(w)
            if w in seen:
                break
            seen.add(w)
        path = path[path.index(path[-1]):]
        out.append(" -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(path, path[1:])) + f" -> {path[-1]}")
    return out


def test_imports_point_down_the_package_order():
    bad = upward_imports(ROOT)
    assert not bad, "imports against the package order (README, Architecture):\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    cycles = import_cycles(ROOT)
    assert not cycles, "modules importing each other, directly or around a circle:\n" + "\n".join(cycles)


def test_the_facade_imports_nothing_and_its_names_exist():
    tree = ast.parse((ROOT / "slimkit" / "__init__.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])]
    assert [m for m in imported if m.startswith(FACADE)] == []  # so importing it for __version__ reaches nothing
    mods = _modules(ROOT)
    assert sorted(m for m in set(_exports(ROOT).values()) if m not in mods) == []


def test_the_readme_states_this_order():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Architecture"):]
    section = section[:section.index("\n## ", 4)]
    drawn = " ← ".join(", ".join(f"`{p}`" for p in line) for line in ORDER)
    assert drawn in re.sub(r"\s+", " ", section)


PLANTED = {
    "slimkit/__init__.py": '_EXPORTS = {"load": "slimkit.models.ckpt", "run": "slimkit.methods.verb:go"}\n',
    "slimkit/core/__init__.py": "",
    "slimkit/core/a.py": "def f():\n    from slimkit.methods.verb import go\n",  # function-level, upward
    "slimkit/core/b.py": "import slimkit.core.a\n\nV = slimkit.__version__\nR = slimkit.run\n",  # facade: fine, then upward
    "slimkit/models/__init__.py": "",
    "slimkit/models/ckpt.py": "from slimkit.core import a\n",
    "slimkit/data/__init__.py": "",
    "slimkit/data/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from slimkit.models import ckpt\n",
    "slimkit/methods/__init__.py": "",
    "slimkit/methods/verb.py": "from .helper import h\n",
    "slimkit/methods/helper.py": "def h():\n    from slimkit.methods import verb\n",  # a function-level circle
}


def test_the_checks_name_module_line_and_target_of_planted_violations(tmp_path):
    for rel, text in PLANTED.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert upward_imports(tmp_path) == [
        "slimkit/core/a.py:2 imports slimkit.methods.verb: core may import only core",
        "slimkit/core/b.py:4 imports slimkit.methods.verb: core may import only core",
        "slimkit/data/x.py:3 imports slimkit.models: data may import only data, core",
        "slimkit/data/x.py:3 imports slimkit.models.ckpt: data may import only data, core",
    ]
    assert import_cycles(tmp_path) == [
        "slimkit.methods.helper (line 2) -> slimkit.methods.verb (line 1) -> slimkit.methods.helper",
    ]


@pytest.mark.parametrize("edge", [("slimkit.deploy.compare", "slimkit.models.hypothesis"),
                                  ("slimkit.models.checkpoint", "slimkit.core.widen"),
                                  ("slimkit.cli", "slimkit.cli.app")])
def test_the_walk_sees_the_imports_it_must(edge):
    # the edges the layering rests on are found (module-level and function-level alike)
    assert edge in {(m, t) for m, _, t in import_edges(ROOT)}
