"""`posguard demo`: the engine against a faulty host simulator, with the invariant checked.

Runs on loopback only. Each scripted sale forces one host fault (or a reader/terminal fault) and
the table shows what the terminal showed and what the host ledger holds for it. Everything is left
in the demo directory (journal, keys, host ledger, settlement CSV) for `posguard journal verify`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from guard.engine import Engine, EngineConfig
from guard.errors import IdempotencyConflict, PosguardError
from guard.hostsim import HostCore, HostServer
from guard.iso import HostCodec
from guard.journal import Journal
from guard.keys import init_keys, load_keys
from guard.policies import OFF
from guard.model import CardData, Request, Result, TxnKind, TxnState
from guard.service import GuardService, JournalCrypto, open_guard
from guard.uplink import Uplink
from guard.verify import verify_journal

TID = "DEMO0001"
MID = "DEMOMERCHANT001"
MARKER = ".posguard-demo"

# (label, host fault forced for this sale, extra reader/terminal behaviour)
SCRIPT: list[tuple[str, str | None, str | None]] = [
    ("normal sale", None, None),
    ("host drops the request", "drop_request", None),
    ("host debits, answer lost", "debit_drop_response", None),
    ("answer arrives too late", "delay_response", None),
    ("connection cut mid-answer", "close_mid_frame", None),
    ("answer duplicated", "duplicate_response", None),
    ("answer for another merchant", "wrong_echo", None),
    ("garbage instead of answer", "garbage", None),
    ("insufficient funds", None, "decline"),
    ("reader re-sends same txn id", None, "resend"),
    ("same txn id, other amount", None, "mismatch"),
    ("terminal crash after send", None, "crash"),
    ("normal sale", None, None),
    ("double fault: drop + late", "drop_request", "second_fault"),
]


@dataclass
class Row:
    label: str
    key: str
    amount: int
    shown: str
    final: TxnState | None = None
    stan: int = 0
    mmdd: str = ""
    host_net: int = 0


def _txn_id(i: int, seed: int) -> bytes:
    return hashlib.sha256(f"demo:{seed}:{i}".encode()).digest()[:16]


def run_demo(directory: Path, *, seed: int = 7, host_timeout: float = 1.0, console: Console | None = None) -> int:
    """Run the scripted burst; return 0 only if the invariant holds and the journal verifies."""
    con = console or Console(width=None if sys.stdout.isatty() else 150)
    directory = directory.resolve()
    if directory.exists() and any(directory.iterdir()):
        if not (directory / MARKER).exists():
            con.print(f"[red]{directory} exists and is not a posguard demo directory; choose another --dir[/red]")
            return 2
        shutil.rmtree(directory)
        con.print(f"previous demo run in {directory} removed")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text("posguard demo directory\n")
    keys = init_keys(directory / "keys")
    handler = logging.FileHandler(directory / "guard.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.getLogger("posguard").addHandler(handler)
    logging.getLogger("posguard").setLevel(logging.INFO)
    logging.getLogger("posguard").propagate = False
    journal_path = directory / "journal.db"

    core = HostCore(seed=seed, dup_detection=True, faults={}, late_delay=host_timeout * 2.5)
    codec = HostCodec()
    server = HostServer(core, codec)
    port = server.start()
    ecfg = EngineConfig(
        TID, MID, host_timeout_s=host_timeout, reversal_timeout_s=host_timeout, backoff_base_s=0.2, backoff_max_s=1.0,
        policy=OFF,  # one test card for every scenario; the counter rules are shown by their own tests
    )

    def open_service() -> GuardService:
        return open_guard(journal_path, load_keys(directory / "keys"), ecfg, Uplink("127.0.0.1", port, codec),
                          rng=random.Random(seed), reconnect_s=0.2)

    svc = open_service()
    rows: list[Row] = []
    con.print(f"host simulator on 127.0.0.1:{port} (duplicate detection on); journal {journal_path}")
    svc.run_until(lambda: svc.uplink.connected, 5.0)
    try:
        for i, (label, fault, extra) in enumerate(SCRIPT):
            amount = 4251 if extra == "decline" else 1000 + 137 * i
            req = Request("DEMO-READER", _txn_id(i, seed), TxnKind.SALE, amount, "978", CardData("4761739001010119", "2912"))
            # Settle the previous sale's reversals and reconnect first, so the fault we force
            # hits this sale's 0200 and not a queued 0400.
            svc.run_until(lambda: svc.uplink.connected and not svc.engine.busy(), 30.0)
            if fault:
                core.force(fault)
            if extra == "second_fault":
                core.force("delay_response")
            shown = "?"
            try:
                svc.submit(req)
                if extra == "crash":
                    svc.uplink.close()
                    svc.journal.close()
                    svc = open_service()  # power back: recovery reverses the unknown sale
                    shown = "(terminal restarted)"
                svc.run_until(lambda: req.key in svc.replies, host_timeout * 4)
                r = svc.replies.get(req.key)
                shown = r.display_text if r else shown if extra == "crash" else "(no answer yet)"
                if extra == "resend":
                    svc.submit(req)
                    shown += " / re-send: " + svc.replies[req.key].display_text
                if extra == "mismatch":
                    other = Request(req.reader_id, req.txn_id, req.kind, amount + 1, req.currency, req.card)
                    try:
                        svc.submit(other)
                        shown += " / mismatch ACCEPTED (bug)"
                    except IdempotencyConflict as e:
                        shown += f" / re-use: {e.code}"
            except PosguardError as e:
                shown = f"error {e.code}"
            rows.append(Row(label, req.key, amount, shown))
        con.print("draining the reversal queue ...")
        drained = svc.drain(60.0)
    finally:
        svc.close()
        server.stop()

    j = Journal.open(journal_path, load_keys(directory / "keys"), terminal_id=TID)
    final = Engine.restore(ecfg, JournalCrypto(j, keys.token_key), j.entries())
    j.close()
    violations: list[str] = []
    for row in rows:
        t = final.txns.get(row.key)
        if t is None:
            violations.append(f"{row.label}: not journaled")
            continue
        row.final, row.stan, row.mmdd = t.state, t.stan, t.f7[:4]
        row.host_net = core.net_debits(TID, MID, f"{t.stan:06d}", row.mmdd)
        if (t.state is TxnState.APPROVED) != (row.host_net == 1) or row.host_net not in (0, 1):
            violations.append(f"{row.label}: terminal {t.state.value}, host net debits {row.host_net}")
        if "APPROVED" in row.shown.split(" / ")[0] and t.state is not TxnState.APPROVED:
            violations.append(f"{row.label}: shown approved but final {t.state.value}")

    table = Table(title="posguard demo: what the terminal showed vs. what the host holds")
    for col in ("#", "scenario", "amount", "terminal showed", "final", "STAN", "host net debits", "ok"):
        table.add_column(col)
    for i, row in enumerate(rows):
        ok = row.final is not None and (row.final is TxnState.APPROVED) == (row.host_net == 1)
        table.add_row(
            str(i + 1), row.label, f"{row.amount / 100:.2f}", row.shown,
            row.final.value if row.final else "-", f"{row.stan:06d}", str(row.host_net), "yes" if ok else "NO",
        )
    con.print(table)

    core.dump_ledger(directory / "host-ledger.json")
    core.write_settlement_csv(directory / "settlement.csv")
    rep = verify_journal(journal_path, k0=keys.k0, public_key=keys.signing_key.public_key())
    (directory / "summary.json").write_text(
        json.dumps({"violations": violations, "drained": drained, "verify": rep.ok, "host": core.stats()}, indent=2, default=str)
    )
    con.print(f"journal verify: {'OK' if rep.ok else 'FAILED'} ({rep.entries} entries, {rep.checkpoints} checkpoints)"
              + ("" if rep.ok else f" first bad seq {rep.first_bad_seq}: {rep.reason} {rep.detail}"))
    if not drained:
        violations.append("reversal queue did not drain within 60 s")
    if violations or not rep.ok:
        for v in violations:
            con.print(f"[red]VIOLATION[/red] {v}")
        con.print("[red]invariant FAILED[/red]")
        return 1
    con.print("[green]invariant holds[/green]: every APPROVED sale has exactly one net debit at the host; "
              "every other sale has none.")
    con.print(f"left in {directory}: journal.db, keys/, host-ledger.json, settlement.csv, summary.json, guard.log")
    con.print(f"verify it yourself: posguard journal verify {journal_path} --k0 {directory / 'keys' / 'k0.escrow'} "
              f"--pubkey {directory / 'keys' / 'verify.pub'}")
    return 0
