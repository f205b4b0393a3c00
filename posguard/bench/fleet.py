"""Fleet benchmark on a throwaway PostgreSQL (``posguard.bench.pg``), every figure beside its
baseline measured in the same run:

1. ingest + verify (hash, chain, MAC from k0, checkpoint signatures, COPY, transaction states)
   in entries/s vs a bare COPY of the same rows into the same partitioned table (medians of
   ``--runs`` rounds, each a fresh database for both);
2. incremental `fleet verify` of the new entries (entries/s, and what a day costs);
3. `fleet reconcile` of one settlement file against the journals' sales (rows = sales);
4. the projected node count for 100,000 terminals (docs/FLEET.md has the arithmetic).

usage: python -m posguard.bench.fleet [--terminals 20] [--sales 50000] [--runs 3] [--quick]

Skipped (exit 0, "skipped: ...") without psycopg or the PostgreSQL server binaries.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from guard.core.constants import SETTLEMENT_COLUMNS
from guard.journal.keys import init_keys
from posguard.bench.data import bulk_journal
from posguard.bench.pg import PgServer, find_bindir, start_server

TERMINALS_FLEET = 100_000
ENTRIES_PER_DAY = 2_000 * 2  # 2,000 sales x ~2 entries
PEAK_FACTOR = 4.0  # busiest hour vs the daily average (retail: a few hours carry most sales)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--terminals", type=int, default=20)
    ap.add_argument("--sales", type=int, default=50_000, help="sales per terminal")
    ap.add_argument("--runs", type=int, default=3, help="rounds of bare COPY + ingest (medians are printed)")
    ap.add_argument("--quick", action="store_true", help="4 terminals x 10,000 sales, one round")
    a = ap.parse_args(argv)
    if a.quick:
        a.terminals, a.sales, a.runs = 4, 10_000, 1
    try:
        import psycopg  # noqa: F401
    except ImportError:
        print("skipped: psycopg is not installed (pip install 'posguard[fleet]')")
        return 0
    if find_bindir() is None:
        print("skipped: PostgreSQL server binaries not found (apt-get install postgresql; README)")
        return 0
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
    with open(settle, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SETTLEMENT_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    print(f"generated {a.terminals} journals x {a.sales} sales in {time.perf_counter() - t:.1f} s (not measured)")
    srv = start_server()
    if srv is None:  # pragma: no cover (find_bindir said yes)
        print("skipped: PostgreSQL server binaries not found")
        return 0
    try:
        run(srv, terms, settle, len(rows), max(1, a.runs))
    finally:
        srv.stop()
    return 0


def _file_rows(path: Path) -> list[tuple[Any, ...]]:
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return c.execute("SELECT seq, ts, kind, txn, payload, prev_hash, entry_hash, mac FROM entries ORDER BY seq"
                         ).fetchall()
    finally:
        c.close()


def _prepared(srv: PgServer, name: str, terms: list[tuple[str, Path, Path]], *, enrolled: bool) -> str:
    """A fresh database with every partition the rows need (created before any measurement)."""
    from guard.fleet.ingest import enroll
    from guard.fleet.schema import connect, day_of, ensure_days, init

    dsn = srv.fresh_dsn(name)
    init(dsn)
    if enrolled:
        for tid, _, keys in terms:
            enroll(dsn, tid, keys)
    with connect(dsn) as conn:
        for _, path, _ in terms:
            ensure_days(conn, {day_of(float(r[1])) for r in _file_rows(path)})
    return dsn


def _bare_copy(srv: PgServer, terms: list[tuple[str, Path, Path]], *, per_row: bool = False
               ) -> tuple[float, int, int]:
    """(seconds, entries, stored bytes): each file's rows (read beforehand) COPYed in one transaction,
    as ingest formats them (``copy_text``) or, ``per_row``, with psycopg's ``write_row``."""
    from guard.fleet.ingest import COPY_ENTRIES, copy_text
    from guard.fleet.schema import connect, day_of

    dsn = _prepared(srv, "bench_copy_rows" if per_row else "bench_copy", terms, enrolled=False)
    secs, n = 0.0, 0
    with connect(dsn) as conn:
        for tid, path, _ in terms:
            rows = _file_rows(path)
            n += len(rows)
            t = time.perf_counter()
            with conn.transaction(), conn.cursor() as cur, cur.copy(COPY_ENTRIES) as cp:
                if per_row:
                    for seq, ts, kind, txn, payload, prev, h, mac in rows:
                        cp.write_row((tid, day_of(ts), seq, ts, kind, txn, payload, prev, h, mac))
                else:
                    for chunk in copy_text(tid, rows):
                        cp.write(chunk)
            secs += time.perf_counter() - t
        size = conn.execute("SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits i JOIN pg_class c "
                            "ON c.oid = i.inhrelid WHERE c.relkind = 'r'").fetchone()
    return secs, n, int(size[0] if size else 0)


