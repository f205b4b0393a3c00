"""Benchmark: one sale through the guard vs. two bare SQLite WAL+FULL commits, same run.

A sale goes through GuardService.execute with a real journal file, the real ISO 8583 codec on
both sides and HostCore in-process (no socket). Printed: durable commits per sale (counted, not
assumed), wall-time medians, the engine's own time per sale excluding the two COMMITs, and the
ratio to two bare commits of the same size. "Guard time" is the sale's wall time minus the two
SQLite transactions (BEGIN..COMMIT, what the baseline also does) and minus the simulated host's
own decode/approve/encode work; it includes our ISO 8583 encode+decode, hashing, MACs, AES-GCM.

usage: python -m posguard.bench.engine [--sales N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


from guard.core.engine import Engine, EngineConfig
from guard.runtime.restore import restore_engine
from guard.simulation.hostsim import HostCore
from guard.hostlink.iso import HostCodec, HostMessage
from guard.journal.store import Journal
from guard.journal.keys import init_keys
from guard.core.policies import OFF, PolicyConfig, VelocityLimit
from guard.core.model import CardData, Request, TxnKind, TxnState
from guard.runtime.service import GuardService, JournalCrypto
from guard.hostlink.uplink import SendOutcome

TID, MID = "BENCH001", "BENCHMERCHANT01"


class InProcessUplink:
    """Uplink stand-in: encodes, lets HostCore answer, decodes the answer; no socket."""

    connected = True

    def __init__(self, core: HostCore, codec: HostCodec) -> None:
        self.core, self.codec = core, codec
        self.host_dec = codec.decoder(side="host")
        self.term_dec = codec.decoder()
        self.inbox: list[Any] = []

    host_seconds = 0.0  # the simulated host's own work, excluded from the guard's cost
    host_cpu_seconds = 0.0

    def send(self, fields: dict[str, str]) -> SendOutcome:
        wire = self.codec.encode(fields)
        t0, c0 = time.perf_counter(), time.process_time()
        replies = []
        for m in self.host_dec.feed(wire):
            assert isinstance(m, HostMessage), m
            replies += [self.codec.encode(r.fields) for r in self.core.handle(m.fields, time.time()) if r.fields is not None]
        self.host_seconds += time.perf_counter() - t0
        self.host_cpu_seconds += time.process_time() - c0
        for raw in replies:
            self.inbox.extend(self.term_dec.feed(raw))
        return SendOutcome.SENT

    def poll(self) -> list[Any]:
        out, self.inbox = self.inbox, []
        return out

    def close(self) -> None:
        pass


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"


def bare_commits(path: Path, sizes: tuple[int, int], n: int) -> list[float]:
    """Two INSERT+COMMIT in WAL + synchronous=FULL with payloads of the sale's entry sizes."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("CREATE TABLE t(seq INTEGER PRIMARY KEY, payload BLOB)")
    out = []
    blobs = [os.urandom(s) for s in sizes]
    for _ in range(n):
        t0 = time.perf_counter()
        for b in blobs:
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO t(payload) VALUES (?)", (b,))
            con.execute("COMMIT")
        out.append(time.perf_counter() - t0)
    con.close()
    return out


def run(sales: int, workdir: Path, policy: PolicyConfig | None = None, history: int = 0) -> dict[str, Any]:
    keys = init_keys(workdir / "keys")
    start = time.time()
    journal = Journal.create(workdir / "journal.db", keys, terminal_id=TID, now=start - history * 20 - 1)
    if history:
        fill_history(journal, keys.token_key, history, start)
    ecfg = EngineConfig(TID, MID, policy=policy if policy is not None else OFF)
    # As the daemon: restored from the journal; a new id that may be there is read back (Load).
    engine = restore_engine(ecfg, JournalCrypto(journal, keys.token_key), journal, random.Random(1))
    core = HostCore(seed=1, dup_detection=True, faults={})
    up = InProcessUplink(core, HostCodec())
    svc = GuardService(engine, journal, up)
    svc.execute(engine.on_host_up(time.time()))
    walls, engine_only, engine_cpu, commits = [], [], [], []
    sizes: list[int] = []
    rng = random.Random(2)
    for i in range(sales + 20):
        req = Request("B", (history + i).to_bytes(16, "big"), TxnKind.SALE, 1000 + rng.randrange(1, 999) * 10, "978",
                      CardData(f"476173900{i % 5000:07d}", "2912"))
        c0, ct0, h0 = journal.commit_count, journal.commit_seconds, up.host_seconds
        cc0, hc0, p0 = journal.commit_cpu_seconds, up.host_cpu_seconds, time.process_time()
        t0 = time.perf_counter()
        svc.submit(req)
        for m in up.poll():
            svc.execute(engine.host_message(m.fields, time.time()))
        wall = time.perf_counter() - t0
        cpu = time.process_time() - p0 - (journal.commit_cpu_seconds - cc0) - (up.host_cpu_seconds - hc0)
        if i >= 20:  # warm-up excluded
            walls.append(wall)
            engine_only.append(wall - (journal.commit_seconds - ct0) - (up.host_seconds - h0))
            engine_cpu.append(cpu)
            commits.append(journal.commit_count - c0)
        assert svc.replies[req.key].state.value == "APPROVED"
    for e in journal.entries(max(0, journal.last_seq - 4)):
        sizes.append(len(e.payload_text) if hasattr(e, "payload_text") else 400)
    journal.close()
    db_bytes = sum(p.stat().st_size for p in workdir.glob("journal.db*"))
    return {"walls": walls, "engine_only": engine_only, "engine_cpu": engine_cpu, "commits": commits, "db_bytes": db_bytes,
            "sizes": sizes}


