"""One transaction's state, the table of legal state changes, and ``evolve``: the one function that
applies a journal record to a transaction, both live (the engine applies each record it writes)
and on restore (the engine replays the journal). A state change the table does not allow raises
``IllegalTransition``: a bug when live, a corrupt or forged journal on restore."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from guard.core import constants as C
from guard.core.emv import EntryMode
from guard.core.model import CardData, Result, TxnKind, TxnState
from guard.core.records import Kind

S = TxnState
# state -> the states it may move to (TIGER_STYLE: the one place that says so).
TRANSITIONS: Mapping[TxnState, frozenset[TxnState]] = {
    # VOIDs stay JOURNALED until the reversal of their sale settles them (APPROVED / NEEDS_MANUAL).
    # SENT is never journaled, so on restore a sale moves from JOURNALED straight to its answer.
    S.JOURNALED: frozenset({S.SENT, S.HELD, S.DECLINED, S.DEFERRED, S.REVERSAL_PENDING, S.APPROVED, S.NEEDS_MANUAL,
                            S.PARTIAL, S.AWAITING_COMPLETION}),
    S.SENT: frozenset({S.APPROVED, S.DECLINED, S.REVERSAL_PENDING, S.PARTIAL, S.AWAITING_COMPLETION}),
    # Host approved a chip sale: the card accepts (APPROVED) or not, or no COMPLETE in time (reversed).
    S.AWAITING_COMPLETION: frozenset({S.APPROVED, S.REVERSAL_PENDING}),
    S.PARTIAL: frozenset({S.APPROVED, S.REVERSAL_PENDING, S.AWAITING_COMPLETION}),  # accepted (a chip sale: the card next), cancelled, expired
    S.HELD: frozenset({S.JOURNALED, S.DECLINED}),
    S.DEFERRED: frozenset({S.APPROVED, S.DECLINED, S.NEEDS_MANUAL}),
    S.APPROVED: frozenset({S.REVERSAL_PENDING}),  # VOID
    S.REVERSAL_PENDING: frozenset({S.REVERSED, S.NEEDS_MANUAL}),
    # Final, except that an operator may queue a reversal of a sale the host debited anyway
    # (posguard reconcile --apply): REQUEUE_REASON only.
    S.DECLINED: frozenset({S.REVERSAL_PENDING}),
    S.NEEDS_MANUAL: frozenset({S.REVERSAL_PENDING}),
    S.REVERSED: frozenset(),
    S.UNKNOWN: frozenset(),
}
AWAITS_CARD = frozenset(m.value for m in EntryMode if m.awaits_card)
REQUEUE_REASON = "RECONCILE"  # the reason reconcile writes on such a reversal_pending


class IllegalTransition(ValueError):
    """A state change the table forbids (a ValueError: restore reports it as JOURNAL_CORRUPT)."""


class CardCrypto(Protocol):
    """Keyed card token and vault sealing, injected so the engine stays pure and testable."""

    def token(self, pan: str) -> str: ...

    def seal(self, txn: str, plaintext: bytes) -> Any: ...  # returns an object with `.ref`


@dataclass(slots=True)
class Txn:
    key: str
    kind: TxnKind
    fp: str
    amount: int
    currency: str
    card_token: str
    masked_pan: str
    vault_ref: str | None
    stan: int
    f7: str
    created: float
    state: TxnState = TxnState.JOURNALED
    rc: str = ""
    approval: str = ""
    rrn: str = ""
    reason: str = ""
    deadline: float | None = None  # awaiting 0210 until
    rev_attempts: int = 0  # reversal messages journaled as sent
    rev_failures: int = 0
    rev_next_at: float = 0.0
    rev_inflight_until: float | None = None
    original: str | None = None  # VOID / REFUND: the key of the sale it refers to
    voided_by: str | None = None  # SALE: the VOID that reverses it
    refunds: list[str] = field(default_factory=list)  # SALE: keys of the refunds against it
    signature: str = ""  # "", REQUIRED, CAPTURED or MISSING
    deferred: bool = False  # approved offline once: the host knows it from an 0220, not an 0200
    adv_sent: bool = False  # DEFERRED: an 0220 with the current STAN may have reached the host
    adv_inflight_until: float | None = None
    adv_next_at: float = 0.0
    adv_failures: int = 0
    approved: int | None = None  # a partial approval's amount (None: the whole amount)
    rev_since: float = 0.0  # when its first reversal message was sent (the horizon counts from here; 0: none yet)
    rev_last_rc: str = ""  # the host's field 39 on the last 0410 that did not end the reversal
    entry_mode: str = ""  # emv.EntryMode value from the intent ("": not told, as MANUAL)
    online_pin: bool = False  # the reader sent a PIN block (kept in memory only, never journaled)
    issuer_icc: bytes = b""  # field 55 of the 0210 for the reader (memory only: never journaled)

    @property
    def awaits_card(self) -> bool:
        """A sale whose host approval is final only once the card accepts it (COMPLETE)."""
        return self.kind is TxnKind.SALE and self.entry_mode in AWAITS_CARD

    @property
    def settled(self) -> int:
        """The amount the host debited or credited on approval: a partial's approved amount."""
        return self.amount if self.approved is None else self.approved

    def result(self, *, in_progress: bool = False) -> Result:
        extra: dict[str, Any] = {"amount": self.amount, "currency": self.currency}
        if self.approved is not None:
            extra["approved_amount"] = self.approved
        if self.signature:
            extra["signature"] = self.signature
        if self.issuer_icc and self.state is TxnState.AWAITING_COMPLETION:
            extra["issuer_icc"] = self.issuer_icc
        return Result(key=self.key, state=self.state, response_code=self.rc, approval_code=self.approval,
                      rrn=self.rrn, masked_pan=self.masked_pan, stan=self.stan, reason=self.reason,
                      in_progress=in_progress, extra=extra)

    def request_fields(self, terminal_id: str, merchant_id: str,
                       entry_codes: Mapping[str, str] | None = None) -> dict[str, str]:
        f = {
            "t": C.MTI_ADVICE if self.state is TxnState.DEFERRED else C.MTI_FIN_REQUEST,
            C.F_PROC_CODE: C.PROC_REFUND if self.kind is TxnKind.REFUND else C.PROC_PURCHASE,
            C.F_AMOUNT: f"{self.amount:012d}",
            C.F_TRANSMISSION_DT: self.f7,
            C.F_STAN: f"{self.stan:06d}",
            C.F_TERMINAL_ID: terminal_id,
            C.F_MERCHANT_ID: merchant_id,
            C.F_CURRENCY: self.currency,
        }
        if self.entry_mode and entry_codes:
            f[C.F_POS_ENTRY_MODE] = entry_codes[self.entry_mode]
        return f


