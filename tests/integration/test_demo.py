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


def test_demo_results_fit_100_columns_with_a_legend_colour_only_on_a_terminal_and_an_unwrapped_command(
        tmp_path: Path) -> None:
    """Issue 15 item 22: the table wrapped past 100 columns, had no legend or colour, and the
    "verify it yourself" command was wrapped when piped (so it could not be pasted)."""
    import io

    from rich.console import Console

    from guard.core.model import TxnState
    from guard.simulation.demo import LEGEND, Row, print_verify_command, render_results

    rows = [Row("guard killed while waiting for host [kill]", bytes(16), 2950,
                "guard SIGKILLed and restarted; reader asked STATUS: FAILED - NOT CHARGED (REVERSAL QUEUED) "
                "(link faults: duplicate 2, bitflip 1)", TxnState.REVERSED, 15, 0),
            Row("normal sale", bytes(16), 1000, "APPROVED 123456", TxnState.APPROVED, 1, 1)]
    piped = io.StringIO()
    con = Console(file=piped, width=100)  # not a terminal: what `posguard demo | tee` gets
    render_results(con, rows)
    long_dir = tmp_path / ("a-rather-long-directory-name-" * 3) / "posguard-demo"
    print_verify_command(con, long_dir)
    out = piped.getvalue()
    table = [ln for ln in out.splitlines() if not ln.startswith("verify it yourself: ")]
    assert "\x1b[" not in out and max(len(ln) for ln in table) <= 100, out
    assert "[kill]" in out and " ".join(LEGEND.split()[:6]) in " ".join(out.split())
    line = [ln for ln in out.splitlines() if ln.startswith("verify it yourself: ")]
    assert line == [f"verify it yourself: posguard journal verify {long_dir / 'journal.db'} --k0 "
                    f"{long_dir / 'keys' / 'k0.escrow'} --pubkey {long_dir / 'keys' / 'verify.pub'}"]
    tty = io.StringIO()
    render_results(Console(file=tty, width=160, force_terminal=True, color_system="standard"), rows)
    assert "\x1b[32m" in tty.getvalue() and max(len(re.sub(r"\x1b\[[0-9;]*m", "", ln))
                                                 for ln in tty.getvalue().splitlines()) <= 100
