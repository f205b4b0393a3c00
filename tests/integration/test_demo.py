"""`posguard demo` end to end: exit 0, the invariant table, and nothing sensitive in the journal."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TEST_PAN = "4761739001010119"


def test_demo_runs_the_whole_path_and_leaves_no_clear_card_data(tmp_path: Path) -> None:
    d = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "posguard.cli", "demo", "--dir", str(d)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "invariant holds" in proc.stdout and "NO" not in re.findall(r"\b(?:yes|NO)\b", proc.stdout)
    assert "REVERSED" in proc.stdout and "IDEMPOTENCY_MISMATCH" in proc.stdout
    dump = subprocess.run(["sqlite3", str(d / "journal.db"), ".dump"], capture_output=True, text=True).stdout \
        if Path("/usr/bin/sqlite3").exists() else "\n".join(__import__("sqlite3").connect(d / "journal.db").iterdump())
    assert "INSERT INTO" in dump and "476173******0119" in dump
    assert TEST_PAN not in dump and "=2912" not in dump and "D2912" not in dump, "no PAN or track data"
    for f in ("guard.log", "host-ledger.json", "settlement.csv", "summary.json"):
        assert TEST_PAN not in (d / f).read_text(), f
    verify = subprocess.run([sys.executable, "-m", "posguard.cli", "journal", "verify", str(d / "journal.db"),
                             "--k0", str(d / "keys" / "k0.escrow"), "--pubkey", str(d / "keys" / "verify.pub")],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stdout.startswith("OK"), verify.stdout + verify.stderr


def test_demo_refuses_a_directory_that_is_not_its_own(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, "-m", "posguard.cli", "demo", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and (tmp_path / "precious.txt").exists()
