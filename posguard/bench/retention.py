"""A daemon left running for a simulated month or year with automatic retention (and the soak test's driver).

The real ``GuardService`` (open_guard, executor, journal, snapshots, retention) takes ``--sales``
sales over ``--days`` simulated days (12 opening hours a day, the loop running through the night)
from an in-process host (the clock is simulated, the
journal and its fsyncs are real unless ``--no-fsync``). Between two sales the loop runs one round
(``step``): checkpoints, deposits, snapshots, retention. Printed: how often retention ran, the
longest loop round it took (the longest a sale arriving then would wait) beside the median sale,
the live journal's largest size against its budget, the archives, and whether ``verify-chain``
passes over archives + live file (with k0 and the public key). Sizing from the environment for
the soak: POSGUARD_SOAK_SALES, POSGUARD_SOAK_DAYS.

Targets: no retention round over 50 ms; live journal data under ``--max-live-mb``; verify-chain ok.

usage: python -m posguard.bench.retention [--sales 700000] [--days 365] [--retain-days 2] [--max-live-mb 16]
                                          [--no-fsync] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard.core.engine import EngineConfig
from guard.core.model import CardData, Request, TxnKind, luhn_complete
from guard.hostlink.iso import HostCodec
from guard.journal.keys import init_keys, load_keys
from guard.ops.compact import archives_in, journal_bytes, verify_chain
from guard.runtime.retention import DAY_S, Cut, Retention, RetentionConfig
from guard.runtime.service import open_guard
from guard.simulation.hostsim import HostCore
from posguard.bench.data import MID, T0, TID
from posguard.bench.engine import InProcessUplink, machine

MB = 1024 * 1024
OPEN_HOURS_S = 12 * 3600.0  # the shop sells 12 hours a day; retention's cut waits for an idle minute


def luhn_pan(n: int) -> str:
    """A distinct Luhn-valid card number per sale (no counter rule fires)."""
    return luhn_complete(f"476173{n % 10**9:09d}")


@dataclass
class SoakResult:
    sales: int
    runs: int
    pauses: list[float]
    slices: list[float]
    sale_walls: list[float]
    max_live_data: int
    max_live_file: int
    archives: list[Path]
    chain_ok: bool
    snapshots: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    confirmed_seq: int = 0  # the newest checkpoint the host confirmed (archives before it may go)
    deleted: int = 0  # archives deleted (older than keep_days, covered by a deposited checkpoint)
    states: dict[str, int] = field(default_factory=dict)
    cuts: list[Cut] = field(default_factory=list)  # each cut round's parts


def soak(base: Path, sales: int, days: float, *, retain_days: float = 2.0, max_live_mb: float = 16.0,
         fsync: bool = True, keep_days: float = 0.0, verify: bool = True, deposits: bool = True,
         open_hours_s: float = OPEN_HOURS_S) -> SoakResult:
    """Run the daemon for ``days`` simulated days with ``sales`` sales (module docstring)."""
    base.mkdir(parents=True, exist_ok=True)
    keys = init_keys(base / "keys")
    path = base / "journal.db"
    now = [T0]
    up = InProcessUplink(HostCore(seed=1, dup_detection=True, faults={}), HostCodec())
    svc = open_guard(path, keys, EngineConfig(TID, MID), up, rng=random.Random(1),  # type: ignore[arg-type]
                     clock=lambda: now[0], deposit_checkpoints=deposits)
    if not fsync:
        svc.journal._db().execute("PRAGMA synchronous = OFF")  # a soak's shortcut: retention's logic is the same
    cfg = RetentionConfig(retain_s=retain_days * DAY_S, max_live_bytes=int(max_live_mb * MB),
                          archive_dir=base / "archive", archive_keep_s=keep_days * DAY_S)
    ret = Retention(svc, cfg)
    svc.retention = ret
    eng = svc.engine
    svc.execute(eng.on_host_up(now[0]))
    walls: list[float] = []
    max_data = max_file = 0
    states: dict[str, int] = {}

    def feed() -> None:
        for m in up.poll():
            svc.execute(eng.host_message(m.fields, now[0]))

    per_day = max(1, round(sales / days))
    gap = open_hours_s / per_day  # sales during opening hours; the loop keeps running at night
    try:
        for i in range(sales):
            if i and i % per_day == 0:  # closing time: the night passes, one loop round every 10 minutes
                night_end = now[0] + DAY_S - open_hours_s
                while now[0] < night_end:
                    now[0] += 600.0
                    svc.step(0.0)
                    feed()
            now[0] += gap / 2
            svc.step(0.0)  # the loop round between two sales
            feed()
            now[0] += gap / 2
            req = Request("SK", i.to_bytes(16, "big"), TxnKind.SALE, 1000 + (i % 997) * 10, "978",
                          CardData(luhn_pan(i), "2912"))
            t0 = time.perf_counter()
            svc.submit(req)
            feed()
            walls.append(time.perf_counter() - t0)
            st = svc.replies.pop(req.key).state.value
            states[st] = states.get(st, 0) + 1
            if i % 500 == 0:
                max_data = max(max_data, ret.live_data_bytes())
                max_file = max(max_file, journal_bytes(path))
        svc.step(0.0)
        max_data = max(max_data, ret.live_data_bytes())
        max_file = max(max_file, journal_bytes(path))
    finally:
        svc.close()
    archives = archives_in(base / "archive", path.stem)
    ok, problems = True, []
    if verify:
        k = load_keys(base / "keys")
        rep = verify_chain([*archives, path], k0=k.k0, public_keys=[k.signing_key.public_key()])
        ok, problems = rep.ok, rep.problems + [f"{f.path.name}: {f.report.reason}" for f in rep.files if not f.report.ok]
    snaps = svc.snapshots.seconds if svc.snapshots is not None else []
    return SoakResult(sales, ret.runs, ret.pauses, ret.slices, walls, max_data, max_file, archives, ok,
                      problems=problems, states=states, snapshots=snaps, confirmed_seq=ret.confirmed_seq,
                      deleted=ret.deleted, cuts=ret.cuts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sales", type=int, default=int(os.environ.get("POSGUARD_SOAK_SALES", 700_000)))
    ap.add_argument("--days", type=float, default=float(os.environ.get("POSGUARD_SOAK_DAYS", 365)))
    ap.add_argument("--retain-days", type=float, default=2.0)
    ap.add_argument("--max-live-mb", type=float, default=16.0)
    ap.add_argument("--no-fsync", action="store_true", help="synchronous=OFF for the soak (pauses then exclude fsync)")
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="posguard-bench-retention-", dir=args.dir))
    print(f"machine: {machine()}")
    print(f"work dir: {base}; {args.sales:,} sales over {args.days:g} simulated days, retain {args.retain_days:g} days, "
          f"budget {args.max_live_mb:g} MB, fsync {'off' if args.no_fsync else 'on'}")
    t0 = time.monotonic()
    r = soak(base, args.sales, args.days, retain_days=args.retain_days, max_live_mb=args.max_live_mb,
             fsync=not args.no_fsync)
    longest = max([*r.pauses, *r.slices], default=0.0)
    print(f"retention runs: {r.runs}; archives: {len(r.archives)}; wall {time.monotonic() - t0:.0f} s; states {r.states}")
    print(f"{'sale, wall (ms, median)':52} {statistics.median(r.sale_walls) * 1e3:9.3f}")
    print(f"{'sale, wall (ms, max)':52} {max(r.sale_walls) * 1e3:9.3f}")
    print(f"{'retention cut round, ms (median)':52} {statistics.median(r.pauses or [0]) * 1e3:9.3f}")
    print(f"{'retention cut round, ms (max)':52} {max(r.pauses or [0]) * 1e3:9.3f}")
    if r.cuts:
        seal, restart = [c.seal_s * 1e3 for c in r.cuts], [c.restart_s * 1e3 for c in r.cuts]
        print(f"{'  seal + archive in place, ms (median / max)':52} {statistics.median(seal):9.3f} / {max(seal):.3f}")
        print(f"{'  live restart, ms (median / max)':52} {statistics.median(restart):9.3f} / {max(restart):.3f}")
        print(f"{'  entries archived / carried a cut (median)':52} {statistics.median(c.archived for c in r.cuts):9.0f} / "
              f"{statistics.median(c.carried for c in r.cuts):.0f}")
        per = [c.restart_s * 1e6 / c.carried for c in r.cuts if c.carried]
        print(f"{'  live restart per carried entry, us (median)':52} {statistics.median(per or [0]):9.1f}")
    print(f"{'longest pause a sale could see from retention (ms)':52} {longest * 1e3:9.3f}")
    print(f"{'archive copy slice, ms (median)':52} {statistics.median(r.slices or [0]) * 1e3:9.3f}")
    print(f"{'snapshot commit, ms (median / max)':52} {statistics.median(r.snapshots or [0]) * 1e3:9.3f} / "
          f"{max(r.snapshots or [0]) * 1e3:.3f} ({len(r.snapshots)} snapshots)")
    print(f"{'live journal data, max (MB)':52} {r.max_live_data / MB:9.2f}  budget {args.max_live_mb:g}")
    print(f"{'live journal file + WAL, max (MB)':52} {r.max_live_file / MB:9.2f}")
    print(f"verify-chain over {len(r.archives)} archives + live: {'ok' if r.chain_ok else 'FAILED ' + '; '.join(r.problems[:3])}")
    ok = r.chain_ok and longest < 0.05 and r.max_live_data <= args.max_live_mb * MB
    print(f"target longest retention pause < 50 ms: {'MET' if longest < 0.05 else 'NOT MET'} ({longest * 1e3:.1f} ms)")
    shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