def fill_history(journal: Journal, token_key: bytes, n: int, now: float) -> None:
    """``n`` past approved sales, one every 20 s up to now, written in large batches (test data)."""
    from guard.journal.keys import card_token
    from guard.core.model import fingerprint

    tokens = [card_token(token_key, f"476173900{i:07d}") for i in range(5000)]
    batch: list[tuple[str, str | None, dict[str, Any]]] = []
    for i in range(n):
        key = f"B:{i.to_bytes(16, 'big').hex()}"
        tok = tokens[i % len(tokens)]
        stan = i % 999_999 + 1
        batch.append(("intent", key, {"kind": "SALE", "fp": fingerprint(TxnKind.SALE, 1000, "978", tok, None), "amount": 1000,
                                      "currency": "978", "card_token": tok, "masked_pan": "476173******0000",
                                      "vault_ref": None, "stan": stan, "f7": "0101000000", "tid": TID, "mid": MID}))
        batch.append(("outcome", key, {"state": "APPROVED", "rc": "00", "approval": "123456", "rrn": f"{i:012d}", "reason": ""}))
        if len(batch) >= 2000 or i == n - 1:
            journal.append(batch, now=now - (n - i) * 20)
            batch = []


def codec_pair_seconds(n: int = 3000) -> float:
    """Median time of the terminal's own ISO 8583 work for one sale (encode 0200, decode 0210):
    the yardstick the target was set against (issue: "encode+decode alone is ~0.06 ms")."""
    codec = HostCodec()
    f = {"t": "0200", "2": "4761739001010119", "14": "2912", "3": "000000", "4": "000000001000",  # public EMV test card
         "7": "1122010203", "11": "000001", "41": TID, "42": MID, "49": "978"}
    resp = [r.fields for r in HostCore(seed=1, dup_detection=False).handle(f, time.time())][0]
    assert resp is not None
    raw = codec.encode(resp)
    dec = codec.decoder()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        codec.encode(f)
        dec.feed(raw)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


class _BenchCrypto:
    """Token and vault sealing without the journal: the loop-round measurement needs neither."""

    def token(self, pan: str) -> str:
        return pan[-8:].rjust(32, "0")

    def seal(self, txn: str, plaintext: bytes) -> Any:
        return type("Blob", (), {"ref": txn[-16:]})()


def loop_round_seconds(finals: int = 5000, n: int = 2000) -> tuple[float, float]:
    """Median cost of one idle daemon loop round (next_deadline + tick) with ``finals`` final
    transactions in memory (the engine keeps up to keep_final=5000), and of a plain Python scan
    over that many transactions (what a round cost before timers watched only live ones)."""
    eng = Engine(EngineConfig(TID, MID, policy=OFF), _BenchCrypto(), random.Random(1))
    now = time.time()
    eng.on_host_up(now)
    codec = HostCodec()
    core = HostCore(seed=1, dup_detection=False, faults={})
    for i in range(finals):
        acts = eng.submit(Request("B", i.to_bytes(16, "big"), TxnKind.SALE, 1000, "978", CardData(f"476173900{i:07d}", "2912")), now)
        for a in acts:
            if hasattr(a, "fields") and a.fields:
                for r in core.handle(dict(a.fields, **{"2": "4761739000000000"}), now):
                    if r.fields is not None:
                        msg = codec.decoder().feed(codec.encode(r.fields))[0]
                        assert isinstance(msg, HostMessage)
                        eng.host_message(msg.fields, now)
    assert not eng.busy() and len(eng.txns) == finals
    rounds, scans = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        eng.next_deadline()
        eng.tick(now)
        t1 = time.perf_counter()
        [t for t in eng.txns.values() if t.state is TxnState.SENT]  # the old per-round scan, once
        rounds.append(t1 - t0)
        scans.append(time.perf_counter() - t1)
    return statistics.median(rounds), statistics.median(scans)


