"""Read-only views of a journal for operators and auditors: one row per transaction or per entry.

Needs no keys and never opens the vault: it reads the ``entries`` table through a read-only
SQLite connection and rebuilds every transaction's state with the engine's own restore
(``guard.core.engine.Engine.restore``), so a state shown here is exactly the state the guard would
recover. Entries hold masked PANs and keyed card tokens only, never a clear PAN.

Per transaction: txn, kind, state, stan, date (MMDD of field 7, the host's ledger date), amount,
currency, masked_pan, rc, approval, rrn, reason, signature (REQUIRED / CAPTURED / MISSING for a sale
above the signature limit), created, updated, entries, history (a list of
``[seq, kind, ts]``). Per entry: seq, time, ts, kind, txn, state (of its transaction), payload.
Times are UTC ISO 8601 (``time``/``created``/``updated``) or seconds since the epoch (``ts``).

Error codes (``ExportError.code``): EXPORT_BAD_SINCE, EXPORT_BAD_STATE; journals that cannot be
read raise ``JournalError`` (JOURNAL_MISSING, JOURNAL_CORRUPT, JOURNAL_NOT_INITIALISED).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from guard.core.engine import Engine, EngineConfig
from guard.core.errors import JournalError, PosguardError
from guard.journal.format import CHECKPOINT_KIND, canonical_json
from guard.journal.readonly import connect_readonly
from guard.core.model import TxnKind, TxnState
from guard.core.policies import OFF

TXN_COLUMNS = ["txn", "kind", "state", "stan", "date", "amount", "currency", "masked_pan", "rc", "approval", "rrn",
               "reason", "signature", "created", "updated", "entries", "history"]
ENTRY_COLUMNS = ["seq", "time", "ts", "kind", "txn", "state", "payload"]
STATES = tuple(s.value for s in TxnState)


def _full_view_config() -> EngineConfig:
    """Restore never looks at the ids (any valid ones will do); keep every final transaction in
    memory (the live engine evicts old ones and reads them back on demand)."""
    cfg = EngineConfig("RESTORE0", "RESTOREMERCHANT", policy=OFF)
    if hasattr(cfg, "keep_final"):
        cfg = dataclasses.replace(cfg, keep_final=10**12)
    return cfg


_RESTORE_CFG = _full_view_config()
_PROGRESS_EVERY = 8192


class ExportError(PosguardError):
    """A filter given on the command line is unusable."""

    code = "EXPORT_INVALID"


class Rec(NamedTuple):
    """One journal entry as read back (what Engine.restore consumes)."""

    seq: int
    ts: float
    kind: str
    txn: str | None
    payload: dict[str, Any]


@dataclass
class TxnView:
    key: str
    kind: str
    state: str
    stan: int
    date: str
    amount: int
    currency: str
    masked_pan: str
    rc: str
    approval: str
    rrn: str
    reason: str
    tid: str
    mid: str
    original: str | None
    created: float
    updated: float
    signature: str = ""  # "", REQUIRED, CAPTURED or MISSING (a sale above the signature limit)
    history: list[tuple[int, str, float]] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return TxnState(self.state).final

    def row(self) -> dict[str, Any]:
        return {"txn": self.key, "kind": self.kind, "state": self.state, "stan": self.stan, "date": self.date,
                "amount": self.amount, "currency": self.currency, "masked_pan": self.masked_pan, "rc": self.rc,
                "approval": self.approval, "rrn": self.rrn, "reason": self.reason, "signature": self.signature,
                "created": iso(self.created),
                "updated": iso(self.updated), "entries": len(self.history),
                "history": [[s, k, t] for s, k, t in self.history]}


@dataclass
class JournalView:
    """Every transaction of a journal file, its meta data and the engine rebuilt from it."""

    meta: dict[str, str]
    txns: dict[str, TxnView]
    engine: Engine
    first_seq: int
    last_seq: int
    entries: int


# --- reading ---------------------------------------------------------------------------------


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only, query-only connection; JournalError if the file is missing or not a journal."""
    path = Path(path)
    if not path.is_file():
        raise JournalError(f"journal {path} does not exist", code="JOURNAL_MISSING")
    conn: sqlite3.Connection | None = None
    try:
        conn = connect_readonly(path)
        conn.execute("PRAGMA query_only = ON")
        conn.execute("PRAGMA trusted_schema = OFF")
        conn.execute("PRAGMA busy_timeout = 2000")
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        if conn is not None:
            conn.close()
        if "locked" in str(e):
            raise JournalError(f"journal {path} is locked by a maintenance command (replay, compaction, "
                               "rotation); try again when it is done", code="JOURNAL_BUSY") from None
        raise JournalError(f"{path} cannot be read: {e}", code="JOURNAL_CORRUPT") from None
    if not {"meta", "entries"} <= names:
        conn.close()
        raise JournalError(f"{path} is not an initialised posguard journal", code="JOURNAL_NOT_INITIALISED")
    return conn


def read_meta(path: Path) -> dict[str, str]:
    conn = open_readonly(path)
    try:
        return dict(conn.execute("SELECT k, v FROM meta").fetchall())
    finally:
        conn.close()


