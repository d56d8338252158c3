"""The layers hold: ``models`` imports neither ``streams`` nor ``services``; ``streams`` nothing of ``services``.

Read from the source (``ast``), not from ``sys.modules``: every import counts wherever it sits (module level,
inside a function, under ``if TYPE_CHECKING:``, in a ``try``), relative imports are resolved against the module's
package, and ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name count too. A failure
names the module, the line and what it imported.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.settings import REPO_ROOT

FORBIDDEN: dict[str, frozenset[str]] = {
    "models": frozenset({"streams", "services"}),
    "streams": frozenset({"services"}),
    "services": frozenset(),
}
"""For each package, the packages of ours it must not import (``services`` may import both others)."""

SERVING: tuple[str, ...] = ("services.api", "services.worker", "services.spamd")
"""The processes users and operators run: they never import the benchmarks, the harness or the replay."""
TOOLS = "services.bench.api"
MAX_MODULE_LINES = 800
"""No module outside ``tests/`` needs two sittings."""


@dataclass(frozen=True, slots=True)
class Import:
    line: int
    module: str
    """The absolute module name imported (``services.settings``)."""


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, *, is_package: bool = False) -> list[Import]:
    """Every import in ``source`` (the module named ``module``), relative ones made absolute."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(Import(node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # ``from services import settings`` imports services.settings; the top package is what matters here.
            found.append(Import(node.lineno, target))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append(Import(node.lineno, node.args[0].value))
    return found


def violations(root: Path = REPO_ROOT) -> tuple[list[str], dict[str, int]]:
    """Offending imports as ``path:line: module imports target (rule)``, and how many modules each package has."""
    problems: list[str] = []
    counts: dict[str, int] = {}
    for package, banned in FORBIDDEN.items():
        files = sorted((root / package).rglob("*.py"))
        counts[package] = len(files)
        for path in files:
            module = module_name(path, root)
            for imp in imports_of(path.read_text(), module, is_package=path.name == "__init__.py"):
                top = imp.module.split(".")[0]
                if top in banned:
                    problems.append(f"{path.relative_to(root)}:{imp.line}: {module} imports {imp.module} "
                                    f"({package} must not import {top})")
    return problems, counts


@pytest.mark.unit
def test_the_import_graph_points_down() -> None:
    problems, counts = violations()
    assert all(n > 0 for n in counts.values()), f"a package has no modules to check: {counts}"
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


@pytest.mark.unit
def test_the_check_sees_imports_wherever_they_are(tmp_path: Path) -> None:
    """The checker itself: a forbidden import is found in a function, under TYPE_CHECKING, relative, dynamic."""
    (tmp_path / "services").mkdir()
    (tmp_path / "services" / "settings.py").write_text("X = 1\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "ok.py").write_text("import numpy\nfrom models import features\nfrom . import rules\n")
    streams = tmp_path / "streams"
    (streams / "sub").mkdir(parents=True)
    (streams / "__init__.py").write_text("")
    (streams / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from services.settings import Settings\n"
        "def f():\n"
        "    import services.daemon as d\n"
        "    return d\n"
    )
    (streams / "sub" / "b.py").write_text(
        "from ...services import settings\n"
        "from .. import config\n"
        "import importlib\n"
        "m = importlib.import_module('services.local.stack')\n"
    )
    problems, counts = violations(tmp_path)
    assert counts == {"models": 1, "streams": 3, "services": 1}
    assert sorted(problems) == [
        "streams/a.py:3: streams.a imports services.settings (streams must not import services)",
        "streams/a.py:5: streams.a imports services.daemon (streams must not import services)",
        "streams/sub/b.py:1: streams.sub.b imports services (streams must not import services)",
        "streams/sub/b.py:4: streams.sub.b imports services.local.stack (streams must not import services)",
    ]


@pytest.mark.unit
def test_relative_imports_resolve_against_the_package() -> None:
    assert [i.module for i in imports_of("from . import x\nfrom .y import z\n", "streams.topics")] == [
        "streams", "streams.y"]
    assert [i.module for i in imports_of("from . import x\n", "streams", is_package=True)] == ["streams"]
    assert [i.module for i in imports_of("from ..services import s\n", "streams.topics")] == ["services"]


@pytest.mark.unit
def test_no_two_test_files_share_a_basename() -> None:
    """pytest imports test files by basename (rootdir-relative, no packages): a second ``test_app.py`` anywhere
    under ``tests/`` stops the whole run at collection ("import file mismatch"), in CI as here."""
    seen: dict[str, list[str]] = {}
    for path in sorted((REPO_ROOT / "tests").rglob("test_*.py")):
        seen.setdefault(path.name, []).append(str(path.relative_to(REPO_ROOT)))
    clashes = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not clashes, f"test files sharing a basename (rename one of each): {clashes}"


def _modules(root: Path, package: str) -> list[tuple[Path, str]]:
    return [(path, module_name(path, root)) for path in sorted((root / package).rglob("*.py"))]


@pytest.mark.unit
def test_the_serving_processes_never_import_the_tools() -> None:
    problems = []
    for path, module in _modules(REPO_ROOT, "services"):
        if not module.startswith(SERVING):
            continue
        for imp in imports_of(path.read_text(), module, is_package=path.name == "__init__.py"):
            if imp.module == TOOLS or imp.module.startswith(TOOLS + "."):
                problems.append(f"{path.relative_to(REPO_ROOT)}:{imp.line}: {module} imports {imp.module}")
    assert (REPO_ROOT / "services" / "bench").is_dir()
    assert not problems, "serving code importing the benchmarks and harness:\n" + "\n".join(problems)


@pytest.mark.unit
def test_streams_starts_no_process() -> None:
    """``streams/`` is event plumbing: starting the broker, Prometheus or any other process is ``services.local``'s."""
    problems = [f"{path.relative_to(REPO_ROOT)}:{imp.line}: {module} imports {imp.module}"
                for path, module in _modules(REPO_ROOT, "streams")
                for imp in imports_of(path.read_text(), module, is_package=path.name == "__init__.py")
                if imp.module.split(".")[0] in ("subprocess", "multiprocessing")]
    assert not problems, "\n".join(problems)


@pytest.mark.unit
def test_no_module_outside_the_tests_is_too_long() -> None:
    long = {str(path.relative_to(REPO_ROOT)): n for package in FORBIDDEN for path, _ in _modules(REPO_ROOT, package)
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (cut them along their sections): {long}"
