"""`posguard bench` works from the packages alone: the benchmarks ship in posguard.bench, so an
installed posguard (no tools/, no tests/ beside it) runs them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_runs_from_the_packages_alone(tmp_path: Path) -> None:
    site = tmp_path / "site"
    for pkg in ("guard", "posguard", "firmware_bridge"):  # what `pip install .` installs
        shutil.copytree(ROOT / pkg, site / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", "from posguard.cli import main; main()", "bench", "--quick", "--only",
                        "startup", "--out", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "startup (" in r.stdout and ", ok)" in r.stdout, r.stdout
    detail = (tmp_path / "out" / "startup.txt").read_text()
    assert f"posguard from: {site / 'posguard'}" in detail  # not from the source checkout
    assert re.search(r"start-up, 100,000 sales, ms\s+[\d.]+\n", r.stdout), r.stdout


def test_fleet_bench_skips_without_postgresql(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                                              ) -> None:
    """`posguard bench` on a machine without PostgreSQL: the fleet benchmark says why and exits 0
    (the table shows it as skipped), generating nothing."""
    import posguard.bench.fleet as fleet

    monkeypatch.setattr(fleet, "find_bindir", lambda: None)
    assert fleet.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert re.match(r"skipped: PostgreSQL server binaries not found", out) and "generated" not in out, out