def run(srv: PgServer, terms: list[tuple[str, Path, Path]], settle: Path, sales: int, runs: int) -> None:
    from guard.fleet.ingest import IngestResult, ingest
    from guard.fleet.reconcile import reconcile
    from guard.fleet.verify import verify

    jobs = os.cpu_count() or 1
    copy_r: list[float] = []
    rowc_r: list[float] = []
    ing_r: list[float] = []
    par_r: list[float] = []
    phases: list[dict[str, float]] = []
    res: list[IngestResult] = []
    dsn = ""
    added = n_entries = bytes_total = 0
    for _ in range(runs):
        copy_s, n_entries, bytes_total = _bare_copy(srv, terms)
        rowc_r.append(n_entries / _bare_copy(srv, terms, per_row=True)[0])
        dsn = _prepared(srv, "bench_ingest", terms, enrolled=True)
        t = time.perf_counter()
        res = ingest(dsn, [p for _, p, _ in terms])
        ingest_s = time.perf_counter() - t
        assert all(r.status == "added" for r in res), [r.line() for r in res if r.status != "added"][:3]
        added = sum(r.added for r in res)
        par = _prepared(srv, "bench_ingest_par", terms, enrolled=True)
        t = time.perf_counter()
        pres = ingest(par, [p for _, p, _ in terms], jobs=jobs)
        par_s = time.perf_counter() - t
        assert sum(r.added for r in pres) == added
        copy_r.append(n_entries / copy_s)
        ing_r.append(added / ingest_s)
        par_r.append(added / par_s)
        ph = {k: sum(r.seconds.get(k, 0.0) for r in res) for k in ("verify", "copy", "states")}
        ph["other"] = ingest_s - sum(ph.values())
        phases.append(ph)
        print(f"round: bare COPY {copy_r[-1]:,.0f}/s, ingest {ing_r[-1]:,.0f}/s ({ing_r[-1] / copy_r[-1]:.2f}x), "
              f"{jobs} workers {par_r[-1]:,.0f}/s ({par_r[-1] / copy_r[-1]:.2f}x)")
    med = statistics.median
    ratio = med(i / c for i, c in zip(ing_r, copy_r))
    par_ratio = med(p / c for p, c in zip(par_r, copy_r))
    print(f"entries                                   {added}")
    print(f"rounds (medians below)                    {runs}")
    print(f"bare COPY, entries/s                      {med(copy_r):,.0f}")
    print(f"bare COPY via psycopg write_row, entries/s {med(rowc_r):,.0f}")
    print(f"ingest + verify + states, entries/s       {med(ing_r):,.0f}")
    print(f"ratio ingest (all) / bare COPY            {ratio:.2f}")
    print(f"ratio ingest (all) / write_row COPY       {med(i / c for i, c in zip(ing_r, rowc_r)):.2f}")
    print("phases s (verify and states overlap the COPY): " + ", ".join(
        f"{k} {med(p[k] for p in phases):.1f}" for k in ("verify", "copy", "states", "other")))
    print(f"stored bytes per entry (heap+index+toast) {bytes_total / n_entries:.0f}")
    print(f"ingest, {jobs} workers, entries/s            {med(par_r):,.0f}")
    print(f"ratio ingest ({jobs} workers) / bare COPY     {par_ratio:.2f}")
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
    per_node = med(par_r)  # measured with one ingest worker per core of this machine
    nodes_ingest = math.ceil(peak / per_node)
    verify_core_h = day_entries / v_rate / 3600
    store_day_gb = day_entries * bytes_total / n_entries / 1e9
    print(f"100k terminals: {day_entries / 1e6:.0f} M entries/day, {avg:,.0f}/s average, {peak:,.0f}/s at peak "
          f"(x{PEAK_FACTOR:g})")
    print(f"projected ingest nodes ({os.cpu_count()} cores each, one ingest worker per core)  {nodes_ingest}")
    print(f"fleet verify of a day, core-hours         {verify_core_h:.1f}")
    print(f"stored per day, GB                        {store_day_gb:.0f}")


if __name__ == "__main__":
    sys.exit(main())
