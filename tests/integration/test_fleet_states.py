"""The fleet's transaction states (``guard.fleet.states``: the engine's ``from_intent``/``evolve``
per record) equal what the engine's full restore gives for every transaction of seeded simulated
journals with host faults, crashes, VOIDs and REFUNDs, for a whole file and for the records after
any seq; and ``fleet ingest`` stores the same ``txns`` whether it folds them inline or in its
helper process."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

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


@pytest.mark.slow
def test_ingest_helper_process_stores_the_same(tmp_path: Path, pg_server: Any, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    psycopg = pytest.importorskip("psycopg")
    import guard.fleet.ingest as ing
    from guard.fleet.schema import init

    terms = [run_terminal(seed, tmp_path / "j") for seed in range(6)]
    tables = []
    for name, apart_from in (("inline", 10**9), ("apart", 1)):
        monkeypatch.setattr(ing, "_APART_FROM", apart_from)
        dsn = pg_server.fresh_dsn(f"states_{name}")
        init(dsn, hash_parts=2)
        for t in terms:
            ing.enroll(dsn, t.tid, t.keys)
        res = ing.ingest(dsn, [t.journal for t in terms])
        assert {r.status for r in res} == {"added"}, [r.line() for r in res]
        with psycopg.connect(dsn) as c:
            tables.append(c.execute("SELECT * FROM txns ORDER BY terminal, txn").fetchall())
    assert tables[0] == tables[1] and len(tables[0]) > 50
