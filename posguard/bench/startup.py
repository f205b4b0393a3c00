"""Start-up time of the daemon at any journal age, beside a bare SELECT of the same entries.

For each size (settled sales already in the live journal, 2,000 a day, the default counter
rules, a snapshot as the daemon leaves one), this measures what ``posguard run`` does before it
can take a sale: open the journal (schema, start-up checks: newest 1,024 checkpoint signatures,
the tail's hash chain), rebuild the engine (``open_guard``: snapshot, open transactions, the rules'
window, recovery) and find the last ``config_loaded``. Beside it, in the same run: a bare
``SELECT`` of every entry of that journal (what reading it all costs with no Python work), and
at the smaller sizes the old way, a restore from every entry. The journals are written in bulk
through ``Journal.append`` (settled sales in the engine's record format, ``synchronous=OFF`` while
generating only); medians of ``--runs``, warm page cache.

Targets: start-up with 1,000,000 sales under 1 s; growth from 100,000 to 1,000,000 under 2x.

usage: python -m posguard.bench.startup [--sizes 10000,100000,1000000] [--runs 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from guard.core.engine import Engine, EngineConfig
from guard.core.model import mask_pan, txn_key_hash
from guard.hostlink.iso import HostCodec, transmission_dt
from guard.hostlink.uplink import Uplink
from guard.journal.keys import DeviceKeys, init_keys
from guard.journal.store import Journal
from guard.runtime.restore import restore
from guard.runtime.service import JournalCrypto, open_guard
from guard.runtime.snapshot import Snapshotter
from posguard.bench.data import MID, PANS, T0, TID
from posguard.bench.engine import machine

SALES_PER_DAY = 2_000
FULL_RESTORE_MAX = 100_000  # the old way (every entry) is measured up to this size


def generate(path: Path, keys: DeviceKeys, sales: int, *, per_day: int = SALES_PER_DAY, seed: int = 3) -> float:
    """A live journal of ``sales`` settled sales, checkpoints every 256 entries, and the snapshot
    a daemon would have left at the end; returns the time of the last entry."""
    rng = random.Random(seed)
    step = 86_400.0 / per_day
    j = Journal.create(path, keys, terminal_id=TID, now=T0)
    j._db().execute("PRAGMA synchronous = OFF")  # generating only: a benchmark's data, not a terminal's
    engine = Engine(EngineConfig(TID, MID), JournalCrypto(j, keys.token_key))
    stan, ts, batch = 0, T0, 128  # 256 entries a commit: one checkpoint each, as at the default cadence
    try:
        for b in range(0, sales, batch):
            recs: list[tuple[str, str | None, dict[str, Any]]] = []
            hashes = []
            for i in range(b, min(sales, b + batch)):
                stan = stan % 999_999 + 1
                ts = T0 + i * step
                key = f"R1:{hashlib.sha256(f'boot:{seed}:{i}'.encode()).hexdigest()[:32]}"
                hashes.append(txn_key_hash(key))
                pan = PANS[i % len(PANS)]
                amount = rng.randrange(100, 99_999)
                recs.append(("intent", key, {
                    "kind": "SALE", "fp": hashlib.sha256(key.encode()).hexdigest()[:32], "amount": amount,
                    "currency": "978", "card_token": hashlib.sha256(pan.encode()).hexdigest()[:32],
                    "masked_pan": mask_pan(pan), "vault_ref": None, "stan": stan, "f7": transmission_dt(ts),
                    "tid": TID, "mid": MID}))
                recs.append(("outcome", key, {"state": "APPROVED", "rc": "00", "approval": f"{i % 999_999 + 1:06d}",
                                              "rrn": f"{i + 1:012d}", "reason": ""}))
            j.append(recs, now=ts)
            engine.note_archived(hashes)  # what a running daemon's key filter holds: every id journaled
        engine.last_stan = stan
        Snapshotter(engine, j, 1).write(ts)
    finally:
        j.close()
    return ts


def startup_seconds(path: Path, keys: DeviceKeys) -> tuple[float, int, int]:
    """What ``posguard run`` does before it takes a sale; (seconds, first entry replayed, entries replayed)."""
    t0 = time.perf_counter()
    svc = open_guard(path, keys, EngineConfig(TID, MID, stan_clock_floor=True),
                     Uplink("127.0.0.1", 9, HostCodec()), rng=random.Random(1))
    svc.journal.last_of_kind("config_loaded")
    dt = time.perf_counter() - t0
    snaps = svc.snapshots
    first = snaps.floor if snaps is not None else 0
    replayed = svc.journal.last_seq - first + 1
    svc.close()
    return dt, first, replayed


def bare_select_seconds(path: Path, n: int) -> float:
    import sqlite3

    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    t0 = time.perf_counter()
    rows = c.execute("SELECT seq, ts, kind, txn, payload, entry_hash, mac FROM entries ORDER BY seq LIMIT ?",
                     (n,)).fetchall()
    dt = time.perf_counter() - t0
    assert len(rows) == n
    c.close()
    return dt


def full_restore_seconds(path: Path, keys: DeviceKeys) -> float:
    j = Journal.open(path, keys, terminal_id=TID)
    t0 = time.perf_counter()
    restore(EngineConfig(TID, MID), JournalCrypto(j, keys.token_key), j, random.Random(1), snapshot=False)
    dt = time.perf_counter() - t0
    j.close()
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="sales in the live journal, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    base = Path(tempfile.mkdtemp(prefix="posguard-bench-startup-", dir=args.dir))
    keys = init_keys(base / "keys")
    print(f"machine: {machine()}")
    print(f"work dir: {base}")
    print(f"posguard from: {Path(__file__).resolve().parents[1]}")
    print(f"{'sales in live journal':>22} {'entries':>10} {'start-up (ms)':>14} {'bare SELECT all (ms)':>21} "
          f"{'ratio':>6} {'replayed':>9} {'full restore (ms)':>18} {'generate (s)':>13}")
    results: dict[int, float] = {}
    for n in sizes:
        path = base / f"journal-{n}.db"
        g0 = time.perf_counter()
        generate(path, keys, n)
        gen_s = time.perf_counter() - g0
        runs = [startup_seconds(path, keys) for _ in range(args.runs)]
        start = statistics.median(r[0] for r in runs)
        with Journal.open(path, keys, terminal_id=TID) as j:
            entries = j.last_seq
        bare = statistics.median(bare_select_seconds(path, entries) for _ in range(args.runs))
        full = f"{full_restore_seconds(path, keys) * 1e3:18.0f}" if n <= FULL_RESTORE_MAX else f"{'-':>18}"
        results[n] = start
        print(f"{n:22,} {entries:10,} {start * 1e3:14.1f} {bare * 1e3:21.1f} {start / bare:6.2f} {runs[0][2]:9,} "
              f"{full} {gen_s:13.1f}")
        path.unlink()
    ok = True
    if 1_000_000 in results:
        ok = results[1_000_000] < 1.0
        print(f"target start-up at 1,000,000 sales < 1 s: {'MET' if ok else 'NOT MET'} ({results[1_000_000]:.3f} s)")
    if 100_000 in results and 1_000_000 in results:
        growth = results[1_000_000] / results[100_000]
        print(f"target growth 100,000 -> 1,000,000 sales < 2x: {'MET' if growth < 2 else 'NOT MET'} ({growth:.2f}x)")
        ok = ok and growth < 2
    shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