def iter_entries(conn: sqlite3.Connection, since_seq: int = 0) -> Iterator[Rec]:
    """Entries in seq order, payloads parsed (one streaming SELECT)."""
    loads = json.loads
    for seq, ts, kind, txn, payload in conn.execute(
            "SELECT seq, ts, kind, txn, payload FROM entries WHERE seq >= ? ORDER BY seq", (since_seq,)):
        try:
            p = loads(payload)
        except (ValueError, TypeError):
            raise JournalError(f"journal entry {seq}: payload is not JSON; `posguard journal verify` names the first "
                               "entry that changed", code="JOURNAL_CORRUPT") from None
        yield Rec(seq, ts, kind, txn, p)


def latest_checkpoint(path: Path) -> dict[str, Any]:
    """The newest signed checkpoint (an anchor for ``posguard journal verify --anchor``)."""
    conn = open_readonly(path)
    try:
        row = conn.execute("SELECT payload FROM entries WHERE kind = ? ORDER BY seq DESC LIMIT 1",
                           (CHECKPOINT_KIND,)).fetchone()
    except sqlite3.DatabaseError as e:
        raise JournalError(f"{path} cannot be read: {e}", code="JOURNAL_CORRUPT") from None
    finally:
        conn.close()
    if row is None:
        raise JournalError(f"{path} has no checkpoint", code="JOURNAL_CORRUPT")
    cp: dict[str, Any] = json.loads(row[0])
    return cp


def anchor_coverage(path: Path, cp: dict[str, Any]) -> str | None:
    """A warning when the anchor ``cp`` proves little: it covers nothing but the genesis, or newer
    entries follow it (they are not covered until the next checkpoint); None when it covers all."""
    conn = open_readonly(path)
    try:
        last = int(conn.execute("SELECT max(seq) FROM entries").fetchone()[0] or 0)
    except sqlite3.DatabaseError as e:
        raise JournalError(f"{path} cannot be read: {e}", code="JOURNAL_CORRUPT") from None
    finally:
        conn.close()
    covers = int(cp.get("covers_seq", 0))
    uncovered = last - covers - 1  # the checkpoint itself is entry covers + 1
    if covers < 1:
        tail = f"; the {uncovered} newer entries are not covered" if uncovered > 0 else ""
        return (f"this anchor covers nothing (the journal's genesis only){tail}. Stop the daemon cleanly (it signs a "
                "final checkpoint) or wait for the next checkpoint, then anchor again")
    if uncovered > 0:
        return (f"this anchor covers entries up to {covers}; the {uncovered} newer entries are not covered until the "
                "next checkpoint (or a clean stop of the daemon)")
    return None


def load_view(path: Path, progress: Callable[[int, int], None] | None = None) -> JournalView:
    """Stream the journal file once (read-only connection) into a ``JournalView``."""
    conn = open_readonly(path)
    try:
        meta = dict(conn.execute("SELECT k, v FROM meta").fetchall())
        lo, hi = conn.execute("SELECT min(seq), max(seq) FROM entries").fetchone()
        try:
            return build_view(meta, iter_entries(conn), progress, (hi or 0) - (lo or 1) + 1)
        except sqlite3.DatabaseError as e:
            raise JournalError(f"{path} cannot be read: {e}", code="JOURNAL_CORRUPT") from None
    finally:
        conn.close()


def recorded_archives(path: Path) -> list[str]:
    """Paths of the archive files `journal compact` recorded in the live journal ``path``."""
    conn = open_readonly(path)
    try:
        has = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'archive_files'").fetchone()
        return [r[0] for r in conn.execute("SELECT path FROM archive_files ORDER BY id")] if has else []
    except sqlite3.DatabaseError as e:
        raise JournalError(f"{path} cannot be read: {e}", code="JOURNAL_CORRUPT") from None
    finally:
        conn.close()


def build_view(meta: dict[str, str], entries: Iterable[Any], progress: Callable[[int, int], None] | None = None,
               total: int = 0) -> JournalView:
    """The engine's restore for states plus (seq, kind, ts) per transaction, in one pass over
    ``entries`` (objects with seq, ts, kind, txn, payload: ``Rec`` or ``guard.journal.format.Entry``)."""
    hist: dict[str, list[tuple[int, str, float]]] = {}
    ids: dict[str, tuple[str, str]] = {}
    count, lo, hi = 0, 0, 0

    def feed() -> Iterator[Any]:
        nonlocal count, lo, hi
        for r in entries:
            if r.txn is not None:
                h = hist.get(r.txn)
                if h is None:
                    hist[r.txn] = h = []
                h.append((r.seq, r.kind, r.ts))
                if r.kind == "intent":
                    ids[r.txn] = (str(r.payload.get("tid", "")), str(r.payload.get("mid", "")))
            count += 1
            lo = lo or r.seq
            hi = r.seq
            if progress is not None and not count % _PROGRESS_EVERY:
                progress(count, total)
            yield r

    try:
        engine = Engine.restore(_RESTORE_CFG, _NoCrypto(), feed())
    except (KeyError, ValueError, TypeError) as e:
        raise JournalError(f"the journal holds an entry the engine cannot restore ({e.__class__.__name__}: {e})",
                           code="JOURNAL_CORRUPT") from None
    txns: dict[str, TxnView] = {}
    for key, t in engine.txns.items():
        h = hist.get(key, [])
        tid, mid = ids.get(key, ("", ""))
        txns[key] = TxnView(
            key=key, kind=t.kind.value, state=t.state.value, stan=t.stan, date=t.f7[:4], amount=t.settled,
            currency=t.currency, masked_pan=t.masked_pan, rc=t.rc, approval=t.approval, rrn=t.rrn,
            reason=t.reason, tid=tid, mid=mid, original=t.original, created=t.created, signature=t.signature,
            updated=h[-1][2] if h else t.created, history=h)
    if progress is not None:
        progress(count, count)
    return JournalView(meta, txns, engine, lo, hi, count)


