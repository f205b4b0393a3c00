"""`posguard demo`: the whole path, with faults, and the invariant checked.

reference reader (firmware side) --pty null-modem--> `posguard run` (a real daemon process:
config file, journal on disk, reader bridge, engine, uplink) --TCP 127.0.0.1--> host simulator.

Each scripted sale meets one fault: on the host (dropped request, lost answer, late answer, cut
connection, duplicate answer, answer for another merchant, garbage), on the serial line
(duplicated, bit-flipped, truncated frames, garbage between frames), at the reader (reboot after
sending, then re-send or STATUS; a reused txn id with another amount), at the chip card (it
declines after the host approved: the guard reverses the approval) or in the guard itself
(SIGKILL right after the AUTH, then restart). The table shows what the reader was told and what
the host's ledger holds. Exit 0 only if every APPROVED sale has exactly one net debit at the host,
every other sale has none, and the journal verifies. Everything is left in the demo directory.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from firmware_bridge import messages as M
from firmware_bridge.nullmodem import NullModem
from guard.core.emv import EntryMode
from guard.simulation import cards
from guard.simulation.linkfaults import LinkFaults
from guard.simulation.readersim import ReaderSim
from firmware_bridge.serial_port import open_port
from guard.core.engine import Engine, EngineConfig
from guard.core.errors import PosguardError
from guard.simulation.hostsim import HostCore
from guard.simulation.hostserver import HostServer
from guard.hostlink.iso import HostCodec
from guard.journal.store import Journal
from guard.journal.keys import init_keys, load_keys
from guard.core.model import TxnState
from guard.runtime.service import JournalCrypto
from guard.journal.verify import verify_journal

TID = "DEMO0001"
MID = "DEMOMERCHANT001"
READER = "DEMO-READER"
PAN = "4761739001010119"  # public EMV test card
MARKER = ".posguard-demo"

# (scenario, host fault for this sale's 0200, serial faults, reader/guard behaviour)
SCRIPT: list[tuple[str, str | None, LinkFaults | None, str | None]] = [
    ("normal sale", None, None, None),
    ("host drops the request", "drop_request", None, None),
    ("host debits, answer lost", "debit_drop_response", None, None),
    ("answer arrives too late", "delay_response", None, None),
    ("connection cut mid-answer", "close_mid_frame", None, None),
    ("answer duplicated", "duplicate_response", None, None),
    ("answer for another merchant", "wrong_echo", None, None),
    ("garbage instead of answer", "garbage", None, None),
    ("insufficient funds", None, None, "decline"),
    ("serial: frames duplicated, bits flipped", None, LinkFaults(seed=1, duplicate_rate=0.6, bitflip_rate=0.4), None),
    ("serial: truncated frames, line noise", None, LinkFaults(seed=2, truncate_rate=0.5, garbage_rate=0.6), None),
    ("reader reboots, re-sends same txn id", None, None, "reboot_resend"),
    ("reader reboots, asks STATUS", None, None, "reboot_status"),
    ("same txn id, other amount", None, None, "mismatch"),
    ("guard killed while waiting for host", "delay_response", None, "kill_guard"),
    ("customer returns half: refund of sale 1", None, None, "refund"),
    ("host unreachable: approved offline, forwarded later", None, None, "offline"),
    ("chip: host approves, card declines (2nd GENERATE AC)", None, None, "chip_decline"),
    ("normal sale", None, None, None),
]


@dataclass
class Row:
    label: str
    txn_id: bytes
    amount: int
    shown: str = "?"
    final: TxnState | None = None
    stan: int = 0
    host_net: int = 0
    refund: bool = False


def _write_config(path: Path, directory: Path, host_port: int, reader_url: str, host_timeout: float) -> None:
    path.write_text(f"""# written by posguard demo; see `posguard config-example` for every key
[terminal]
terminal_id = "{TID}"
merchant_id = "{MID}"

[reader]
url = "{reader_url}"
reader_id = "{READER}"

[host]
address = "127.0.0.1"
port = {host_port}
timeout = {host_timeout}
reversal_timeout = {host_timeout}
echo_idle = 300

