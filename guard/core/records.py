"""Journal record kinds and their payloads: the one list of what the journal can hold.

Every writer (the engine, the journal itself, reconcile, compaction, key rotation, replay, the
daemon at start) names its records with ``Kind`` and its payload keys are checked by ``check``
before the journal commits them. A record is ``(kind, txn key or None, payload)``; payloads are
canonical JSON objects holding no clear card data (the journal refuses card-number-like digit runs).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from guard.core.errors import JournalError


class Kind(str, enum.Enum):
    """Record kinds. The value is what the journal stores in its ``kind`` column."""

    # A transaction's life (written by the engine; reconcile writes REVERSAL_PENDING too)
    INTENT = "intent"
    HELD = "held"
    RELEASED = "released"
    OUTCOME = "outcome"
    PARTIAL = "partial"  # the host approved part of the amount; the operator accepts or cancels
    AWAIT_COMPLETION = "await_completion"  # the host approved a chip sale; the card's decision is awaited
    REFUND_OF = "refund_of"
    SIGNATURE = "signature"
    SIGNATURE_MISSING = "signature_missing"
    DEFERRED = "deferred"
    ADVICE_ATTEMPT = "advice_attempt"
    ADVICE_REVERSAL_PENDING = "advice_reversal_pending"
    ADVICE_REVERSED = "advice_reversed"
    REVERSAL_PENDING = "reversal_pending"
    REVERSAL_ATTEMPT = "reversal_attempt"
    REVERSAL_FAILED = "reversal_failed"
    REVERSED = "reversed"
    NEEDS_MANUAL = "needs_manual"
    # What the host said that belongs to no live request (engine)
    LATE_RESPONSE = "late_response"
    UNMATCHED_RESPONSE = "unmatched_response"
    HOST_GARBAGE = "host_garbage"
    # Terminal-level facts
    STAN_USE = "stan_use"  # a STAN spent on a network message (echo, checkpoint deposit)
    CHECKPOINT_DEPOSITED = "checkpoint_deposited"
    CHECKPOINT = "checkpoint"  # journal: signed state of the chain
    SEGMENT = "segment"  # compaction: restart point of a compacted live file
    KEY_ROTATION = "key_rotation"  # keys rotate
    CONFIG_LOADED = "config_loaded"  # daemon at start
    SNAPSHOT = "snapshot"  # daemon: where a restore may start (guard.runtime.snapshot)

    def __str__(self) -> str:
        return self.value


Record = tuple[Kind, "str | None", dict[str, Any]]

# Keys every payload of a kind must have (writers may add more: optional keys are listed in the
# comments). Kinds written by the journal layer itself (checkpoint, segment, key_rotation) are
# free-form here: their own modules check them.
REQUIRED: Mapping[Kind, frozenset[str]] = {
    Kind.INTENT: frozenset({"kind", "fp", "amount", "currency", "card_token", "masked_pan", "vault_ref", "stan",
                            "f7", "tid", "mid"}),  # + original, verdict, entry, emv (non-sensitive EMV facts)
    Kind.HELD: frozenset({"code", "detail"}),
    Kind.RELEASED: frozenset({"by"}),
    Kind.OUTCOME: frozenset({"state", "rc", "approval", "rrn", "reason"}),  # + policy, signature, approved_amount, card, emv
    Kind.AWAIT_COMPLETION: frozenset({"rc", "approval", "rrn"}),
    Kind.PARTIAL: frozenset({"rc", "approved_amount", "approval", "rrn"}),
    Kind.REFUND_OF: frozenset({"refund", "amount"}),
    Kind.SIGNATURE: frozenset({"late"}),
    Kind.SIGNATURE_MISSING: frozenset({"after_s"}),
    Kind.DEFERRED: frozenset({"stored", "stored_amount"}),  # + signature
    Kind.ADVICE_ATTEMPT: frozenset({"n", "stan", "f7"}),
    Kind.ADVICE_REVERSAL_PENDING: frozenset({"reason", "stan"}),
    Kind.ADVICE_REVERSED: frozenset({"rc", "failures"}),
    Kind.REVERSAL_PENDING: frozenset({"reason", "stan"}),  # + void, fields, rc, category, settlement_rrn, card, emv
    Kind.REVERSAL_ATTEMPT: frozenset({"n", "mti", "f7"}),
    Kind.REVERSAL_FAILED: frozenset({"why", "failures"}),
    Kind.REVERSED: frozenset({"rc", "attempts"}),
    Kind.NEEDS_MANUAL: frozenset({"reason", "attempts"}),  # + last_rc
    Kind.LATE_RESPONSE: frozenset({"mti", "rc", "note"}),  # + state, stan
    Kind.UNMATCHED_RESPONSE: frozenset({"why"}),
    # code/detail/len/digest: the first item of the interval; count, bytes, codes (count by code),
    # last ({code, len, digest}) and since: the whole interval (records before the tally had only the first four)
    Kind.HOST_GARBAGE: frozenset({"code", "detail", "len", "digest", "count", "bytes", "codes", "last", "since"}),
    Kind.STAN_USE: frozenset({"stan", "purpose"}),
    Kind.CHECKPOINT_DEPOSITED: frozenset({"stan", "rc"}),
    Kind.CONFIG_LOADED: frozenset(),
    # from_seq: the first entry a restore replays in full; open: keys of transactions still open
    # (their earlier entries are read too); stan: the last STAN; digest: SHA-256 of the key filter
    # stored beside it; horizon_s: the policy window the replay from from_seq covers
    Kind.SNAPSHOT: frozenset({"from_seq", "open", "stan", "digest", "horizon_s"}),
    Kind.CHECKPOINT: frozenset(),
    Kind.SEGMENT: frozenset(),
    Kind.KEY_ROTATION: frozenset(),
}
# Kinds that describe one transaction and must carry its key.
PER_TXN = frozenset({
    Kind.INTENT, Kind.HELD, Kind.RELEASED, Kind.OUTCOME, Kind.PARTIAL, Kind.AWAIT_COMPLETION, Kind.REFUND_OF, Kind.SIGNATURE, Kind.SIGNATURE_MISSING,
    Kind.DEFERRED, Kind.ADVICE_ATTEMPT, Kind.ADVICE_REVERSAL_PENDING, Kind.ADVICE_REVERSED, Kind.REVERSAL_PENDING,
    Kind.REVERSAL_ATTEMPT, Kind.REVERSAL_FAILED, Kind.REVERSED, Kind.NEEDS_MANUAL, Kind.LATE_RESPONSE,
})
_BY_VALUE: Mapping[str, Kind] = {k.value: k for k in Kind}


def kind_of(value: str) -> Kind | None:
    """The ``Kind`` a stored kind string names, or None for one this version does not know."""
    return _BY_VALUE.get(value)


def check(kind: str, txn: str | None, payload: Mapping[str, Any]) -> Kind:
    """Refuse a record no reader of the journal could interpret: unknown kind, missing key, or a
    per-transaction record without its transaction. Raises JournalError (JOURNAL_BAD_RECORD)."""
    k = _BY_VALUE.get(kind)
    if k is None:
        raise JournalError(f"refusing to journal a record of unknown kind {kind[:40]!r}", code="JOURNAL_BAD_RECORD")
    missing = REQUIRED[k].difference(payload)
    if missing:
        raise JournalError(f"refusing to journal a {k.value} record without {', '.join(sorted(missing))}",
                           code="JOURNAL_BAD_RECORD")
    if k in PER_TXN and not txn:
        raise JournalError(f"refusing to journal a {k.value} record without its transaction", code="JOURNAL_BAD_RECORD")
    return k
