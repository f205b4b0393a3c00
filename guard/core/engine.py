"""The transaction engine: a pure state machine (events in, actions out).

It never touches SQLite, sockets, clocks or randomness. The driver feeds it events with the time
(``now``) and executes the returned actions strictly in order; every ``Append`` (a durable commit)
precedes the ``SendHost`` or ``Reply`` that depends on it, which is what makes the guard
write-ahead. State is rebuilt after a crash from the journal's entries (``Engine.restore``).

Lifecycle of a sale (shared/design/iso8583-reversals.md):
  intent committed -> 0200 sent -> 0210 -> outcome committed -> reader told
  no/invalid answer -> reversal_pending committed -> reader told "not charged"
  -> 0400, then 0401 repeats with backoff -> 0410 -> reversed | cap -> needs_manual
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence, Union

from guard.core import constants as C
from guard.hostlink import iso
from guard.core.errors import IdempotencyConflict, JournalError, PosguardError, RequestInvalid
from guard.core.policies import Action as PolicyAction, History, OfflineConfig, PolicyConfig, decide
from guard.core.model import CardData, Request, Result, TxnKind, TxnState, fingerprint, mask_pan, txn_key, txn_key_hash


# ----------------------------------------------------------------------------------------------
# Actions


Record = tuple[str, str | None, dict[str, Any]]  # (kind, txn key, payload)


@dataclass(frozen=True)
class Append:
    """One durable journal commit: records are (kind, txn key, payload)."""

    records: list[Record]
    vault_put: list[Any] = field(default_factory=list)  # sealed blobs (guard.journal.store.VaultBlob)
    vault_shred: list[str] = field(default_factory=list)


@dataclass(frozen=True, repr=False)
class SendHost:
    """Send an ISO 8583 message. Card fields (2, 14) are filled by the driver from ``card`` or,
    after a restart, from the vault blob ``card_ref``; the engine keeps no clear PAN."""

    key: str | None
    fields: dict[str, str]
    card: CardData | None = None
    card_ref: str | None = None

    def __repr__(self) -> str:
        return f"SendHost({self.key}, mti={self.fields.get('t')}, stan={self.fields.get(C.F_STAN)})"


@dataclass(frozen=True)
class Reply:
    """Tell the reader. Always after the commit of the state it reports."""

    result: Result


Action = Union[Append, SendHost, Reply]


class CardCrypto(Protocol):
    """Keyed card token and vault sealing, injected so the engine stays pure and testable."""

    def token(self, pan: str) -> str: ...

    def seal(self, txn: str, plaintext: bytes) -> Any: ...  # returns an object with `.ref`


@dataclass(frozen=True)
class EngineConfig:
    terminal_id: str
    merchant_id: str
    host_timeout_s: float = C.HOST_TIMEOUT_S
    reversal_timeout_s: float = C.REVERSAL_TIMEOUT_S
    reversal_max_attempts: int = C.REVERSAL_MAX_ATTEMPTS
    backoff_base_s: float = C.REVERSAL_BACKOFF_BASE_S
    backoff_max_s: float = C.REVERSAL_BACKOFF_MAX_S
    saf_window: int = C.SAF_WINDOW
    echo_idle_s: float = C.ECHO_IDLE_S
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    keep_final: int = 5000  # final transactions kept in memory; older ones are read from the journal

    def __post_init__(self) -> None:
        if len(self.terminal_id) != 8 or not (self.terminal_id.isascii() and self.terminal_id.isprintable()):
            raise RequestInvalid("terminal id (field 41) must be exactly 8 printable ASCII characters",
                                 code="CONFIG_TERMINAL_ID")
        if len(self.merchant_id) != 15 or not (self.merchant_id.isascii() and self.merchant_id.isprintable()):
            raise RequestInvalid("merchant id (field 42) must be exactly 15 printable ASCII characters",
                                 code="CONFIG_MERCHANT_ID")


# ----------------------------------------------------------------------------------------------
# State


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

    def result(self, *, in_progress: bool = False) -> Result:
        return Result(
            key=self.key,
            state=self.state,
            response_code=self.rc,
            approval_code=self.approval,
            rrn=self.rrn,
            masked_pan=self.masked_pan,
            stan=self.stan,
            reason=self.reason,
            in_progress=in_progress,
            extra={"amount": self.amount, "currency": self.currency, **({"signature": self.signature} if self.signature else {})},
        )

    def request_fields(self, cfg: EngineConfig) -> dict[str, str]:
        return {
            "t": C.MTI_ADVICE if self.state is TxnState.DEFERRED else C.MTI_FIN_REQUEST,
            C.F_PROC_CODE: C.PROC_REFUND if self.kind is TxnKind.REFUND else C.PROC_PURCHASE,
            C.F_AMOUNT: f"{self.amount:012d}",
            C.F_TRANSMISSION_DT: self.f7,
            C.F_STAN: f"{self.stan:06d}",
            C.F_TERMINAL_ID: cfg.terminal_id,
            C.F_MERCHANT_ID: cfg.merchant_id,
            C.F_CURRENCY: self.currency,
        }


AWAITING = frozenset({TxnState.JOURNALED, TxnState.SENT})
WATCHED = frozenset({TxnState.JOURNALED, TxnState.SENT, TxnState.HELD})  # states with a timer or a drain to wait for


class KeyFilter:
    """Bloom filter of transaction keys the journal holds but memory does not (evicted, pruned).

    A new transaction id is then looked up in the journal only when it may be there: the common
    case, a genuinely new id, costs no SQLite query. False positives only cost that query; there
    are no false negatives. 2^20 bits (128 KiB), 3 probes: ~2% false positives at 100,000 keys.
    """

    __slots__ = ("bits",)
    LOG2_BITS = 20

    def __init__(self) -> None:
        self.bits = bytearray(1 << (self.LOG2_BITS - 3))

    @staticmethod
    def _probes(h: int) -> tuple[int, int, int]:
        h &= 0xFFFF_FFFF_FFFF_FFFF
        m = (1 << KeyFilter.LOG2_BITS) - 1
        return h & m, (h >> 21) & m, (h >> 42) & m

    def add(self, key: str) -> None:
        self.add_hash(txn_key_hash(key))

    def add_hash(self, h: int) -> None:
        """Add a key known only by ``model.txn_key_hash`` (the archived-id index stores that)."""
        bits = self.bits
        for p in self._probes(h):
            bits[p >> 3] |= 1 << (p & 7)

    def __contains__(self, key: str) -> bool:
        bits = self.bits
        return all(bits[p >> 3] & (1 << (p & 7)) for p in self._probes(txn_key_hash(key)))


class Engine:
    """Sans-I/O transaction engine. Not thread-safe: one driver owns it."""

    def __init__(self, cfg: EngineConfig, crypto: CardCrypto, rng: random.Random | None = None,
                 lookup: Callable[[str], Iterable[Any]] | None = None) -> None:
        self.cfg = cfg
        self.lookup = lookup  # read-only: a transaction's journal entries, for ones evicted from memory
        self._evicted = KeyFilter()
        self._finals: OrderedDict[str, None] = OrderedDict()
        self.crypto = crypto
        self.rng = rng or random.Random(0)
        self.txns: dict[str, Txn] = {}
        self.by_stan: dict[int, str] = {}
        self.last_stan = 0
        self.host_up = False
        self.last_host_activity = 0.0
        self.echo_stan: int | None = None
        self.echo_deadline: float | None = None
        self.deposit_stan: int | None = None
        self.deposit_result: str | None = None  # the host's field 39 for the last checkpoint deposit
        self._saf: OrderedDict[str, None] = OrderedDict()  # pending reversals, journal order
        self._adv: OrderedDict[str, None] = OrderedDict()  # deferred sales owing an 0220, journal order
        self._stored: dict[str, int] = {}  # DEFERRED (not final) sales -> amount, for the offline limits
        self._sig_due: dict[str, float] = {}  # approved sales awaiting a signature -> when it is missing
        # Keys that may be in a WATCHED state (a superset, pruned lazily): timers and drains look at
        # these instead of every transaction in memory (up to keep_final), once per loop round.
        self._watch: dict[str, None] = {}
        self.stats: dict[str, int] = {}
        self.history = History(cfg.policy)

    # ------------------------------------------------------------------ restore from the journal

    @classmethod
    def restore(
        cls,
        cfg: EngineConfig,
        crypto: CardCrypto,
        entries: Iterable[Any],
        rng: random.Random | None = None,
        lookup: Callable[[str], Iterable[Any]] | None = None,
    ) -> Engine:
        """Rebuild state from journal entries (objects with .seq, .kind, .txn, .payload, .ts)."""
        eng = cls(cfg, crypto, rng, lookup)
        seq, last = None, 0
        try:
            for n, e in enumerate(entries):
                seq = e.seq
                eng._apply_entry(e.kind, e.txn, e.payload, e.ts, e.seq)
                seq, last = None, e.seq
                if n & 4095 == 4095:
                    eng.history.prune(e.ts)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
            raise _corrupt(seq if seq is not None else f"after {last}", exc) from None
        return eng

    def _apply_entry(self, kind: str, key: str | None, p: dict[str, Any], ts: float, seq: int | None = None) -> None:
        if kind == "stan_use":
            self.last_stan = int(p["stan"])
            return
        if key is None:
            return
        if kind == "intent":
            t = _txn_from_intent(key, p, ts)
            self.txns[key] = t
            self._watch[key] = None
            if t.kind is TxnKind.VOID:
                o = self._get(t.original or "", before_seq=seq)
                if o is not None:
                    o.voided_by = key
            else:
                self.by_stan[t.stan] = key
                self.last_stan = t.stan
                self.history.add(t.card_token, t)
                if not p.get("verdict") and t.kind is TxnKind.SALE:
                    self.history.count(t.card_token, ts, t.amount)
            return
        found = self._get(key, before_seq=seq)
        if found is None:
            return
        t = found
        was_final = t.state.final
        _apply_state(t, kind, p)
        if kind == "held":
            self.history.pending(t.card_token, t)
        elif kind == "released":
            if t.kind is TxnKind.SALE:
                self.history.count(t.card_token, ts, t.amount)
        elif kind == "deferred":
            self._stored[key] = t.amount
            self._adv[key] = None
            self._sig_watch(t)
        elif kind == "advice_attempt":
            self.by_stan[t.stan] = key
            self.last_stan = t.stan
            self._adv.pop(key, None)
        elif kind == "advice_reversal_pending":
            self._enqueue(t)
        elif kind == "advice_reversed":
            self._saf.pop(key, None)
            self._adv[key] = None
        elif kind == "outcome" and t.state is TxnState.APPROVED:
            self._sig_watch(t)
        elif kind in ("signature", "signature_missing"):
            self._sig_due.pop(key, None)
        elif kind == "reversal_pending":
            self.history.pending(t.card_token, t)
            self._finals.pop(key, None)
            if p.get("reason") == "RECONCILE":  # re-queued by an operator: a fresh set of attempts
                t.rev_failures = 0
            self._enqueue(t)
        elif kind in ("reversed", "needs_manual"):
            self._saf.pop(key, None)
        if t.state.final and not was_final:
            self._finalized(t)

    # ------------------------------------------------------------------ bounded memory

    def _finalized(self, t: Txn) -> None:
        """Final transactions stay in memory up to ``keep_final``; older ones are read back from
        the journal when a reader asks about them (idempotency and STATUS never forget)."""
        self._watch.pop(t.key, None)
        self._adv.pop(t.key, None)
        self._stored.pop(t.key, None)
        self._finals[t.key] = None
        self._finals.move_to_end(t.key)
        while len(self._finals) > self.cfg.keep_final:
            old, _ = self._finals.popitem(last=False)
            o = self.txns.get(old)
            if o is None or not o.state.final:
                continue
            self.forget(old)
            self.count("evicted")

    def note_archived(self, key_hashes: Iterable[int]) -> int:
        """Ids (``txn_key_hash``) of transactions compaction archived: looked up if a reader re-uses one."""
        n = 0
        for n, h in enumerate(key_hashes, 1):
            self._evicted.add_hash(h)
        return n

    def forget(self, key: str) -> None:
        """Drop a transaction from memory; it stays findable through ``lookup``."""
        t = self.txns.pop(key, None)
        self._evicted.add(key)
        if t is not None and self.by_stan.get(t.stan) == key:
            del self.by_stan[t.stan]

    def _get(self, key: str, before_seq: int | None = None) -> Txn | None:
        t = self.txns.get(key)
        if t is not None or self.lookup is None or not key or key not in self._evicted:
            return t
        try:
            entries = [e for e in self.lookup(key) if before_seq is None or e.seq < before_seq]
            t = _rebuild(key, entries)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise _corrupt(f"of {key}", exc) from None
        if t is not None:
            self.count("reloaded")
            self.txns[key] = t
            self._watch[key] = None
            # Findable by STAN again, like at its intent: a VOID or completion failure reverses it
            # and the 0410 must find it (a VOID shares its sale's STAN and never owns the slot).
            if t.kind is not TxnKind.VOID and self.by_stan.get(t.stan) not in self.txns:
                self.by_stan[t.stan] = key
            if t.state.final:
                self._finalized(t)
        return t

    def _peek(self, key: str) -> Txn | None:
        """A transaction to look at, without bringing it back into memory: reading one back makes
        room by evicting the oldest final transaction, which may be the one the caller holds (the
        sale a VOID is about to reverse while it checks that sale's refunds)."""
        t = self.txns.get(key)
        if t is not None or self.lookup is None or not key or key not in self._evicted:
            return t
        return _rebuild(key, self.lookup(key))

    def recover(self, now: float) -> list[Action]:
        """After restore: every intent without an outcome may have reached the host -> reverse it.

        Reversals that were in flight at the crash are retried (as 0401) right away."""
        pending = [t for t in self.txns.values() if t.state in AWAITING and t.kind is not TxnKind.VOID]
        advices = [t for t in self.txns.values() if t.state is TxnState.DEFERRED and t.adv_sent and t.key not in self._saf]
        acts: list[Action] = []
        if pending or advices:
            recs: list[Record] = []
            for t in pending:
                self._to_reversal(t, "RECOVERY", now)
                recs.append(("reversal_pending", t.key, {"reason": "RECOVERY", "stan": t.stan}))
            for t in advices:
                recs.append(self._advice_to_reversal(t, "RECOVERY", now))
            acts.append(Append(recs))
        for key in self._saf:
            self.txns[key].rev_next_at = now
        self.count("recovered", len(pending))
        return acts

    # ------------------------------------------------------------------ reader events

    def submit(self, req: Request, now: float) -> list[Action]:
        """A reader request. Raises IdempotencyConflict for a reused id with a different request,
        PosguardError (REFUND_*) for a refund its original does not allow."""
        if req.kind is TxnKind.VOID:
            return self._void(req, now)
        if req.card is None:
            raise RequestInvalid(f"a {req.kind.value.lower()} needs card data", code="REQUEST_BAD_PAN")
        token = self.crypto.token(req.card.pan)
        fp = fingerprint(req.kind, req.amount, req.currency, token, req.original_txn_id)
        key = req.key
        known = self._get(key)
        if known is not None:
            if known.fp != fp:
                self.count("idempotency_conflict")
                raise IdempotencyConflict(
                    f"transaction id {req.txn_id.hex()} was already used for a different request; "
                    "use a new transaction id for a new sale"
                )
            self.count("idempotent_replay")
            return [Reply(known.result(in_progress=known.state in AWAITING))]
        original = self._refund_original(req, token) if req.kind is TxnKind.REFUND else None

        self.history.prune(now)
        verdict = decide(req.kind, req.amount, now, self.history.for_card(token), self.history, token, self.cfg.policy)
        stan = self._next_stan()
        blob = self.crypto.seal(key, _card_plaintext(req.card))
        t = Txn(
            key=key,
            kind=req.kind,
            fp=fp,
            amount=req.amount,
            currency=req.currency,
            card_token=token,
            masked_pan=mask_pan(req.card.pan),
            vault_ref=blob.ref,
            stan=stan,
            f7=iso.transmission_dt(now),
            created=now,
            original=original.key if original else None,
        )
        self.txns[key] = t
        self._watch[key] = None
        self.by_stan[stan] = key
        self.history.add(token, t)
        intent = {
            "kind": t.kind.value,
            "fp": fp,
            "amount": t.amount,
            "currency": t.currency,
            "card_token": token,
            "masked_pan": t.masked_pan,
            "vault_ref": blob.ref,
            "stan": stan,
            "f7": t.f7,
            "tid": self.cfg.terminal_id,
            "mid": self.cfg.merchant_id,
        }
        recs: list[tuple[str, str | None, dict[str, Any]]] = [("intent", key, intent)]
        if original is not None:
            intent["original"] = original.key
            original.refunds.append(key)
            recs.append(("refund_of", original.key, {"refund": key, "amount": t.amount}))
        self.count("intents")
        if verdict.action is PolicyAction.DECLINE:
            self.count("policy_decline")
            t.state, t.reason, t.vault_ref = TxnState.DECLINED, verdict.code, None
            self._finalized(t)
            outcome = {"state": "DECLINED", "rc": "", "approval": "", "rrn": "", "reason": verdict.code,
                       "policy": verdict.detail}
            intent.update(vault_ref=None, verdict=verdict.code)
            return [Append([*recs, ("outcome", key, outcome)]), Reply(t.result())]
        if verdict.action is PolicyAction.HOLD:
            self.count("policy_hold")
            t.state, t.reason = TxnState.HELD, verdict.code
            self.history.pending(token, t)
            intent["verdict"] = verdict.code
            return [Append([*recs, ("held", key, {"code": verdict.code, "detail": verdict.detail})],
                           vault_put=[blob]), Reply(t.result())]
        if t.kind is TxnKind.SALE:
            self.history.count(token, now, req.amount)
        if not self.host_up and self._may_defer(t):
            return self._defer(t, recs, now, vault_put=[blob])
        return [Append(recs, vault_put=[blob]), *self._send_request(t, now, card=req.card)]

    def _send_request(self, t: Txn, now: float, card: CardData | None = None) -> list[Action]:
        """Send the journaled request (0200), or fail it cleanly when there is no host."""
        if not self.host_up:
            reason = self.cfg.offline.refuse(t.amount, len(self._stored), sum(self._stored.values())) \
                if t.kind is TxnKind.SALE else "NO_HOST"
            return self._finish(t, TxnState.DECLINED, reason=reason or "NO_HOST")
        t.state = TxnState.SENT
        t.deadline = now + self.cfg.host_timeout_s
        self._watch[t.key] = None
        return [SendHost(t.key, t.request_fields(self.cfg), card=card, card_ref=None if card else t.vault_ref)]

    def _refund_original(self, req: Request, token: str) -> Txn:
        """The APPROVED sale a refund goes against; refuses what the counter must not do."""
        if req.original_txn_id is None:
            raise PosguardError("a refund must name the original sale (ORIGINAL_TXN_ID)", code="REFUND_NEEDS_ORIGINAL")
        o = self._get(txn_key(req.reader_id, req.original_txn_id))
        if o is None or o.kind is not TxnKind.SALE:
            raise PosguardError("the original sale is not known on this terminal", code="REFUND_ORIGINAL_UNKNOWN")
        if o.state is TxnState.REVERSAL_PENDING:
            raise PosguardError("the original sale is being reversed: the customer gets the money back without a "
                                "refund; wait for the reversal", code="REFUND_ORIGINAL_PENDING_REVERSAL")
        if o.state is not TxnState.APPROVED or o.voided_by:
            raise PosguardError(f"only an APPROVED sale can be refunded (original is {o.state.value})",
                                code="REFUND_NOT_ALLOWED")
        if o.card_token != token:
            raise PosguardError("a refund goes back to the card of the original sale", code="REFUND_CARD_MISMATCH")
        if req.currency != o.currency:
            raise PosguardError("refund currency must equal the original sale's", code="REFUND_NOT_ALLOWED")
        refunded = sum(r.amount for r in (self._peek(k) for k in o.refunds)
                       if r is not None and r.state not in (TxnState.DECLINED, TxnState.REVERSED))
        if req.amount > o.amount - refunded:
            raise PosguardError(f"refund exceeds what is left of the original sale ({o.amount - refunded})",
                                code="REFUND_EXCEEDS_ORIGINAL")
        return o

    def confirm(self, key: str, now: float) -> list[Action]:
        """The operator's CONFIRM of a held request: re-check (a pending reversal still holds
        refunds), then release it to the host. Raises NOTHING_HELD if it is not held."""
        t = self._get(key)
        if t is None or t.state is not TxnState.HELD:
            raise PosguardError("nothing is held for this transaction id", code="NOTHING_HELD")
        self.history.prune(now)
        others = [x for x in self.history.for_card(t.card_token) if x is not t]
        verdict = decide(t.kind, t.amount, now, others, self.history, t.card_token, self.cfg.policy, confirmed=True)
        if verdict.action is PolicyAction.HOLD:
            return [Reply(t.result())]
        if verdict.action is PolicyAction.DECLINE:
            return self._finish(t, TxnState.DECLINED, reason=verdict.code)
        if t.kind is TxnKind.SALE:
            self.history.count(t.card_token, now, t.amount)
        t.state, t.reason = TxnState.JOURNALED, ""
        self._watch[key] = None
        recs: list[Record] = [("released", key, {"by": "operator"})]
        self.count("released")
        if not self.host_up and self._may_defer(t):
            return self._defer(t, recs, now)
        return [Append(recs), *self._send_request(t, now)]

    def cancel(self, key: str, now: float) -> list[Action]:
        """The operator's CANCEL of a held request (wrong amount, wrong card): DECLINED, never sent."""
        t = self._get(key)
        if t is None or t.state is not TxnState.HELD:
            raise PosguardError("nothing is held for this transaction id", code="NOTHING_HELD")
        self.count("cancelled")
        return self._finish(t, TxnState.DECLINED, reason="OPERATOR_CANCELLED")

    def signed(self, key: str, now: float) -> list[Action]:
        """The operator confirms the customer signed the receipt of an approved sale."""
        t = self._get(key)
        if t is None or t.signature not in ("REQUIRED", "MISSING"):
            raise PosguardError("no signature is awaited for this transaction id", code="SIGNATURE_NOT_REQUIRED")
        late = t.signature == "MISSING"
        t.signature = "CAPTURED"
        self._sig_due.pop(key, None)
        return [Append([("signature", key, {"late": late})]), Reply(t.result())]

    # ------------------------------------------------------------------ offline (deferred) sales

    def _may_defer(self, t: Txn) -> bool:
        return t.kind is TxnKind.SALE and not self.cfg.offline.refuse(t.amount, len(self._stored), sum(self._stored.values()))

    def _defer(self, t: Txn, recs: list[Record], now: float,
               vault_put: list[Any] | None = None) -> list[Action]:
        """Approve offline: the card data stays sealed in the vault until the 0220 is answered."""
        t.state, t.reason, t.deferred = TxnState.DEFERRED, "", True
        t.adv_next_at = now
        self._stored[t.key] = t.amount
        self._adv[t.key] = None
        self._sig_watch(t, required=True)
        self.count("deferred")
        rec = ("deferred", t.key, {"stored": len(self._stored), "stored_amount": sum(self._stored.values()),
                                   **({"signature": t.signature} if t.signature else {})})
        return [Append([*recs, rec], vault_put=vault_put or []), Reply(t.result())]

    def _advice_to_reversal(self, t: Txn, reason: str, now: float) -> Record:
        """An 0220 whose fate is unknown is reversed before a fresh one (new STAN) is sent, so a host
        without duplicate detection never books an offline sale twice."""
        t.adv_inflight_until = None
        t.reason = reason
        t.rev_next_at = now
        self._enqueue(t)
        self.count("advice_reversal_pending")
        return ("advice_reversal_pending", t.key, {"reason": reason, "stan": t.stan})

    def _dispatch_advices(self, now: float) -> list[Action]:
        if not self.host_up or not self._adv:
            return []
        inflight = sum(1 for k in self._stored if self.txns[k].adv_inflight_until is not None)
        due: list[Txn] = []
        for key in self._adv:
            if inflight + len(due) >= self.cfg.saf_window:
                break
            t = self.txns[key]
            if t.adv_next_at <= now:
                due.append(t)
        if not due:
            return []
        recs: list[Record] = []
        sends: list[Action] = []
        for t in due:
            del self._adv[t.key]
            t.stan, t.f7, t.adv_sent = self._next_stan(), iso.transmission_dt(now), True
            t.rev_attempts = t.rev_failures = 0
            t.adv_inflight_until = now + self.cfg.host_timeout_s
            self.by_stan[t.stan] = t.key
            recs.append(("advice_attempt", t.key, {"n": t.adv_failures + 1, "stan": t.stan, "f7": t.f7}))
            sends.append(SendHost(t.key, t.request_fields(self.cfg), card_ref=t.vault_ref))
        self.count("advice_sent", len(due))
        return [Append(recs), *sends]

    def _on_advice_response(self, t: Txn, f: dict[str, str], now: float) -> list[Action]:
        rc = f.get(C.F_RESPONSE_CODE, "")
        if t.adv_inflight_until is None or f.get("t") != C.MTI_ADVICE_RESPONSE:
            self.count("late_response")
            return [Append([("late_response", t.key, {"mti": f.get("t"), "rc": rc, "note": "advice_not_in_flight",
                                                      "state": t.state.value})])]
        bad = self._echo_mismatches(t, f)
        if bad or len(rc) != 2 or rc == C.RC_DUPLICATE:
            why = "ECHO_MISMATCH" if bad else "BAD_RESPONSE"
            return [Append([self._advice_to_reversal(t, why, now)]), *self._dispatch_reversals(now)]
        t.adv_inflight_until = None
        t.rc = rc
        if rc == C.RC_APPROVED:
            return self._finish(t, TxnState.APPROVED, approval=f.get(C.F_APPROVAL_CODE, ""), rrn=f.get(C.F_RRN, ""))
        return self._finish(t, TxnState.DECLINED, rrn=f.get(C.F_RRN, ""), reason="ADVICE_DECLINED")

    # ------------------------------------------------------------------ signatures

    def _sig_watch(self, t: Txn, required: bool = False) -> None:
        """Start the missing-signature clock for a sale shown as approved above the limit."""
        lim = self.cfg.policy.signature_above
        if required and t.kind is TxnKind.SALE and lim and t.amount > lim and not t.signature:
            t.signature = "REQUIRED"
        if t.signature == "REQUIRED":
            self._sig_due[t.key] = t.created + self.cfg.policy.signature_timeout_s

    def _signatures_due(self, now: float) -> list[Action]:
        late = [k for k, due in self._sig_due.items() if now >= due]
        if not late:
            return []
        recs: list[Record] = []
        for k in late:
            del self._sig_due[k]
            t = self.txns.get(k)
            if t is not None:
                t.signature = "MISSING"
            recs.append(("signature_missing", k, {"after_s": self.cfg.policy.signature_timeout_s}))
        self.count("signature_missing", len(late))
        return [Append(recs)]

    def _void(self, req: Request, now: float) -> list[Action]:
        """VOID of an APPROVED sale: reverse the original (0400 with its field 90); the VOID's
        own result follows the reversal. Idempotent by the VOID's txn id."""
        key = req.key
        orig_key = txn_key(req.reader_id, req.original_txn_id or b"")
        fp = fingerprint(req.kind, req.amount, req.currency, "", req.original_txn_id)
        known = self._get(key)
        if known is not None:
            if known.fp != fp:
                raise IdempotencyConflict(f"transaction id {req.txn_id.hex()} was already used for a different request")
            return [Reply(known.result(in_progress=not known.state.final))]
        o = self._get(orig_key)
        if o is None or o.kind is not TxnKind.SALE or o.state is not TxnState.APPROVED:
            why = "unknown" if o is None else o.state.value
            raise PosguardError(f"only an APPROVED sale can be voided (original is {why})", code="VOID_NOT_ALLOWED")
        if req.amount != o.amount or req.currency != o.currency:
            raise PosguardError("void amount and currency must equal the original sale's", code="VOID_NOT_ALLOWED")
        if any(r is not None and r.state not in (TxnState.DECLINED, TxnState.REVERSED) for r in map(self._peek, o.refunds)):
            raise PosguardError("this sale has a refund against it; it can no longer be voided", code="VOID_NOT_ALLOWED")
        v = Txn(key=key, kind=TxnKind.VOID, fp=fp, amount=o.amount, currency=o.currency, card_token=o.card_token,
                masked_pan=o.masked_pan, vault_ref=None, stan=o.stan, f7=o.f7, created=now, original=orig_key)
        self.txns[key] = v
        self._watch[key] = None
        o.voided_by = key
        self._to_reversal(o, "VOID", now)
        self.count("voids")
        intent = {"kind": "VOID", "fp": fp, "amount": o.amount, "currency": o.currency, "card_token": o.card_token,
                  "masked_pan": o.masked_pan, "vault_ref": None, "stan": o.stan, "f7": o.f7, "original": orig_key,
                  "tid": self.cfg.terminal_id, "mid": self.cfg.merchant_id}
        rec = ("reversal_pending", orig_key, {"reason": "VOID", "stan": o.stan, "void": key})
        return [Append([("intent", key, intent), rec]), Reply(v.result(in_progress=True)), *self._dispatch_reversals(now)]

    def status(self, key: str) -> Result | None:
        """STATUS(id): the stored result, or None if the id is unknown."""
        t = self._get(key)
        if t is None:
            return None
        return t.result(in_progress=t.state in AWAITING)

    def _void_follow(self, o: Txn, state: TxnState) -> tuple[list[tuple[str, str | None, dict[str, Any]]], list[Action]]:
        """The VOID's outcome record and reply when the sale it voids is settled."""
        v = self.txns.get(o.voided_by or "")
        if v is None or v.state.final:
            return [], []
        v.state = state
        v.reason = "" if state is TxnState.APPROVED else o.reason
        self._finalized(v)
        rec = ("outcome", v.key, {"state": state.value, "rc": "", "approval": "", "rrn": "", "reason": v.reason})
        return [rec], [Reply(v.result())]

    def last_for_reader(self, reader_id: str) -> Result | None:
        """STATUS(LAST): the newest transaction of this reader."""
        prefix = reader_id + ":"
        for key in reversed(list(self.txns)):
            if key.startswith(prefix):
                return self.status(key)
        return None

    def completion_failed(self, key: str, now: float) -> list[Action]:
        """Host approved but the card or terminal could not complete (jPOS 4007): reverse."""
        t = self._get(key)
        if t is None or t.state is not TxnState.APPROVED:
            return []
        self._to_reversal(t, "COMPLETION_FAILED", now)
        return [Append([("reversal_pending", t.key, {"reason": "COMPLETION_FAILED", "stan": t.stan})]), Reply(t.result())]

    # ------------------------------------------------------------------ host events

    def on_host_up(self, now: float) -> list[Action]:
        self.host_up = True
        self.last_host_activity = now
        return self.tick(now)

    def on_host_down(self, now: float) -> list[Action]:
        """The connection is gone: no response can arrive for anything in flight on it."""
        self.host_up = False
        self.echo_stan = self.echo_deadline = None
        acts: list[Action] = []
        sent = [t for t in self._watched() if t.state is TxnState.SENT]
        if sent:
            acts += self._reverse_many(sent, "HOST_DISCONNECTED", now)
        advices = [self.txns[k] for k in self._stored if self.txns[k].adv_inflight_until is not None]
        if advices:
            acts.append(Append([self._advice_to_reversal(t, "HOST_DISCONNECTED", now) for t in advices]))
        for key in self._saf:
            t = self.txns[key]
            if t.rev_inflight_until is not None:
                t.rev_inflight_until = None
                t.rev_next_at = now + self._backoff(t.rev_failures)
        return acts

    def send_failed(self, key: str | None, now: float) -> list[Action]:
        """The driver knows no byte of the message left the terminal."""
        self.host_up = False
        if key is None:
            self.echo_stan = self.echo_deadline = None
            return []
        t = self.txns.get(key)
        if t is None:
            return []
        if t.state is TxnState.SENT:
            return self._finish(t, TxnState.DECLINED, reason="NO_HOST")
        if t.state is TxnState.DEFERRED and t.adv_inflight_until is not None:  # no byte left: send it again later
            t.adv_inflight_until, t.adv_sent = None, False
            t.adv_next_at = now + self._backoff(t.adv_failures + 1)
            self._adv[key] = None
            return []
        if key in self._saf and t.rev_inflight_until is not None:
            t.rev_inflight_until = None
            t.rev_next_at = now + self._backoff(t.rev_failures)
        return []

    def host_garbage(self, code: str, detail: str, raw_len: int, digest: str, now: float) -> list[Action]:
        """Undecodable host input: journal it (no content, only its size and digest), carry on."""
        self.count("host_garbage")
        return [Append([("host_garbage", None, {"code": code, "detail": detail[:200], "len": raw_len, "digest": digest})])]

    def host_message(self, fields: dict[str, str], now: float) -> list[Action]:
        """A decoded ISO 8583 message from the host."""
        self.last_host_activity = now
        for k, n in C.HOST_FIELD_MAX_LEN.items():
            if len(fields.get(k, "")) > n:  # only a custom spec lets one through; never journal it whole
                return self._unmatched(fields, f"FIELD_TOO_LONG:{k}")
        mti = fields.get("t", "")
        stan_s = fields.get(C.F_STAN, "")
        if (len(mti) != 4 or not (mti.isascii() and mti.isdigit()) or mti[2] not in "13"
                or not (0 < len(stan_s) <= 6 and stan_s.isascii() and stan_s.isdigit())):
            return self._unmatched(fields, "NOT_A_RESPONSE")
        stan = int(stan_s)
        cls = mti[1]
        if cls == "8":
            if self.echo_stan == stan:
                self.echo_stan = self.echo_deadline = None
            if self.deposit_stan == stan:
                self.deposit_stan, self.deposit_result = None, fields.get(C.F_RESPONSE_CODE, "")
                return [Append([("checkpoint_deposited", None, {"stan": stan, "rc": self.deposit_result})])]
            return []
        key = self.by_stan.get(stan)
        t = self.txns.get(key) if key else None
        if t is None:
            return self._unmatched(fields, "UNKNOWN_STAN")
        if stan != t.stan:  # an answer to an earlier 0220 of a deferred sale, since reversed
            self.count("late_response")
            return [Append([("late_response", t.key, {"mti": mti, "rc": fields.get(C.F_RESPONSE_CODE, ""),
                                                      "note": "superseded_stan", "stan": stan})])]
        if cls == "2":
            if t.state is TxnState.DEFERRED:
                return self._on_advice_response(t, fields, now)
            return self._on_fin_response(t, fields, now)
        if cls == "4":
            return self._on_reversal_response(t, fields, now)
        return self._unmatched(fields, "UNEXPECTED_MTI")

    def _on_fin_response(self, t: Txn, f: dict[str, str], now: float) -> list[Action]:
        rc = f.get(C.F_RESPONSE_CODE, "")
        if t.state is not TxnState.SENT:
            self.count("late_response")
            note = "after_reversal" if t.state in (TxnState.REVERSAL_PENDING, TxnState.REVERSED, TxnState.NEEDS_MANUAL) else "duplicate"
            return [Append([("late_response", t.key, {"mti": f.get("t"), "rc": rc, "note": note, "state": t.state.value})])]
        bad = self._echo_mismatches(t, f)
        if bad:
            self.count("echo_mismatch")
            return self._reverse_many([t], "ECHO_MISMATCH", now, extra={"fields": bad, "rc": rc})
        if rc == C.RC_DUPLICATE:
            self.count("dup_notice")
            return [Append([("late_response", t.key, {"mti": f.get("t"), "rc": rc, "note": "duplicate_notice"})])]
        if len(rc) != 2:
            self.count("bad_response")
            return self._reverse_many([t], "BAD_RESPONSE", now)
        t.rc = rc
        if rc == C.RC_APPROVED:
            return self._finish(t, TxnState.APPROVED, approval=f.get(C.F_APPROVAL_CODE, ""), rrn=f.get(C.F_RRN, ""))
        return self._finish(t, TxnState.DECLINED, rrn=f.get(C.F_RRN, ""), reason="HOST_DECLINED")

    def _on_reversal_response(self, t: Txn, f: dict[str, str], now: float) -> list[Action]:
        rc = f.get(C.F_RESPONSE_CODE, "")
        if t.key not in self._saf:
            self.count("late_reversal_response")
            return [Append([("late_response", t.key, {"mti": f.get("t"), "rc": rc, "note": "reversal_not_pending", "state": t.state.value})])]
        sent = {C.F_STAN: f"{t.stan:06d}", C.F_TERMINAL_ID: self.cfg.terminal_id, C.F_MERCHANT_ID: self.cfg.merchant_id}
        bad = [k for k in (C.F_STAN, C.F_TERMINAL_ID, C.F_MERCHANT_ID) if f.get(k) != sent[k]]
        if not bad and rc in C.REVERSAL_DONE_CODES and t.state is TxnState.DEFERRED:
            self._saf.pop(t.key, None)
            t.rev_inflight_until = None
            t.adv_sent = False
            t.adv_failures += 1
            t.adv_next_at = now + self._backoff(t.adv_failures)
            self._adv[t.key] = None
            self.count("advice_reversed")
            return [Append([("advice_reversed", t.key, {"rc": rc, "failures": t.adv_failures})])]
        if not bad and rc in C.REVERSAL_DONE_CODES:
            self._saf.pop(t.key, None)
            t.state = TxnState.REVERSED
            t.rev_inflight_until = None
            self.count("reversed")
            self._finalized(t)
            vrec, vreply = self._void_follow(t, TxnState.APPROVED)
            return [Append([("reversed", t.key, {"rc": rc, "attempts": t.rev_attempts}), *vrec], vault_shred=self._shred(t)),
                    *vreply]
        return self._reversal_failed(t, now, f"ECHO_MISMATCH:{','.join(bad)}" if bad else f"RC_{rc or 'NONE'}")

    def _echo_mismatches(self, t: Txn, f: dict[str, str]) -> list[str]:
        """Echo fields (4, 11, 41, 42: C.ECHO_FIELDS) of the response that differ from the request."""
        get = f.get
        if (get(C.F_AMOUNT) == f"{t.amount:012d}" and get(C.F_STAN) == f"{t.stan:06d}"
                and get(C.F_TERMINAL_ID) == self.cfg.terminal_id and get(C.F_MERCHANT_ID) == self.cfg.merchant_id):
            return []
        return iso.echo_mismatches(t.request_fields(self.cfg), f)

    def _unmatched(self, f: dict[str, str], why: str) -> list[Action]:
        self.count("unmatched")
        safe = {k: f.get(k, "")[:C.HOST_FIELD_MAX_LEN[k]] for k in ("t", C.F_STAN, C.F_RESPONSE_CODE)}
        # 41/42 are exempt from the journal's card-number guard (our own ids may be Luhn-valid
        # numbers); what a host sends there is not ours to trust: a long digit run that is not our
        # id is kept masked like a PAN (BIN + last 4 still tell which id it was).
        for k, ours in ((C.F_TERMINAL_ID, self.cfg.terminal_id), (C.F_MERCHANT_ID, self.cfg.merchant_id)):
            v = f.get(k, "")
            safe[k] = mask_pan(v) if v != ours and len(v) >= 13 and v.isdigit() else v
        return [Append([("unmatched_response", None, {"why": why, **safe})])]

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        watched = self._watched()
        ds = [t.deadline for t in watched if t.state is TxnState.SENT and t.deadline is not None]
        for key in self._saf:
            t = self.txns[key]
            ds.append(t.rev_inflight_until if t.rev_inflight_until is not None else t.rev_next_at)
        if self.echo_deadline is not None:
            ds.append(self.echo_deadline)
        if self.cfg.policy.hold_expiry_s > 0:
            ds += [t.created + self.cfg.policy.hold_expiry_s for t in watched if t.state is TxnState.HELD]
        for key in self._stored:
            t = self.txns[key]
            if t.adv_inflight_until is not None:
                ds.append(t.adv_inflight_until)
            elif key in self._adv:
                ds.append(t.created + self.cfg.offline.max_age_s)
                if self.host_up:
                    ds.append(t.adv_next_at)
        ds += self._sig_due.values()
        if self.host_up:
            ds.append(self.last_host_activity + self.cfg.echo_idle_s)
        return min(ds) if ds else None

    def tick(self, now: float) -> list[Action]:
        acts: list[Action] = []
        watched = self._watched()
        expired = [t for t in watched if t.state is TxnState.SENT and t.deadline is not None and now >= t.deadline]
        if expired:
            acts += self._reverse_many(expired, "HOST_TIMEOUT", now)
        for key in list(self._saf):
            t = self.txns[key]
            if t.rev_inflight_until is not None and now >= t.rev_inflight_until:
                acts += self._reversal_failed(t, now, "TIMEOUT")
        if self.cfg.policy.hold_expiry_s > 0:
            for t in [t for t in watched if t.state is TxnState.HELD and now >= t.created + self.cfg.policy.hold_expiry_s]:
                acts += self._finish(t, TxnState.DECLINED, reason="HOLD_EXPIRED")
        if self._stored:
            acts += self._advices_tick(now)
        if self._sig_due:
            acts += self._signatures_due(now)
        acts += self._dispatch_reversals(now)
        acts += self._dispatch_advices(now)
        if self.host_up and self.echo_stan is None and now >= self.last_host_activity + self.cfg.echo_idle_s:
            acts += self._echo(now)
        elif self.echo_deadline is not None and now >= self.echo_deadline:
            self.echo_stan = self.echo_deadline = None
            self.last_host_activity = now
        return acts

    def _advices_tick(self, now: float) -> list[Action]:
        """Unanswered 0220s are reversed; offline sales never forwarded within max_age give up."""
        acts: list[Action] = []
        timed_out = [self.txns[k] for k in self._stored
                     if self.txns[k].adv_inflight_until is not None and now >= self.txns[k].adv_inflight_until]  # type: ignore[operator]
        if timed_out:
            acts.append(Append([self._advice_to_reversal(t, "HOST_TIMEOUT", now) for t in timed_out]))
        expired = [self.txns[k] for k in self._adv if now >= self.txns[k].created + self.cfg.offline.max_age_s]
        for t in expired:
            self.count("offline_expired")
            acts += self._finish(t, TxnState.NEEDS_MANUAL, reason="OFFLINE_EXPIRED")
        return acts

    def pending_reversals(self) -> int:
        return len(self._saf)

    def busy(self) -> bool:
        """True while anything awaits the host: used by drivers to know when a drain is done."""
        return bool(self._saf) or bool(self._stored) or any(t.state in AWAITING and t.kind is not TxnKind.VOID
                                                           for t in self._watched())

    def _watched(self) -> list[Txn]:
        """Transactions in a WATCHED state, in the order they were first watched; prunes the rest."""
        out: list[Txn] = []
        gone: list[str] = []
        txns = self.txns
        for key in self._watch:
            t = txns.get(key)
            if t is not None and t.state in WATCHED:
                out.append(t)
            else:
                gone.append(key)
        for key in gone:
            del self._watch[key]
        return out

    # ------------------------------------------------------------------ internals

    def count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    def _next_stan(self) -> int:
        self.last_stan = self.last_stan + 1 if self.last_stan < C.STAN_MAX else C.STAN_MIN
        return self.last_stan

    def _shred(self, t: Txn) -> list[str]:
        ref, t.vault_ref = t.vault_ref, None
        return [ref] if ref else []

    def _finish(self, t: Txn, state: TxnState, *, approval: str = "", rrn: str = "", reason: str = "") -> list[Action]:
        t.state, t.approval, t.rrn, t.reason, t.deadline = state, approval, rrn, reason, None
        self.count(state.value.lower())
        self._finalized(t)
        if state is TxnState.APPROVED:
            self._sig_watch(t, required=True)
        payload = {"state": state.value, "rc": t.rc, "approval": approval, "rrn": rrn, "reason": reason}
        if t.signature:
            payload["signature"] = t.signature
        return [Append([("outcome", t.key, payload)], vault_shred=self._shred(t)), Reply(t.result())]

    def _to_reversal(self, t: Txn, reason: str, now: float) -> None:
        self.history.pending(t.card_token, t)
        self._finals.pop(t.key, None)
        t.state = TxnState.REVERSAL_PENDING
        t.reason = reason
        t.deadline = None
        t.rev_next_at = now
        self._enqueue(t)

    def _enqueue(self, t: Txn) -> None:
        self._saf[t.key] = None

    def _reverse_many(self, ts: Sequence[Txn], reason: str, now: float, extra: dict[str, Any] | None = None) -> list[Action]:
        """UNKNOWN outcome: commit REVERSAL_PENDING before telling the reader anything."""
        recs: list[Record] = []
        for t in ts:
            self._to_reversal(t, reason, now)
            recs.append(("reversal_pending", t.key, {"reason": reason, "stan": t.stan, **(extra or {})}))
            self.count("reversal_pending")
        acts: list[Action] = [Append(recs)]
        acts += [Reply(t.result()) for t in ts]
        acts += self._dispatch_reversals(now)
        return acts

    def _backoff(self, failures: int) -> float:
        base = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * (2 ** max(0, failures - 1)))
        return base * (0.5 + self.rng.random() / 2)

    def _reversal_failed(self, t: Txn, now: float, why: str) -> list[Action]:
        t.rev_inflight_until = None
        t.rev_failures += 1
        self.count("reversal_failure")
        if t.rev_failures >= self.cfg.reversal_max_attempts:
            self._saf.pop(t.key, None)
            t.state = TxnState.NEEDS_MANUAL
            t.reason = f"REVERSAL_UNCONFIRMED:{why}"
            self.count("needs_manual")
            self._finalized(t)
            vrec, vreply = self._void_follow(t, TxnState.NEEDS_MANUAL)
            return [Append([("needs_manual", t.key, {"reason": t.reason, "attempts": t.rev_attempts}), *vrec],
                           vault_shred=self._shred(t)), *vreply]
        t.rev_next_at = now + self._backoff(t.rev_failures)
        return [Append([("reversal_failed", t.key, {"why": why, "failures": t.rev_failures})])]

    def _reversal_fields(self, t: Txn, mti: str, f7: str) -> dict[str, str]:
        """A reversal (or repeat) of ``t``: its own transmission time ``f7`` in field 7; the
        original's MTI, STAN and field 7 in field 90, which is how the host finds the original
        (a host may refuse a field 7 far from its clock, e.g. after a day-long outage)."""
        original_mti = C.MTI_ADVICE if t.deferred else C.MTI_FIN_REQUEST
        return {
            "t": mti,
            C.F_PROC_CODE: C.PROC_REFUND if t.kind is TxnKind.REFUND else C.PROC_PURCHASE,
            C.F_AMOUNT: f"{t.amount:012d}",
            C.F_TRANSMISSION_DT: f7,
            C.F_STAN: f"{t.stan:06d}",
            C.F_TERMINAL_ID: self.cfg.terminal_id,
            C.F_MERCHANT_ID: self.cfg.merchant_id,
            C.F_CURRENCY: t.currency,
            C.F_ORIGINAL_DATA: iso.field90(original_mti, t.stan, t.f7),
        }

    def _dispatch_reversals(self, now: float) -> list[Action]:
        """Send due reversals, in journal order, up to the window; attempts are journaled first."""
        if not self.host_up:
            return []
        inflight = sum(1 for k in self._saf if self.txns[k].rev_inflight_until is not None)
        due: list[Txn] = []
        for key in self._saf:
            if inflight + len(due) >= self.cfg.saf_window:
                break
            t = self.txns[key]
            if t.rev_inflight_until is None and t.rev_next_at <= now:
                due.append(t)
        if not due:
            return []
        recs: list[Record] = []
        sends: list[Action] = []
        for t in due:
            mti = C.MTI_REVERSAL if t.rev_attempts == 0 else C.MTI_REVERSAL_REPEAT
            t.rev_attempts += 1
            t.rev_inflight_until = now + self.cfg.reversal_timeout_s
            f7 = iso.transmission_dt(now)
            recs.append(("reversal_attempt", t.key, {"n": t.rev_attempts, "mti": mti, "f7": f7}))
            sends.append(SendHost(t.key, self._reversal_fields(t, mti, f7), card_ref=t.vault_ref))
        self.count("reversal_sent", len(due))
        return [Append(recs), *sends]

    def deposit_checkpoint(self, checkpoint_json: str, now: float) -> list[Action]:
        """Send a signed checkpoint to the host (0800, field 70 = 880, field 48 = the checkpoint):
        an anchor held outside the terminal, against truncation or rollback of the journal."""
        if not self.host_up:
            return []
        stan = self._next_stan()
        self.deposit_stan, self.deposit_result = stan, None
        fields = {
            "t": C.MTI_NET_REQUEST,
            C.F_TRANSMISSION_DT: iso.transmission_dt(now),
            C.F_STAN: f"{stan:06d}",
            C.F_TERMINAL_ID: self.cfg.terminal_id,
            C.F_MERCHANT_ID: self.cfg.merchant_id,
            C.F_PRIVATE_DATA: checkpoint_json,
            C.F_NET_MGMT_CODE: C.NET_CHECKPOINT,
        }
        return [Append([("stan_use", None, {"stan": stan, "purpose": "checkpoint"})]), SendHost(None, fields)]

    def pending_work(self) -> int:
        """Transactions the host still owes an answer for: queued reversals and unsent advices."""
        return len(self._saf.keys() | self._stored.keys())

    def _echo(self, now: float) -> list[Action]:
        stan = self._next_stan()
        self.echo_stan = stan
        self.echo_deadline = now + self.cfg.host_timeout_s
        self.last_host_activity = now
        fields = {
            "t": C.MTI_NET_REQUEST,
            C.F_TRANSMISSION_DT: iso.transmission_dt(now),
            C.F_STAN: f"{stan:06d}",
            C.F_TERMINAL_ID: self.cfg.terminal_id,
            C.F_MERCHANT_ID: self.cfg.merchant_id,
            C.F_NET_MGMT_CODE: C.NET_ECHO,
        }
        return [Append([("stan_use", None, {"stan": stan, "purpose": "echo"})]), SendHost(None, fields)]


