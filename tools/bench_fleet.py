"""Fleet benchmark on a throwaway PostgreSQL (tests/support/pg.py), every figure beside its
baseline measured in the same run:

1. ingest + verify (hash, chain, MAC from k0, checkpoint signatures, COPY, transaction states)
   in entries/s vs a bare COPY of the same rows into the same partitioned table;
2. incremental `fleet verify` of the new entries (entries/s, and what a day costs);
3. `fleet reconcile` of one settlement file against the journals' sales (rows = sales);
4. the projected node count for 100,000 terminals (docs/FLEET.md has the arithmetic).

usage: python tools/bench_fleet.py [--terminals 20] [--sales 50000] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guard.fleet.ingest import copy_text, enroll, ingest, COPY_ENTRIES  # noqa: E402
from guard.fleet.reconcile import reconcile  # noqa: E402
from guard.fleet.schema import connect, day_of, ensure_days, init  # noqa: E402
from guard.fleet.verify import verify  # noqa: E402
from guard.journal.keys import init_keys  # noqa: E402
from tests.support.ops_support import bulk_journal, write_settlement  # noqa: E402
from tests.support.pg import start_server  # noqa: E402

TERMINALS_FLEET = 100_000
ENTRIES_PER_DAY = 2_000 * 2  # 2,000 sales x ~2 entries
PEAK_FACTOR = 4.0  # busiest hour vs the daily average (retail: a few hours carry most sales)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--terminals", type=int, default=20)
    ap.add_argument("--sales", type=int, default=50_000, help="sales per terminal")
    ap.add_argument("--quick", action="store_true", help="4 terminals x 10,000 sales")
    a = ap.parse_args()
    if a.quick:
        a.terminals, a.sales = 4, 10_000
    work = Path(tempfile.mkdtemp(prefix="posguard-bench-fleet-"))
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}")
    t = time.perf_counter()
    rows: list[dict[str, str]] = []
    terms: list[tuple[str, Path, Path]] = []
    for i in range(a.terminals):
        tid = f"B{i:07d}"
        d = work / tid
        d.mkdir()
        keys = init_keys(d / "keys")
        rows += bulk_journal(d / "journal.db", keys, a.sales, tid=tid, seed=i + 1)
        terms.append((tid, d / "journal.db", d / "keys"))
    settle = work / "settlement.csv"
    write_settlement(settle, rows)
    print(f"generated {a.terminals} journals x {a.sales} sales in {time.perf_counter() - t:.1f} s (not measured)")
    srv = start_server()
    if srv is None:
        sys.exit("PostgreSQL server binaries not found (apt-get install postgresql)")
    try:
        run(srv, terms, settle, len(rows))
    finally:
        srv.stop()


def _file_rows(path: Path) -> list[tuple[object, ...]]:
    import sqlite3

    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return c.execute("SELECT seq, ts, kind, txn, payload, prev_hash, entry_hash, mac FROM entries ORDER BY seq"
                         ).fetchall()
    finally:
        c.close()


def run(srv: object, terms: list[tuple[str, Path, Path]], settle: Path, sales: int) -> None:
    fresh = srv.fresh_dsn  # type: ignore[attr-defined]
    # 1a. bare COPY of the same rows (rows read beforehand; partitions created beforehand)
    base = fresh("bench_copy")
    init(base)
    copy_s, n_entries = 0.0, 0
    with connect(base) as conn:
        for tid, path, _ in terms:
            rows = _file_rows(path)
            ensure_days(conn, {day_of(float(r[1])) for r in rows})  # type: ignore[arg-type]
            n_entries += len(rows)
            t = time.perf_counter()
            with conn.transaction(), conn.cursor() as cur, cur.copy(COPY_ENTRIES) as cp:
                for chunk in copy_text(tid, rows):
                    cp.write(chunk)
            copy_s += time.perf_counter() - t
        bytes_total = conn.execute("SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits i JOIN pg_class c "
                                   "ON c.oid = i.inhrelid WHERE c.relkind = 'r'").fetchone()[0]
        bytes_total = int(bytes_total)
    copy_rate = n_entries / copy_s
    # 1b. ingest + verify into a fresh database
    dsn = fresh("bench_ingest")
    init(dsn)
    for tid, _, keys in terms:
        enroll(dsn, tid, keys)
    with connect(dsn) as conn:  # the same partitions exist before either measurement
        for _, path, _ in terms:
            ensure_days(conn, {day_of(float(r[1])) for r in _file_rows(path)})  # type: ignore[arg-type]
    t = time.perf_counter()
    res = ingest(dsn, [p for _, p, _ in terms])
    ingest_s = time.perf_counter() - t
    assert all(r.status == "added" for r in res), [r.line() for r in res if r.status != "added"][:3]
    added = sum(r.added for r in res)
    phase = {k: sum(r.seconds.get(k, 0.0) for r in res) for k in ("verify", "copy", "states")}
    witness_s = phase["verify"] + phase["copy"]
    print(f"entries                                   {added}")
    print(f"bare COPY, entries/s                      {copy_rate:,.0f}")
    print(f"ingest + verify + states, entries/s       {added / ingest_s:,.0f}")
    print(f"ratio ingest (all) / bare COPY            {added / ingest_s / copy_rate:.2f}")
    print(f"witness path (verify + COPY), entries/s   {added / witness_s:,.0f}")
    print(f"ratio witness path / bare COPY            {added / witness_s / copy_rate:.2f}")
    print(f"phases s: verify {phase['verify']:.1f}, COPY {phase['copy']:.1f}, transaction states {phase['states']:.1f}, "
          f"other {ingest_s - sum(phase.values()):.1f}")
    print(f"stored bytes per entry (heap+index+toast) {bytes_total / n_entries:.0f}")
    # 1c. the same with one ingest worker per core
    jobs = os.cpu_count() or 1
    par = fresh("bench_ingest_par")
    init(par)
    for tid, _, keys in terms:
        enroll(par, tid, keys)
    with connect(par) as conn:
        for _, path, _ in terms:
            ensure_days(conn, {day_of(float(r[1])) for r in _file_rows(path)})  # type: ignore[arg-type]
    t = time.perf_counter()
    pres = ingest(par, [p for _, p, _ in terms], jobs=jobs)
    par_s = time.perf_counter() - t
    assert sum(r.added for r in pres) == added
    print(f"ingest, {jobs} workers, entries/s            {added / par_s:,.0f}")
    print(f"ratio ingest ({jobs} workers) / bare COPY     {added / par_s / copy_rate:.2f}")
    # 2. incremental verify of the new entries (everything is new to `fleet verify` once)
    t = time.perf_counter()
    vr = verify(dsn)
    verify_s = time.perf_counter() - t
    assert all(v.ok for v in vr)
    t = time.perf_counter()
    again = verify(dsn)
    idle_s = time.perf_counter() - t
    v_rate = sum(v.checked for v in vr) / verify_s
    print(f"fleet verify of new entries, entries/s    {v_rate:,.0f}")
    print(f"fleet verify with nothing new, s          {idle_s:.3f} ({sum(v.checked for v in again)} entries read)")
    print(f"a day of one terminal ({ENTRIES_PER_DAY} entries), ms    {ENTRIES_PER_DAY / v_rate * 1000:.1f}")
    # 3. reconcile: one settlement row per sale
    t = time.perf_counter()
    rep = reconcile(dsn, [settle])
    rec_s = time.perf_counter() - t
    assert not rep.discrepancies, rep.counts()
    print(f"reconcile {sales:,} settlement rows vs {rep.sales_compared:,} sales, s   {rec_s:.1f} "
          f"(rows/s {sales / rec_s:,.0f})")
    # 4. projection
    day_entries = TERMINALS_FLEET * ENTRIES_PER_DAY
    avg = day_entries / 86_400
    peak = avg * PEAK_FACTOR
    per_node = added / par_s  # measured with one ingest worker per core of this machine
    nodes_ingest = math.ceil(peak / per_node)
    verify_core_h = day_entries / v_rate / 3600
    store_day_gb = day_entries * bytes_total / n_entries / 1e9
    print(f"100k terminals: {day_entries / 1e6:.0f} M entries/day, {avg:,.0f}/s average, {peak:,.0f}/s at peak "
          f"(x{PEAK_FACTOR:g})")
    print(f"projected ingest nodes ({os.cpu_count()} cores each, one ingest worker per core)  {nodes_ingest}")
    print(f"fleet verify of a day, core-hours         {verify_core_h:.1f}")
    print(f"stored per day, GB                        {store_day_gb:.0f}")


if __name__ == "__main__":
    main()