[journal]
path = "{directory / 'journal.db'}"
keys = "{directory / 'keys'}"

[policy]
# one test card for every scenario: the counter rules are shown by their own tests
double_swipe_window = 0
card_max_count = 0
card_max_amount = 0
terminal_max_count = 0

[offline]
# while the host is unreachable, small sales are approved offline and forwarded as 0220 later
enabled = true
max_sale_amount = 5000
max_total_amount = 20000
max_count = 10
""")


class Daemon:
    """`posguard run` as a child process, logging to guard.log."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([sys.executable, "-m", "posguard.cli", "run", "--config", str(self.config)],
                                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def _txn_id(seed: int, i: int) -> bytes:
    return hashlib.sha256(f"demo:{seed}:{i}".encode()).digest()[:16]


def _text(m: Any) -> str:
    if isinstance(m, M.ErrorMessage):
        return f"ERROR {m.error_code}"
    if isinstance(m, M.ResultMessage):
        return m.display_text or m.state.value
    return str(m)


def run_demo(directory: Path, *, seed: int = 7, host_timeout: float = 1.0, console: Console | None = None) -> int:
    """Run the scripted burst; return 0 only if the invariant holds and the journal verifies."""
    con = console or Console(width=None if sys.stdout.isatty() else TABLE_WIDTH)  # colour only on a terminal
    directory = directory.resolve()
    if directory.exists() and any(directory.iterdir()):
        if not (directory / MARKER).exists():
            con.print(f"[red]{directory} exists and is not a posguard demo directory; choose another --dir[/red]")
            return 2
        shutil.rmtree(directory)
        con.print(f"previous demo run in {directory} removed")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MARKER).write_text("posguard demo directory\n")
        keys = init_keys(directory / "keys")
    except (OSError, PosguardError) as e:
        con.print(f"[red]cannot use {directory} for the demo: {getattr(e, 'strerror', None) or e}; choose another --dir[/red]")
        return 2

    core = HostCore(seed=seed, dup_detection=True, faults={}, late_delay=host_timeout * 2.5)
    server = HostServer(core, HostCodec())
    port = server.start()
    cable = NullModem()
    config = directory / "guard.toml"
    _write_config(config, directory, port, cable.a, host_timeout)
    daemon = Daemon(config, directory / "guard.log")
    daemon.start()
    con.print(f"host simulator on 127.0.0.1:{port} (duplicate detection on); reader on {cable.b} <-> guard on {cable.a}")
    con.print(f"guard: posguard run --config {config}  (logs: {directory / 'guard.log'})")

    reader = ReaderSim(open_port(cable.b), reader_id=READER, rng=random.Random(seed))
    rows: list[Row] = []
    violations: list[str] = []
    try:
        reader.sync(timeout=15)

        def settled() -> bool:
            """Every earlier sale has a final state at the guard (reversals done)."""
            for row in rows:
                res = reader.status(row.txn_id, timeout=10)
                if isinstance(res, M.ResultMessage) and (res.in_progress or res.state in (
                        TxnState.REVERSAL_PENDING, TxnState.UNKNOWN, TxnState.DEFERRED)):
                    return False
            return True

        def wait_for(cond: Callable[[], bool], limit: float) -> bool:
            end = time.monotonic() + limit
            while time.monotonic() < end:
                if cond():
                    return True
                time.sleep(0.2)
            return cond()

        for i, (label, fault, link_faults, extra) in enumerate(SCRIPT):
            wait_for(settled, 30)  # so the fault we force hits this sale's 0200, not a queued 0400
            txn = _txn_id(seed, i)
            amount = 4251 if extra == "decline" else 1000 + 130 * i
            row = Row(label, txn, amount)
            rows.append(row)
            if fault:
                core.force(fault)
            reader.faults = link_faults
            try:
                if extra == "refund":
                    row.refund, row.amount = True, rows[0].amount // 2
                    res = reader.refund(row.amount, "978", PAN, "2912", rows[0].txn_id, txn_id=txn, timeout=20)
                    row.shown = _text(res)
                elif extra == "offline":
                    server.stop()  # the acquirer goes away; the guard keeps retrying the connection
                    time.sleep(1.0)
                    res = reader.auth(txn, amount, "978", PAN, "2912", timeout=20)
                    server = HostServer(core, HostCodec(), port=port)
                    server.start()
                    wait_for(lambda: not (isinstance(r := reader.status(txn, timeout=10), M.ResultMessage)
                                          and r.state is TxnState.DEFERRED), 30)
                    row.shown = _text(res) + "; host back: " + _text(reader.status(txn, timeout=10))
                elif extra == "chip_decline":  # the guard reverses the host's approval itself
                    asked, done = cards.present(reader, cards.CardModel(EntryMode.CHIP, cards.DECLINE), txn, amount,
                                               "978", PAN, "2912", random.Random(seed), timeout=20)
                    waited = isinstance(asked, M.ResultMessage) and asked.state is TxnState.AWAITING_COMPLETION
                    row.shown = ("host approved, card asked; " if waited else _text(asked) + "; ") + "card declined: " + _text(done)
                elif extra == "reboot_resend" or extra == "reboot_status" or extra == "kill_guard":
                    reader.submit(M.Auth(txn, amount, "978", PAN, "2912", READER))
                    time.sleep(0.4)  # the AUTH is journaled and forwarded by now
                    if extra == "kill_guard":
                        daemon.kill()
                        daemon.start()
                        note = "guard SIGKILLed and restarted; reader asked STATUS: "
                    else:
                        note = "reader rebooted; " + ("re-sent: " if extra == "reboot_resend" else "asked STATUS: ")
                    reader.reboot()
                    reader.sync(timeout=15)
                    if extra == "reboot_resend":
                        res = reader.auth(txn, amount, "978", PAN, "2912", timeout=20)
                    else:
                        res = reader.status(txn, timeout=10)
                        wait_for(lambda: not (isinstance(r := reader.status(txn, timeout=10), M.ResultMessage)
                                              and r.in_progress), 20)
                        res = reader.status(txn, timeout=10)
                    row.shown = note + _text(res)
                else:
                    res = reader.auth(txn, amount, "978", PAN, "2912", timeout=20)
                    row.shown = _text(res)
                    if extra == "mismatch":
                        again = reader.auth(txn, amount + 1, "978", PAN, "2912", timeout=20)
                        row.shown += " / re-use: " + _text(again)
            finally:
                reader.faults = None
            if link_faults is not None:
                applied = {k: v for k, v in link_faults.counts.as_dict().items() if v}
                row.shown += " (link faults: " + ", ".join(f"{k} {v}" for k, v in applied.items()) + ")"
        con.print("waiting for the guard to drain its reversal queue ...")
        drained = wait_for(settled, 60)
    finally:
        reader.close()
        rc = daemon.stop()
        cable.close()
        server.stop()
    if rc != 0:
        violations.append(f"the guard did not stop cleanly on SIGTERM (exit {rc})")

    j = Journal.open(directory / "journal.db", load_keys(directory / "keys"), terminal_id=TID)
    final = Engine.restore(EngineConfig(TID, MID), JournalCrypto(j, keys.token_key), j.entries())
    j.close()
    for row in rows:
        t = final.txns.get(f"{READER}:{row.txn_id.hex()}")
        if t is None:
            violations.append(f"{row.label}: not journaled")
            continue
        row.final, row.stan = t.state, t.stan
        row.host_net = core.net_debits(TID, MID, f"{t.stan:06d}", t.f7[:4])  # a refund's one credit counts 1
        if (t.state is TxnState.APPROVED) != (row.host_net == 1) or row.host_net not in (0, 1):
            violations.append(f"{row.label}: terminal {t.state.value}, host net debits {row.host_net}")
        first = row.shown.split(" / ")[0]
        if "APPROVED" in first and t.state is not TxnState.APPROVED:
            violations.append(f"{row.label}: reader was shown approved, final {t.state.value}")
        if "APPROVED" not in first and t.state is TxnState.APPROVED:
            violations.append(f"{row.label}: reader was shown a failure, final APPROVED (charged)")
    journal_keys = {f"{READER}:{r.txn_id.hex()}" for r in rows}
    for key, t in final.txns.items():
        if key not in journal_keys:
            violations.append(f"unexpected transaction {key} in the journal")
    if sum(core.net_by_key().values()) != sum(r.host_net for r in rows):
        violations.append("the host holds debits for sales the demo did not make")

    render_results(con, rows)

    core.dump_ledger(directory / "host-ledger.json")
    core.write_settlement_csv(directory / "settlement.csv")
    rep = verify_journal(directory / "journal.db", k0=keys.k0, public_key=keys.signing_key.public_key())
    (directory / "summary.json").write_text(json.dumps(
        {"violations": violations, "drained": drained, "verify": rep.__dict__, "host": core.stats(),
         "reader": reader.stats.__dict__}, indent=2, default=str))
    con.print(f"journal verify: {'OK' if rep.ok else 'FAILED'} ({rep.entries} entries, {rep.checkpoints} checkpoints)"
              + ("" if rep.ok else f" first bad seq {rep.first_bad_seq}: {rep.reason} {rep.detail}"))
    if not drained:
        violations.append("the guard did not drain its reversal queue within 60 s")
    if violations or not rep.ok:
        for v in violations:
            con.print(f"[red]VIOLATION[/red] {v}")
        con.print("[red]invariant FAILED[/red]")
        return 1
    con.print("[green]invariant holds[/green]: every APPROVED sale has exactly one net debit at the host; "
              "every other sale has none; the journal verifies.")
    con.print(f"left in {directory}: guard.toml, journal.db, keys/, guard.log, host-ledger.json, settlement.csv, summary.json")
    print_verify_command(con, directory)
    return 0


