"""Benchmark the journal: verify entries/s beside the same crypto in a bare loop, and append cost.

    python -m posguard.bench.verify [--entries 100000] [--runs 5] [--appends 2000]

Prints medians (wall entries/s; CPU per entry counts the MAC worker process too). The main baseline
is the same SHA-256 chain hash and HMAC/ratchet computations over the same bytes already in memory,
in one process: the ratio is verify's rate over that crypto floor (above 1 only with the MAC worker,
which uses a second core). Append CPU excludes the COMMIT (the fsync is the physical floor, timed
separately).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import resource
import sqlite3
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


from guard.core.constants import JOURNAL_HASH_DOMAIN, JOURNAL_RATCHET_LABEL
from guard.journal.format import entry_body
from guard.journal.store import Journal
from guard.journal.keys import DeviceKeys, init_keys
from guard.journal.verify import verify_journal


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
    """Each mode's median entries/s (wall) and CPU per entry (this process + the MAC worker), then the
    baselines over the same journal: the same SHA-256 and HMAC computations in a bare loop over bytes
    already in memory (the crypto floor; ratio = our rate / it), and reading every row with one SHA-256."""
    modes: dict[str, dict[str, Any]] = {
        "chain only": {},
        "chain+MAC, 1 process": {"k0": keys.k0, "mac_worker": False},
        "chain+MAC, MAC worker": {"k0": keys.k0, "mac_worker": True},
        "chain+MAC+sigs, 1 process": {"k0": keys.k0, "public_key": keys.public_key, "mac_worker": False},
        "chain+MAC+sigs, MAC worker": {"k0": keys.k0, "public_key": keys.public_key, "mac_worker": True},
        "with k0": {"k0": keys.k0},  # the default (what `posguard journal verify --k0` does)
    }
    rates: dict[str, float] = {}
    checkpoints = 0
    for name, kw in modes.items():
        walls, cpus = [], []
        for _ in range(runs):
            c0, t = _cpu(), time.perf_counter()
            rep = verify_journal(path, **kw)
            wall, cpu = time.perf_counter() - t, _cpu() - c0
            assert rep.ok, rep
            walls.append(rep.entries / wall)
            cpus.append(cpu / rep.entries * 1e6)
            checkpoints = rep.checkpoints
        rates[name] = statistics.median(walls)
        print(f"verify {name:27s} median {rates[name]:>10,.0f} entries/s   CPU {statistics.median(cpus):5.2f} us/entry "
              f"(both processes)   runs {', '.join(f'{r:,.0f}' for r in walls)}")
    print(f"  ({checkpoints} checkpoints: signatures amortised in the +sigs modes)")
    msgs, pairs = _hashed_bytes(path)
    floor = []
    sha, label = hashlib.sha256, JOURNAL_RATCHET_LABEL
    x36, x5c = bytes(b ^ 0x36 for b in range(256)), bytes(b ^ 0x5C for b in range(256))
    p36, p5c = b"\x36" * 32, b"\x5c" * 32
    for _ in range(runs):
        t = time.perf_counter()
        assert keys.k0 is not None
        key, bad = keys.k0, 0
        for m, (h, mac) in zip(msgs, pairs):  # exactly the computations verify must do per entry, nothing else
            bad += sha(m).digest() != h
            ki, ko = key.translate(x36) + p36, key.translate(x5c) + p5c
            bad += sha(ko + sha(ki + h).digest()).digest() != mac
            key = sha(ko + sha(ki + label).digest()).digest()
        floor.append(len(msgs) / (time.perf_counter() - t))
        assert not bad
    f = statistics.median(floor)
    print(f"baseline: the same SHA-256 + HMAC/ratchet calls over the same bytes in memory, 1 process median {f:>10,.0f} /s")
    for name in ("chain+MAC, 1 process", "chain+MAC, MAC worker", "with k0"):
        print(f"  ratio verify {name} / baseline: {rates[name] / f:.2f}")
    rows = [p for (p,) in _query(path, "SELECT payload FROM entries")]
    base = []
    for _ in range(runs):
        t = time.perf_counter()
        for payload in rows:
            sha(payload.encode()).digest()
        base.append(len(rows) / (time.perf_counter() - t))
    print(f"baseline: bare SHA-256 loop over the payloads in memory median {statistics.median(base):>10,.0f} /s")
    sel = []
    for _ in range(runs):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        t = time.perf_counter()
        n = 0
        for row in conn.execute("SELECT seq, ts, kind, txn, payload, prev_hash, entry_hash, mac FROM entries"):
            sha(row[4].encode()).digest()
            n += 1
        sel.append(n / (time.perf_counter() - t))
        conn.close()
    print(f"baseline: SELECT every row + one SHA-256 median {statistics.median(sel):>10,.0f} /s")


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (the MAC worker)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _hashed_bytes(path: Path) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """Per entry, the exact bytes its entry_hash covers, and its (entry_hash, mac)."""
    msgs, pairs = [], []
    for seq, ts, kind, txn, payload, prev, h, mac in _query(
            path, "SELECT seq, ts, kind, txn, payload, prev_hash, entry_hash, mac FROM entries ORDER BY seq"):
        m = JOURNAL_HASH_DOMAIN + seq.to_bytes(8, "big") + prev + entry_body(ts, kind, txn, payload)
        assert hashlib.sha256(m).digest() == h
        msgs.append(m)
        pairs.append((h, mac))
    return msgs, pairs


def _query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return c.execute(sql).fetchall()
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

    def timed_seal(wait_s: float = 0.0) -> bool:
        t = time.perf_counter()
        ok = real_seal(wait_s)
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
    print(f"machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"SQLite {sqlite3.sqlite_version}, {ssl.OPENSSL_VERSION}; load average {os.getloadavg()[0]:.2f}")
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
