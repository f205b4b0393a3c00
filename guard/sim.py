"""Deterministic fault simulation of the whole terminal (TigerBeetle VOPR-style).

One seed drives everything: readers (sales, re-sends after silence or reboot, STATUS), the network
(latency, closed connections), the host (``HostCore`` with seeded faults) and terminal crashes at
any action boundary. Time is simulated; the journal is a real SQLite file, so restarts exercise
the real recovery path. After a fault-free drain the invariants are checked:

- every sale: final APPROVED iff the host holds exactly one net debit for it, otherwise none;
- every debit the host holds belongs to a sale the terminal journaled as APPROVED;
- what the reader was shown never contradicts the final outcome (shown APPROVED -> APPROVED;
  shown failed -> not charged; shown APPROVED OFFLINE -> charged at most once);
- the journal verifies (chain, MACs from k0, checkpoint signatures).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import constants as C
from .engine import Action, Append, Engine, EngineConfig, Reply, SendHost, card_from_plaintext
from .hostsim import HostCore
from .journal import Journal
from .keys import DeviceKeys, init_keys
from .policies import OFF, OfflineConfig
from .model import CardData, Request, Result, TxnKind, TxnState
from .service import JournalCrypto
from .verify import verify_journal

TID = "SIMTERM1"
MID = "SIMMERCHANT0001"
TEST_PANS = ("4761739001010119", "5413330089020011", "4111111111111111", "6011000990139424")
HOST_FAULTS = (
    "drop_request",
    "debit_drop_response",
    "delay_response",
    "close_mid_frame",
    "duplicate_response",
    "wrong_echo",
    "garbage",
)


class _Crash(Exception):
    """The simulated terminal lost power between two actions."""


@dataclass
class SimConfig:
    seed: int
    sales: int = 12
    dup_detection: bool = True
    fault_rate: float = 0.3  # probability that a host message meets some fault
    crash_rate: float = 0.02  # per executed action
    resend_rate: float = 0.3  # reader re-sends the same txn id (lost reply, reboot)
    status_rate: float = 0.2  # reader asks STATUS instead of re-sending
    host_timeout: float = 3.0
    latency: float = 0.02
    late_delay: float = 5.0
    reversal_max_attempts: int = 20
    drain_limit_s: float = 3600.0
    offline: bool = False  # deferred authorization on: sales during outages are stored, then sent as 0220
    outage_s: float = 0.5  # how long the terminal stays disconnected after the host closes the link


@dataclass
class SimReport:
    seed: int
    ok: bool
    violations: list[str]
    sales: int
    approved: int
    reversed: int
    declined: int
    crashes: int
    host_faults: dict[str, int]
    deferred: int = 0  # sales approved offline (journal "deferred" records)
    advice_reversals: int = 0  # unanswered 0220s reversed before a fresh one
    trace: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"seed {self.seed}: {'OK' if self.ok else 'FAIL'} sales={self.sales} approved={self.approved} "
            f"reversed={self.reversed} declined={self.declined} crashes={self.crashes} faults={sum(self.host_faults.values())}"
        )


class _World:
    def __init__(self, cfg: SimConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.now = 1_700_000_000.0 + self.rng.random() * 86_400 * 300
        self.events: list[tuple[float, int, str, Any]] = []
        self.n = 0
        self.trace: list[str] = []
        self.keys: DeviceKeys = init_keys(workdir / "keys", rng=self._det_bytes)
        self.path = workdir / "journal.db"
        self.ecfg = EngineConfig(
            TID,
            MID,
            host_timeout_s=cfg.host_timeout,
            reversal_timeout_s=cfg.host_timeout,
            reversal_max_attempts=cfg.reversal_max_attempts,
            backoff_base_s=0.5,
            backoff_max_s=8.0,
            echo_idle_s=30.0,
            policy=OFF,  # readers here reuse cards and amounts; counter rules have their own tests
            keep_final=3,  # evict early so re-sends and STATUS exercise reading back from the journal
            offline=OfflineConfig(enabled=cfg.offline, max_sale_amount=20_000, max_total_amount=60_000, max_count=8),
        )
        rates = {k: cfg.fault_rate / len(HOST_FAULTS) for k in HOST_FAULTS} if cfg.fault_rate else {}
        self.host = HostCore(seed=cfg.seed, dup_detection=cfg.dup_detection, faults=rates, late_delay=cfg.late_delay)
        self.conn = 0
        self.journal: Journal | None = Journal.create(self.path, self.keys, terminal_id=TID, now=self.now)
        self.engine: Engine | None = Engine(self.ecfg, self._crypto(), random.Random(cfg.seed ^ 0x5EED),
                                            lookup=self.journal.entries_for)
        self.crashes = 0
        self.crashing_enabled = True
        self.requests: dict[str, Request] = {}
        self.shown: dict[str, list[Result]] = {}
        self.kinds: collections.Counter[str] = collections.Counter()

    def _det_bytes(self, n: int) -> bytes:
        return bytes(self.rng.getrandbits(8) for _ in range(n))

    def _crypto(self) -> JournalCrypto:
        assert self.journal is not None
        return JournalCrypto(self.journal, self.keys.token_key)

    def log(self, msg: str) -> None:
        self.trace.append(f"{self.now:.3f} {msg}")

    def at(self, delay: float, kind: str, data: Any = None) -> None:
        self.n += 1
        heapq.heappush(self.events, (self.now + delay, self.n, kind, data))

    # ---------------------------------------------------------------- terminal side

    def execute(self, actions: list[Action]) -> None:
        """Run actions in order, like GuardService, with a chance of power loss before each."""
        queue = list(actions)
        while queue:
            a = queue.pop(0)
            if self.crashing_enabled and self.rng.random() < self.cfg.crash_rate:
                raise _Crash(type(a).__name__)
            assert self.journal is not None and self.engine is not None
            if isinstance(a, Append):
                self.journal.append(a.records, now=self.now, vault_put=a.vault_put, vault_shred=a.vault_shred)
                self.log("commit " + ",".join(f"{k}:{(t or '-')[-6:]}" for k, t, _ in a.records))
            elif isinstance(a, SendHost):
                fields = dict(a.fields)
                card = a.card
                if card is None and a.card_ref:
                    plain = self.journal.vault_open(a.card_ref)
                    card = card_from_plaintext(plain) if plain else None
                if card is not None:
                    fields[C.F_PAN] = card.pan
                if not self.engine.host_up:
                    queue[:0] = self.engine.send_failed(a.key, self.now)
                    continue
                self.log(f"send {fields['t']} stan={fields.get(C.F_STAN)}")
                self.at(self.cfg.latency, "to_host", (self.conn, fields))
            elif isinstance(a, Reply):
                self.shown.setdefault(a.result.key, []).append(a.result)
                self.log(f"reply {a.result.key[-6:]} {a.result.state.value}{' (in progress)' if a.result.in_progress else ''}")

    def terminal(self, fn: Callable[[Engine], list[Action]]) -> None:
        if self.engine is None:
            return
        try:
            self.execute(fn(self.engine))
        except _Crash as c:
            self.crash(str(c))

    def crash(self, where: str) -> None:
        self.crashes += 1
        self.log(f"CRASH before {where}")
        assert self.journal is not None
        self.journal.close()
        self.journal = None
        self.engine = None
        self.conn += 1  # the TCP connection dies with the process
        self.at(0.5 + self.rng.random(), "restart")

    def restart(self) -> None:
        self.journal = Journal.open(self.path, self.keys, terminal_id=TID)
        self.engine = Engine.restore(self.ecfg, self._crypto(), self.journal.entries(), random.Random(self.rng.random()),
                                     lookup=self.journal.entries_for)
        self.log(f"restart: {self.engine.pending_reversals()} reversals pending before recovery")
        self.terminal(lambda e: e.recover(self.now))
        self.conn += 1
        self.terminal(lambda e: e.on_host_up(self.now))

    # ---------------------------------------------------------------- host side

    def host_receive(self, conn: int, fields: dict[str, str]) -> None:
        if conn != self.conn:
            return
        for r in self.host.handle(fields, self.now):
            if r.action == "drop":
                continue
            if r.action == "close_mid_frame":
                self.at(r.delay + self.cfg.latency, "close", conn)
            elif r.action == "garbage":
                self.at(r.delay + self.cfg.latency, "garbage", conn)
            else:
                self.at(r.delay + self.cfg.latency, "to_term", (conn, r.fields))

    # ---------------------------------------------------------------- readers

    def schedule_sales(self) -> None:
        t = 0.0
        for i in range(self.cfg.sales):
            t += self.rng.expovariate(1 / 4.0)
            txn_id = hashlib.sha256(f"{self.cfg.seed}:{i}".encode()).digest()[:16]
            amount = self.rng.choice([1000, 2550, 999, 12345, 5005, 4251, 700])
            card = CardData(self.rng.choice(TEST_PANS), "2912")
            req = Request("R1", txn_id, TxnKind.SALE, amount, "978", card)
            self.requests[req.key] = req
            self.at(t, "submit", (req, 0))

    def reader_submit(self, req: Request, attempt: int) -> None:
        if self.engine is None:
            self.at(1.0, "submit", (req, attempt))
            return
        self.log(f"reader submits {req.key[-6:]} attempt {attempt}")
        self.terminal(lambda e: e.submit(req, self.now))
        if attempt < 3 and self.rng.random() < self.cfg.resend_rate:
            kind = "status" if self.rng.random() < self.cfg.status_rate else "submit"
            self.at(self.rng.uniform(0.1, 2 * self.cfg.host_timeout), kind, (req, attempt + 1))

    def reader_status(self, req: Request) -> None:
        if self.engine is None:
            return
        r = self.engine.status(req.key)
        self.log(f"reader STATUS {req.key[-6:]} -> {r.state.value if r else 'UNKNOWN_ID'}")
        if r is not None and not r.in_progress:
            self.shown.setdefault(req.key, []).append(r)

    # ---------------------------------------------------------------- main loop

    def run(self) -> None:
        self.schedule_sales()
        self.terminal(lambda e: e.on_host_up(self.now))
        self.at(0.25, "tick")
        steps = 0
        draining = False
        end = None
        while self.events and steps < 200_000:
            steps += 1
            t, _, kind, data = heapq.heappop(self.events)
            self.now = max(self.now, t)
            if kind == "tick":
                self.terminal(lambda e: e.tick(self.now))
                if not draining and not any(k in ("submit", "status", "restart") for _, _, k, _ in self.events):
                    draining = True
                    end = self.now + self.cfg.drain_limit_s
                    self.host.faults = {}
                    self.crashing_enabled = False
                    self.log("drain: faults and crashes off")
                if draining and (self.engine is not None and not self.engine.busy()):
                    if all(k == "tick" for _, _, k, _ in self.events):
                        break
                if end is None or self.now < end:
                    self.at(0.25, "tick")
            elif kind == "submit":
                self.reader_submit(*data)
            elif kind == "status":
                self.reader_status(data[0])
            elif kind == "to_host":
                self.host_receive(*data)
            elif kind == "to_term":
                conn, fields = data
                if conn == self.conn and self.engine is not None:
                    self.log(f"recv {fields.get('t')} stan={fields.get(C.F_STAN)} rc={fields.get(C.F_RESPONSE_CODE)}")
                    self.terminal(lambda e: e.host_message(fields, self.now))
            elif kind == "garbage":
                if data == self.conn and self.engine is not None:
                    self.log("recv garbage")
                    self.terminal(lambda e: e.host_garbage("HOST_UNDECODABLE", "simulated garbage", 17, "00" * 8, self.now))
            elif kind == "close":
                if data == self.conn and self.engine is not None:
                    self.log("connection closed by host")
                    self.conn += 1
                    self.terminal(lambda e: e.on_host_down(self.now))
                    self.at(self.rng.uniform(0.5, self.cfg.outage_s) if self.cfg.outage_s > 0.5 else 0.5,
                            "reconnect", self.conn)
            elif kind == "reconnect":
                if data == self.conn and self.engine is not None:
                    self.terminal(lambda e: e.on_host_up(self.now))
            elif kind == "restart":
                self.restart()

    # ---------------------------------------------------------------- invariants

    def check(self) -> list[str]:
        bad: list[str] = []
        if self.journal is not None:
            self.journal.close()
        # Judge by what the journal holds after a fresh restore, not by the engine's memory.
        self.journal = Journal.open(self.path, self.keys, terminal_id=TID)
        self.kinds = collections.Counter(e.kind for e in self.journal.entries())
        self.engine = Engine.restore(dataclasses.replace(self.ecfg, keep_final=10**9), self._crypto(), self.journal.entries())
        by_stan: dict[tuple[int, str], str] = {}
        for key, t in self.engine.txns.items():
            by_stan[(t.stan, t.f7[:4])] = key
            net = self.host.net_debits(TID, MID, f"{t.stan:06d}", t.f7[:4])
            if t.state is TxnState.APPROVED and net != 1:
                bad.append(f"{key}: terminal APPROVED but host holds {net} net debits")
            if t.state is not TxnState.APPROVED and net != 0:
                bad.append(f"{key}: terminal {t.state.value} but host holds {net} net debits")
            if not t.state.final:
                bad.append(f"{key}: still {t.state.value} after drain")
            if t.state is TxnState.NEEDS_MANUAL:
                bad.append(f"{key}: NEEDS_MANUAL after a fault-free drain")
            for r in self.shown.get(key, []):
                if r.in_progress:
                    continue
                if r.state is TxnState.APPROVED and t.state is not TxnState.APPROVED:
                    bad.append(f"{key}: reader was shown APPROVED, final is {t.state.value}")
                if r.state not in (TxnState.APPROVED, TxnState.DEFERRED) and t.state is TxnState.APPROVED:
                    bad.append(f"{key}: reader was shown {r.state.value}, final is APPROVED (charged)")
        for (tid, mid, stan, mmdd), net in self.host.net_by_key().items():
            if net and (tid, mid) == (TID, MID) and (int(stan), mmdd) not in by_stan:
                bad.append(f"host holds a debit for stan {stan} {mmdd} that the journal does not know")
        for key in self.shown:
            if key not in self.engine.txns:
                bad.append(f"{key}: reader was shown a result the journal does not hold")
        self.journal.close()
        rep = verify_journal(self.path, k0=self.keys.k0, public_key=self.keys.signing_key.public_key())
        if not rep.ok:
            bad.append(f"journal does not verify: {rep.reason} at {rep.first_bad_seq}: {rep.detail}")
        self.journal = None
        return bad


def run_seed(cfg: SimConfig, workdir: Path | None = None, keep_trace: bool = True) -> SimReport:
    """Run one seed end to end and check the invariants."""
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="posguard-sim-")) if workdir is None else workdir
    try:
        w = _World(cfg, wd)
        w.run()
        violations = w.check()
        states = [t.state for t in (w.engine.txns.values() if w.engine else [])]
        return SimReport(
            seed=cfg.seed,
            ok=not violations,
            violations=violations,
            sales=len(states),
            approved=sum(s is TxnState.APPROVED for s in states),
            reversed=sum(s is TxnState.REVERSED for s in states),
            declined=sum(s is TxnState.DECLINED for s in states),
            crashes=w.crashes,
            host_faults=dict(w.host.stats().get("faults", {})),
            deferred=w.kinds["deferred"],
            advice_reversals=w.kinds["advice_reversal_pending"],
            trace=w.trace if (keep_trace or violations) else [],
        )
    finally:
        if own:
            shutil.rmtree(wd, ignore_errors=True)


__all__ = ["SimConfig", "SimReport", "run_seed", "HOST_FAULTS"]