def move(t: Txn, to: TxnState, *, requeue: bool = False) -> None:
    """Change ``t.state``, or raise IllegalTransition. The only assignment of ``Txn.state``."""
    frm = t.state
    if to is frm and to in (S.REVERSAL_PENDING, S.DEFERRED):
        return  # re-queued / re-forwarded in place
    if to not in TRANSITIONS[frm] or (frm in (S.DECLINED, S.NEEDS_MANUAL) and not requeue):
        raise IllegalTransition(f"{t.kind.value} {frm.value} -> {to.value}")
    t.state = to


def from_intent(key: str, p: Mapping[str, Any], ts: float) -> Txn:
    t = Txn(key=key, kind=TxnKind(p["kind"]), fp=p["fp"], amount=int(p["amount"]), currency=p["currency"],
            card_token=p["card_token"], masked_pan=p["masked_pan"], vault_ref=p.get("vault_ref"),
            stan=int(p["stan"]), f7=p["f7"], created=ts)
    t.original = p.get("original")
    t.entry_mode = p.get("entry", "")
    t.online_pin = bool(p.get("pin", False))
    return t


def evolve(t: Txn, kind: str, p: Mapping[str, Any]) -> None:
    """What one journal record does to a transaction's own state (no engine indexes)."""
    if kind == Kind.HELD:
        move(t, S.HELD)
        t.reason = p.get("code", "")
    elif kind == Kind.RELEASED:
        move(t, S.JOURNALED)
        t.reason = ""
    elif kind == Kind.OUTCOME:
        move(t, TxnState(p["state"]))
        t.rc, t.approval, t.rrn, t.reason = p.get("rc", ""), p.get("approval", ""), p.get("rrn", ""), p.get("reason", "")
        t.signature = p.get("signature", t.signature)
        t.deadline = None
        if "approved_amount" in p:
            t.approved = int(p["approved_amount"])
    elif kind == Kind.PARTIAL:
        move(t, S.PARTIAL)
        t.rc, t.approval, t.rrn, t.reason = p["rc"], p.get("approval", ""), p.get("rrn", ""), "PARTIAL_APPROVAL"
        t.approved, t.deadline = int(p["approved_amount"]), None
    elif kind == Kind.AWAIT_COMPLETION:
        move(t, S.AWAITING_COMPLETION)
        t.rc, t.approval, t.rrn, t.reason = p["rc"], p.get("approval", ""), p.get("rrn", ""), ""
        t.deadline = None  # set by the engine: journal time + completion_timeout_s
    elif kind == Kind.DEFERRED:
        move(t, S.DEFERRED)
        t.signature, t.deferred, t.reason = p.get("signature", ""), True, ""
    elif kind == Kind.ADVICE_ATTEMPT:
        t.stan, t.f7, t.adv_sent = int(p["stan"]), p["f7"], True
        t.rev_attempts = t.rev_failures = 0
    elif kind == Kind.ADVICE_REVERSAL_PENDING:
        t.reason = p.get("reason", "")
    elif kind == Kind.ADVICE_REVERSED:
        t.adv_sent, t.adv_failures = False, int(p.get("failures", t.adv_failures + 1))
    elif kind == Kind.REFUND_OF:
        t.refunds.append(p["refund"])
    elif kind == Kind.SIGNATURE:
        t.signature = "CAPTURED"
    elif kind == Kind.SIGNATURE_MISSING:
        t.signature = "MISSING" if t.signature != "CAPTURED" else t.signature
    elif kind == Kind.REVERSAL_PENDING:
        requeue = t.state.final and p.get("reason") == REQUEUE_REASON
        move(t, S.REVERSAL_PENDING, requeue=requeue)
        t.reason, t.deadline = p.get("reason", ""), None
        if requeue:  # re-queued by an operator: a fresh set of attempts and a fresh horizon
            t.rev_failures, t.rev_since = 0, 0.0
        if p.get("void"):  # the sale's own record names its VOID: a sale read back keeps the link
            t.voided_by = p["void"]
    elif kind == Kind.REVERSAL_ATTEMPT:
        t.rev_attempts = int(p["n"])
    elif kind == Kind.REVERSAL_FAILED:
        t.rev_failures = int(p["failures"])
        t.rev_last_rc = p.get("rc", t.rev_last_rc)
    elif kind == Kind.REVERSED:
        move(t, S.REVERSED)
    elif kind == Kind.NEEDS_MANUAL:
        move(t, S.NEEDS_MANUAL)
        t.reason = p.get("reason", t.reason)
        t.rev_last_rc = p.get("last_rc", t.rev_last_rc)


