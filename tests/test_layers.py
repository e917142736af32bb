"""The floors of the house, read from the code's imports (issue 22).

storage/ is pure: files in, reports out; it imports nothing above it. runtime/ (processes,
pipes, supervision) imports neither the API faces nor the launcher nor the command line.
Imports under ``if TYPE_CHECKING:`` are for the type checker only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "safechroma"

# floor -> the subpackages and modules of safechroma it must never import
FORBIDDEN = {
    "storage": ("api", "http", "runtime", "launch", "jobs", "cli", "server", "_policy", "_demo"),
    "runtime": ("api", "http", "launch", "jobs", "cli", "server", "_demo"),
    "launch": ("cli", "http", "server", "_demo"),
    "jobs": ("cli", "http", "server", "launch", "_demo"),
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    here = _module(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            # ``from . import events`` names a submodule, not the package's own code: no edge
            # to the package unless a name is not a module (a sibling importing its package's
            # __init__ would be a circle; a submodule of it is not).
            if not all(_is_module(n) for n in names):
                out.add(target)
            out.update(names)
    return {name for name in out if name.startswith("safechroma")}


@pytest.mark.parametrize("floor", sorted(FORBIDDEN))
def test_a_floor_imports_nothing_above_it(floor: str) -> None:
    bad = []
    for path in sorted((PACKAGE / floor).rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if len(parts) > 1 and parts[1] in FORBIDDEN[floor]:
                bad.append(f"{_module(path)} imports {name}")
    assert bad == []


def test_the_check_sees_an_import_that_runs_back_up(tmp_path: Path) -> None:
    """The reader above must catch a lazy import inside a function, as the one that storage/
    recovery.py had (it imported the API for ``reembed``)."""
    sample = tmp_path / "safechroma" / "storage" / "x.py"
    sample.parent.mkdir(parents=True)
    sample.write_text("def f():\n    from safechroma.api.client import SafeClient\n")
    global SRC
    saved, SRC = SRC, tmp_path
    try:
        assert "safechroma.api.client" in _imports(sample)
    finally:
        SRC = saved


# ---- circles and sizes (issue 22) -------------------------------------------------------------

# The floors whose modules the two checks below hold to the rules; "." is the whole package.
CHECKED_FLOORS = (".",)
# The one circle allowed: a client hands out collections, a collection reaches its client.
ALLOWED_CIRCLES = [{"safechroma.api.client", "safechroma.api.collection"}]
MAX_LINES = 800


def _graph() -> dict[str, set[str]]:
    """module -> the safechroma modules it imports (lazy imports count, TYPE_CHECKING not)."""
    paths = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    return {name: _imports(path) & paths.keys() - {name} for name, path in paths.items()}


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                part = set()
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    part.add(top)
                    if top == node:
                        break
                if len(part) > 1:
                    out.append(part)
    return out


def _in_floor(module: str, floor: str) -> bool:
    if floor == ".":
        return True
    prefix = f"safechroma.{floor}"
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("floor", CHECKED_FLOORS)
def test_no_import_circle(floor: str) -> None:
    circles = [
        sorted(c)
        for c in _circles(_graph())
        if c not in ALLOWED_CIRCLES and any(_in_floor(m, floor) for m in c)
    ]
    assert circles == []


@pytest.mark.parametrize("floor", CHECKED_FLOORS)
def test_no_module_over_the_size_limit(floor: str) -> None:
    big = {
        _module(p): n
        for p in sorted(PACKAGE.rglob("*.py"))
        if _in_floor(_module(p), floor) and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert big == {}


def test_the_circle_check_sees_a_lazy_import(tmp_path: Path) -> None:
    """A circle closed by an import inside a function is still a circle (the one between
    storage/journal.py and storage/recovery.py was), and the allowed pair is one."""
    pkg = tmp_path / "safechroma"
    (pkg / "storage").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "storage" / "__init__.py").write_text("")
    (pkg / "storage" / "a.py").write_text("from safechroma.storage.b import x\n")
    (pkg / "storage" / "b.py").write_text("def x():\n    from safechroma.storage import a\n")
    (pkg / "storage" / "c.py").write_text("from safechroma.storage.a import y\n")
    global SRC, PACKAGE
    saved, SRC, PACKAGE = (SRC, PACKAGE), tmp_path, pkg
    try:
        assert _circles(_graph()) == [{"safechroma.storage.a", "safechroma.storage.b"}]
    finally:
        SRC, PACKAGE = saved
