"""Memory benchmark: process RSS while sales run through the real guard.

Each sale goes through GuardService (real journal file, WAL + synchronous=FULL, real ISO 8583 codec
both ways) with HostCore in-process (``InProcessUplink`` from posguard.bench.engine). Time is
simulated (``--seconds-per-sale``, default 30 s: a busy lane) so the counter rules (whose history is
bounded by their longest window, one day by default), checkpoints and journal timestamps see a
realistic clock; every card is different so no rule declines. The in-process host keeps a ledger of every debit, which is the acquirer's memory, not the
terminal's: it is replaced by a fresh HostCore every ``--host-reset`` sales so RSS shows the guard.

Printed: the machine, VmRSS (/proc/self/status) at 0, N/2 and N sales, the engine's in-memory
containers, where the per-sale growth lives (tracemalloc over extra sales, by file and line), what
Engine.txns/by_stan keep per transaction, and what a restart costs (without a snapshot it reads the whole
journal), extrapolated to a year. Targets: RSS after 10,000 sales
<= 60 MB and growth 10,000 -> 20,000 <= 5 MB; exit status 1 if missed.

usage: python -m posguard.bench.memory [--sales 20000] [--policy off|default] [--drop-replies] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the directory that holds the packages


def status_kb(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


RSS_BEFORE_IMPORTS_KB = status_kb("VmRSS")


from posguard.bench.engine import InProcessUplink, machine

from guard.core.engine import Engine, EngineConfig
from guard.runtime.restore import restore, restore_engine
from guard.simulation.hostsim import HostCore
from guard.hostlink.iso import HostCodec
from guard.journal.store import Journal
from guard.journal.keys import init_keys
from guard.core.model import CardData, Request, TxnKind, luhn_complete
from guard.core.policies import OFF, PolicyConfig
from guard.runtime.service import JournalCrypto, open_guard

TID, MID = "MEMBENCH", "MEMBENCHMERCH01"
PROVISION = """import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from guard.journal.store import Journal
from guard.journal.keys import load_keys
Journal.create(Path(sys.argv[3]), load_keys(Path(sys.argv[2])), terminal_id=sys.argv[4], now=float(sys.argv[5])).close()
"""
T0 = 1_760_000_000.0
RSS_AT_10K_MAX_MB = 60.0
GROWTH_10K_20K_MAX_MB = 5.0
MB = 1024 * 1024


def rss_mb() -> float:
    gc.collect()
    return status_kb("VmRSS") / 1024


def luhn_pan(n: int) -> str:
    """A distinct Luhn-valid 16-digit card number per sale (so no counter rule fires)."""
    return luhn_complete(f"476173{n:09d}")


class Rig:
    """One terminal: journal file, engine, service (open_guard, as at every start), in-process host,
    simulated clock. The journal is provisioned in a child process, as on a real terminal: creating
    it imports sqlite_utils (and numpy), which a terminal's daily start never does."""

    def __init__(self, workdir: Path, policy: PolicyConfig, seconds_per_sale: float, host_reset: int,
                 drop_replies: bool = False) -> None:
        self.drop_replies = drop_replies
        self.keys = init_keys(workdir / "keys")
        self.now = T0
        path = workdir / "journal.db"
        subprocess.run([sys.executable, "-c", PROVISION, str(ROOT), str(workdir / "keys"), str(path), TID, repr(T0)],
                       check=True, timeout=120)
        self.ecfg = EngineConfig(TID, MID, policy=policy)
        self.up = InProcessUplink(self._host(), HostCodec())
        self.svc = open_guard(path, self.keys, self.ecfg, self.up,  # type: ignore[arg-type]
                              rng=random.Random(1), clock=lambda: self.now)
        self.engine, self.journal = self.svc.engine, self.svc.journal
        self.svc.execute(self.engine.on_host_up(self.now))
        self.step, self.host_reset = seconds_per_sale, host_reset
        self.sales = 0
        self.states: Counter[str] = Counter()

    def _host(self) -> HostCore:
        return HostCore(seed=1, dup_detection=True, faults={})

    def run(self, n: int, deadline: float) -> None:
        for _ in range(n):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up after {self.sales} sales (deadline)")
            i = self.sales
            if self.host_reset and i and i % self.host_reset == 0:
                self.up.core = self._host()  # the acquirer's ledger is not the terminal's memory
            self.now += self.step
            req = Request("MB", i.to_bytes(16, "big"), TxnKind.SALE, 1000 + (i % 997) * 10, "978",
                          CardData(luhn_pan(i), "2912"))
            self.svc.submit(req)
            for m in self.up.poll():
                self.svc.execute(self.engine.host_message(m.fields, self.now))
            result = self.svc.replies.pop(req.key) if self.drop_replies else self.svc.replies[req.key]
            self.states[result.state.value] += 1  # by default left in place, as the product does
            self.svc.journal.maybe_checkpoint(self.now)
            self.sales += 1

    def containers(self) -> dict[str, int]:
        e = self.engine
        out = {"Engine.txns": len(e.txns), "Engine.by_stan": len(e.by_stan),
               "GuardService.replies": len(self.svc.replies), "Engine._saf": len(e._saf)}
        if hasattr(e, "_finals"):
            out["Engine._finals"] = len(e._finals)
        h = getattr(e, "history", None)
        for name in ("_recent", "_recent_order", "_pending", "_card_windows", "_count_order"):
            if h is not None and hasattr(h, name):
                out[f"History.{name}"] = len(getattr(h, name))
        return out


