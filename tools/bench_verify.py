"""Benchmark the journal: verify entries/s against a bare SHA-256 loop, and append cost.

    python tools/bench_verify.py [--entries 100000] [--runs 5] [--appends 2000]

Prints medians. Append CPU excludes the COMMIT (the fsync is the physical floor, timed separately).
"""

from __future__ import annotations

import argparse
import hashlib
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guard.journal import Journal
from guard.keys import DeviceKeys, init_keys
from guard.verify import verify_journal


def _payload(i: int) -> dict[str, object]:
    return {"amount": 1234 + i % 97, "currency": "978", "card_token": f"{i:032x}", "masked_pan": "411111******1111",
            "stan": i % 999_999, "vault_ref": f"{i:064x}", "state": "JOURNALED"}


def build(path: Path, keys_dir: Path, n: int) -> tuple[Journal, DeviceKeys]:
    keys = init_keys(keys_dir)
    j = Journal.create(path, keys, terminal_id="BENCH001", now=1_700_000_000.0)
    batch = 1000
    for b in range(0, n, batch):
        recs = [("intent", f"R1:{i:032x}", _payload(i)) for i in range(b, min(n, b + batch))]
        j.append(recs, now=1_700_000_000.0 + b)
    return j, keys


def bench_verify(path: Path, keys: DeviceKeys, runs: int) -> None:
    rows = [r for r in _rows(path)]
    modes = {"chain only": {}, "chain+MAC": {"k0": keys.k0},
             "chain+MAC+sigs": {"k0": keys.k0, "public_key": keys.public_key}}
    for name, kw in modes.items():
        rates = []
        for _ in range(runs):
            t = time.perf_counter()
            rep = verify_journal(path, **kw)  # type: ignore[arg-type]
            rates.append(rep.entries / (time.perf_counter() - t))
            assert rep.ok, rep
        print(f"verify {name:15s} median {statistics.median(rates):>10,.0f} entries/s")
    base = []
    sha = hashlib.sha256
    for _ in range(runs):
        t = time.perf_counter()
        for payload in rows:
            sha(payload).digest()
        base.append(len(rows) / (time.perf_counter() - t))
    print(f"baseline: bare SHA-256 loop over the payloads in memory median {statistics.median(base):>10,.0f} /s")
    floor = []
    for _ in range(runs):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        t = time.perf_counter()
        n = 0
        for row in conn.execute("SELECT seq, ts, kind, txn, payload, prev_hash, entry_hash, mac FROM entries"):
            sha(row[4].encode()).digest()
            n += 1
        floor.append(n / (time.perf_counter() - t))
        conn.close()
    print(f"baseline: SELECT every row + one SHA-256 median {statistics.median(floor):>10,.0f} /s")


def _rows(path: Path) -> list[bytes]:
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [p.encode() for (p,) in c.execute("SELECT payload FROM entries")]
    finally:
        c.close()


def bench_append(j: Journal, n: int) -> None:
    """Real appends (fsync and all): COMMIT and the WAL seal after checkpoints are timed apart."""
    commit_s: list[float] = []
    commit_cpu: list[float] = []
    seal_s: list[float] = []
    real_commit, real_seal = j._commit, j.seal_wal

    def timed_commit(cur: sqlite3.Cursor) -> None:
        t, c = time.perf_counter(), time.process_time()
        real_commit(cur)
        commit_s.append(time.perf_counter() - t)
        commit_cpu.append(time.process_time() - c)

    def timed_seal() -> bool:
        t = time.perf_counter()
        ok = real_seal()
        seal_s.append(time.perf_counter() - t)
        return ok

    j._commit = timed_commit  # type: ignore[method-assign]
    j.seal_wal = timed_seal  # type: ignore[method-assign]
    total, cpu = [], []
    now = 1_800_000_000.0
    for i in range(n):
        blob = j.seal_vault(f"R1:{i:032x}", b"4111111111111111|2512")
        p = _payload(i) | {"vault_ref": blob.ref}
        t, c = time.perf_counter(), time.process_time()
        j.append([("intent", f"R1:{i:032x}", p)], now=now + i * 0.001, vault_put=[blob])
        total.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    med = statistics.median
    cpu_ex = [t - c for t, c in zip(cpu, commit_cpu)]
    print(f"append 1 record + vault, real ({n}): wall {med(total) * 1e6:.0f} us, COMMIT {med(commit_s) * 1e6:.0f} us, "
          f"CPU excluding COMMIT {med(cpu_ex) * 1e6:.0f} us median / {statistics.fmean(cpu_ex) * 1e6:.0f} us mean; "
          f"{len(seal_s)} WAL seals {med(seal_s or [0]) * 1e3:.1f} ms median")


def bench_append_warm(j: Journal, n: int) -> None:
    """CPU of append alone: COMMIT replaced by ROLLBACK, so no fsync evicts the caches in between."""
    def rollback(cur: sqlite3.Cursor) -> None:
        cur.execute("ROLLBACK")

    j._commit = rollback  # type: ignore[method-assign]
    j.wal_truncate_on_checkpoint = False
    blob = j.seal_vault("R1:warm", b"4111111111111111|2512")
    recs = [("intent", "R1:warm", _payload(1) | {"vault_ref": blob.ref})]
    cpu = []
    for i in range(n):
        c = time.process_time()
        j.append(recs, now=1_800_000_000.0 + i, vault_put=[blob])
        cpu.append(time.process_time() - c)
    print(f"append 1 record + vault, warm ({n}, COMMIT -> ROLLBACK): CPU {statistics.median(cpu) * 1e6:.0f} us median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--appends", type=int, default=2000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.db"
        j, keys = build(path, Path(d) / "keys", a.entries)
        bench_append(j, a.appends)
        j.close()
        warm, _ = build(Path(d) / "warm.db", Path(d) / "keys2", 0)
        bench_append_warm(warm, a.appends)
        warm.close()
        bench_verify(path, keys, a.runs)


if __name__ == "__main__":
    main()
