"""The ``txns`` rows of one upload: each touched transaction's state, folded from its journal rows.

A transaction's state is its own records applied in seq order with the engine's per-record
functions (``guard.core.txn.from_intent`` and ``evolve``, what ``Engine.restore`` runs for each
record); the engine's indexes (STAN map, velocity history, timers) play no part in the columns the
fleet stores, so they are not rebuilt (a full ``Engine.restore`` cost about three times the verify
and COPY of the same entries).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from guard.core.errors import JournalError
from guard.core.records import Kind, check
from guard.core.txn import Txn, evolve, from_intent

TxnRow = tuple[str, str, str, str, int, str, int, str, str, str, str, int, float]
_INTENT = Kind.INTENT.value


class StateError(Exception):
    """A verified record the engine's functions cannot apply (the seq and what went wrong)."""

    def __init__(self, seq: int, detail: str) -> None:
        super().__init__(seq, detail)
        self.seq, self.detail = seq, detail

    def __str__(self) -> str:
        return f"entry {self.seq}: {self.detail}"


def txn_rows(terminal: str, rows: Iterable[tuple[Any, ...]], first_new: int) -> list[TxnRow]:
    """``txns`` rows for the transactions whose last record in ``rows`` is at or after ``first_new``.

    ``rows``: (seq, ts, kind, txn, payload text) in seq order, holding every record of those
    transactions that the file holds. Records of a transaction whose intent is not among them
    change nothing (as in a restore); rows without a transaction id are checked, then skipped.
    """
    loads = json.loads
    txns: dict[str, Txn] = {}
    last: dict[str, tuple[int, float]] = {}
    ids: dict[str, tuple[str, str]] = {}
    seq = 0
    try:
        for seq, ts, kind, key, payload in rows:
            p = loads(payload)
            check(kind, key, p)  # what a restore refuses (unknown kind, missing key), also without a txn
            if key is None:
                continue
            last[key] = (seq, ts)
            if kind == _INTENT:
                txns[key] = from_intent(key, p, ts)
                ids[key] = (str(p.get("tid", "")), str(p.get("mid", "")))
            else:
                t = txns.get(key)
                if t is not None:
                    evolve(t, kind, p)
    except (KeyError, ValueError, TypeError, AttributeError, JournalError) as e:  # JSONDecodeError, IllegalTransition
        raise StateError(seq, f"{e.__class__.__name__}: {e}") from None
    out: list[TxnRow] = []
    for key, t in txns.items():
        s, ts = last[key]
        if s >= first_new:
            tid, mid = ids[key]
            out.append((terminal, key, t.kind.value, t.state.value, t.stan, t.f7[:4], t.settled, tid, mid,
                        t.masked_pan, t.rrn, s, ts))
    return out


_ESC = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_field(v: object) -> str:
    """A text value in COPY's text format (``translate`` only when needed: it is slow per character)."""
    if v is None:
        return "\\N"
    s = v if type(v) is str else str(v)
    if "\\" in s or "\t" in s or "\n" in s or "\r" in s:
        return s.translate(_ESC)
    return s


def txns_copy_text(terminal: str, rows: list[tuple[Any, ...]], first_new: int) -> str:
    """``txn_rows`` as COPY text for ``txns``."""
    return "".join(f"{copy_field(a)}\t{copy_field(b)}\t{copy_field(c)}\t{copy_field(d)}\t{e}\t{copy_field(f)}\t{g}\t"
                   f"{copy_field(h)}\t{copy_field(i)}\t{copy_field(j)}\t{copy_field(k)}\t{s}\t{ts!r}\n"
                   for a, b, c, d, e, f, g, h, i, j, k, s, ts in txn_rows(terminal, rows, first_new))


__all__ = ["StateError", "TxnRow", "copy_field", "txn_rows", "txns_copy_text"]