def rebuild(key: str, entries: Iterable[Any]) -> Txn | None:
    """A transaction from its own journal entries (objects with .kind, .payload, .ts)."""
    t: Txn | None = None
    for e in entries:
        if e.kind == Kind.INTENT:
            t = from_intent(key, e.payload, e.ts)
        elif t is not None:
            evolve(t, e.kind, e.payload)
    if t is not None and t.state.final:
        t.vault_ref = None
    return t


def card_plaintext(card: CardData) -> bytes:
    """What the vault keeps of a card until the sale is final: PAN, expiry and, for chip sales,
    entry mode, card sequence number, track 2 equivalent and ICC data. Never the PIN block."""
    if not (card.entry_mode or card.pan_seq or card.track2 or card.icc):
        return f"{card.pan}|{card.expiry}".encode()
    return f"{card.pan}|{card.expiry}|{card.entry_mode}|{card.pan_seq}|{card.track2}|{card.icc.hex()}".encode()


def card_from_plaintext(data: bytes) -> CardData:
    parts = data.decode().split("|")
    if len(parts) <= 2:
        return CardData(parts[0], parts[1] if len(parts) > 1 else "")
    pan, expiry, entry, seq, track2, icc = parts[:6]
    return CardData(pan, expiry, entry_mode=entry, pan_seq=seq, track2=track2, icc=bytes.fromhex(icc))