TABLE_WIDTH = 100  # the results table fits this many columns
# Colours of the final states (rich styles; a console that is not a terminal prints none).
STATE_STYLE = {TxnState.APPROVED: "green", TxnState.REVERSED: "yellow", TxnState.DECLINED: "yellow",
               TxnState.NEEDS_MANUAL: "bold red"}
LEGEND = (
    "scenario: the fault this sale met; amount: EUR; reader was told: the RESULT text (or ERROR) the reader "
    "displayed; final: the guard's journal after the drain; STAN: field 11 the host booked it under; host net: "
    "the host ledger's debits minus reversals for it (a refund: its one credit); ok: final APPROVED exactly "
    "when host net is 1."
)


def render_results(con: Console, rows: list[Row]) -> None:
    """The results table (at most ``TABLE_WIDTH`` columns, outcomes coloured) and its legend."""
    table = Table(title="posguard demo: what the reader was told vs. what the host holds",
                  width=min(TABLE_WIDTH, con.width))
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("scenario", ratio=3)
    table.add_column("amount", justify="right", no_wrap=True)
    table.add_column("reader was told", ratio=5)
    table.add_column("final", no_wrap=True)
    table.add_column("STAN", no_wrap=True)
    table.add_column("host net", justify="right", no_wrap=True)
    table.add_column("ok", no_wrap=True)
    for i, row in enumerate(rows):
        ok = row.final is not None and (row.final is TxnState.APPROVED) == (row.host_net == 1)
        final = f"[{STATE_STYLE.get(row.final, 'cyan')}]{row.final.value}[/]" if row.final else "-"
        net = f"{row.host_net} (credit)" if row.refund and row.host_net else str(row.host_net)
        table.add_row(str(i + 1), escape(row.label), f"{row.amount / 100:.2f}", escape(row.shown), final,
                      f"{row.stan:06d}", net,
                      "[green]yes[/]" if ok else "[bold red]NO[/]")
    con.print(table)
    con.print(LEGEND, width=min(TABLE_WIDTH, con.width), style="dim", highlight=False)


def print_verify_command(con: Console, directory: Path) -> None:
    """On one line however long the paths: a command to copy, never wrapped."""
    cmd = (f"posguard journal verify {directory / 'journal.db'} --k0 {directory / 'keys' / 'k0.escrow'} "
           f"--pubkey {directory / 'keys' / 'verify.pub'}")
    con.print(f"verify it yourself: {cmd}", soft_wrap=True, highlight=False, markup=False)
