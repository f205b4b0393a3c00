"""The invariants the deterministic simulation checks after a fault-free drain.

Judged from a fresh restore of the journal and the host simulator's ledger (what the acquirer
booked, by its own rules), never from the engine's memory: every sale is APPROVED iff the host
holds exactly one net debit for it (of the amount the terminal settled), VOIDs and refunds agree
with their sales, and what the reader was shown never contradicts the final outcome.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING

from guard.core.emv import CardDecision
from guard.core.model import Request, Result, TxnKind, TxnState
from guard.core.txn import Txn
from guard.journal.store import Journal
from guard.journal.verify import verify_journal
from guard.runtime.restore import restore_engine

if TYPE_CHECKING:
    from guard.simulation.deterministic import _World

TID, MID = "SIMTERM1", "SIMMERCHANT0001"  # the simulated terminal's ids (deterministic.TID / MID)



def check_void(self: _World, v: Txn) -> list[str]:
    assert self.engine is not None
    bad: list[str] = []
    o = self.engine.txns.get(v.original or "")
    if o is None:
        return [f"{v.key}: VOID of {v.original}, which the journal does not hold"]
    net = self.host.net_debits(self.cfg.tid, MID, f"{o.stan:06d}", o.f7[:4])
    if net:
        bad.append(f"{v.key}: VOID {v.state.value} but the host still holds {net} net debits for sale {o.key}")
    if not v.state.final:
        bad.append(f"{v.key}: VOID still {v.state.value} after drain (sale {o.key} is {o.state.value})")
    elif (v.state is TxnState.APPROVED) != (o.state is TxnState.REVERSED):
        bad.append(f"{v.key}: VOID {v.state.value} but its sale {o.key} is {o.state.value}")
    if v.state is TxnState.NEEDS_MANUAL:
        bad.append(f"{v.key}: VOID NEEDS_MANUAL after a fault-free drain")
    for r in self.shown.get(v.key, []):
        if not r.in_progress and r.state is not v.state:
            bad.append(f"{v.key}: reader was shown VOID {r.state.value}, final is {v.state.value}")
    return bad

def check_world(self: _World) -> list[str]:
    """After a fault-free drain: the invariants of the module docstring of ``deterministic``."""
    bad: list[str] = []
    if self.journal is not None:
        self.journal.close()
    # Judge by what the journal holds after a fresh restore, not by the engine's memory.
    self.journal = Journal.open(self.path, self.keys, terminal_id=self.cfg.tid)
    self.kinds = collections.Counter(e.kind for e in self.journal.entries())
    self.engine = restore_engine(dataclasses.replace(self.ecfg, keep_final=10**9), self._crypto(), self.journal,
                                 snapshot=False)
    # Net records per (STAN, MMDD) and type: a SALE is a debit, a REFUND a credit.
    ledger: collections.Counter[tuple[str, str, str]] = collections.Counter()
    amounts: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for d in self.host.debits():
        if not d.reversed and (d.tid, d.mid) == (self.cfg.tid, MID):
            ledger[(d.stan, d.date, d.type)] += 1
            amounts[(d.stan, d.date, d.type)] += d.amount
    txns = self.engine.txns
    by_stan: dict[tuple[int, str], str] = {}
    for key, t in txns.items():
        if t.kind is TxnKind.VOID:  # shares its sale's STAN; judged with the sale below
            bad += check_void(self, t)
            continue
        by_stan[(t.stan, t.f7[:4])] = key
        stan, mmdd = f"{t.stan:06d}", t.f7[:4]
        own, other = ("REFUND", "SALE") if t.kind is TxnKind.REFUND else ("SALE", "REFUND")
        net = ledger[(stan, mmdd, own)]
        what = "net credits" if t.kind is TxnKind.REFUND else "net debits"
        if t.state is TxnState.APPROVED and net != 1:
            bad.append(f"{key}: terminal APPROVED but host holds {net} {what}")
        if t.state is TxnState.APPROVED and net == 1 and amounts[(stan, mmdd, own)] != t.settled:
            bad.append(f"{key}: terminal APPROVED for {t.settled} but the host booked {amounts[(stan, mmdd, own)]}")
        if t.state is not TxnState.APPROVED and net != 0:
            bad.append(f"{key}: terminal {t.state.value} but host holds {net} {what}")
        if ledger[(stan, mmdd, other)]:
            bad.append(f"{key}: host holds a {other} record under this {t.kind.value}'s STAN {stan}")
        if not t.state.final:
            bad.append(f"{key}: still {t.state.value} after drain")
        if t.state is TxnState.NEEDS_MANUAL:
            bad.append(f"{key}: NEEDS_MANUAL after a fault-free drain")
        void = txns.get(t.voided_by or "")
        voided = void is not None and void.state is TxnState.APPROVED and t.state is TxnState.REVERSED
        for r in self.shown.get(key, []):
            if r.in_progress:
                continue
            if r.state is TxnState.APPROVED and t.state is not TxnState.APPROVED and not voided:
                bad.append(f"{key}: reader was shown APPROVED, final is {t.state.value}")
            if (r.state not in (TxnState.APPROVED, TxnState.DEFERRED, TxnState.PARTIAL, TxnState.AWAITING_COMPLETION)
                    and t.state is TxnState.APPROVED):
                bad.append(f"{key}: reader was shown {r.state.value}, final is APPROVED (charged)")
        said = self.card_said.get(key)
        if said is not None and said is not CardDecision.ACCEPTED and t.state is TxnState.APPROVED:
            bad.append(f"{key}: the card did not accept ({said.value}) but the terminal is APPROVED")
        if t.kind is TxnKind.SALE and t.refunds:
            approved = [txns[k] for k in t.refunds if k in txns and txns[k].state is TxnState.APPROVED]
            if sum(r.settled for r in approved) > t.settled:
                bad.append(f"{key}: APPROVED refunds {sum(r.settled for r in approved)} exceed the sale's {t.settled}")
            if approved and t.state is not TxnState.APPROVED:
                bad.append(f"{key}: {t.state.value} sale has {len(approved)} APPROVED refund(s): money back twice")
    for (stan, mmdd, typ), net in ledger.items():
        if net and (int(stan), mmdd) not in by_stan:
            bad.append(f"host holds a {'credit' if typ == 'REFUND' else 'debit'} for stan {stan} {mmdd} "
                       "that the journal does not know")
    bad += self.shown_bad
    for when, key, code, why in self.refusals:
        if why:
            bad.append(f"{key}: refused {code} at {when:.3f} without cause: {why}")
    for key in self.shown:
        if key not in self.engine.txns:
            bad.append(f"{key}: reader was shown a result the journal does not hold")
    self.journal.close()
    rep = verify_journal(self.path, k0=self.keys.k0, public_key=self.keys.signing_key.public_key())
    if not rep.ok:
        bad.append(f"journal does not verify: {rep.reason} at {rep.first_bad_seq}: {rep.detail}")
    self.journal = None
    return bad


def check_shown(self: _World, r: Result) -> None:
    """What the reader is told APPROVED must already be true at the host, at that moment: the
    sale's debit booked, the refund's credit booked, the voided sale's debit reversed."""
    if r.in_progress or r.state is not TxnState.APPROVED:
        return
    t = self._journaled(r.key)
    if t is None:
        self.shown_bad.append(f"{r.key}: reader shown APPROVED for an id the journal does not hold")
        return
    if t.kind is TxnKind.VOID:
        o = self._journaled(t.original or "")
        net = self.host.net_debits(self.cfg.tid, MID, f"{t.stan:06d}", t.f7[:4]) if o is not None else -1
        if net != 0:
            self.shown_bad.append(f"{r.key}: reader shown VOID APPROVED at {self.now:.3f} while the host "
                                  f"holds {net} net debits for sale {t.original}")
        return
    typ = "REFUND" if t.kind is TxnKind.REFUND else "SALE"
    held = self.host.net_debits_of(self.cfg.tid, MID, f"{t.stan:06d}", t.f7[:4], typ)  # per key: O(1), not a ledger copy
    if held != 1:
        self.shown_bad.append(f"{r.key}: reader shown {typ} APPROVED at {self.now:.3f} while the host holds {held}")


