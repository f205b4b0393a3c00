"""The fleet's transaction states (``guard.fleet.states``: the engine's ``from_intent``/``evolve``
per record) equal what the engine's full restore gives for every transaction of seeded simulated
journals with host faults, crashes, VOIDs and REFUNDs, for a whole file and for the records after
any seq (what ``fleet ingest`` stored before the fold)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from guard.fleet.states import TxnRow, txn_rows
from guard.ops.export import load_view
from tests.support.fleet_sim import run_terminal

SEEDS = range(40)


def _restored(tid: str, journal: Path, first_new: int) -> list[TxnRow]:
    """The rows ``fleet ingest`` stored before the fold: from the engine's restore of the file."""
    view = load_view(journal)
    return sorted((tid, t.key, t.kind, t.state, t.stan, t.date, t.amount, t.tid, t.mid, t.masked_pan, t.rrn,
                   t.history[-1][0], t.updated) for t in view.txns.values() if t.history[-1][0] >= first_new)


def _rows(journal: Path) -> list[tuple[Any, ...]]:
    c = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        return c.execute("SELECT seq, ts, kind, txn, payload FROM entries ORDER BY seq").fetchall()
    finally:
        c.close()


def test_fold_equals_engine_restore(tmp_path: Path) -> None:
    compared = 0
    for seed in SEEDS:
        t = run_terminal(seed, tmp_path)
        rows = _rows(t.journal)
        for first_new in (rows[0][0], rows[len(rows) // 2][0], rows[-1][0]):
            got = sorted(txn_rows(t.tid, rows, first_new))
            assert got == _restored(t.tid, t.journal, first_new), (seed, first_new)
            compared += len(got)
    assert compared > 500  # the seeds produce enough transactions to mean something


def test_a_record_no_restore_could_read_rejects_the_upload_even_without_a_txn() -> None:
    """A MACed file from a device holding its keys can still carry a record the engine's restore
    refuses (a stan_use without its STAN, a kind this version does not know): the fold names its
    seq instead of skipping rows that have no transaction id."""
    import pytest

    from guard.fleet.states import StateError

    intent = ('{"kind": "SALE", "fp": "f", "amount": 100, "currency": "978", "card_token": "t", '
              '"masked_pan": "476173******0119", "vault_ref": null, "stan": 1, "f7": "1202120000", '
              '"tid": "T", "mid": "M"}')
    ok = [(1, 1.0, "intent", "R1:a", intent), (2, 2.0, "stan_use", None, '{"stan": 2, "purpose": "echo"}')]
    assert [r[1] for r in txn_rows("T", ok, 1)] == ["R1:a"]
    for bad in ((3, 3.0, "stan_use", None, '{"purpose": "echo"}'), (3, 3.0, "no_such_kind", None, "{}"),
                (3, 3.0, "stan_use", None, "not json")):
        with pytest.raises(StateError) as e:
            txn_rows("T", [*ok, bad], 1)
        assert e.value.seq == 3
