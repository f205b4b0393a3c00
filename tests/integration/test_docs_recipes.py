"""The operator recipes of docs/OPERATIONS.md run exactly as written (issue 15 item 15).

The "After an outage" block is read from the document, and every ``posguard`` line in it is run
with ``sh -c`` in a directory holding the files it names (journal.db, k0.escrow, verify.pub,
guard.toml, settlement.csv), against a host simulator that holds debits the terminal shows as
failed. The recipe must end with those debits reversed: a chain that stops on an exit status of 1
(`reconcile --apply && replay`) never sends them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from guard.hostlink.iso import HostCodec
from guard.ops.export import load_view
from guard.simulation.hostserver import HostServer
from guard.simulation.hostsim import HostCore
from tests.support import cli, subprocess_env
from tests.support.ops_support import guard_toml, mixed_journal, net_invariant

ROOT = Path(__file__).resolve().parents[2]


def doc_block(doc: Path, heading: str) -> list[str]:
    """The lines of the first ```sh block after ``heading``, comments stripped."""
    text = doc.read_text(encoding="utf-8")
    m = re.search(re.escape(heading) + r".*?```sh\n(.*?)```", text, re.S)
    assert m, f"no sh block after {heading!r} in {doc}"
    return [ln.split("  #")[0].strip() for ln in m.group(1).splitlines() if ln.strip()]


def posguard_on_path(bindir: Path) -> dict[str, str]:
    """An environment whose ``posguard`` is this checkout's CLI (as `pip install .` would install)."""
    bindir.mkdir()
    exe = bindir / "posguard"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} -m posguard.cli \"$@\"\n")
    exe.chmod(0o755)
    return subprocess_env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")


def test_outage_recipe_as_written_reverses_what_the_host_wrongly_holds(tmp_path: Path) -> None:
    lines = doc_block(ROOT / "docs" / "OPERATIONS.md", "## After an outage")
    run = [ln for ln in lines if ln.startswith("posguard ")]
    assert any("--apply" in ln for ln in run), lines
    core = HostCore(seed=11, dup_detection=True)
    work = tmp_path / "terminal"
    g = mixed_journal(work, core, approved=60, lost_debited=6, lost_unprocessed=4, needs_manual=3, no_host=2)
    keys = work / "keys"
    for name in ("k0.escrow", "verify.pub"):  # what the auditor holds, next to the journal
        shutil.copy2(keys / name, work / name)
    manual = {t.key for t in load_view(g.path).txns.values() if t.state == "NEEDS_MANUAL"}
    assert len(manual) == 3 and net_invariant(core, load_view(g.path).txns)  # the host holds wrong debits
    server = HostServer(core, HostCodec())
    port = server.start()
    env = posguard_on_path(tmp_path / "bin")
    codes = []
    try:
        guard_toml(work / "guard.toml", journal=g.path, keys=keys, port=port)
        for ln in run:
            if "settlement.csv" in ln and not (work / "settlement.csv").exists():
                core.write_settlement_csv(work / "settlement.csv")  # "once the host's report is in"
            r = subprocess.run(["sh", "-c", ln], cwd=work, env=env, capture_output=True, text=True, timeout=300)
            codes.append(r.returncode)
            assert r.returncode in (0, 1), (ln, r.returncode, r.stdout, r.stderr)
    finally:
        server.stop()
    view = load_view(g.path)
    assert {k for k in manual if view.txns[k].state == "REVERSED"} == manual, codes
    assert not net_invariant(core, view.txns)
    core.write_settlement_csv(tmp_path / "after.csv")
    assert cli("reconcile", g.path, tmp_path / "after.csv")[0] == 0