class _NoCrypto:
    """Restore never tokenises or seals; a read-only view must not be able to."""

    def token(self, pan: str) -> str:  # pragma: no cover
        raise PosguardError("read-only view", code="EXPORT_READ_ONLY")

    def seal(self, txn: str, plaintext: bytes) -> Any:  # pragma: no cover
        raise PosguardError("read-only view", code="EXPORT_READ_ONLY")


# --- filters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Since:
    """``--since``: a seq (inclusive) or a UTC time (inclusive)."""

    seq: int | None = None
    ts: float | None = None

    def entry_ok(self, seq: int, ts: float) -> bool:
        return (self.seq is None or seq >= self.seq) and (self.ts is None or ts >= self.ts)


def parse_since(text: str | None) -> Since:
    """``123`` (a seq) or an ISO 8601 date/time (``2024-03-14``, ``2024-03-14T10:00``; UTC unless an
    offset is given)."""
    if text is None or text == "":
        return Since()
    t = text.strip()
    if t.isdigit():
        return Since(seq=int(t))
    try:
        d = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise ExportError(f"--since {text!r} is neither a seq number nor an ISO date/time (e.g. 2024-03-14)",
                          code="EXPORT_BAD_SINCE") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    return Since(ts=d.timestamp())


def parse_states(values: Iterable[str]) -> frozenset[str]:
    out = set()
    for v in values:
        for s in v.split(","):
            s = s.strip().upper()
            if not s:
                continue
            if s not in STATES:
                raise ExportError(f"unknown state {s!r} (known: {', '.join(STATES)})", code="EXPORT_BAD_STATE")
            out.add(s)
    return frozenset(out)


def txn_rows(view: JournalView, since: Since = Since(), states: frozenset[str] = frozenset()) -> Iterator[dict[str, Any]]:
    """One row per transaction (journal order) that has an entry since ``since`` and is in ``states``."""
    for t in view.txns.values():
        if states and t.state not in states:
            continue
        if (since.seq is not None or since.ts is not None) and not any(since.entry_ok(s, ts) for s, _, ts in t.history):
            continue
        yield t.row()


def entry_rows(path: Path, view: JournalView | None = None, since: Since = Since(),
               states: frozenset[str] = frozenset()) -> Iterator[dict[str, Any]]:
    """One row per entry (streamed). ``states`` keeps entries of transactions in those states."""
    if states and view is None:
        raise ValueError("filtering entries by state needs the transaction view")
    conn = open_readonly(path)
    try:
        for r in iter_entries(conn, since.seq or 0):
            if since.ts is not None and r.ts < since.ts:
                continue
            t = view.txns.get(r.txn) if (view is not None and r.txn is not None) else None
            state = t.state if t is not None else ""
            if states and state not in states:
                continue
            yield {"seq": r.seq, "time": iso(r.ts), "ts": r.ts, "kind": r.kind, "txn": r.txn, "state": state,
                   "payload": r.payload}
    except sqlite3.DatabaseError as e:
        raise JournalError(f"{path} cannot be read: {e}", code="JOURNAL_CORRUPT") from None
    finally:
        conn.close()


# --- writers ---------------------------------------------------------------------------------


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def write_jsonl(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    n = 0
    for row in rows:
        out.write(canonical_json(row))
        out.write("\n")
        n += 1
    return n


def write_csv(rows: Iterable[dict[str, Any]], columns: list[str], out: IO[str]) -> int:
    """CSV with a header; ``history`` as ``seq/kind/time`` items joined by ``;``, ``payload`` as JSON,
    ``stan`` zero-padded to 6 digits."""
    w = csv.DictWriter(out, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    n = 0
    for row in rows:
        flat = dict(row)
        if "history" in flat:
            flat["history"] = ";".join(f"{s}/{k}/{iso(t)}" for s, k, t in flat["history"])
        if "payload" in flat:
            flat["payload"] = canonical_json(flat["payload"])
        if isinstance(flat.get("stan"), int):  # as on the wire and in settlement reports: 6 digits
            flat["stan"] = f"{flat['stan']:06d}"
        w.writerow(flat)
        n += 1
    return n


def is_void(t: TxnView) -> bool:
    return t.kind == TxnKind.VOID.value
