"""The floor plan holds: dependencies point one way, and serving never imports a benchmark.

Walks the ``import`` statements of every module of the project's packages (top level and inside
functions alike) and checks the graph they make: no cycle between modules, no ``clients -> server``
edge, and the layer rule of DESIGN.md (nothing below ``server`` imports it or ``aiohttp``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "cache", "scheduler", "trainer", "protocol", "clients", "server", "bench")
# What each package may import from the project (itself always). The arrows of DESIGN.md.
ALLOWED = {
    "protocol": set(),
    "cache": set(),
    "engine": set(),
    "trainer": {"engine"},
    "scheduler": {"engine", "cache", "trainer"},
    "clients": {"protocol"},
    "server": {"engine", "cache", "scheduler", "trainer", "protocol"},
    "bench": {"engine", "cache", "scheduler", "trainer", "protocol", "clients", "server"},
}
# The ``mace`` command line dispatches to every part: ``mace load`` runs the load generator (and
# ``mace bench`` a benchmark, by module name, imported only then).
ALLOWED_MODULES = {"server.cli": {"clients"}}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules ``path`` imports (``from a import b`` counts ``a.b`` when it is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_packages_import_only_what_they_may():
    wrong = []
    for module, deps in _graph().items():
        pkg = module.split(".")[0]
        for dep in deps:
            if dep.split(".")[0] not in ALLOWED[pkg] | ALLOWED_MODULES.get(module, set()) | {pkg}:
                wrong.append(f"{module} -> {dep}")
    assert wrong == []


def test_nothing_below_the_server_imports_aiohttp():
    below = ("engine", "cache", "scheduler", "trainer", "protocol")
    offenders = []
    for pkg in below:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{_module_name(path)}: {n}" for n in names if n.split(".")[0] == "aiohttp"]
    assert offenders == []


@pytest.mark.parametrize("argv", [["serve", "--help"], ["load", "--url", "http://x", "--help"], ["bench", "--help"]])
def test_the_cli_imports_no_benchmark_outside_mace_bench(argv):
    code = ("import sys\nfrom server.cli import build_parser\n"
            f"try:\n    build_parser().parse_args({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m == 'bench' or m.startswith('bench.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_mace_bench_imports_only_the_benchmark_asked_for():
    code = ("import sys\nfrom server.cli import build_parser\n"
            "build_parser('plan').parse_args(['bench', 'plan', '--iterations', '1'])\n"
            "print(sorted(m for m in sys.modules if m.startswith('bench.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    imported = eval(out.stdout.strip().splitlines()[-1])
    assert "bench.plan" in imported and "bench.paper" not in imported and "bench.engine" not in imported
