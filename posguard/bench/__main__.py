"""Every benchmark of the project in one command (``posguard bench``), and one table of medians and ratios.

Each benchmark is its own module of ``posguard.bench`` (run in a child process with the same
Python, so its baseline is measured in the same run as its subject); this collects their key
lines into one table with the machine description, and keeps the full outputs in --out
(default: a temp dir) for the details. They ship with the package: no source checkout needed.

A benchmark whose prerequisites are missing (fleet: psycopg and the PostgreSQL server binaries)
prints "skipped: why" and shows as skipped.

usage: posguard bench [--quick] [--only startup,engine] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = Path(__file__).resolve().parents[2]  # the directory holding posguard/, guard/, firmware_bridge/

# (module of posguard.bench, args, quick args, [(label, regex with one group per printed value)])
BENCHES: list[tuple[str, list[str], list[str], list[tuple[str, str]]]] = [
    ("startup", [], ["--sizes", "10000,100000", "--runs", "1"], [
        ("start-up, 10,000 sales in the live journal, ms", r"^\s+10,000\s+[\d,]+\s+([\d.]+)"),
        ("start-up, 100,000 sales, ms", r"^\s+100,000\s+[\d,]+\s+([\d.]+)"),
        ("  bare SELECT of those 100,000 sales' entries, ms", r"^\s+100,000\s+[\d,]+\s+[\d.]+\s+([\d.]+)"),
        ("start-up, 1,000,000 sales, ms", r"^\s+1,000,000\s+[\d,]+\s+([\d.]+)"),
        ("  bare SELECT of those 1,000,000 sales' entries, ms", r"^\s+1,000,000\s+[\d,]+\s+[\d.]+\s+([\d.]+)"),
        ("start-up growth 100,000 -> 1,000,000 sales", r"< 2x: \w+ \(([\d.]+x)\)"),
    ]),
    ("retention", ["--sales", "60000", "--days", "30"], ["--sales", "800", "--days", "5", "--retain-days", "1"], [
        ("retention cuts: median round, ms", r"retention cut round, ms \(median\)\s+([\d.]+)"),
        ("longest pause a sale could see from retention, ms", r"longest pause a sale could see from retention \(ms\)\s+([\d.]+)"),
        ("  median sale, wall ms (same run)", r"sale, wall \(ms, median\)\s+([\d.]+)"),
        ("  live journal data, max MB", r"live journal data, max \(MB\)\s+([\d.]+)"),
        ("  verify-chain over archives + live", r"verify-chain over \d+ archives \+ live: (\w+)"),
    ]),
    ("engine", ["--sales", "2000", "--history", "100000"], ["--sales", "300", "--history", "20000"], [
        ("sale through guard, wall ms (median)", r"sale through guard, wall \(ms\)\s+([\d.]+)"),
        ("two bare WAL+FULL commits, wall ms (median)", r"two bare WAL\+FULL commits, wall \(ms\)\s+([\d.]+)"),
        ("ratio sale / two bare commits", r"ratio sale / two bare commits\s+([\d.]+)"),
        ("durable commits per sale (counted)", r"durable commits per sale \(counted\)\s+(\S+)"),
        ("guard CPU per sale excl. SQLite, ms (median)", r"guard CPU per sale excl. SQLite txns \(ms\)\s+([\d.]+)"),
        ("journal bytes per sale", r"journal bytes per sale \(db\+wal\)\s+([\d.]+)"),
        ("policy cost ratio on/off over 100k past sales (CPU)", r"policy cost ratio \(on / off, guard CPU\)\s+([\d.]+)"),
        ("idle daemon loop round, 5,000 final txns in memory, ms", r"idle loop round, 5,000 final txns in memory \(ms\)\s+([\d.]+)"),
        ("  one full scan over those txns (the old per-round cost x4), ms", r"one scan over those 5,000 txns \(ms\)\s+([\d.]+)"),
    ]),
    ("latency", ["--sales", "300"], ["--sales", "60"], [
        ("AUTH frame transmission at 115200, ms", r"serial transmission at 115200 8N1: ([\d.]+) ms"),
        ("link encode+decode per AUTH frame, ms", r"link encode\+decode per AUTH frame \(ms\)\s+([\d.]+)"),
        ("last AUTH byte -> first 0200 byte incl. fsync, ms (median)", r"incl. fsync \(ms\)\s+([\d.]+)"),
        ("same, minus the intent commit, ms (median)", r"minus the intent commit \(ms\)\s+([\d.]+)"),
        ("ratio added latency / frame transmission", r"/ frame transmission\s+([\d.]+)"),
    ]),
    ("verify", [], ["--entries", "20000", "--runs", "3"], [
        ("verify with k0 (chain + MAC), entries/s", r"verify (?:with k0|chain\+mac)\S*\s+median\s+([\d,]+)"),
        ("baseline: SELECT every row + one SHA-256, /s", r"SELECT every row \+ one SHA-256 median\s+([\d,]+)"),
    ]),
    ("memory", [], ["--sales", "4000"], [
        ("daemon RSS after 10,000 sales, MB", r"target RSS after \d+ sales <= 60 MB: \w+ \(([\d.]+) MB\)"),
        ("RSS growth 10,000 -> 20,000 sales, MB", r"target growth \d+ -> \d+ <= 5.0 MB: \w+ \(([\d.]+) MB\)"),
    ]),
    ("fleet", [], ["--quick"], [
        ("fleet ingest (verify, COPY, states), entries/s (median)", r"^ingest \+ verify \+ states, entries/s\s+([\d,]+)"),
        ("  bare COPY of the same rows, entries/s (median)", r"^bare COPY, entries/s\s+([\d,]+)"),
        ("ratio fleet ingest / bare COPY", r"^ratio ingest \(all\) / bare COPY\s+([\d.]+)"),
        ("fleet verify of new entries, entries/s", r"^fleet verify of new entries, entries/s\s+([\d,]+)"),
        ("fleet reconcile of the settlement rows, s", r"^reconcile [\d,]+ settlement rows vs [\d,]+ sales, s\s+([\d.]+)"),
    ]),
    ("ops", ["--runs", "3"], ["--runs", "1", "--entries-sales", "10000", "--backlog", "1000", "--wide-window", "0"], [
        ("verify chain+MAC, entries/s", r"verify chain\+MAC \(entries/s\)\s+([\d,]+)"),
        ("replay backlog, window 32, items/s", r"replay \d+ backlog, window 32 \(items/s\)\s+([\d,]+)"),
        ("replay / host simulator max rate", r"replay \d+ backlog, window 32 \(items/s\)\s+[\d,]+\s+([\d.]+x)"),
        ("journal bytes per sale", r"journal bytes per sale\s+([\d,]+)"),
    ]),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller runs (a smoke test of the benchmarks)")
    ap.add_argument("--out", type=Path, default=None, help="directory for each benchmark's full output")
    ap.add_argument("--only", default="", help="comma-separated benchmarks to run: " + ", ".join(b[0] for b in BENCHES))
    args = ap.parse_args(argv)
    only = {x for x in args.only.split(",") if x}
    unknown = only - {b[0] for b in BENCHES}
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    out = args.out or Path(tempfile.mkdtemp(prefix="posguard-bench-all-"))
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    machine = ""
    failed = 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(PACKAGES), os.environ.get("PYTHONPATH", "")) if p))
    for name, full, quick, metrics in BENCHES:
        if only and name not in only:
            continue
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", f"posguard.bench.{name}", *(quick if args.quick else full)],
                              capture_output=True, text=True, timeout=3600, env=env)
        failed += proc.returncode != 0
        text = proc.stdout + proc.stderr
        (out / f"{name}.txt").write_text(text)
        m = re.search(r"machine: (.+)", text)
        machine = machine or (m.group(1).strip() if m else "")
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        if proc.returncode == 0 and re.search(r"^skipped: ", text, re.MULTILINE):
            status = "skipped"  # e.g. fleet without PostgreSQL
        rows.append((f"{name} ({time.monotonic() - t0:.0f} s, {status})", "", ""))
        for label, rx in metrics:
            hit = re.search(rx, text, re.MULTILINE)
            rows.append(("  " + label, hit.group(1) if hit else "n/a", ""))
    print(f"machine: {machine}")
    print(f"full outputs: {out}")
    width = max(len(r[0]) for r in rows) + 2
    for name, value, _ in rows:
        print(f"{name:<{width}} {value:>14}")
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
