"""Drain what the journal still owes the host (``posguard replay``).

What is pending: every sale whose reversal is queued (``reversal_pending`` without ``reversed``
or ``needs_manual``): 0400 first, then 0401 repeats with the engine's backoff, up to
``saf_window`` in flight matched by STAN; every intent without an outcome (it was in flight at a
crash): recovery commits its reversal before anything is sent; and every offline sale
(``deferred``) not yet acknowledged: sent as an 0220 advice, and an advice left unanswered is
reversed before a fresh one with a new STAN goes (never a plain repeat a host without duplicate
detection could book twice). When the queue is empty, a fresh signed checkpoint is deposited
with the host (0800, field 70 = 880, field 48 = the checkpoint): the anchor an auditor compares
the journal with (``posguard journal verify --anchor``).

Never a new charge decision, by construction: the replay only restores the engine from the
journal and lets it drain; it never submits or releases a sale. An 0220 only forwards a sale the
terminal already approved offline and journaled. Its uplink refuses any MTI but 0220, 0400, 0401
and 0800 (REPLAY_FORBIDDEN_MTI) as a second line of defence. Running it twice, or killing it and
running it again, can at most repeat a reversal, which the host answers idempotently (00, 25 or
94 all mean "no debit left").

Throughput: every answer readable at once is handed to the engine before its records are
committed, in one durable commit (appends are coalesced; an Append is still committed before any
later send or reply, so write-ahead holds). The journal is opened exclusively: the daemon must
be stopped (JOURNAL_BUSY otherwise).
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard.core.engine import Engine, EngineConfig
from guard.core.errors import PosguardError
from guard.journal.format import canonical_json
from guard.journal.store import Journal
from guard.journal.keys import DeviceKeys
from guard.core.model import TxnState
from guard.runtime.executor import BATCH
from guard.runtime.restore import restore_engine
from guard.runtime.service import GuardService, JournalCrypto
from guard.hostlink.uplink import SendOutcome, Uplink

ALLOWED_MTIS = frozenset({"0220", "0400", "0401", "0800"})
_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)
EXIT_DRAINED, EXIT_NEEDS_MANUAL, EXIT_USAGE, EXIT_PENDING, EXIT_JOURNAL = 0, 1, 2, 3, 4


class ReplayError(PosguardError):
    code = "REPLAY_ERROR"


class ReversalOnlyUplink:
    """Wraps an ``Uplink``: refuses to send anything but advices, reversals and network messages."""

    def __init__(self, inner: Uplink) -> None:
        self.inner = inner
        self.sent: Counter[str] = Counter()
        self._corked = False
        self._dup: tuple[tuple[int, int], socket.socket] | None = None

    @property
    def connected(self) -> bool:
        return self.inner.connected

    def connect(self) -> bool:
        self._corked = False
        return self.inner.connect()

    def fileno(self) -> int:
        return self.inner.fileno()

    def poll(self) -> list[Any]:
        return self.inner.poll()

    def close(self) -> None:
        self._close_dup()
        self._corked = False
        self.inner.close()

    def cork(self, on: bool) -> None:
        """TCP_CORK (Linux) around a burst of sends, so it leaves in as few segments as possible;
        a no-op elsewhere or when not connected. Uses a dup of the uplink's socket descriptor."""
        if _TCP_CORK is None or not self.inner.connected or on == self._corked:
            return
        conn = (self.inner.connections, self.inner.fileno())
        if self._dup is None or self._dup[0] != conn:
            self._close_dup()
            try:
                self._dup = (conn, socket.socket(fileno=os.dup(conn[1])))
            except OSError:
                return
        try:
            self._dup[1].setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1 if on else 0)
            self._corked = on
        except OSError:
            self._close_dup()

    def _close_dup(self) -> None:
        if self._dup is not None:
            self._dup[1].close()
            self._dup = None

    def send(self, fields: dict[str, str]) -> SendOutcome:
        mti = fields.get("t", "")
        if mti not in ALLOWED_MTIS:
            raise ReplayError(f"replay refused to send MTI {mti!r}: only advices, reversals and echo may leave",
                              code="REPLAY_FORBIDDEN_MTI")
        out = self.inner.send(fields)
        if out is not SendOutcome.NOT_SENT:
            self.sent[mti] += 1
        return out


