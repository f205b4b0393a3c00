"""Chip sales after the host's approval: the card's decision (the reader's COMPLETE) makes the
sale APPROVED or reverses it; no decision within ``completion_timeout_s`` reverses it too. The
timer is rebuilt from the journal's time on restore (``Engine._apply_entry``), so it runs on
across a restart. PAX/TSYS and Heartland Portico: a chip sale the card refuses after the host
approved it is reversed by the terminal, automatically."""

from __future__ import annotations

from typing import Any

from guard.core import constants as C
from guard.core import emv
from guard.core.actions import Action, Append, Reply
from guard.core.emv import issuer_data
from guard.core.errors import PosguardError
from guard.core.model import TxnState
from guard.core.records import Kind
from guard.core.state import AWAITING, EngineState, entry
from guard.core.txn import Txn


def issuer_icc_of(f: dict[str, str]) -> bytes:
    """Field 55 of a host answer as bytes for the reader, or b"" (absent, not hex, not clean BER-TLV)."""
    try:
        return issuer_data(bytes.fromhex(f.get(C.F_ICC, "")))
    except ValueError:
        return b""


class CardCompletion(EngineState):
    """The card's side of a chip sale the host approved (AWAITING_COMPLETION)."""

    def _await_card(self, t: Txn, f: dict[str, str], approval: str, rrn: str, now: float) -> list[Action]:
        """A chip sale the host approved (or whose partial approval the operator accepted): not
        final until the card accepts (COMPLETE). The card data stays in the vault (a reversal may
        need it); the issuer's field 55 of ``f`` goes to the reader."""
        rec = self._record(t, Kind.AWAIT_COMPLETION, {"rc": t.rc, "approval": approval, "rrn": rrn})
        if C.F_ICC in f or not t.issuer_icc:  # a partial's issuer data came with its 0210
            t.issuer_icc = issuer_icc_of(f)
        t.deadline = now + self.cfg.completion_timeout_s
        self._watch[t.key] = None
        self.count("awaiting_completion")
        return [Append([rec]), Reply(t.result())]

    @entry
    def complete(self, key: str, decision: emv.CardDecision, icc: bytes, now: float) -> list[Action]:
        """The reader's COMPLETE: the card's final decision on a chip sale the host approved.
        Accepted: APPROVED. Declined by the card, card removed, terminal error: reversed (reason =
        the decision), the reader told "not charged". For a transaction not awaiting the card
        (already final, a swiped sale, still at the host) the stored result, changing nothing.
        ``icc`` (the card's final ICC data, already checked) adds the cryptogram type, ATC, TVR and
        TSI to the journal. Raises TXN_UNKNOWN for an id never journaled."""
        t = self._get(key)
        if t is None:
            raise PosguardError("no transaction with this id on this terminal", code="TXN_UNKNOWN")
        if t.state is not TxnState.AWAITING_COMPLETION:
            self.count("complete_replayed")
            return [Reply(t.result(in_progress=t.state in AWAITING))]
        extra: dict[str, Any] = {"card": decision.value}
        if icc:
            extra["emv"] = emv.facts(icc)
        if decision is emv.CardDecision.ACCEPTED:
            self.count("card_accepted")
            return self._finish(t, TxnState.APPROVED, approval=t.approval, rrn=t.rrn, extra=extra,
                                approved_amount=t.approved)
        self.count("card_" + decision.value.lower())
        return self._reverse_many([t], decision.value, now, extra=extra)

    def completion_failed(self, key: str, now: float) -> list[Action]:
        """The host approved but the card or terminal could not complete: as COMPLETE(TERMINAL_ERROR)."""
        return self.complete(key, emv.CardDecision.TERMINAL_ERROR, b"", now)

    def _completions_due(self, watched: list[Txn], now: float) -> list[Action]:
        """No COMPLETE in time (the reader rebooted, the card went with the customer): undo (part of ``tick``)."""
        silent = [t for t in watched if t.state is TxnState.AWAITING_COMPLETION and t.deadline is not None
                  and now >= t.deadline]
        if not silent:
            return []
        self.count("completion_timeout", len(silent))
        return self._reverse_many(silent, "COMPLETION_TIMEOUT", now)