def traced_keep(fn: Callable[[], Any]) -> tuple[Any, tracemalloc.Snapshot, tracemalloc.Snapshot, int]:
    """Like ``traced`` but leaves tracemalloc running (the caller stops it)."""
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    result = fn()
    gc.collect()
    after = tracemalloc.take_snapshot()
    return result, before, after, tracemalloc.get_traced_memory()[1]


def traced(fn: Callable[[], Any]) -> tuple[Any, tracemalloc.Snapshot, tracemalloc.Snapshot, int]:
    """Run ``fn`` under tracemalloc: (result, snapshot before, snapshot after, peak bytes)."""
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    result = fn()
    gc.collect()
    after = tracemalloc.take_snapshot()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, before, after, peak


def by_file(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> list[tuple[str, int]]:
    rows: Counter[str] = Counter()
    for d in after.compare_to(before, "filename"):
        name = d.traceback[0].filename
        short = str(Path(name).relative_to(ROOT)) if name.startswith(str(ROOT)) else Path(name).name
        rows[short] += d.size_diff
    return rows.most_common()


def top_lines(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int) -> list[tuple[str, int, int]]:
    out = []
    for d in after.compare_to(before, "lineno"):
        f = d.traceback[0]
        if f.filename.startswith(str(ROOT)) and d.size_diff > 0:
            out.append((f"{Path(f.filename).relative_to(ROOT)}:{f.lineno}", d.size_diff, d.count_diff))
    return sorted(out, key=lambda r: -r[1])[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sales", type=int, default=20_000, help="sales to run (RSS is read at 0, half and all)")
    ap.add_argument("--trace-sales", type=int, default=2_000, help="extra sales under tracemalloc, for attribution")
    ap.add_argument("--seconds-per-sale", type=float, default=30.0,
                    help="simulated time between sales (default 30: a busy lane, 2,880 sales a day)")
    ap.add_argument("--policy", choices=("off", "default"), default="default", help="counter rules (default: product defaults)")
    ap.add_argument("--host-reset", type=int, default=1_000, help="fresh in-process host every N sales (0: never)")
    ap.add_argument("--drop-replies", action="store_true",
                    help="remove each result from GuardService.replies once read (what a bounded replies map would do)")
    ap.add_argument("--dir", type=Path, default=None, help="directory for the journal, kept (default: a temp dir, removed)")
    ap.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    args = ap.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    base = args.dir or Path(tempfile.mkdtemp(prefix="posguard-mem-"))
    base.mkdir(parents=True, exist_ok=True)
    half = args.sales // 2

    rss0_import = rss_mb()
    rig = Rig(base, OFF if args.policy == "off" else PolicyConfig(), args.seconds_per_sale, args.host_reset,
              args.drop_replies)
    marks = [(0, rss_mb(), status_kb("VmHWM") / 1024, time.monotonic())]
    for target in (half, args.sales):
        rig.run(target - rig.sales, deadline)
        marks.append((rig.sales, rss_mb(), status_kb("VmHWM") / 1024, time.monotonic()))
    containers = rig.containers()

    # Where does per-sale memory go? More sales under tracemalloc (after the RSS readings).
    first = rig.sales
    n_replies_end = len(rig.svc.replies)
    _, b, a, _ = traced_keep(lambda: rig.run(args.trace_sales, deadline))
    files = by_file(b, a)
    lines = top_lines(b, a, 8)
    # What GuardService.replies keeps per sale: free the entries made while tracing, see what goes.
    traced_now = tracemalloc.get_traced_memory()[0]
    for i in range(first, rig.sales):
        rig.svc.replies.pop(f"MB:{i.to_bytes(16, 'big').hex()}", None)
    gc.collect()
    per_reply = (traced_now - tracemalloc.get_traced_memory()[0]) / max(1, rig.sales - first)
    tracemalloc.stop()
    rig.svc.close()

    # A restart from every journal entry (no snapshot): time (untraced), then memory; and from
    # the daemon's newest snapshot, as ``posguard run`` does.
    j = Journal.open(base / "journal.db", rig.keys, terminal_id=TID)
    crypto = JournalCrypto(j, rig.keys.token_key)
    t0 = time.perf_counter()
    restore_engine(rig.ecfg, crypto, j, snapshot=False)
    restore_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, snap_from = restore(rig.ecfg, crypto, j)
    snap_s = time.perf_counter() - t0
    gc.collect()
    tracemalloc.start(1)
    restored = restore_engine(rig.ecfg, crypto, j, snapshot=False)
    restored.history.prune(rig.now)  # restore prunes every 4096 entries; the next sale would prune the rest
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    n_txns = len(restored.txns)
    restored.txns.clear()  # what only the per-transaction maps keep alive
    restored.by_stan.clear()
    gc.collect()
    per_txn = (held - tracemalloc.get_traced_memory()[0]) / max(1, n_txns)
    tracemalloc.stop()
    entries = j.last_seq
    j.close()
    db_mb = sum(p.stat().st_size for p in base.glob("journal.db*")) / MB

    rss_half, rss_end = marks[1][1], marks[2][1]
    growth = rss_end - rss_half
    per_sale_rss = growth * MB / max(1, args.sales - half)
    total_traced = sum(s for _, s in files)
    host_bytes = sum(s for f, s in files if f == "guard/hostsim.py")
    print(f"machine: {machine()}")
    print(f"journal: {base} ({db_mb:.1f} MB after {rig.sales} sales, {entries} entries); policy={args.policy}; "
          f"{args.seconds_per_sale:g} s simulated per sale; host ledger reset every {args.host_reset} sales"
          + ("; results dropped from GuardService.replies once read" if args.drop_replies else ""))
    print(f"outcomes: {dict(rig.states)}")
    print(f"RSS: interpreter {RSS_BEFORE_IMPORTS_KB / 1024:.1f} MB; after imports (guard, cryptography, iso8583, "
          f"host simulator) {rss0_import:.1f} MB; sqlite_utils imported: {'sqlite_utils' in sys.modules}")
    print(f"{'sales':>8} {'VmRSS MB':>9} {'VmHWM MB':>9} {'wall s':>7}")
    for n, rss, hwm, t in marks:
        print(f"{n:>8} {rss:9.1f} {hwm:9.1f} {t - marks[0][3]:7.1f}")
    print(f"RSS growth {half} -> {args.sales}: {growth:.2f} MB = {per_sale_rss:.0f} bytes/sale")
    print("engine containers after the run: " + ", ".join(f"{k}={v}" for k, v in containers.items()))
    print(f"tracemalloc over {args.trace_sales} more sales: {total_traced / args.trace_sales:.0f} bytes/sale allocated "
          f"and still alive ({host_bytes / args.trace_sales:.0f} of them the simulated host's ledger). Bounded "
          "structures that recycle (rule windows, evicted transactions) show here too; RSS growth is the leak "
          "measure. Allocated in:")
    for f, s in files[:8]:
        print(f"  {f:40} {s / args.trace_sales:8.0f} bytes/sale")
    for where, size, count in lines:
        print(f"  {where:40} {size / args.trace_sales:8.0f} bytes/sale ({count / args.trace_sales:.1f} objects/sale)")
    keep = getattr(rig.ecfg, "keep_final", None)
    print(f"Engine.txns + Engine.by_stan: {per_txn:.0f} bytes per transaction held (measured by clearing them after "
          f"a restore); {n_txns} held after {rig.sales} sales"
          + (f" (keep_final={keep}: at most {per_txn * keep / MB:.1f} MB)" if keep else " (no cap: grows forever)"))
    replies_unbounded = not args.drop_replies and n_replies_end >= first
    if args.drop_replies:
        print("GuardService.replies: emptied after every sale by --drop-replies")
    elif not replies_unbounded:
        print(f"GuardService.replies: bounded ({n_replies_end} results kept after {first} sales)")
    else:
        print(f"GuardService.replies: {n_replies_end + rig.sales - first} results, {per_reply:.0f} bytes each "
              f"(Result objects and the strings they keep), never removed: {per_reply * 10_000 / MB:.1f} MB per 10,000 sales")
    per_sale_s = restore_s / max(1, rig.sales)
    print(f"restart without a snapshot: restore reads all {entries} entries: {restore_s:.2f} s "
          f"({per_sale_s * 1e6:.0f} us per sale in the journal), {held / MB:.1f} MB held after it")
    print(f"restart from the daemon's snapshot: {snap_s:.2f} s, reads {entries - snap_from + 1 if snap_from else entries} "
          "entries (the counter rules' window and what is open; posguard.bench.startup: 10k to 1M sales)")
    for per_day in (500, 2_000):
        year = per_day * 365
        print(f"  without snapshots, at {per_day} sales/day after a year a restart would read {year:,} sales "
              f"(~{per_sale_s * year:.0f} s)"
              + (f"; GuardService.replies ~{per_reply * year / MB:.0f} MB if the process ran all year"
                 if replies_unbounded else ""))
    ok_rss = rss_half <= RSS_AT_10K_MAX_MB if half == 10_000 else None
    ok_growth = growth <= GROWTH_10K_20K_MAX_MB * (args.sales - half) / 10_000
    print(f"target RSS after {half} sales <= {RSS_AT_10K_MAX_MB:.0f} MB: "
          f"{'n/a (run 20000 sales)' if ok_rss is None else 'MET' if ok_rss else 'NOT MET'} ({rss_half:.1f} MB)")
    print(f"target growth {half} -> {args.sales} <= {GROWTH_10K_20K_MAX_MB * (args.sales - half) / 10_000:.1f} MB: "
          f"{'MET' if ok_growth else 'NOT MET'} ({growth:.2f} MB)")
    if args.dir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok_growth and ok_rss is not False else 1


if __name__ == "__main__":
    sys.exit(main())