class ReplayService(GuardService):
    """GuardService configured for draining (``executor.BATCH``): the records of one burst of host
    answers are committed at once, and transactions are forgotten once final (their outcome
    recorded in ``finished``) so the engine's timer scans stay O(backlog)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("policy", BATCH)
        super().__init__(*args, on_commit=self._forget, **kwargs)
        self.finished: dict[str, Item] = {}

    def _forget(self, records: Sequence[tuple[str, str | None, dict[str, Any]]]) -> None:
        """After a commit: drop transactions that just became final (not VOID-linked) from the engine."""
        eng = self.engine
        for kind, key, _ in records:
            if kind not in ("reversed", "needs_manual", "outcome") or key is None:
                continue
            t = eng.txns.get(key)
            if t is None or not t.state.final or t.original or t.voided_by:
                continue
            self.finished[key] = Item(key, t.stan, t.amount, t.masked_pan, t.state.value, t.reason, t.rev_attempts,
                                      t.currency)
            eng.forget(key)


@dataclass
class Item:
    txn: str
    stan: int
    amount: int
    masked_pan: str
    state: str
    reason: str
    attempts: int
    currency: str = ""


@dataclass
class ReplayReport:
    started_pending: int
    reversed: list[Item] = field(default_factory=list)
    forwarded: list[Item] = field(default_factory=list)  # offline sales the host accepted (0230 00)
    advice_declined: list[Item] = field(default_factory=list)  # offline sales the host refused: collect
    needs_manual: list[Item] = field(default_factory=list)
    pending: list[Item] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    interrupted: bool = False
    checkpoint: dict[str, Any] | None = None  # the checkpoint deposited with the host, if any
    checkpoint_rc: str = ""  # the host's answer to the deposit ("" = not deposited)
    checkpoint_note: str = ""  # why no checkpoint was deposited ("" when one was)
    elapsed: float = 0.0  # wall time of the whole run: opening, recovery, draining and the deposit
    host: str = ""  # host:port the config names
    connect_error: str = ""  # the uplink's last connection failure (CONNECT_REFUSED, ...), "" if none
    connected: bool = False  # the host was reached at least once

    @property
    def exit_code(self) -> int:
        """0 drained, 1 drained but some items need manual action, 3 items still pending or interrupted."""
        if self.pending or self.interrupted:
            return EXIT_PENDING
        return EXIT_NEEDS_MANUAL if (self.needs_manual or self.advice_declined) else EXIT_DRAINED

    def to_json(self) -> dict[str, Any]:
        def items(xs: list[Item]) -> list[dict[str, Any]]:
            return [x.__dict__ for x in xs]

        return {"started_pending": self.started_pending, "reversed": len(self.reversed),
                "forwarded": len(self.forwarded), "advice_declined": items(self.advice_declined),
                "needs_manual": items(self.needs_manual), "pending": items(self.pending), "sent": self.sent,
                "checkpoint_deposited": (self.checkpoint or {}).get("covers_seq") if self.checkpoint_rc == "00" else None,
                "checkpoint_note": self.checkpoint_note,
                "seconds": round(self.seconds, 3), "elapsed": round(self.elapsed, 3), "items_per_s": round(self.rate, 1),
                "host": self.host, "connected": self.connected, "connect_error": self.connect_error,
                "interrupted": self.interrupted, "exit_code": self.exit_code}

    @property
    def rate(self) -> float:
        done = len(self.reversed) + len(self.forwarded) + len(self.advice_declined) + len(self.needs_manual)
        return done / self.seconds if self.seconds > 0 else 0.0


def open_replay(journal_path: Path, keys: DeviceKeys, ecfg: EngineConfig, uplink: Uplink, *,
                rng: random.Random | None = None, clock: Callable[[], float] = time.time,
                reconnect_s: float = 1.0, prune_final: bool = True) -> ReplayService:
    """Open the journal exclusively, restore the engine, commit recovery reversals, wrap the uplink.

    ``prune_final`` drops final transactions from the restored engine (the replay never submits,
    so it needs neither their idempotency keys nor the policy history): the engine's timer scans
    then cost O(backlog), not O(journal). ``last_stan`` is kept, so STANs never go backwards.
    """
    path = Path(journal_path)
    journal = Journal.open_exclusive(path, keys, terminal_id=ecfg.terminal_id)
    try:
        engine = restore_engine(ecfg, JournalCrypto(journal, keys.token_key), journal, rng)
        if prune_final:
            prune_final_txns(engine)
        svc = ReplayService(engine, journal, ReversalOnlyUplink(uplink), clock=clock, reconnect_s=reconnect_s)
        svc.executor.call(engine.recover)
    except BaseException:
        journal.close()
        raise
    return svc


def prune_final_txns(engine: Engine) -> int:
    """Forget final transactions not linked (VOID <-> original) to a live one; returns how many."""
    keep = {k for k, t in engine.txns.items() if not t.state.final}
    for k in list(keep):
        t = engine.txns[k]
        keep.update(x for x in (t.original, t.voided_by) if x)
    gone = [k for k in engine.txns if k not in keep]
    for k in gone:
        engine.forget(k)
    return len(gone)


def run_replay(svc: ReplayService, *, timeout: float, progress: Callable[[int, int], None] | None = None,
               stop: Callable[[], bool] = lambda: False, deposit: bool = True,
               started: float | None = None) -> ReplayReport:
    """Step the service until the queue is empty, ``timeout`` seconds pass or ``stop()``; then
    (``deposit``) hand the host a fresh signed checkpoint. ``started`` (``time.monotonic()`` when
    the command began) makes ``elapsed`` include opening the journal."""
    eng = svc.engine
    todo = [k for k, t in eng.txns.items() if t.state in (TxnState.REVERSAL_PENDING, TxnState.DEFERRED)]
    total = len(todo)
    t0 = time.monotonic()
    end = t0 + timeout
    interrupted = False
    last_report = -1
    link = _LinkWatch(svc)
    while eng.pending_work() and time.monotonic() < end:
        if stop():
            interrupted = True
            break
        svc.step(0.05)
        link.look()
        done = total - eng.pending_work()
        if progress is not None and done != last_report:
            progress(done, total)
            last_report = done
    rep = ReplayReport(total, seconds=time.monotonic() - t0, interrupted=interrupted)
    for k in todo:
        t = eng.txns.get(k)
        item = svc.finished[k] if t is None else Item(k, t.stan, t.amount, t.masked_pan, t.state.value, t.reason,
                                                       t.rev_attempts, t.currency)
        if item.state == TxnState.REVERSED.value:
            rep.reversed.append(item)
        elif item.state == TxnState.APPROVED.value:
            rep.forwarded.append(item)
        elif item.state == TxnState.DECLINED.value:
            rep.advice_declined.append(item)
        elif item.state == TxnState.NEEDS_MANUAL.value:
            rep.needs_manual.append(item)
        else:
            rep.pending.append(item)
    if not deposit:
        rep.checkpoint_note = "not asked for"
    elif interrupted:
        rep.checkpoint_note = "interrupted before the deposit"
    elif rep.pending:
        rep.checkpoint_note = "items are still pending (a checkpoint is deposited once the queue is empty)"
    else:
        rep.checkpoint, rep.checkpoint_rc = deposit_checkpoint(svc, min(10.0, max(1.0, end - time.monotonic())))
        link.look()
        if rep.checkpoint is None:
            rep.checkpoint_note = "the host was not reachable"
        elif rep.checkpoint_rc == "":
            rep.checkpoint_note = "the host did not answer the deposit (0800) in time"
        elif rep.checkpoint_rc != "00":
            rep.checkpoint_note = f"the host refused the deposit (answer {rep.checkpoint_rc})"
    up = svc.uplink
    rep.sent = dict(up.sent) if isinstance(up, ReversalOnlyUplink) else {}
    rep.host, rep.connected, rep.connect_error = link.host, link.connected, link.error
    rep.elapsed = time.monotonic() - (t0 if started is None else started)
    return rep


class _LinkWatch:
    """Remembers whether the uplink ever connected and its last connection failure, to name it."""

    def __init__(self, svc: GuardService) -> None:
        up: Any = svc.uplink
        self.inner: Any = up.inner if isinstance(up, ReversalOnlyUplink) else up
        self.host = f"{getattr(self.inner, 'host', '?')}:{getattr(self.inner, 'port', '?')}"
        self.connected = False
        self.error = ""

    def look(self) -> None:
        if self.inner.connected:
            self.connected = True
        err = getattr(self.inner, "last_error", "")
        if err:
            self.error = str(err)


def deposit_checkpoint(svc: GuardService, timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Commit a checkpoint covering the whole journal and send it to the host; wait (bounded) for
    the 0810. Returns the checkpoint and the host's field 39 ("" when not answered in time)."""
    eng = svc.engine
    end = time.monotonic() + timeout
    while not (svc.uplink.connected and eng.host_up) and time.monotonic() < end:
        svc.step(0.05)
    if not (svc.uplink.connected and eng.host_up):
        return None, ""
    svc.journal.checkpoint(svc.clock())
    cp = svc.journal.latest_checkpoint()
    svc.executor.call(eng.deposit_checkpoint, canonical_json(cp))
    while eng.deposit_stan is not None and svc.uplink.connected and time.monotonic() < end:
        svc.step(0.05)
    return cp, eng.deposit_result or ""
