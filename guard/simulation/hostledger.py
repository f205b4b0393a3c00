"""The host simulator's ledger views (guard.simulation.hostsim): the JSON snapshot, the settlement
rows and CSV, written atomically. Pure functions over ``HostCore``'s records."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import threading
from dataclasses import asdict
from typing import Any, Iterable, Mapping

from guard.core.constants import SETTLE_REFUND, SETTLE_REVERSAL, SETTLEMENT_COLUMNS
from guard.simulation.acquirer import AcquirerAnswers
from guard.simulation.hosttypes import Debit, FaultRecord, LedgerKey, ReversalRecord, SaleRecord


def _signed(d: Debit) -> int:
    return -d.amount if d.type == SETTLE_REFUND else d.amount


def snapshot(*, seed: int, dup_detection: bool, debits: Iterable[Debit], reversals: Iterable[ReversalRecord],
             tombstones: Mapping[LedgerKey, float], faults: Iterable[FaultRecord],
             checkpoints: Iterable[dict[str, Any]], profile: str) -> dict[str, Any]:
    """JSON-serialisable ledger: debits, reversals, tombstones, per-card counts, totals."""
    ds = list(debits)
    per_card: dict[str, dict[str, Any]] = {}
    for d in ds:
        c = per_card.setdefault(d.card, {"masked_pan": d.masked_pan, "debits": 0, "reversed": 0, "net": 0, "net_amount": 0})
        c["debits"] += 1
        if d.reversed:
            c["reversed"] += 1
        else:
            c["net"] += 1
            c["net_amount"] += _signed(d)
    active = [d for d in ds if not d.reversed]
    return {
        "seed": seed,
        "dup_detection": dup_detection,
        "profile": profile,
        "debits": [asdict(d) for d in ds],
        "reversals": [asdict(r) for r in reversals],
        "tombstones": [{"tid": k[0], "mid": k[1], "stan": k[2], "date": k[3], "at": at} for k, at in tombstones.items()],
        "counts_per_card": per_card,
        "totals": {
            "debits": len(ds),
            "reversed": len(ds) - len(active),
            "net_debits": len(active),
            "net_amount": sum(_signed(d) for d in active),
            "refunds": sum(1 for d in active if d.type == SETTLE_REFUND),
        },
        "faults": [asdict(f) for f in faults],
        "checkpoints": [dict(c) for c in checkpoints],
    }


def settlement_rows(sales: Iterable[SaleRecord], reversals: Iterable[ReversalRecord]) -> list[dict[str, str]]:
    """Every processed sale (any response) and every reversal, in arrival order.

    REVERSAL rows carry the *original* STAN and date (the ledger key) and the original RRN when it
    was found, so they join with their SALE row. A partial approval's SALE row shows the amount
    the host booked.
    """
    events: list[tuple[float, int, dict[str, str]]] = []
    for i, s in enumerate(sales):
        events.append((s.at, 2 * i, {
            "date": s.date, "tid": s.tid, "mid": s.mid, "stan": s.stan, "rrn": s.rrn,
            "amount": str(s.amount if s.booked_amount is None else s.booked_amount), "type": s.type,
            "response": s.response}))
    for i, r in enumerate(reversals):
        events.append((r.at, 2 * i + 1, {
            "date": r.orig_date, "tid": r.tid, "mid": r.mid, "stan": r.orig_stan, "rrn": r.rrn,
            "amount": str(r.amount), "type": SETTLE_REVERSAL, "response": r.response}))
    events.sort(key=lambda e: (e[0], e[1]))
    return [e[2] for e in events]


def settlement_csv(rows: Iterable[Mapping[str, str]]) -> bytes:
    """Settlement export: ``date,tid,mid,stan,rrn,amount,type,response`` (amount in minor units)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SETTLEMENT_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Temp file + fsync + rename, so a reader never sees half a file."""
    tmp = f"{os.fspath(path)}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class LedgerViews:
    """``HostCore``'s read side: debit counts, the ledger snapshot, settlement and checkpoints."""

    seed: int
    dup_detection: bool
    fault_log: list[FaultRecord]
    _lock: threading.RLock
    _debits: list[Debit]
    _by_key: dict[LedgerKey, list[Debit]]
    _reversals: list[ReversalRecord]
    _sales: list[SaleRecord]
    _tombstones: dict[LedgerKey, float]
    _checkpoints: list[dict[str, Any]]
    _answers: AcquirerAnswers

    def net_debits(self, tid: str, mid: str, stan: str | int, mmdd: str) -> int:
        """Active (not reversed) debits for the key; > 1 means a double debit."""
        s = f"{stan:06d}" if isinstance(stan, int) else stan.zfill(6)
        with self._lock:
            return sum(1 for d in self._by_key.get((tid, mid, s, mmdd), []) if not d.reversed)

    def net_debits_of(self, tid: str, mid: str, stan: str, mmdd: str, type_: str) -> int:
        """``net_debits`` counting only records of ``type_`` (SALE or REFUND): no copy of the ledger."""
        with self._lock:
            return sum(1 for d in self._by_key.get((tid, mid, stan, mmdd), []) if not d.reversed and d.type == type_)

    def net_by_key(self) -> dict[LedgerKey, int]:
        """Active debit count per ledger key (tid, mid, stan, MMDD), for every key ever debited."""
        with self._lock:
            return {k: sum(1 for d in ds if not d.reversed) for k, ds in self._by_key.items()}

    def total_net_debits(self) -> int:
        with self._lock:
            return sum(1 for d in self._debits if not d.reversed)

    def debits(self) -> list[Debit]:
        """Copies of every debit record (reversed ones too), oldest first."""
        with self._lock:
            return [Debit(**asdict(d)) for d in self._debits]

    def checkpoints(self) -> list[dict[str, Any]]:
        """Checkpoints terminals deposited (0800 / 880), oldest first."""
        with self._lock:
            return [dict(c["checkpoint"]) for c in self._checkpoints]

    def ledger(self) -> dict[str, Any]:
        """JSON-serialisable snapshot: debits, reversals, tombstones, per-card counts, totals."""
        with self._lock:
            return snapshot(seed=self.seed, dup_detection=self.dup_detection, debits=self._debits,
                            reversals=self._reversals, tombstones=self._tombstones, faults=self.fault_log,
                            checkpoints=self._checkpoints, profile=self._answers.profile.name)

    def dump_ledger(self, path: str | os.PathLike[str]) -> None:
        """Write ``ledger()`` as JSON atomically (temp file + fsync + rename)."""
        atomic_write(path, json.dumps(self.ledger(), indent=2, sort_keys=True).encode())

    def settlement_rows(self) -> list[dict[str, str]]:
        """Every processed sale (any response) and every reversal but refused ones, in arrival order."""
        with self._lock:
            return settlement_rows(self._sales, [r for r in self._reversals if r.effect != "refused"])

    def write_settlement_csv(self, path: str | os.PathLike[str]) -> None:
        """Settlement export: ``date,tid,mid,stan,rrn,amount,type,response`` (amount in minor units)."""
        atomic_write(path, settlement_csv(self.settlement_rows()))