def _corrupt(where: Any, exc: BaseException) -> JournalError:
    """A journal entry the engine cannot replay (bit rot, or edited without the keys): a journal
    failure naming where, never a traceback. The exception text is left out: it quotes payload."""
    return JournalError(f"journal entry {where} cannot be replayed ({type(exc).__name__}); `posguard journal verify` "
                        "names the first entry that changed", code="JOURNAL_CORRUPT")


def _txn_from_intent(key: str, p: dict[str, Any], ts: float) -> Txn:
    t = Txn(key=key, kind=TxnKind(p["kind"]), fp=p["fp"], amount=int(p["amount"]), currency=p["currency"],
            card_token=p["card_token"], masked_pan=p["masked_pan"], vault_ref=p.get("vault_ref"), stan=int(p["stan"]),
            f7=p["f7"], created=ts)
    t.original = p.get("original")
    return t


def _apply_state(t: Txn, kind: str, p: dict[str, Any]) -> None:
    """What one journal record does to a transaction's own state (no engine indexes)."""
    if kind == "held":
        t.state, t.reason = TxnState.HELD, p.get("code", "")
    elif kind == "released":
        t.state, t.reason = TxnState.JOURNALED, ""
    elif kind == "outcome":
        t.state = TxnState(p["state"])
        t.rc, t.approval, t.rrn, t.reason = p.get("rc", ""), p.get("approval", ""), p.get("rrn", ""), p.get("reason", "")
        t.signature = p.get("signature", t.signature)
    elif kind == "deferred":
        t.state, t.signature, t.deferred = TxnState.DEFERRED, p.get("signature", ""), True
    elif kind == "advice_attempt":
        t.stan, t.f7, t.adv_sent = int(p["stan"]), p["f7"], True
        t.rev_attempts = t.rev_failures = 0
    elif kind == "advice_reversal_pending":
        t.reason = p.get("reason", "")
    elif kind == "advice_reversed":
        t.adv_sent, t.adv_failures = False, int(p.get("failures", t.adv_failures + 1))
    elif kind == "refund_of":
        t.refunds.append(p["refund"])
    elif kind == "signature":
        t.signature = "CAPTURED"
    elif kind == "signature_missing":
        t.signature = "MISSING" if t.signature != "CAPTURED" else t.signature
    elif kind == "reversal_pending":
        t.state, t.reason, t.rc = TxnState.REVERSAL_PENDING, p.get("reason", ""), p.get("rc", t.rc)
        if p.get("void"):  # the sale's own record names its VOID: a sale read back keeps the link
            t.voided_by = p["void"]
    elif kind == "reversal_attempt":
        t.rev_attempts = int(p["n"])
    elif kind == "reversal_failed":
        t.rev_failures = int(p["failures"])
    elif kind == "reversed":
        t.state = TxnState.REVERSED
    elif kind == "needs_manual":
        t.state, t.reason = TxnState.NEEDS_MANUAL, p.get("reason", t.reason)


def _rebuild(key: str, entries: Iterable[Any]) -> Txn | None:
    """A transaction from its own journal entries (for one evicted from memory)."""
    t: Txn | None = None
    for e in entries:
        if e.kind == "intent":
            t = _txn_from_intent(key, e.payload, e.ts)
        elif t is not None:
            _apply_state(t, e.kind, e.payload)
    if t is not None:
        t.vault_ref = None if t.state.final else t.vault_ref
    return t


def _card_plaintext(card: CardData) -> bytes:
    return f"{card.pan}|{card.expiry}".encode()


def card_from_plaintext(data: bytes) -> CardData:
    pan, _, expiry = data.decode().partition("|")
    return CardData(pan, expiry)

