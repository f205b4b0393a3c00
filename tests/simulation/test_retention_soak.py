"""A daemon left running a simulated month (CI size; a year: POSGUARD_SOAK_SALES=700000
POSGUARD_SOAK_DAYS=365, or ``python -m posguard.bench.retention``): automatic retention keeps the
live journal under its budget with no operator, every archive verifies and links to the next
file, old archives go only once a later checkpoint was deposited with the host, and a restart
afterwards reads only what is in flight while every old id stays taken."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest

from guard.core.engine import EngineConfig
from guard.core.errors import IdempotencyConflict
from guard.core.model import CardData, Request, TxnKind
from guard.journal.keys import load_keys
from guard.ops.compact import verify_chain
from guard.runtime import restore
from guard.runtime.service import open_guard
from posguard.bench.data import MID, TID
from posguard.bench.retention import MB, luhn_pan, soak

SALES = int(os.environ.get("POSGUARD_SOAK_SALES", "20000"))
DAYS = float(os.environ.get("POSGUARD_SOAK_DAYS", "30"))
BUDGET_MB = 4.0


@pytest.mark.slow
def test_a_simulated_month_stays_under_budget_and_every_archive_verifies(tmp_path: Path) -> None:
    r = soak(tmp_path, SALES, DAYS, retain_days=1.0, max_live_mb=BUDGET_MB, fsync=False, keep_days=10.0, verify=False)
    print(f"runs={r.runs} archives={len(r.archives)} deleted={r.deleted} live max {r.max_live_data / MB:.2f} MB "
          f"(file {r.max_live_file / MB:.2f} MB) pauses max {max(r.pauses) * 1e3:.1f} ms states={r.states}")
    assert r.states == {"APPROVED": SALES}
    assert r.runs >= DAYS / 3  # a cut about every 2 x retain_days
    assert r.max_live_data <= BUDGET_MB * MB
    assert r.deleted > 0 and len(r.archives) + r.deleted == r.runs  # the oldest went, after their deposit
    keys = load_keys(tmp_path / "keys")
    files = [*r.archives, tmp_path / "journal.db"]
    rep = verify_chain(files, k0=keys.k0, public_keys=[keys.signing_key.public_key()])
    assert all(f.report.ok for f in rep.files), [(f.path.name, f.report.reason, f.report.detail) for f in rep.files]
    # the only gap is where deleted archives were: every remaining file links to the next one
    assert [p for p in rep.problems if not re.search(r"starts at seq \d+: the archive\(s\) before it are missing", p)] == []
    # a restart reads the snapshot the last cut left and what came after; old ids stay taken
    svc = open_guard(tmp_path / "journal.db", keys, EngineConfig(TID, MID), object(), rng=random.Random(1))  # type: ignore[arg-type]
    try:
        assert svc.snapshots is not None and svc.snapshots.floor > 1
        assert len(svc.engine.txns) < SALES / DAYS * 4
        i = SALES - int(SALES / DAYS * 5)  # five days old: archived, and its archive kept
        old = Request("SK", i.to_bytes(16, "big"), TxnKind.SALE, 1, "978", CardData(luhn_pan(i), "2912"))
        with pytest.raises(IdempotencyConflict):  # the same id with another amount: refused, never charged again
            restore.call(svc.engine, svc.journal, lambda: svc.engine.submit(old, 0.0))
    finally:
        svc.journal.close()
