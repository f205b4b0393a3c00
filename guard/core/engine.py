"""The transaction engine: a pure state machine (events in, actions out).

It never touches SQLite, sockets, clocks or randomness of its own: the executor hands it events
with the time (``now``), an injected ``Randomness`` and, when it asks with ``Load``, the journal
entries of transactions it no longer keeps in memory; it runs the returned actions strictly in
order. Every ``Append`` (a durable commit) precedes the ``SendHost`` or ``Reply`` that depends on
it, which is what makes the guard write-ahead. Every state change is a journal record applied by
``txn.evolve``, live and on restore alike, and checked against ``txn.TRANSITIONS``.

Lifecycle of a sale (ISO 8583:1987 reversal practice, see docs/HOST.md):
  intent committed -> 0200 sent -> 0210 -> outcome committed -> reader told
  no/invalid answer -> reversal_pending committed -> reader told "not charged"
  -> 0400, then 0401 repeats with backoff -> 0410 -> reversed | cap -> needs_manual
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from guard.core import emv
from guard.core.actions import Action, Append, EngineConfig, Load, Randomness, Record, Reply, SendHost
from guard.core.errors import IdempotencyConflict, JournalError, PosguardError, RequestInvalid
from guard.core.host_events import HostEvents
from guard.core.model import CardData, Request, Result, TxnKind, TxnState, fingerprint, mask_pan, txn_key
from guard.core.policies import Action as PolicyAction
from guard.core.policies import decide
from guard.core.records import Kind
from guard.core.state import AWAITING, NeedData, corrupt, entry
from guard.core.txn import CardCrypto, Txn, card_from_plaintext, card_plaintext, evolve, from_intent, move, rebuild

__all__ = ["Action", "Append", "CardCrypto", "Engine", "EngineConfig", "Load", "Reply", "SendHost", "Txn",
           "card_from_plaintext"]

class Engine(HostEvents):
    """Sans-I/O transaction engine. Not thread-safe: one executor owns it."""

    def __init__(self, cfg: EngineConfig, crypto: CardCrypto, rng: Randomness | None = None) -> None:
        super().__init__(cfg, crypto, rng)
        self._applied = 0

    # ------------------------------------------------------------------ restore from the journal

    @classmethod
    def restore(cls, cfg: EngineConfig, crypto: CardCrypto, entries: Iterable[Any],
                rng: Randomness | None = None) -> Engine:
        """Rebuild state from entries (objects with .seq, .kind, .txn, .payload, .ts) that need no
        other data: a journal whose entries may name evicted or archived transactions is restored
        by the executor (``guard.runtime.restore``), which answers ``apply``'s ``Load``."""
        eng = cls(cfg, crypto, rng)
        for e in entries:
            need = eng.apply(e)
            if need is not None:
                raise JournalError(f"journal entry {e.seq} refers to a transaction this restore was not given",
                                   code="JOURNAL_CORRUPT")
        return eng

    def apply(self, e: Any) -> Load | None:
        """Replay one journal entry; ``Load`` (nothing changed) if it needs a transaction's entries
        before ``e.seq`` first: hand them in with ``load`` and apply ``e`` again."""
        try:
            self._apply_entry(e.kind, e.txn, e.payload, e.ts)
        except NeedData as n:
            return Load(n.keys, before_seq=e.seq)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
            raise corrupt(e.seq, exc) from None
        self._loaded.clear()
        self._applied += 1
        if self._applied & 4095 == 0:
            self.history.prune(e.ts)
        return None

    def _apply_entry(self, kind: str, key: str | None, p: dict[str, Any], ts: float) -> None:
        if kind == Kind.STAN_USE or kind == Kind.SNAPSHOT:
            self.last_stan = int(p["stan"])
            return
        if key is None:
            return
        if kind == Kind.INTENT:
            t = from_intent(key, p, ts)
            o = self._get(t.original or "") if t.kind is TxnKind.VOID else None
            self.txns[key] = t
            self.newest[key.rpartition(":")[0]] = key
            self._evicted.add(key)
            self._watch[key] = None
            if t.kind is TxnKind.VOID:
                if o is not None:
                    o.voided_by = key
            else:
                self.by_stan[t.stan] = key
                self.last_stan = t.stan
                self.history.add(t.card_token, t)
                if not p.get("verdict") and t.kind is TxnKind.SALE:
                    self.history.count(t.card_token, ts, t.amount)
            return
        found = self._get(key)
        if found is None:
            return
        t = found
        was_final = t.state.final
        evolve(t, kind, p)
        if kind == Kind.HELD:
            self.history.pending(t.card_token, t)
        elif kind == Kind.RELEASED:
            if t.kind is TxnKind.SALE:
                self.history.count(t.card_token, ts, t.amount)
        elif kind == Kind.DEFERRED:
            self._stored[key] = t.amount
            self._adv[key] = None
            self._sig_watch(t)
        elif kind == Kind.ADVICE_ATTEMPT:
            self.by_stan[t.stan] = key
            self.last_stan = t.stan
            self._adv.pop(key, None)
        elif kind == Kind.ADVICE_REVERSAL_PENDING:
            self._saf[key] = None
            t.rev_since = 0.0
        elif kind == Kind.ADVICE_REVERSED:
            self._saf.pop(key, None)
            self._adv[key] = None
        elif kind == Kind.OUTCOME and t.state is TxnState.APPROVED:
            self._sig_watch(t)
        elif kind in (Kind.SIGNATURE, Kind.SIGNATURE_MISSING):
            self._sig_due.pop(key, None)
        elif kind == Kind.REVERSAL_PENDING:
            self.history.pending(t.card_token, t)
            self._finals.pop(key, None)
            self._saf[key] = None
        elif kind == Kind.REVERSAL_ATTEMPT:
            t.rev_since = t.rev_since or ts
        elif kind == Kind.PARTIAL:
            t.deadline = ts + self.cfg.partial_expiry_s
            self._watch[key] = None
        elif kind == Kind.AWAIT_COMPLETION:  # the timer runs on after a restart: no COMPLETE, reversed
            t.deadline = ts + self.cfg.completion_timeout_s
            self._watch[key] = None
        elif kind in (Kind.REVERSED, Kind.NEEDS_MANUAL):
            self._saf.pop(key, None)
        if t.state.final and not was_final:
            self._finalized(t)


    @entry
    def recover(self, now: float) -> list[Action]:
        """After restore: every intent without an outcome may have reached the host -> reverse it.

        Reversals that were in flight at the crash are retried (as 0401) right away."""
        pending = [t for t in self.txns.values() if t.state in AWAITING and t.kind is not TxnKind.VOID]
        advices = [t for t in self.txns.values() if t.state is TxnState.DEFERRED and t.adv_sent and t.key not in self._saf]
        acts: list[Action] = []
        if pending or advices:
            recs: list[Record] = [self._to_reversal(t, "RECOVERY", now) for t in pending]
            for t in advices:
                recs.append(self._advice_to_reversal(t, "RECOVERY", now))
            acts.append(Append(recs))
        for key in self._saf:
            self.txns[key].rev_next_at = now
        self.count("recovered", len(pending))
        return acts

    # ------------------------------------------------------------------ reader events

    @entry
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
        stan = self._next_stan(now)
        blob = self.crypto.seal(key, card_plaintext(req.card))
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
            f7=self.f7(now),
            created=now,
            original=original.key if original else None,
            entry_mode=req.card.entry_mode,
        )
        self.txns[key] = t
        self.newest[req.reader_id] = key
        self._evicted.add(key)
        self._writes += 1
        self._watch[key] = None
        self.by_stan[stan] = key
        self.history.add(token, t)
        intent: dict[str, Any] = {
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
        if req.card.entry_mode:
            intent["entry"] = req.card.entry_mode
        if req.card.pin_block:
            intent["pin"] = True  # that a PIN was entered, never the PIN block
        if req.card.icc:
            intent["emv"] = emv.facts(req.card.icc)
        recs: list[Record] = [(Kind.INTENT, key, intent)]
        if original is not None:
            intent["original"] = original.key
            recs.append(self._record(original, Kind.REFUND_OF, {"refund": key, "amount": t.amount}))
        self.count("intents")
        if verdict.action is PolicyAction.DECLINE:
            self.count("policy_decline")
            outcome = self._record(t, Kind.OUTCOME, {"state": "DECLINED", "rc": "", "approval": "", "rrn": "",
                                                      "reason": verdict.code, "policy": verdict.detail})
            t.vault_ref = None
            self._finalized(t)
            intent.update(vault_ref=None, verdict=verdict.code)
            return [Append([*recs, outcome]), Reply(t.result())]
        if verdict.action is PolicyAction.HOLD:
            self.count("policy_hold")
            held = self._record(t, Kind.HELD, {"code": verdict.code, "detail": verdict.detail})
            self.history.pending(token, t)
            intent["verdict"] = verdict.code
            if req.card.pin_block:  # memory only, for the CONFIRM that releases it
                self._held_cards[key] = req.card
            return [Append([*recs, held], vault_put=[blob]), Reply(t.result())]
        if t.kind is TxnKind.SALE:
            self.history.count(token, now, req.amount)
        if not self.host_up and self._may_defer(t):
            return self._defer(t, recs, now, vault_put=[blob])
        return [Append(recs, vault_put=[blob]), *self._send_request(t, now, card=req.card)]

    def _send_request(self, t: Txn, now: float, card: CardData | None = None) -> list[Action]:
        """Send the journaled request (0200), or fail it cleanly when there is no host."""
        if not self.host_up:
            reason = self.cfg.offline.refuse(t.amount, len(self._stored), sum(self._stored.values()), t.entry_mode) \
                if t.kind is TxnKind.SALE else "NO_HOST"
            return self._finish(t, TxnState.DECLINED, reason=reason or "NO_HOST")
        move(t, TxnState.SENT)
        t.deadline = now + self.cfg.host_timeout_s
        self._watch[t.key] = None
        card = card or self._held_cards.pop(t.key, None)
        fields = t.request_fields(self.cfg.terminal_id, self.cfg.merchant_id, self.cfg.entry_mode_codes)
        return [SendHost(t.key, fields, card=card, card_ref=None if card else t.vault_ref, ksn_field=self.cfg.ksn_field)]

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
        refunded = sum(r.settled for r in self._peek_many(o.refunds)
                       if r is not None and r.state not in (TxnState.DECLINED, TxnState.REVERSED))
        if req.amount > o.settled - refunded:
            raise PosguardError(f"refund exceeds what is left of the original sale ({o.settled - refunded})",
                                code="REFUND_EXCEEDS_ORIGINAL")
        return o

    @entry
    def confirm(self, key: str, now: float) -> list[Action]:
        """The operator's CONFIRM of a held request: re-check (a pending reversal still holds
        refunds), then release it to the host; or the operator's acceptance of a partial approval
        (the sale completes for the approved amount). Raises NOTHING_HELD otherwise."""
        t = self._get(key)
        if t is not None and t.state is TxnState.PARTIAL:
            self.count("partial_accepted")
            if t.awaits_card:  # the card still has to accept the (smaller) approval
                return self._await_card(t, {}, t.approval, t.rrn, now)
            return self._finish(t, TxnState.APPROVED, approval=t.approval, rrn=t.rrn, reason="PARTIAL_ACCEPTED",
                                approved_amount=t.settled)
        if t is None or t.state is not TxnState.HELD:
            raise PosguardError("nothing is held for this transaction id", code="NOTHING_HELD")
        self.history.prune(now)
        others = [x for x in self.history.for_card(t.card_token) if x is not t]
        verdict = decide(t.kind, t.amount, now, others, self.history, t.card_token, self.cfg.policy, confirmed=True)
        if verdict.action is PolicyAction.HOLD:
            return [Reply(t.result())]
        if verdict.action is PolicyAction.DECLINE:
            return self._finish(t, TxnState.DECLINED, reason=verdict.code)
        if t.online_pin and t.key not in self._held_cards:  # a restart lost it; never send the sale without it
            return self._finish(t, TxnState.DECLINED, reason="PIN_LOST")
        if t.kind is TxnKind.SALE:
            self.history.count(t.card_token, now, t.amount)
        recs: list[Record] = [self._record(t, Kind.RELEASED, {"by": "operator"})]
        self._watch[key] = None
        self.count("released")
        if not self.host_up and self._may_defer(t):
            return self._defer(t, recs, now)
        return [Append(recs), *self._send_request(t, now)]

    @entry
    def cancel(self, key: str, now: float) -> list[Action]:
        """The operator's CANCEL of a held request (wrong amount, wrong card): DECLINED, never sent;
        of a partial approval: it is reversed and the reader told "not charged"."""
        t = self._get(key)
        if t is not None and t.state is TxnState.PARTIAL:
            self.count("partial_cancelled")
            return self._reverse_many([t], "PARTIAL_CANCELLED", now)
        if t is None or t.state is not TxnState.HELD:
            raise PosguardError("nothing is held for this transaction id", code="NOTHING_HELD")
        self.count("cancelled")
        return self._finish(t, TxnState.DECLINED, reason="OPERATOR_CANCELLED")

    @entry
    def signed(self, key: str, now: float) -> list[Action]:
        """The operator confirms the customer signed the receipt of an approved sale."""
        t = self._get(key)
        if t is None or t.signature not in ("REQUIRED", "MISSING"):
            raise PosguardError("no signature is awaited for this transaction id", code="SIGNATURE_NOT_REQUIRED")
        rec = self._record(t, Kind.SIGNATURE, {"late": t.signature == "MISSING"})
        self._sig_due.pop(key, None)
        return [Append([rec]), Reply(t.result())]

    # ------------------------------------------------------------------ offline (deferred) sales

    def _may_defer(self, t: Txn) -> bool:
        return t.kind is TxnKind.SALE and not self.cfg.offline.refuse(t.amount, len(self._stored), sum(self._stored.values()),
                                                                       t.entry_mode)

    def _defer(self, t: Txn, recs: list[Record], now: float,
               vault_put: list[Any] | None = None) -> list[Action]:
        """Approve offline: the card data stays sealed in the vault until the 0220 is answered."""
        self._sig_watch(t, required=True)
        self._stored[t.key] = t.amount
        rec = self._record(t, Kind.DEFERRED, {"stored": len(self._stored), "stored_amount": sum(self._stored.values()),
                                              **({"signature": t.signature} if t.signature else {})})
        t.adv_next_at = now
        self._adv[t.key] = None
        self._sig_watch(t)
        self.count("deferred")
        return [Append([*recs, rec], vault_put=vault_put or []), Reply(t.result())]

    def _signatures_due(self, now: float) -> list[Action]:
        late = [k for k, due in self._sig_due.items() if now >= due]
        if not late:
            return []
        recs: list[Record] = []
        for k in late:
            del self._sig_due[k]
            payload = {"after_s": self.cfg.policy.signature_timeout_s}
            t = self.txns.get(k)
            recs.append(self._record(t, Kind.SIGNATURE_MISSING, payload) if t is not None
                        else (Kind.SIGNATURE_MISSING, k, payload))
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
        if req.amount != o.settled or req.currency != o.currency:
            raise PosguardError("void amount and currency must equal the original sale's", code="VOID_NOT_ALLOWED")
        if any(r is not None and r.state not in (TxnState.DECLINED, TxnState.REVERSED) for r in self._peek_many(o.refunds)):
            raise PosguardError("this sale has a refund against it; it can no longer be voided", code="VOID_NOT_ALLOWED")
        v = Txn(key=key, kind=TxnKind.VOID, fp=fp, amount=o.settled, currency=o.currency, card_token=o.card_token,
                masked_pan=o.masked_pan, vault_ref=None, stan=o.stan, f7=o.f7, created=now, original=orig_key)
        self.txns[key] = v
        self.newest[req.reader_id] = key
        self._evicted.add(key)
        self._writes += 1
        self._watch[key] = None
        rec = self._to_reversal(o, "VOID", now, {"void": key})
        self.count("voids")
        intent = {"kind": "VOID", "fp": fp, "amount": o.settled, "currency": o.currency, "card_token": o.card_token,
                  "masked_pan": o.masked_pan, "vault_ref": None, "stan": o.stan, "f7": o.f7, "original": orig_key,
                  "tid": self.cfg.terminal_id, "mid": self.cfg.merchant_id}
        return [Append([(Kind.INTENT, key, intent), rec]), Reply(v.result(in_progress=True)), *self._dispatch_reversals(now)]

    def status(self, key: str, entries: Iterable[Any] | None = None) -> Result | Load | None:
        """STATUS(id): the stored result, None if the id is unknown, or ``Load`` when only the
        journal knows it: ask again with its ``entries``. Changes nothing."""
        t = self.txns.get(key)
        if t is None and self._maybe_journaled(key):
            if entries is None:
                return Load((key,))
            t = rebuild(key, entries)
        if t is None:
            return None
        return t.result(in_progress=t.state in AWAITING)

    def last_for_reader(self, reader_id: str) -> Result | Load | None:
        """STATUS(LAST): ``status`` of this reader's newest transaction by arrival (a transaction
        read back from the journal later, e.g. for a late SIGNED, does not become the newest)."""
        key = self.newest.get(reader_id)
        return None if key is None else self.status(key)

    # ------------------------------------------------------------------ host events

    def next_deadline(self) -> float | None:
        watched = self._watched(prune=False)
        now_inf = float("inf")
        ds = [t.deadline for t in watched if t.state in (TxnState.SENT, TxnState.PARTIAL, TxnState.AWAITING_COMPLETION)
              and t.deadline is not None]
        for key in self._saf:
            t = self.txns[key]
            ds.append(t.rev_inflight_until if t.rev_inflight_until is not None
                      else min(t.rev_next_at, (t.rev_since or now_inf) + self.cfg.reversal_max_age_s))
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
        garbage = self.garbage_deadline()
        if garbage is not None:
            ds.append(garbage)
        return min(ds) if ds else None

    @entry
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
        acts += self._reversals_expired(now)
        partials = [t for t in watched if t.state is TxnState.PARTIAL and t.deadline is not None and now >= t.deadline]
        if partials:
            acts += self._reverse_many(partials, "PARTIAL_EXPIRED", now)
        acts += self._completions_due(watched, now)
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
        return acts + self.garbage_tick(now)  # last: nothing after it can ask for data and drop its record

    def pending_reversals(self) -> int:
        return len(self._saf)

    def busy(self) -> bool:
        """True while anything awaits the host: used by drivers to know when a drain is done."""
        return bool(self._saf) or bool(self._stored) or any(
            (t.state in AWAITING and t.kind is not TxnKind.VOID) or t.state is TxnState.AWAITING_COMPLETION
            for t in self._watched(prune=False))

