"""One structured log line for each committed fact an operator bringing up a host must see.

The journal holds everything; these lines make the loud cases visible without reading it:
NEEDS_MANUAL, answers that are not ours (echo mismatch, wrong MTI, unknown STAN), late answers,
partial approvals, fail-safe reversals of codes no class covers, STAN collisions, host timeouts
(``host_timeout``), every other queued reversal (``reversal_queued``: host disconnected, VOID, ...)
and each sale recovery queues at start (``recovered``: an intent without an outcome). Each line
carries its fields as JSON (``posguard.run.JsonFormatter`` merges ``extra["fields"]``): the txn
key, STAN, reason and host code. Nothing here can hold card data: the records are already
card-data-free, and only named fields are copied.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from guard.core.model import CARD_REASONS
from guard.core.records import Kind

log = logging.getLogger("posguard.events")

LOUD_REVERSAL_REASONS = frozenset({"ECHO_MISMATCH", "UNCLASSIFIED_RESPONSE", "BAD_RESPONSE", "BAD_PARTIAL_AMOUNT",
                                   "PARTIAL_NOT_SUPPORTED"})
QUIET_REVERSAL_REASONS = frozenset({"VOID", "PARTIAL_CANCELLED"})  # asked for by the operator: INFO, not WARNING
_COPIED = ("reason", "stan", "rc", "why", "note", "mti", "attempts", "last_rc", "approved_amount", "state", "fields",
           "card")


def event_of(kind: str, txn: str | None, payload: Mapping[str, Any]) -> tuple[int, str] | None:
    """(level, event name) when a committed record deserves a log line, else None."""
    if kind == Kind.NEEDS_MANUAL:
        return logging.ERROR, "needs_manual"
    if kind == Kind.UNMATCHED_RESPONSE:
        return logging.WARNING, "unmatched_answer"
    if kind == Kind.LATE_RESPONSE:
        return logging.WARNING, "late_answer"
    if kind == Kind.PARTIAL:
        return logging.WARNING, "partial_approval"
    if kind == Kind.REVERSAL_PENDING and payload.get("reason") in LOUD_REVERSAL_REASONS:
        return logging.WARNING, "echo_mismatch" if payload.get("reason") == "ECHO_MISMATCH" else "fail_safe_reversal"
    if kind == Kind.REVERSAL_PENDING and payload.get("reason") in CARD_REASONS:
        return logging.WARNING, "card_did_not_complete"  # the host approved; the chip card refused or went silent
    if kind == Kind.OUTCOME and payload.get("reason") == "STAN_COLLISION":
        return logging.ERROR, "stan_collision"
    if kind in (Kind.REVERSAL_PENDING, Kind.ADVICE_REVERSAL_PENDING):
        reason = payload.get("reason")
        if reason == "HOST_TIMEOUT":
            return logging.WARNING, "host_timeout"
        if reason == "RECOVERY":
            return logging.WARNING, "recovered"
        return (logging.INFO if reason in QUIET_REVERSAL_REASONS else logging.WARNING), "reversal_queued"
    return None


def log_committed(records: Sequence[tuple[str, str | None, Mapping[str, Any]]]) -> int:
    """Log the loud ones among records just committed; returns how many lines were written."""
    n = 0
    for kind, txn, payload in records:
        ev = event_of(kind, txn, payload)
        if ev is None:
            continue
        level, name = ev
        fields: dict[str, Any] = {"event": name, "txn": txn}
        fields.update((k, payload[k]) for k in _COPIED if k in payload)
        log.log(level, name, extra={"fields": fields})
        n += 1
    return n
