"""Host-side events: answers, disconnects, send failures, and the queues the host works off
(reversals 0400/0401, offline advices 0220, echo and checkpoint deposits 0800)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from guard.core import constants as C
from guard.core.actions import Action, Append, Reply, SendHost
from guard.core.completion import CardCompletion, issuer_icc_of
from guard.core.fields import echo_mismatches, field90
from guard.core.model import TxnKind, TxnState, mask_pan
from guard.core.records import Kind, Record
from guard.core.state import entry
from guard.core.txn import Txn


# Card fields the executor fills: a reversal never carries track 2 or a PIN block (docs/HOST.md);
# an 0220 (offline sale forwarded) carries all the vault holds (never a PIN block: memory only).
REVERSAL_CARD_FIELDS = frozenset({C.F_PAN, C.F_EXPIRY})
REVERSAL_ICC_FIELDS = frozenset({C.F_CARD_SEQ, C.F_ICC})
ADVICE_CARD_FIELDS = frozenset({C.F_PAN, C.F_EXPIRY, C.F_CARD_SEQ, C.F_TRACK2, C.F_ICC})
GARBAGE_INTERVAL_S = 10.0  # host garbage after the first of an interval is journaled as one summary per interval
GARBAGE_SUMMARY_ITEMS = 10_000  # ... or per this many items, whichever comes first
# A digit run, possibly split by spaces or dashes, long enough to be a card number (13+ digits).
_DIGIT_RUN = re.compile(r"\d[\d -]*\d")


@dataclass
class GarbageTally:
    """Host garbage since the last ``host_garbage`` record of this connection: counts, bytes and
    the first/last item's digest, so a flood costs one record per interval instead of one per frame."""

    since: float  # start of the interval (the first item's time, journaled at once)
    count: int = 0
    bytes: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    first: tuple[str, str, int, str] | None = None  # code, detail, len, digest of the first unjournaled item
    last: tuple[str, int, str] = ("", 0, "")  # code, len, digest of the latest

    def add(self, code: str, detail: str, raw_len: int, digest: str) -> None:
        if self.first is None:
            self.first = (code, detail, raw_len, digest)
        self.count += 1
        self.bytes += raw_len
        self.codes[code] = self.codes.get(code, 0) + 1
        self.last = (code, raw_len, digest)

    def record(self) -> Record:
        """The first item's code, detail, len and digest (what a single item's record always
        held), the counts and bytes of the interval, and the last item under ``last`` (its digest
        under a ``digest`` key, which the journal's card-number scan exempts)."""
        assert self.first is not None
        code, detail, raw_len, digest = self.first
        last_code, last_len, last_digest = self.last
        return (Kind.HOST_GARBAGE, None, {"code": code, "detail": detail[:200], "len": raw_len, "digest": digest,
                                          "count": self.count, "bytes": self.bytes, "codes": dict(sorted(self.codes.items())),
                                          "last": {"code": last_code, "len": last_len, "digest": last_digest},
                                          "since": self.since})


def mask_digit_runs(value: str) -> str:
    """``value`` with every card-number-like digit run (13+ digits, spaces and dashes allowed
    between them) masked to BIN + last 4; shorter runs and other text are kept."""

    def one(m: re.Match[str]) -> str:
        digits = "".join(ch for ch in m.group() if ch.isdigit())
        return mask_pan(digits) if len(digits) >= 13 else m.group()

    return _DIGIT_RUN.sub(one, value)


