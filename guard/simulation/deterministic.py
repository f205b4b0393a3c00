"""Deterministic fault simulation of the whole terminal (TigerBeetle VOPR-style).

One seed drives everything: readers (sales, re-sends after silence or reboot, STATUS), the network
(latency, closed connections, sends that fail or may have left), the host (``HostCore`` with seeded
faults) and terminal crashes at any action boundary. The terminal runs the daemon's ``Executor``
over simulated ports (``simports``). Time is simulated; the journal is a real SQLite file, so
restarts exercise the real recovery path, and a seed's journal is byte-identical run after run. After a fault-free drain the invariants are checked:

- every sale: final APPROVED iff the host holds exactly one net debit for it, otherwise none;
- every debit the host holds belongs to a sale the terminal journaled as APPROVED;
- what the reader was shown never contradicts the final outcome (shown APPROVED -> APPROVED;
  shown failed -> not charged; shown APPROVED OFFLINE -> charged at most once), and whatever it
  is shown APPROVED is already true at the host at that moment (debit / credit booked, voided
  debit reversed);
- the journal verifies (chain, MACs from k0, checkpoint signatures).

With ``operator_rate`` > 0 a seeded fraction of readers also act as the operator once their sale
is shown APPROVED: a VOID of it, a REFUND against it (full or partial, sometimes two), or a REFUND
and a VOID in either order, sometimes sent early (while the sale is still in flight or only
APPROVED OFFLINE) and re-sent with the same txn id after silence or a reboot. Extra invariants:

- a voided sale ends with no net debit at the host and its VOID is final (APPROVED iff the
  sale is REVERSED); a voided sale has no APPROVED refund;
- every REFUND: final APPROVED iff the host holds exactly one net credit (type REFUND) for its
  STAN, otherwise none; never a credit under a sale's STAN or a debit under a refund's;
- the APPROVED refunds of a sale never add up to more than the sale;
- a VOID or REFUND the engine refuses (PosguardError) is refused for a reason the journal bears
  out at that moment (original unknown / not APPROVED / reversal pending / live refund / amount
  left), and the refused id has nothing in the journal.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from guard.core import constants as C
from guard.core.engine import Engine, EngineConfig, Txn
from guard.core.txn import rebuild as _rebuild
from guard.runtime.restore import restore_engine
from guard.core.errors import PosguardError
from guard.core.emv import CardDecision
from guard.simulation import cards
from guard.simulation.acquirer import AcquirerProfile
from guard.simulation.hostsim import HostCore
from guard.simulation import invariants
from guard.simulation.invariants import check_world
from guard.journal.store import Journal
from guard.journal.keys import DeviceKeys, init_keys
from guard.core.policies import OFF, OfflineConfig
from guard.core.model import CardData, Request, Result, TxnKind, TxnState
from guard.runtime.executor import Executor
from guard.runtime.service import JournalCrypto
from guard.simulation.simports import SimHost, SimReader, SimStore

TID = "SIMTERM1"
MID = "SIMMERCHANT0001"
# Public scheme test card numbers (never real cards); the simulation never writes them in clear.
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
    operator_rate: float = 0.0  # fraction of sales the reader later VOIDs or REFUNDs (0: the sales-only simulation)
    not_sent_rate: float = 0.01  # per send: the write fails before any byte left (NOT_SENT, link dropped)
    maybe_sent_rate: float = 0.02  # per send: the link closes during it (MAYBE_SENT; half of those still arrive)
    tid: str = TID  # the terminal id (field 41; fleet tests run many terminals)
    acquirer: bool = False  # the host answers like real acquirers (AcquirerProfile.for_seed): 08/10/11/16,
    # booked wait and unknown codes, wrong MTIs, silent or refusing reversal answers, 0411
    chip_rate: float = 0.6  # sales read from a card (cards.pick: chip, contactless, swiped; card declines, pulls,
    # reader reboots before COMPLETE); the rest are keyed as before. Own stream: other draws unchanged
    max_steps: int = 0  # events to process at most (0: ``step_limit_for`` sizes it from the run)


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
    voids: int = 0  # VOIDs journaled (accepted by the engine)
    voids_approved: int = 0
    refunds: int = 0  # REFUNDs journaled
    refunds_approved: int = 0
    ops_sent: int = 0  # VOID / REFUND submissions, re-sends included
    refusals: dict[str, int] = field(default_factory=dict)  # engine refusals of a VOID / REFUND, by code
    host_answers: dict[str, int] = field(default_factory=dict)  # the acquirer profile's answers, by label
    partials: dict[str, int] = field(default_factory=dict)  # the simulated operator's decisions on PARTIAL
    trace: list[str] = field(default_factory=list)
    steps: int = 0  # events processed
    step_limit_reached: bool = False  # stopped before the drain ended: not judged (no violations checked)

    def summary(self) -> str:
        if self.step_limit_reached:
            return (f"seed {self.seed}: STEP LIMIT REACHED after {self.steps} events, before the drain ended: not "
                    "judged (raise --max-steps)")
        return (
            f"seed {self.seed}: {'OK' if self.ok else 'FAIL'} sales={self.sales} approved={self.approved} "
            f"reversed={self.reversed} declined={self.declined} crashes={self.crashes} faults={sum(self.host_faults.values())}"
            + (f" voids={self.voids}/{self.voids_approved} refunds={self.refunds}/{self.refunds_approved} "
               f"refused={sum(self.refusals.values())}" if self.ops_sent else "")
        )


PROGRESS_EVERY = 2048  # events between two progress callbacks
STEPS_BASE = 200_000  # events for the drain and idle ticks whatever the size of the run
STEPS_PER_SALE = 400  # generous: a sale with re-sends, faults, crashes and reversals takes ~30-60


def step_limit_for(cfg: SimConfig) -> int:
    """A bound on the events of a run of ``cfg.sales`` sales: every loop is bounded, but a long run
    must not stop early and have its unfinished sales judged as violations."""
    return STEPS_BASE + STEPS_PER_SALE * cfg.sales * (2 if cfg.operator_rate else 1)


class _World:
    def __init__(self, cfg: SimConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.now = 1_700_000_000.0 + self.rng.random() * 86_400 * 300
        self.events: list[tuple[float, int, str, Any]] = []
        self.n = 0
        self.trace: list[str] = []
        self.keys: DeviceKeys = init_keys(workdir / "keys", rng=self._det_bytes)
        self.profile = AcquirerProfile.for_seed(cfg.seed) if cfg.acquirer else AcquirerProfile()
        self.path = workdir / "journal.db"
        self.ecfg = EngineConfig(
            cfg.tid,
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
            partial_amount_field=self.profile.partial_field,
            partial_expiry_s=20.0,
            completion_timeout_s=30.0,
        )
        rates = {k: cfg.fault_rate / len(HOST_FAULTS) for k in HOST_FAULTS} if cfg.fault_rate else {}
        self.host = HostCore(seed=cfg.seed, dup_detection=cfg.dup_detection, faults=rates, late_delay=cfg.late_delay,
                             profile=self.profile)
        # The operator's answer to a PARTIAL (accept / cancel / leave it to expire): its own stream.
        self.partial_rng = random.Random(f"posguard.sim.partial.{cfg.seed}")
        self.partials: collections.Counter[str] = collections.Counter()
        self.conn = 0
        self.up = False  # the simulated TCP connection (the host port's ``connected``)
        # Separate streams, so vault nonces and send faults do not shift the seed's other draws.
        self.nonce_rng = random.Random(f"posguard.sim.nonce.{cfg.seed}")
        self.send_rng = random.Random(f"posguard.sim.send.{cfg.seed}")
        self.journal: Journal | None = Journal.create(self.path, self.keys, terminal_id=cfg.tid, now=self.now)
        self.engine: Engine | None = Engine(self.ecfg, self._crypto(), random.Random(cfg.seed ^ 0x5EED))
        self.ex = self._executor(self.engine)
        self.crashes = 0
        self.faults_on = True  # crashes and send faults; off for the final drain
        self.requests: dict[str, Request] = {}
        self.shown: dict[str, list[Result]] = {}
        self.kinds: collections.Counter[str] = collections.Counter()
        # Operator remedies (operator_rate > 0). A separate stream, so the sales of a seed are the
        # same with and without them, and operator_rate 0 draws nothing (earlier traces unchanged).
        self.op_rng = random.Random(f"posguard.sim.ops.{cfg.seed}")
        self.plans: dict[str, list[Request]] = {}  # sale key -> its VOID / REFUND requests, in order
        self.op_sale: dict[str, str] = {}  # VOID / REFUND key -> sale key
        self.op_chained: set[str] = set()  # ops whose successor in the plan is scheduled
        self.op_started: set[str] = set()  # sales whose plan was started by an APPROVED result
        self.partials_seen: set[str] = set()  # PARTIAL results the operator has been asked about
        self.ops_sent = 0
        self.refusals: list[tuple[float, str, str, str]] = []  # (when, op key, code, why it is not legitimate or "")
        self.shown_bad: list[str] = []  # a reader told APPROVED before the host had done it
        self.chip_rng = random.Random(f"posguard.sim.chip.{cfg.seed}")
        self.cards: dict[str, cards.CardModel] = {}  # sale key -> the card presented (chip_rate)
        self.card_said: dict[str, CardDecision] = {}  # sale key -> the card's decision the reader reported
        self.steps = 0
        self.step_limit = cfg.max_steps or step_limit_for(cfg)
        self.limit_reached = False
        self.submitted = 0  # sales whose first submission happened

    def _det_bytes(self, n: int) -> bytes:
        return bytes(self.rng.getrandbits(8) for _ in range(n))

    def _crypto(self) -> JournalCrypto:
        assert self.journal is not None
        return JournalCrypto(self.journal, self.keys.token_key, self.nonce_rng.randbytes)

    def _executor(self, engine: Engine) -> Executor:
        """The daemon's executor class over simulated ports, with power loss before any action."""
        return Executor(engine, SimStore(self), SimHost(self, self.send_rng), SimReader(self), lambda: self.now,
                        before=self._power)

    def _power(self, a: object) -> None:
        if self.faults_on and self.rng.random() < self.cfg.crash_rate:
            raise _Crash(type(a).__name__)

    def log(self, msg: str) -> None:
        self.trace.append(f"{self.now:.3f} {msg}")

    def at(self, delay: float, kind: str, data: Any = None) -> None:
        self.n += 1
        heapq.heappush(self.events, (self.now + delay, self.n, kind, data))

    # ---------------------------------------------------------------- terminal side

    def terminal(self, entry: str, *args: Any) -> None:
        """Call engine entry point ``entry`` through the executor; a crash stops the terminal."""
        self.guarded(lambda ex: ex.call(getattr(ex.engine, entry), *args))

    def guarded(self, fn: Callable[[Executor], None]) -> None:
        if self.engine is None:
            return
        try:
            fn(self.ex)
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
        self.up = False
        self.at(0.5 + self.rng.random(), "restart")

    def restart(self) -> None:
        self.journal = Journal.open(self.path, self.keys, terminal_id=self.cfg.tid)
        self.engine = restore_engine(self.ecfg, self._crypto(), self.journal, random.Random(self.rng.random()))
        self.ex = self._executor(self.engine)
        self.log(f"restart: {self.engine.pending_reversals()} reversals pending before recovery")
        self.terminal("recover")
        self.connect()

    def connect(self) -> None:
        self.conn += 1
        self.up = self.engine is not None
        self.terminal("on_host_up")

    # ---------------------------------------------------------------- host side

    def host_receive(self, conn: int, fields: dict[str, str], arrived: bool = False) -> None:
        """``arrived``: the bytes reached the host before their connection closed (MAYBE_SENT)."""
        if conn != self.conn and not arrived:
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
            if self.cfg.chip_rate and self.chip_rng.random() < self.cfg.chip_rate:
                model = cards.pick(self.chip_rng)
                card = cards.card_data(model, card.pan, card.expiry, amount, "978", self.chip_rng)
            req = Request("R1", txn_id, TxnKind.SALE, amount, "978", card)
            if card.entry_mode:
                self.cards[req.key] = model
            self.requests[req.key] = req
            self.at(t, "submit", (req, 0))
            if self.cfg.operator_rate and self.op_rng.random() < self.cfg.operator_rate:
                self.plans[req.key] = ops = self.plan_ops(i, req)
                for op in ops:
                    self.op_sale[op.key] = req.key
                if self.op_rng.random() < 0.15:  # sent too early: while the sale is still in flight
                    self.at(t + self.op_rng.uniform(0.01, 1.0), "op", (ops[0], 0, False))

    def reader_submit(self, req: Request, attempt: int) -> None:
        if self.engine is None:
            self.at(1.0, "submit", (req, attempt))
            return
        self.log(f"reader submits {req.key[-6:]} attempt {attempt}")
        if attempt == 0 and req.kind is TxnKind.SALE:
            self.submitted += 1
        self.terminal("submit", req)
        if attempt < 3 and self.rng.random() < self.cfg.resend_rate:
            kind = "status" if self.rng.random() < self.cfg.status_rate else "submit"
            self.at(self.rng.uniform(0.1, 2 * self.cfg.host_timeout), kind, (req, attempt + 1))

    # ---------------------------------------------------------------- readers as operators

    def plan_ops(self, i: int, sale: Request) -> list[Request]:
        """What the operator will do about sale ``i`` once it is shown APPROVED."""
        r = self.op_rng

        def op(j: int, kind: TxnKind, amount: int) -> Request:
            txn_id = hashlib.sha256(f"{self.cfg.seed}:{i}:op{j}".encode()).digest()[:16]
            card = None if kind is TxnKind.VOID else sale.card
            return Request("R1", txn_id, kind, max(1, amount), sale.currency, card, sale.txn_id)  # type: ignore[arg-type]

        part = r.randint(1, sale.amount)
        plan = r.choices(["void", "refund", "partial", "refund_void", "void_refund"], weights=[4, 3, 2, 1, 1])[0]
        if plan == "void":
            return [op(0, TxnKind.VOID, sale.amount)]
        if plan == "refund":
            return [op(0, TxnKind.REFUND, sale.amount)]
        if plan == "partial":  # the rest, or sometimes one unit more than is left
            return [op(0, TxnKind.REFUND, part), op(1, TxnKind.REFUND, sale.amount - part + (r.random() < 0.3))]
        if plan == "refund_void":
            return [op(0, TxnKind.REFUND, part), op(1, TxnKind.VOID, sale.amount)]
        return [op(0, TxnKind.VOID, sale.amount), op(1, TxnKind.REFUND, part)]

    def check_shown(self, r: Result) -> None:
        invariants.check_shown(self, r)

    def on_shown(self, r: Result) -> None:
        """A sale the reader saw APPROVED starts its operator plan; APPROVED OFFLINE sometimes tempts
        the operator into an early VOID / REFUND (refused: not APPROVED yet)."""
        if r.state is TxnState.PARTIAL and not r.in_progress and r.key not in self.partials_seen:
            self.partials_seen.add(r.key)
            choice = self.partial_rng.choices(["accept", "cancel", "ignore"], weights=[5, 3, 1])[0]
            self.at(self.partial_rng.uniform(0.1, 5.0), "partial", (r.key, choice))
        if r.state is TxnState.AWAITING_COMPLETION and r.key in self.cards and r.key not in self.card_said:
            cards.card_decides(self, r.key)
        plan = self.plans.get(r.key)
        if plan is None or r.in_progress or r.key in self.op_started:
            return
        if r.state is TxnState.APPROVED:
            self.op_started.add(r.key)
            self.at(self.op_rng.uniform(0.1, 10.0), "op", (plan[0], 0, True))
        elif r.state is TxnState.DEFERRED and self.op_rng.random() < 0.3:
            self.at(self.op_rng.uniform(0.1, 3.0), "op", (plan[0], 0, False))

    def reader_op(self, req: Request, attempt: int, chain: bool) -> None:
        if self.engine is None:
            self.at(1.0, "op", (req, attempt, chain))
            return
        sale_key = self.op_sale[req.key]
        self.ops_sent += 1
        self.log(f"reader sends {req.kind.value} {req.key[-6:]} of {sale_key[-6:]} amount {req.amount} attempt {attempt}")
        plan = self.plans[sale_key]
        if chain and req.key not in self.op_chained:
            self.op_chained.add(req.key)
            j = plan.index(req) + 1
            if j < len(plan):  # the next remedy, maybe while this one is still in flight
                soon = self.op_rng.random() < 0.4  # at once: races the first one's host round trip
                self.at(self.op_rng.uniform(0.0, 0.05) if soon else self.op_rng.uniform(0.05, 8.0), "op", (plan[j], 0, True))
        try:
            self.terminal("submit", req)
        except PosguardError as err:
            why = invariants.refusal_problem(self, req, sale_key, err.code)
            self.refusals.append((self.now, req.key, err.code, why))
            self.log(f"refused {req.key[-6:]} {err.code}{' NOT LEGITIMATE: ' + why if why else ''}")
            if attempt < 3 and self.op_rng.random() < 0.5:  # the operator tries again later, same txn id
                self.at(self.op_rng.uniform(0.5, 10.0), "op", (req, attempt + 1, chain))
            return
        if attempt < 3 and self.op_rng.random() < self.cfg.resend_rate:
            kind = "status" if self.op_rng.random() < self.cfg.status_rate else "op"
            data = (req, attempt + 1) if kind == "status" else (req, attempt + 1, chain)
            self.at(self.op_rng.uniform(0.1, 2 * self.cfg.host_timeout), kind, data)

    def _journaled(self, key: str) -> Txn | None:
        """A transaction as the journal holds it right now (independent of the engine's memory)."""
        assert self.journal is not None
        return _rebuild(key, self.journal.entries_for(key))

    def operator_decides(self, key: str, choice: str) -> None:
        """The operator's answer to a partial approval: CONFIRM (accept) or CANCEL; or nothing."""
        self.partials[choice] += 1
        if choice == "ignore" or self.engine is None:
            return
        self.log(f"operator {choice}s the partial approval of {key[-6:]}")
        try:
            self.terminal("confirm" if choice == "accept" else "cancel", key)
        except PosguardError as err:  # it expired or was already settled: NOTHING_HELD
            self.log(f"{choice} refused {err.code}")

    def reader_status(self, req: Request) -> None:
        if self.engine is None:
            return
        r = self.ex.status(req.key)
        self.log(f"reader STATUS {req.key[-6:]} -> {r.state.value if r else 'UNKNOWN_ID'}")
        if r is not None and not r.in_progress:
            self.shown.setdefault(req.key, []).append(r)
            self.on_shown(r)

    # ---------------------------------------------------------------- main loop

    def run(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Process events until the drain ends or ``step_limit`` events (``limit_reached``).
        ``progress(sales submitted, sales)`` is called every ``PROGRESS_EVERY`` events."""
        self.schedule_sales()
        self.connect()
        self.at(0.25, "tick")
        draining = False
        end = None
        while self.events:
            if self.steps >= self.step_limit:
                self.limit_reached = True
                self.log(f"step limit reached: {self.step_limit} events processed, {len(self.events)} still queued")
                break
            self.steps += 1
            if progress is not None and self.steps % PROGRESS_EVERY == 0:
                progress(self.submitted, self.cfg.sales)
            t, _, kind, data = heapq.heappop(self.events)
            self.now = max(self.now, t)
            if kind == "tick":
                self.terminal("tick")
                if not draining and not any(k in ("submit", "op", "status", "restart", "complete") for _, _, k, _ in self.events):
                    draining = True
                    end = self.now + self.cfg.drain_limit_s
                    self.host.faults = {}
                    self.host.profile = AcquirerProfile()  # fault-free drain: ordinary answers, silences end
                    self.faults_on = False
                    self.log("drain: faults and crashes off")
                if draining and (self.engine is not None and not self.engine.busy()
                                 and not any(t.state is TxnState.PARTIAL for t in self.engine.txns.values())):
                    if all(k == "tick" for _, _, k, _ in self.events):
                        break
                if end is None or self.now < end:
                    self.at(0.25, "tick")
            elif kind == "submit":
                self.reader_submit(*data)
            elif kind == "op":
                self.reader_op(*data)
            elif kind == "status":
                self.reader_status(data[0])
            elif kind == "partial":
                self.operator_decides(*data)
            elif kind == "complete":
                cards.reader_complete(self, *data)
            elif kind == "to_host":
                self.host_receive(*data)
            elif kind == "to_term":
                conn, fields = data
                if conn == self.conn and self.engine is not None:
                    self.log(f"recv {fields.get('t')} stan={fields.get(C.F_STAN)} rc={fields.get(C.F_RESPONSE_CODE)}")
                    self.terminal("host_message", fields)
            elif kind == "garbage":
                if data == self.conn and self.engine is not None:
                    self.log("recv garbage")
                    self.terminal("host_garbage", "HOST_UNDECODABLE", "simulated garbage", 17, "00" * 8)
            elif kind == "close":
                if data == self.conn and self.engine is not None:
                    self.log("connection closed by host")
                    self.guarded(lambda ex: ex.lost_connection())
            elif kind == "reconnect":
                if data == self.conn and self.engine is not None:
                    self.up = True
                    self.terminal("on_host_up")
            elif kind == "restart":
                self.restart()

    def check(self) -> list[str]:
        return check_world(self)


def run_seed(cfg: SimConfig, workdir: Path | None = None, keep_trace: bool = True,
             progress: Callable[[int, int], None] | None = None) -> SimReport:
    """Run one seed end to end and check the invariants. A run stopped by its step limit is not
    judged (``step_limit_reached``): its unfinished sales are no evidence of a violation."""
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="posguard-sim-")) if workdir is None else workdir
    try:
        w = _World(cfg, wd)
        try:
            w.run(progress)
        except Exception as e:  # noqa: BLE001 - an engine that raises is a finding: reported with its seed and trace
            w.log(f"EXCEPTION {e!r}")
            violations = [f"the terminal raised {type(e).__name__}: {e} at {w.now:.3f}"]
            w.engine = None
            if w.journal is not None:
                w.journal.close()
        else:
            if w.limit_reached:
                violations = []
                if w.journal is not None:
                    w.journal.close()
                    w.journal = None
            else:
                violations = w.check()
        txns = list(w.engine.txns.values()) if w.engine else []
        states = [t.state for t in txns if t.kind is TxnKind.SALE]
        voids = [t for t in txns if t.kind is TxnKind.VOID]
        refunds = [t for t in txns if t.kind is TxnKind.REFUND]
        return SimReport(
            seed=cfg.seed,
            ok=not violations and not w.limit_reached,
            violations=violations,
            steps=w.steps,
            step_limit_reached=w.limit_reached,
            sales=len(states),
            approved=sum(s is TxnState.APPROVED for s in states),
            reversed=sum(s is TxnState.REVERSED for s in states),
            declined=sum(s is TxnState.DECLINED for s in states),
            crashes=w.crashes,
            host_faults=dict(w.host.stats().get("faults", {})),
            host_answers=dict(w.host.stats().get("answers", {})),
            partials=dict(w.partials),
            deferred=w.kinds["deferred"],
            advice_reversals=w.kinds["advice_reversal_pending"],
            voids=len(voids),
            voids_approved=sum(t.state is TxnState.APPROVED for t in voids),
            refunds=len(refunds),
            refunds_approved=sum(t.state is TxnState.APPROVED for t in refunds),
            ops_sent=w.ops_sent,
            refusals=dict(collections.Counter(code for _, _, code, _ in w.refusals)),
            trace=w.trace if (keep_trace or violations) else [],
        )
    finally:
        if own:
            shutil.rmtree(wd, ignore_errors=True)


__all__ = ["SimConfig", "SimReport", "run_seed", "HOST_FAULTS"]