def refusal_problem(self: _World, req: Request, sale_key: str, code: str) -> str:
    """Why a refusal is NOT legitimate given what the journal holds at that moment ("" if it is)."""
    if self._journaled(req.key) is not None:
        return "the refused id is already journaled (known ids must be answered, not refused)"
    o = self._journaled(sale_key)
    state = o.state if o is not None else None
    live = [x for x in (self._journaled(k) for k in (o.refunds if o else []))
            if x is not None and x.state not in (TxnState.DECLINED, TxnState.REVERSED)]
    voided = o is not None and self.journal is not None and any(
        e.kind == "reversal_pending" and e.payload.get("void") for e in self.journal.entries_for(sale_key))
    seen = f"original {state.value if state else 'unknown'}, {len(live)} live refund(s), voided={voided}"
    if req.kind is TxnKind.VOID:  # the amount must be what the sale settled (a partial's approved amount)
        ok = code == "VOID_NOT_ALLOWED" and (state is not TxnState.APPROVED or bool(live)
                                             or (o is not None and req.amount != o.settled))
    elif code == "REFUND_ORIGINAL_UNKNOWN":
        ok = o is None
    elif code == "REFUND_ORIGINAL_PENDING_REVERSAL":
        ok = state is TxnState.REVERSAL_PENDING
    elif code == "REFUND_NOT_ALLOWED":
        ok = state is not TxnState.APPROVED or voided
    elif code == "REFUND_EXCEEDS_ORIGINAL":
        ok = o is not None and sum(x.settled for x in live) + req.amount > o.settled
    else:
        ok = False
    return "" if ok else f"{code} but {seen}"