class HostEvents(CardCompletion):
    """What the host says or fails to say, and what the terminal owes it."""

    garbage: GarbageTally | None = None  # this connection's garbage interval (None: next item is journaled at once)

    @entry
    def on_host_up(self, now: float) -> list[Action]:
        self.host_up = True
        self.last_host_activity = now
        return self.tick(now) + self._garbage_close(now)

    @entry
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
        return acts + self._garbage_close(now)

    @entry
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

    @entry
    def host_garbage(self, code: str, detail: str, raw_len: int, digest: str, now: float) -> list[Action]:
        """Undecodable host input: journaled without content (sizes, codes and digests only). The
        first item of an interval is journaled at once; later ones are tallied and journaled as one
        summary at the interval's end (``garbage_tick``), every GARBAGE_SUMMARY_ITEMS items, or when
        the connection goes down or up: a flooding host cannot turn each frame into a commit."""
        self.count("host_garbage")
        g = self.garbage
        if g is None:
            first = GarbageTally(since=now)
            first.add(code, detail, raw_len, digest)
            self.garbage = GarbageTally(since=now)
            return [Append([first.record()])]
        g.add(code, detail, raw_len, digest)
        if g.count >= GARBAGE_SUMMARY_ITEMS:
            return self._garbage_flush(now, reopen=True)
        return []

    def garbage_tick(self, now: float) -> list[Action]:
        """End the garbage interval once GARBAGE_INTERVAL_S have passed (part of ``tick``)."""
        g = self.garbage
        if g is None or now < g.since + GARBAGE_INTERVAL_S:
            return []
        return self._garbage_flush(now, reopen=False)

    def garbage_deadline(self) -> float | None:
        """When ``tick`` has a garbage summary to write (None: nothing tallied)."""
        g = self.garbage
        return g.since + GARBAGE_INTERVAL_S if g is not None and g.count else None

    def _garbage_close(self, now: float) -> list[Action]:
        """A connection ends or starts: journal what it tallied, start the next one afresh."""
        return self._garbage_flush(now, reopen=False) if self.garbage is not None else []

    def _garbage_flush(self, now: float, reopen: bool) -> list[Action]:
        g = self.garbage
        assert g is not None
        self.garbage = GarbageTally(since=now) if reopen else None
        if not g.count:
            return []
        self.count("host_garbage_summary")
        return [Append([g.record()])]

    @entry
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
            if mti == C.MTI_NET_RESPONSE and self.echo_stan == stan:
                self.echo_stan = self.echo_deadline = None
                return []
            if mti == C.MTI_NET_RESPONSE and self.deposit_stan == stan:
                self.deposit_stan, self.deposit_result = None, fields.get(C.F_RESPONSE_CODE, "")
                return [Append([(Kind.CHECKPOINT_DEPOSITED, None, {"stan": stan, "rc": self.deposit_result})])]
            if stan in self.by_stan:  # a network answer carrying a transaction's STAN: not its answer
                return self._unmatched(fields, "MTI_MISMATCH")
            return []  # a late echo answer
        key = self.by_stan.get(stan)
        t = self.txns.get(key) if key else None
        if t is None:
            return self._unmatched(fields, "UNKNOWN_STAN")
        if stan != t.stan:  # an answer to an earlier 0220 of a deferred sale, since reversed
            self.count("late_response")
            return [Append([(Kind.LATE_RESPONSE, t.key, {"mti": mti, "rc": fields.get(C.F_RESPONSE_CODE, ""),
                                                      "note": "superseded_stan", "stan": stan})])]
        # MTI pairing: 0200 -> 0210, 0220 -> 0230, 0400/0401 -> 0410 (or 0411). Any other answer is
        # not this transaction's: journaled, and the sale is resolved by its timeout (reversal).
        if mti == C.MTI_FIN_RESPONSE and not t.deferred:
            return self._on_fin_response(t, fields, now)
        if mti == C.MTI_ADVICE_RESPONSE and t.deferred:
            return self._on_advice_response(t, fields, now)
        if mti in C.RESPONSE_MTIS[C.MTI_REVERSAL]:
            return self._on_reversal_response(t, fields, now)
        self.count("mti_mismatch")
        return self._unmatched(fields, "MTI_MISMATCH")

    def _on_fin_response(self, t: Txn, f: dict[str, str], now: float) -> list[Action]:
        rc = f.get(C.F_RESPONSE_CODE, "")
        if t.state is not TxnState.SENT:
            self.count("late_response")
            note = "after_reversal" if t.state in (TxnState.REVERSAL_PENDING, TxnState.REVERSED, TxnState.NEEDS_MANUAL) else "duplicate"
            return [Append([(Kind.LATE_RESPONSE, t.key, {"mti": f.get("t"), "rc": rc, "note": note, "state": t.state.value})])]
        cfg = self.cfg
        partial = rc in cfg.rc_partial
        bad = self._echo_mismatches(t, f, amount=not (partial and cfg.partial_amount_field == C.F_AMOUNT))
        if bad:
            self.count("echo_mismatch")
            return self._reverse_many([t], "ECHO_MISMATCH", now, extra={"fields": bad, "rc": rc})
        if len(rc) != 2:
            self.count("bad_response")
            return self._reverse_many([t], "BAD_RESPONSE", now)
        approval, rrn = f.get(C.F_APPROVAL_CODE, ""), f.get(C.F_RRN, "")
        if rc in cfg.rc_approved:
            t.rc = rc
            if t.awaits_card:
                return self._await_card(t, f, approval, rrn, now)
            return self._finish(t, TxnState.APPROVED, approval=approval, rrn=rrn)
        if rc in cfg.rc_declined:
            t.rc = rc
            return self._finish(t, TxnState.DECLINED, rrn=rrn, reason="HOST_DECLINED")
        if rc in cfg.rc_duplicate:
            # We never send a 0200 twice (a timed-out sale is reversed, not repeated): "already
            # processed" for a fresh 0200 can only mean the host holds this STAN for another
            # transaction. Ours was not processed; a reversal naming this STAN could undo the other.
            t.rc = rc
            self.count("stan_collision")
            return self._finish(t, TxnState.DECLINED, rrn=rrn, reason="STAN_COLLISION")
        if partial:
            amount = self._partial_amount(t, f)
            if amount is None:
                self.count("bad_response")
                return self._reverse_many([t], "BAD_PARTIAL_AMOUNT", now, extra={"rc": rc})
            rec = self._record(t, Kind.PARTIAL, {"rc": rc, "approved_amount": amount, "approval": approval, "rrn": rrn})
            if t.awaits_card:
                t.issuer_icc = issuer_icc_of(f)
            self.count("partial")
            if not cfg.partial_approvals:  # the reader cannot offer it: undo it, never show a charge
                acts = self._reverse_many([t], "PARTIAL_NOT_SUPPORTED", now)
                first = acts[0]
                assert isinstance(first, Append)
                return [Append([rec, *first.records]), *acts[1:]]
            t.deadline = now + cfg.partial_expiry_s
            self._watch[t.key] = None
            return [Append([rec]), Reply(t.result())]
        # Not a code this host profile says is an approval, a decline or a duplicate: a wait code,
        # a system error, a code no table lists. It may have moved money: undo it (fail safe).
        self.count("unclassified_rc")
        return self._reverse_many([t], "UNCLASSIFIED_RESPONSE", now, extra={"rc": rc})

    def _partial_amount(self, t: Txn, f: dict[str, str]) -> int | None:
        """The approved amount of a partial approval (field 4, or the first amount of field 54),
        or None when it is missing or not strictly between 0 and the amount asked."""
        if self.cfg.partial_amount_field == C.F_AMOUNT:
            raw = f.get(C.F_AMOUNT, "")
        else:
            block = f.get(C.F_ADDITIONAL_AMOUNTS, "")[:20]
            raw = block[8:20] if len(block) == 20 else ""
        if not (raw.isascii() and raw.isdigit()):
            return None
        amount = int(raw)
        return amount if 0 < amount < t.amount else None

    def _on_reversal_response(self, t: Txn, f: dict[str, str], now: float) -> list[Action]:
        rc = f.get(C.F_RESPONSE_CODE, "")
        if t.key not in self._saf:
            self.count("late_reversal_response")
            return [Append([(Kind.LATE_RESPONSE, t.key, {"mti": f.get("t"), "rc": rc, "note": "reversal_not_pending", "state": t.state.value})])]
        sent = {C.F_STAN: f"{t.stan:06d}", C.F_TERMINAL_ID: self.cfg.terminal_id, C.F_MERCHANT_ID: self.cfg.merchant_id}
        bad = [k for k in (C.F_STAN, C.F_TERMINAL_ID, C.F_MERCHANT_ID) if f.get(k) != sent[k]]
        if not bad and rc in C.REVERSAL_DONE_CODES and t.state is TxnState.DEFERRED:
            self._saf.pop(t.key, None)
            t.rev_inflight_until = None
            rec = self._record(t, Kind.ADVICE_REVERSED, {"rc": rc, "failures": t.adv_failures + 1})
            t.adv_next_at = now + self._backoff(t.adv_failures)
            self._adv[t.key] = None
            self.count("advice_reversed")
            return [Append([rec])]
        if not bad and rc in C.REVERSAL_DONE_CODES:
            self._saf.pop(t.key, None)
            rec = self._record(t, Kind.REVERSED, {"rc": rc, "attempts": t.rev_attempts})
            t.rev_inflight_until = None
            self.count("reversed")
            self._finalized(t)
            vrec, vreply = self._void_follow(t, TxnState.APPROVED)
            # The reader was told REVERSAL_PENDING (IN_PROGRESS 00, not final): push the final state.
            return [Append([rec, *vrec], vault_shred=self._shred(t)), Reply(t.result()), *vreply]
        if bad:  # not an answer to our reversal: like no answer, it does not count as a refusal
            return self._reversal_failed(t, now, f"ECHO_MISMATCH:{','.join(bad)}")
        return self._reversal_failed(t, now, f"RC_{rc or 'NONE'}", refused=rc)

    def _echo_mismatches(self, t: Txn, f: dict[str, str], amount: bool = True) -> list[str]:
        """Echo fields (4, 11, 41, 42: C.ECHO_FIELDS) of the response that differ from the request;
        field 4 is left out for a partial approval that carries its approved amount there."""
        get = f.get
        if ((not amount or get(C.F_AMOUNT) == f"{t.amount:012d}") and get(C.F_STAN) == f"{t.stan:06d}"
                and get(C.F_TERMINAL_ID) == self.cfg.terminal_id and get(C.F_MERCHANT_ID) == self.cfg.merchant_id):
            return []
        bad = echo_mismatches(t.request_fields(self.cfg.terminal_id, self.cfg.merchant_id), f)
        return bad if amount else [k for k in bad if k != C.F_AMOUNT]

    def _unmatched(self, f: dict[str, str], why: str) -> list[Action]:
        self.count("unmatched")
        safe = {k: f.get(k, "")[:C.HOST_FIELD_MAX_LEN[k]] for k in ("t", C.F_STAN, C.F_RESPONSE_CODE)}
        # 41/42 are exempt from the journal's card-number guard (our own ids may be Luhn-valid
        # numbers); what a host sends there is not ours to trust: a long digit run that is not our
        # id, even split by spaces or dashes, is kept masked like a PAN (BIN + last 4 still tell
        # which id it was).
        for k, ours in ((C.F_TERMINAL_ID, self.cfg.terminal_id), (C.F_MERCHANT_ID, self.cfg.merchant_id)):
            v = f.get(k, "")
            safe[k] = v if v == ours else mask_digit_runs(v)
        return [Append([(Kind.UNMATCHED_RESPONSE, None, {"why": why, **safe})])]

    # ------------------------------------------------------------------ offline sales' advices (0220)

    def _advice_to_reversal(self, t: Txn, reason: str, now: float) -> Record:
        """An 0220 whose fate is unknown is reversed before a fresh one (new STAN) is sent, so a host
        without duplicate detection never books an offline sale twice."""
        rec = self._record(t, Kind.ADVICE_REVERSAL_PENDING, {"reason": reason, "stan": t.stan})
        t.adv_inflight_until = None
        t.rev_next_at, t.rev_since = now, 0.0
        self._saf[t.key] = None
        self.count("advice_reversal_pending")
        return rec

    def _dispatch_advices(self, now: float) -> list[Action]:
        if not self.host_up or not self._adv:
            return []
        inflight = sum(1 for k in self._stored if self.txns[k].adv_inflight_until is not None)
        due = self._due(self._adv, inflight, lambda t: t.adv_next_at <= now)
        if not due:
            return []
        recs: list[Record] = []
        sends: list[Action] = []
        for t in due:
            assert t.state is TxnState.DEFERRED, t.state
            del self._adv[t.key]
            recs.append(self._record(t, Kind.ADVICE_ATTEMPT, {"n": t.adv_failures + 1, "stan": self._next_stan(now),
                                                               "f7": self.f7(now)}))
            t.adv_inflight_until = now + self.cfg.host_timeout_s
            self.by_stan[t.stan] = t.key
            sends.append(SendHost(t.key, t.request_fields(self.cfg.terminal_id, self.cfg.merchant_id, self.cfg.entry_mode_codes),
                                  card_ref=t.vault_ref, card_fields=ADVICE_CARD_FIELDS))
        self.count("advice_sent", len(due))
        return [Append(recs), *sends]

    def _on_advice_response(self, t: Txn, f: dict[str, str], now: float) -> list[Action]:
        rc = f.get(C.F_RESPONSE_CODE, "")
        if t.adv_inflight_until is None or f.get("t") != C.MTI_ADVICE_RESPONSE:
            self.count("late_response")
            return [Append([(Kind.LATE_RESPONSE, t.key, {"mti": f.get("t"), "rc": rc, "note": "advice_not_in_flight",
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

    def _reversal_failed(self, t: Txn, now: float, why: str, refused: str | None = None) -> list[Action]:
        """A reversal attempt that did not end it. Only an explicit refusal (a 0410 whose code is
        not in the done set) counts toward ``reversal_max_attempts``; silence, disconnects and
        answers that are not ours repeat it (0401, backoff capped) until ``reversal_max_age_s``."""
        t.rev_inflight_until = None
        self.count("reversal_failure")
        failures = t.rev_failures + (refused is not None)
        if failures >= self.cfg.reversal_max_attempts:
            t.rev_failures = failures
            return self._give_up(t, f"REVERSAL_UNCONFIRMED:{why}", refused if refused is not None else t.rev_last_rc)
        payload: dict[str, Any] = {"why": why, "failures": failures}
        if refused is not None:
            payload["rc"] = refused
        rec = self._record(t, Kind.REVERSAL_FAILED, payload)
        t.rev_next_at = now + self._backoff(max(t.rev_failures, t.rev_attempts))
        return [Append([rec])]

    def _give_up(self, t: Txn, reason: str, last_rc: str) -> list[Action]:
        """NEEDS_MANUAL: the reversal could not be confirmed; the operator report says why."""
        self._saf.pop(t.key, None)
        rec = self._record(t, Kind.NEEDS_MANUAL, {"reason": reason, "attempts": t.rev_attempts, "last_rc": last_rc})
        self.count("needs_manual")
        self._finalized(t)
        vrec, vreply = self._void_follow(t, TxnState.NEEDS_MANUAL)
        return [Append([rec, *vrec], vault_shred=self._shred(t)), Reply(t.result()), *vreply]

    def _reversals_expired(self, now: float) -> list[Action]:
        """Reversals unanswered for ``reversal_max_age_s`` (default a day) since their first send go
        to NEEDS_MANUAL; one never sent (a terminal off for days) is sent before it can expire."""
        horizon = self.cfg.reversal_max_age_s
        old = [self.txns[k] for k in self._saf
               if self.txns[k].rev_inflight_until is None and self.txns[k].rev_since
               and now - self.txns[k].rev_since >= horizon]
        acts: list[Action] = []
        for t in old:
            acts += self._give_up(t, "REVERSAL_EXPIRED", t.rev_last_rc)
        return acts

    @property
    def _reversal_card_fields(self) -> frozenset[str]:
        """Card fields of a reversal: 2 and 14, and 23 and 55 of a chip sale if the host profile asks."""
        return REVERSAL_CARD_FIELDS | (REVERSAL_ICC_FIELDS if self.cfg.reversal_icc else frozenset())

    def _reversal_fields(self, t: Txn, mti: str, f7: str) -> dict[str, str]:
        """A reversal (or repeat) of ``t``: its own transmission time ``f7`` in field 7; the
        original's MTI, STAN and field 7 in field 90, which is how the host finds the original
        (a host may refuse a field 7 far from its clock, e.g. after a day-long outage)."""
        original_mti = C.MTI_ADVICE if t.deferred else C.MTI_FIN_REQUEST
        f = {
            "t": mti,
            C.F_PROC_CODE: C.PROC_REFUND if t.kind is TxnKind.REFUND else C.PROC_PURCHASE,
            C.F_AMOUNT: f"{t.settled:012d}",
            C.F_TRANSMISSION_DT: f7,
            C.F_STAN: f"{t.stan:06d}",
            C.F_TERMINAL_ID: self.cfg.terminal_id,
            C.F_MERCHANT_ID: self.cfg.merchant_id,
            C.F_CURRENCY: t.currency,
            C.F_ORIGINAL_DATA: field90(original_mti, t.stan, t.f7),
        }
        if t.entry_mode:
            f[C.F_POS_ENTRY_MODE] = self.cfg.entry_mode_codes[t.entry_mode]
        return f

    def _due(self, queue: Iterable[str], inflight: int, ready: Callable[[Txn], bool]) -> list[Txn]:
        """The ready transactions of a queue, in journal order, up to the in-flight window."""
        due: list[Txn] = []
        for key in queue:
            if inflight + len(due) >= self.cfg.saf_window:
                break
            t = self.txns[key]
            if ready(t):
                due.append(t)
        return due

    def _dispatch_reversals(self, now: float) -> list[Action]:
        """Send due reversals, in journal order, up to the window; attempts are journaled first."""
        if not self.host_up:
            return []
        inflight = sum(1 for k in self._saf if self.txns[k].rev_inflight_until is not None)
        due = self._due(self._saf, inflight, lambda t: t.rev_inflight_until is None and t.rev_next_at <= now)
        if not due:
            return []
        recs: list[Record] = []
        sends: list[Action] = []
        for t in due:
            assert t.state in (TxnState.REVERSAL_PENDING, TxnState.DEFERRED), t.state
            mti = C.MTI_REVERSAL if t.rev_attempts == 0 else C.MTI_REVERSAL_REPEAT
            f7 = self.f7(now)
            recs.append(self._record(t, Kind.REVERSAL_ATTEMPT, {"n": t.rev_attempts + 1, "mti": mti, "f7": f7}))
            t.rev_since = t.rev_since or now
            t.rev_inflight_until = now + self.cfg.reversal_timeout_s
            sends.append(SendHost(t.key, self._reversal_fields(t, mti, f7), card_ref=t.vault_ref,
                                  card_fields=self._reversal_card_fields))
        self.count("reversal_sent", len(due))
        return [Append(recs), *sends]

    @entry
    def deposit_checkpoint(self, checkpoint_json: str, now: float) -> list[Action]:
        """Send a signed checkpoint to the host (0800, field 70 = 880, field 48 = the checkpoint):
        an anchor held outside the terminal, against truncation or rollback of the journal."""
        if not self.host_up:
            return []
        acts, stan = self._network_message(now, C.NET_CHECKPOINT, "checkpoint", {C.F_PRIVATE_DATA: checkpoint_json})
        self.deposit_stan, self.deposit_result = stan, None
        return acts

    def _network_message(self, now: float, code: str, purpose: str,
                         extra: dict[str, str] | None = None) -> tuple[list[Action], int]:
        """An 0800 (field 70 = ``code``) with a fresh STAN, whose use is journaled first."""
        stan = self._next_stan(now)
        fields = {
            "t": C.MTI_NET_REQUEST,
            C.F_TRANSMISSION_DT: self.f7(now),
            C.F_STAN: f"{stan:06d}",
            C.F_TERMINAL_ID: self.cfg.terminal_id,
            C.F_MERCHANT_ID: self.cfg.merchant_id,
            **(extra or {}),
            C.F_NET_MGMT_CODE: code,
        }
        return [Append([(Kind.STAN_USE, None, {"stan": stan, "purpose": purpose})]), SendHost(None, fields)], stan

    def pending_work(self) -> int:
        """Transactions the host still owes an answer for: queued reversals and unsent advices."""
        return len(self._saf.keys() | self._stored.keys())

    def _echo(self, now: float) -> list[Action]:
        acts, self.echo_stan = self._network_message(now, C.NET_ECHO, "echo")
        self.echo_deadline = now + self.cfg.host_timeout_s
        self.last_host_activity = now
        return acts
