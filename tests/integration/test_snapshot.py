"""Snapshots (guard.runtime.snapshot): a restart from the newest snapshot rebuilds the same engine
as reading every entry (open transactions, queues, STAN, the counter rules' windows, every old
id still taken), and reads only what is in flight; a snapshot that does not check out is ignored."""

from __future__ import annotations

import dataclasses
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from guard.core.engine import Engine, EngineConfig
from guard.core.errors import IdempotencyConflict
from guard.core.model import TxnState
from guard.core.policies import PolicyConfig, VelocityLimit
from guard.journal.store import Journal
from guard.runtime import restore
from guard.runtime.service import JournalCrypto
from guard.runtime.snapshot import Snapshotter
from guard.simulation.hostsim import HostCore
from tests.support.ops_support import MID, TID, Gen

POLICY = PolicyConfig(double_swipe_window_s=120.0, card_limits=(VelocityLimit(600.0, max_count=20),
                                                                VelocityLimit(3600.0, max_amount=3_000_000)),
                      terminal_limits=(VelocityLimit(60.0, max_count=30),))
HORIZON = 3600.0


def view(e: Engine, now: float) -> dict[str, Any]:
    """What decides the engine's next actions (memory of final transactions aside)."""
    h = e.history
    h.prune(now)
    for ws in (*h._card_windows.values(), h._terminal_windows):
        for w in ws:
            w.expire(now)
    return {
        "open": {k: dataclasses.astuple(e.txns[k]) for k in sorted(e.open_keys())},
        "stan": e.last_stan, "saf": list(e._saf), "adv": list(e._adv), "stored": dict(e._stored),
        "sig": dict(e._sig_due),
        "recent": {tok: [t.key for t in q] for tok, q in h._recent.items() if q},
        "cards": {tok: [list(w.items) for w in ws] for tok, ws in h._card_windows.items() if any(w.items for w in ws)},
        "terminal": [list(w.items) for w in h._terminal_windows],
        "pending": sorted(t.key for ts in h._pending.values() for t in ts
                          if t.state in (TxnState.REVERSAL_PENDING, TxnState.HELD)),
    }


def both(g: Gen) -> tuple[Engine, tuple[Engine, int]]:
    crypto = JournalCrypto(g.journal, g.keys.token_key)  # type: ignore[union-attr]
    full = restore.restore_engine(g.ecfg, crypto, g.journal, random.Random(1), snapshot=False)
    snap = restore.restore_from_snapshot(g.ecfg, crypto, g.journal, random.Random(1))
    assert snap is not None
    return full, snap


def scenario(tmp_path: Path) -> tuple[Gen, list[str], list[str]]:
    """Sales over a day with the rules on, reversals left pending long before the snapshot, a
    snapshot, then more traffic after it."""
    ecfg = EngineConfig(TID, MID, policy=POLICY, reversal_timeout_s=5.0, backoff_base_s=1.0, backoff_max_s=4.0)
    g = Gen(tmp_path / "g", HostCore(seed=4, dup_detection=True), ecfg=ecfg, step=7.0)
    g.host_up()
    early = g.sales(200)
    stuck = g.sales(3, respond=False)  # the host debited, the answers were lost
    g.host_down()  # -> REVERSAL_PENDING, open for the rest of the test
    g.no_host_sales(400)  # hours of declined (or held) sales: the pending reversals' entries fall far behind
    g.tick_clock(2 * HORIZON)
    g.run(g.engine.tick(g.t))  # unconfirmed holds expire
    g.flush()
    g.no_host_sales(300)
    return g, early, stuck


def test_snapshot_restore_equals_full_restore_and_reads_only_in_flight(tmp_path: Path) -> None:
    g, early, stuck = scenario(tmp_path)
    s = Snapshotter(g.engine, g.journal, 1)
    seq = s.write(g.t)
    assert seq is not None
    payload = next(e.payload for e in g.journal.entries(seq - 1) if e.seq == seq)
    assert set(stuck) <= set(payload["open"]) and payload["horizon_s"] == HORIZON
    assert payload["from_seq"] > max(e.seq for k in stuck for e in g.journal.entries_for(k))  # read as "open"
    g.no_host_sales(40)  # after the snapshot
    g.flush()
    full, (snap, from_seq) = both(g)
    assert from_seq == payload["from_seq"]
    assert view(snap, g.t) == view(full, g.t)
    assert all(snap.txns[k].state is TxnState.REVERSAL_PENDING for k in stuck)
    assert len(snap.txns) < len(full.txns)  # what is final and old stays on disk
    # every old id is still taken: found on disk, never taken as a new sale
    assert early[0] not in snap.txns
    assert restore.status(snap, g.journal, early[0]) == restore.status(full, g.journal, early[0]) is not None
    old = dataclasses.replace(g.request(), txn_id=bytes.fromhex(early[0].split(":")[1]))
    with pytest.raises(IdempotencyConflict):
        restore.call(snap, g.journal, lambda: snap.submit(old, g.t))
    assert restore.call(full, g.journal, lambda: full.recover(g.t)) == restore.call(snap, g.journal,
                                                                                    lambda: snap.recover(g.t))
    g.close()


def test_full_restore_without_snapshot_or_with_a_tampered_one(tmp_path: Path) -> None:
    g, _, _ = scenario(tmp_path)
    crypto = JournalCrypto(g.journal, g.keys.token_key)  # type: ignore[union-attr]
    assert restore.restore(g.ecfg, crypto, g.journal)[1] == 0  # no snapshot yet: every entry
    Snapshotter(g.engine, g.journal, 1).write(g.t)
    assert restore.restore(g.ecfg, crypto, g.journal)[1] > 1
    wider = dataclasses.replace(g.ecfg, policy=dataclasses.replace(POLICY, double_swipe_window_s=2 * HORIZON))
    assert restore.restore(wider, crypto, g.journal)[1] == 0  # the rules look further back than it kept
    g.close()
    c = sqlite3.connect(g.path)
    c.execute("UPDATE snapshot_filter SET bits = zeroblob(length(bits))")  # "forget" every old id
    c.commit()
    c.close()
    j = Journal.open(g.path, g.keys, terminal_id=TID)  # type: ignore[arg-type]
    try:
        assert j.snapshot() is None
        assert restore.restore(g.ecfg, JournalCrypto(j, g.keys.token_key), j)[1] == 0  # type: ignore[union-attr]
    finally:
        j.close()


def test_snapshot_is_signed_by_the_checkpoint_of_its_commit(tmp_path: Path) -> None:
    g = Gen(tmp_path / "g", HostCore(seed=4, dup_detection=True))
    g.host_up()
    g.sales(20)
    seq = Snapshotter(g.engine, g.journal, 1).write(g.t)
    assert seq is not None and g.journal.latest_checkpoint()["covers_seq"] == seq  # signed in the same commit
    g.close()
