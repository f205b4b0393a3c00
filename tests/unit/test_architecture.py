"""The layering docs/ARCHITECTURE.md describes, checked on the source: what each package may
import, and that the pure core reaches no disk, network, clock, thread or OS randomness."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# package -> the first-party packages its modules may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "guard.core": set(),
    "guard.journal": {"guard.core"},
    "guard.hostlink": {"guard.core"},
    "guard.runtime": {"guard.core", "guard.journal", "guard.hostlink"},
    "guard.ops": {"guard.core", "guard.journal", "guard.hostlink", "guard.runtime"},
    "guard.fleet": {"guard.core", "guard.journal", "guard.ops"},
    "firmware_bridge": {"guard.core", "guard.runtime"},
    "guard.simulation": {"guard.core", "guard.journal", "guard.hostlink", "guard.runtime", "guard.ops",
                         "firmware_bridge"},
    "posguard": {"guard.core", "guard.journal", "guard.hostlink", "guard.runtime", "guard.ops", "guard.fleet",
                 "firmware_bridge", "guard.simulation"},
}
FIRST_PARTY = ("guard", "firmware_bridge", "posguard")
# The sans-I/O core: no storage, network, clock, threads, processes or OS randomness. ``random``
# only for the injected type (``from random import Random``), never drawn from here.
CORE_FORBIDDEN = {"sqlite3", "socket", "os", "time", "threading", "subprocess", "selectors", "ssl", "pathlib",
                  "shutil", "tempfile", "asyncio", "multiprocessing", "secrets", "uuid", "logging", "io", "serial",
                  "sqlite_utils"}
# The CLI may start the demo and the simulators, the benchmarks (posguard/bench/) drive them;
# nothing else in posguard/ may import them.
SIMULATION_IMPORTERS = {"posguard/cli.py"}
SIMULATION_IMPORTER_DIRS = ("posguard/bench/",)


def modules(top: str) -> list[Path]:
    return sorted(p for p in (ROOT / top).rglob("*.py"))


def package_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "guard":
        return ".".join(parts[:2]) if len(parts) > 2 else "guard"
    return parts[0]


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) for every import in the file, nested ones included."""
    out: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import (use absolute ones)"
            out.append((node.lineno, node.module or "", [a.name for a in node.names]))
    return out


def first_party_package(module: str) -> str | None:
    if not module.startswith(FIRST_PARTY):
        return None
    parts = module.split(".")
    if parts[0] == "guard":
        return ".".join(parts[:2]) if len(parts) > 1 else "guard"
    return parts[0]


ALL = [p for top in ("guard", "firmware_bridge", "posguard") for p in modules(top)]


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_module_imports_only_the_layers_below_it(path: Path) -> None:
    own = package_of(path)
    if own == "guard":  # guard/__init__.py
        return
    allowed = ALLOWED[own] | {own}
    rel = str(path.relative_to(ROOT))
    for line, module, _ in imports(path):
        pkg = first_party_package(module)
        if pkg is None:
            continue
        if pkg == "guard.simulation" and own == "posguard":
            assert rel in SIMULATION_IMPORTERS or rel.startswith(SIMULATION_IMPORTER_DIRS), \
                f"{rel}:{line} imports a simulator ({module})"
            continue
        assert pkg in allowed, f"{rel}:{line}: {own} may not import {module} (allowed: {sorted(allowed)})"


@pytest.mark.parametrize("path", modules("guard/core"), ids=lambda p: p.name)
def test_the_core_touches_no_disk_network_clock_or_os_randomness(path: Path) -> None:
    for line, module, names in imports(path):
        top = module.split(".")[0]
        if top == "random":
            assert module == "random" and names == ["Random"], f"{path.name}:{line}: only the injected type"
            continue
        assert top not in CORE_FORBIDDEN, f"guard/core/{path.name}:{line} imports {module}"


def test_no_product_module_imports_a_simulator() -> None:
    product = [p for p in ALL if package_of(p) not in ("guard.simulation", "posguard")]
    bad = [f"{p.relative_to(ROOT)}:{line}" for p in product for line, m, _ in imports(p)
           if m.startswith("guard.simulation")]
    assert not bad, bad


def test_only_the_cli_runs_the_benchmarks() -> None:
    bad = [f"{p.relative_to(ROOT)}:{line}" for p in ALL for line, m, _ in imports(p)
           if m.startswith("posguard.bench") and not str(p.relative_to(ROOT)).startswith(("posguard/bench/", "posguard/cli.py"))]
    assert not bad, bad


def test_modules_stay_small() -> None:
    big = {str(p.relative_to(ROOT)): n for p in ALL if (n := len(p.read_text().splitlines())) > 600}
    assert not big, f"modules over 600 lines: {big}"


def test_the_checks_can_fail() -> None:
    """A module that imports a forbidden layer is seen (the rules above are not vacuous)."""
    assert first_party_package("guard.simulation.hostsim") == "guard.simulation"
    assert "guard.simulation" not in ALLOWED["guard.ops"]
    assert any(m == "guard.core.engine" for p in modules("guard/runtime") for _, m, _ in imports(p))