def q(xs: list[float], p: float) -> float:
    """The ``p`` quantile of ``xs`` (nearest rank)."""
    return sorted(xs)[int(p * (len(xs) - 1))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sales", type=int, default=1000)
    ap.add_argument("--dir", type=Path, default=None, help="directory for the journal (default: a temp dir on the same disk as /tmp)")
    ap.add_argument("--history", type=int, default=100_000, help="past sales in the journal for the policy comparison")
    args = ap.parse_args(argv)
    base = args.dir or Path(tempfile.mkdtemp(prefix="posguard-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    r = run(args.sales, base / "guard")
    busy = PolicyConfig(terminal_limits=(VelocityLimit(60.0, max_count=10**6),))  # every rule runs, none refuses
    # off, on, on, off: each configuration runs once early and once late, so drift of the
    # machine during the run (caches, frequency, other load) does not favour either.
    half = max(1, args.sales // 2)
    runs = [run(half, base / f"hist-{name}-{i}", pol, args.history)
            for i, (name, pol) in enumerate((("off", OFF), ("on", busy), ("on", busy), ("off", OFF)))]
    off = {k: runs[0][k] + runs[3][k] for k in ("engine_cpu", "walls")}
    on = {k: runs[1][k] + runs[2][k] for k in ("engine_cpu", "walls")}
    bare = bare_commits(base / "bare.db", (600, 300), args.sales)
    med = statistics.median
    commits = set(r["commits"])
    print(f"machine: {machine()}")
    print(f"journal dir: {base}")
    print(f"{'metric':44} {'median':>10} {'p99':>10}")
    print(f"{'sale through guard, wall (ms)':44} {med(r['walls'])*1e3:10.3f} {q(r['walls'], .99)*1e3:10.3f}")
    print(f"{'two bare WAL+FULL commits, wall (ms)':44} {med(bare)*1e3:10.3f} {q(bare, .99)*1e3:10.3f}")
    print(f"{'guard time per sale excl. SQLite txns (ms)':44} {med(r['engine_only'])*1e3:10.3f} {q(r['engine_only'], .99)*1e3:10.3f}")
    print(f"{'guard CPU per sale excl. SQLite txns (ms)':44} {med(r['engine_cpu'])*1e3:10.3f} {q(r['engine_cpu'], .99)*1e3:10.3f}")
    codec = codec_pair_seconds()
    print(f"{'ISO 8583 encode 0200 + decode 0210 (ms)':44} {codec*1e3:10.3f}")
    print(f"{'guard CPU / ISO codec pair (target 0.3/0.06 = 5)':44} {med(r['engine_cpu'])/codec:10.2f}")
    print(f"{'ratio sale / two bare commits':44} {med(r['walls'])/med(bare):10.2f}")
    print(f"{'durable commits per sale (counted)':44} {'/'.join(map(str, sorted(commits))):>10}")
    print(f"{'journal bytes per sale (db+wal)':44} {r['db_bytes']/ (args.sales + 20):10.0f}")
    print(f"{'%dk past sales, policies off: guard CPU (ms)' % (args.history // 1000):44} {med(off['engine_cpu'])*1e3:10.3f}")
    print(f"{'%dk past sales, policies on: guard CPU (ms)' % (args.history // 1000):44} {med(on['engine_cpu'])*1e3:10.3f}")
    print(f"{'policy cost ratio (on / off, guard CPU)':44} {med(on['engine_cpu'])/med(off['engine_cpu']):10.2f}")
    print(f"{'policy cost ratio (on / off, wall)':44} {med(on['walls'])/med(off['walls']):10.2f}")
    loop, scan = loop_round_seconds()
    print(f"{'idle loop round, 5,000 final txns in memory (ms)':44} {loop*1e3:10.4f}")
    print(f"{'  one scan over those 5,000 txns (ms)':44} {scan*1e3:10.4f}")
    ok = commits == {2} and med(r["engine_cpu"]) <= 0.3e-3
    print("targets: exactly 2 commits per sale, guard CPU <= 0.300 ms median ->", "MET" if ok else "NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
