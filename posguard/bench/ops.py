"""Benchmark the operator commands, each beside a baseline measured in the same run (medians).

1. verify: entries/s of chain + MAC verification (guard.journal.verify) of a journal of engine-format
   sales, beside a bare SHA-256 loop over exactly the bytes each entry hash covers (in memory).
   Target >= 100,000 entries/s.
2. replay: items/s draining a 5,000-item reversal backlog (left by an outage: answers lost after
   the host debited, requests lost before it saw them) against HostServer on 127.0.0.1 in its
   own process, pipelined (--window), beside the host simulator's own maximum rate: the same
   5,000 reversals pre-encoded and pipelined to a fresh copy of the same host by a bare client.
   Target >= 1,000 items/s.
3. journal bytes per sale: a journal written by GuardService (one commit per action, real ISO
   8583 codec, in-process host), file size after close / sales. Target <= 1 KB.

usage: python -m posguard.bench.ops [--runs 5] [--entries-sales 50000] [--backlog 5000] [--window 32]
                                [--wide-window 128] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import random
import shutil
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from posguard.bench.data import MID, TID, Gen, bulk_journal

from guard.core import constants as C
from guard.core.engine import EngineConfig
from guard.ops.export import load_view
from guard.simulation.hostsim import HostCore
from guard.simulation.hostserver import HostServer
from guard.hostlink.iso import HostCodec, field90
from guard.journal.keys import init_keys, load_keys
from guard.core.policies import OFF
from guard.ops.replay import open_replay, run_replay
from guard.hostlink.uplink import Uplink
from guard.journal.verify import verify_journal

med = statistics.median


# --- 1. verify -------------------------------------------------------------------------------


def bench_verify(base: Path, sales: int, runs: int) -> dict[str, float]:
    keys = init_keys(base / "vkeys")
    path = base / "verify.db"
    bulk_journal(path, keys, sales)
    c = sqlite3.connect(path)
    covered = [C.JOURNAL_HASH_DOMAIN + seq.to_bytes(8, "big") + prev +
               f'{{"kind":{_enc(kind)},"payload":{payload},"ts":{ts!r},"txn":{"null" if txn is None else _enc(txn)}}}'.encode()
               for seq, ts, kind, txn, payload, prev in c.execute(
                   "SELECT seq, ts, kind, txn, payload, prev_hash FROM entries ORDER BY seq")]
    c.close()
    n = len(covered)
    rates, base_rates = [], []
    sha = hashlib.sha256
    for _ in range(runs):
        t = time.perf_counter()
        rep = verify_journal(path, k0=keys.k0)
        rates.append(rep.entries / (time.perf_counter() - t))
        assert rep.ok and rep.entries == n, rep
        t = time.perf_counter()
        for b in covered:
            sha(b).digest()
        base_rates.append(n / (time.perf_counter() - t))
    return {"entries": n, "verify": med(rates), "sha": med(base_rates)}


def _enc(s: str) -> str:
    import json

    return json.encoder.encode_basestring_ascii(s)


# --- 2. replay against HostServer in its own process -----------------------------------------


def _serve(core: HostCore, conn: Any) -> None:
    server = HostServer(core, HostCodec())
    conn.send(server.start())
    conn.recv()  # until told to stop
    server.stop()


class HostProcess:
    """A fork of ``core`` (with its ledger) served by HostServer on 127.0.0.1 in a child process."""

    def __init__(self, core: HostCore) -> None:
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(core, child), daemon=True)
        self.proc.start()
        self.port = int(self.conn.recv())

    def stop(self) -> None:
        self.conn.send("stop")
        self.proc.join(10)


def make_backlog(base: Path, n: int) -> tuple[Path, HostCore]:
    core = HostCore(seed=1, dup_detection=True)
    g = Gen(base / "backlog", core)
    g.host_up()
    g.sales(n // 2, respond=False)
    g.sales(n - n // 2, respond=False, process=False)
    g.host_down()
    g.close()
    return g.path, core


def reversal_frames(path: Path) -> list[bytes]:
    """The 0400 the replay will send for each pending sale, encoded (no PAN: the host needs none)."""
    import json

    codec = HostCodec()
    pending = {k for k, t in load_view(path).txns.items() if t.state == "REVERSAL_PENDING"}
    out = []
    c = sqlite3.connect(path)
    try:
        for txn, payload in c.execute("SELECT txn, payload FROM entries WHERE kind = 'intent' ORDER BY seq"):
            if txn not in pending:
                continue
            p = json.loads(payload)
            stan, f7 = f"{p['stan']:06d}", p["f7"]
            out.append(codec.encode({"t": "0400", "3": "000000", "4": f"{p['amount']:012d}", "7": f7, "11": stan,
                                     "41": TID, "42": MID, "49": p["currency"], "90": field90("0200", stan, f7)}))
    finally:
        c.close()
    return out


def pipelined_client(port: int, frames: list[bytes], window: int) -> float:
    """Send ``frames`` keeping up to ``window`` unanswered; returns answers per second."""
    dec = HostCodec().decoder()
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sent = got = 0
    t = time.perf_counter()
    while got < len(frames):
        if sent < len(frames) and sent - got < window:
            k = min(window - (sent - got), len(frames) - sent)
            s.sendall(b"".join(frames[sent:sent + k]))
            sent += k
        data = s.recv(65536)
        if not data:
            raise RuntimeError("host closed the connection")
        got += len(dec.feed(data))
    rate = len(frames) / (time.perf_counter() - t)
    s.close()
    return rate


def bench_replay(base: Path, n: int, window: int, runs: int) -> dict[str, float]:
    src, core = make_backlog(base, n)
    keys = load_keys(src.parent / "keys")
    frames = reversal_frames(src)
    assert len(frames) == n, len(frames)
    rates, host_rates, commits = [], [], []
    for r in range(runs):
        host = HostProcess(core)
        try:
            host_rates.append(pipelined_client(host.port, frames, max(window, 256)))
        finally:
            host.stop()
        d = base / f"replay{r}"
        shutil.copytree(src.parent, d)
        host = HostProcess(core)
        try:
            ecfg = EngineConfig(TID, MID, policy=OFF, saf_window=window)
            svc = open_replay(d / "journal.db", keys, ecfg, Uplink("127.0.0.1", host.port, HostCodec()),
                              rng=random.Random(r))
            c0 = svc.journal.commit_count
            rep = run_replay(svc, timeout=300)
            commits.append(svc.journal.commit_count - c0)
            svc.close()
        finally:
            host.stop()
        assert len(rep.reversed) == n and not rep.pending, rep.to_json()
        rates.append(rep.rate)
    return {"replay": med(rates), "host": med(host_rates), "commits": med(commits)}


# --- 3. journal bytes per sale -------------------------------------------------------------------


def bench_bytes(base: Path, sales: int, runs: int) -> dict[str, float]:
    from posguard.bench.engine import run as engine_run  # GuardService, one commit per action

    sizes = []
    for r in range(runs):
        d = base / f"bytes{r}"
        d.mkdir()
        res = engine_run(sales, d)
        sizes.append(res["db_bytes"] / (sales + 20))
    return {"bytes": med(sizes)}


# --- main ------------------------------------------------------------------------------------------


def machine() -> str:
    import platform

    load = os.getloadavg() if hasattr(os, "getloadavg") else (0, 0, 0)
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}, load average {load[0]:.2f} {load[1]:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--entries-sales", type=int, default=50_000, help="sales in the verify journal (2 entries each)")
    ap.add_argument("--backlog", type=int, default=5_000)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--wide-window", type=int, default=128, help="also measure this window (0: skip)")
    ap.add_argument("--bytes-sales", type=int, default=2_000)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir under /tmp)")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="posguard-bench-ops-", dir=args.dir))
    (base / "wide").mkdir()
    print(f"machine: {machine()}")
    print(f"work dir: {base} (journals here; fsync cost depends on this disk)")
    v = bench_verify(base, args.entries_sales, args.runs)
    rp = bench_replay(base, args.backlog, args.window, args.runs)
    wide = bench_replay(base / "wide", args.backlog, args.wide_window, args.runs) if args.wide_window else None
    b = bench_bytes(base, args.bytes_sales, max(1, min(3, args.runs)))
    rows = [
        ("verify chain+MAC (entries/s)", v["verify"], f"bare SHA-256 of the same bytes {v['sha']:,.0f}/s",
         f"{v['verify'] / v['sha']:.2f}x", ">= 100,000", v["verify"] >= 100_000),
        (f"replay {args.backlog} backlog, window {args.window} (items/s)", rp["replay"],
         f"host simulator max (pipelined client) {rp['host']:,.0f}/s", f"{rp['replay'] / rp['host']:.2f}x",
         ">= 1,000", rp["replay"] >= 1_000),
        ("journal bytes per sale", b["bytes"], "-", "-", "<= 1,024", b["bytes"] <= 1024),
    ]
    if wide is not None:
        rows.insert(2, (f"replay {args.backlog} backlog, window {args.wide_window} (items/s)", wide["replay"],
                        f"host simulator max (pipelined client) {wide['host']:,.0f}/s",
                        f"{wide['replay'] / wide['host']:.2f}x", ">= 1,000", wide["replay"] >= 1_000))
    print(f"{'metric (median of runs)':48} {'value':>12}  {'ratio':>6}  {'target':>10}  baseline")
    for name, val, baseline, ratio, target, ok in rows:
        print(f"{name:48} {val:12,.0f}  {ratio:>6}  {target:>10}  {baseline}  {'MET' if ok else 'NOT MET'}")
    print(f"(verify journal: {v['entries']:,} entries; replay: {rp['commits']:.0f} durable commits for "
          f"{args.backlog} items, {args.runs} runs)")
    shutil.rmtree(base, ignore_errors=True)
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
