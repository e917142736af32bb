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
    "storage": ("api", "runtime", "launch", "jobs", "cli", "server", "_policy", "_demo"),
    "runtime": ("api", "launch", "jobs", "cli", "server", "_demo"),
    "launch": ("cli", "server", "_demo"),
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


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
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
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
