"""Enrol terminals and ingest their journal files (live journals and compaction archives).

One file is one PostgreSQL transaction: the terminal's row is locked, the file is checked against
what the fleet holds (the witness), its new entries are verified from the stored chain state
(``guard.fleet.chain``), COPYed into ``entries``, the touched transactions' states upserted into
``txns`` and the state advanced; or nothing is written. So an ingest killed at any point loses
nothing that was committed and the next run redoes the rest; a file ingested twice adds nothing.

Witness rules (a rejected file is recorded in ``rejections`` and reported, nothing else changes):
  FLEET_GAP       the file starts after the next entry the fleet expects (upload the archive first)
  FLEET_FORK      an entry the fleet holds differs from the file's entry at the same seq
  FLEET_ROLLBACK  a live journal ends before what the fleet already accepted from that terminal
  FLEET_ENTRY_INVALID  a new entry fails verification (reason: ENTRY_MODIFIED, CHAIN_BROKEN,
                  MAC_INVALID, CHECKPOINT_INVALID (also a forged segment record), TRUNCATED,
                  RATCHET_MISMATCH)
  FLEET_UNKNOWN_TERMINAL  no enrolled keys for the file's terminal
  FLEET_FILE_INVALID      not a posguard journal (unreadable, unexpected schema, no terminal id)
  FLEET_CERT_MISMATCH     (fleet serve) the file is another terminal's than the client certificate's
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.copy import QueuedLibpqWriter

from guard.core.errors import PosguardError
from guard.fleet.chain import ChainReject, ChainState
from guard.fleet.schema import connect, day_of, ensure_days
from guard.fleet.states import StateError, copy_field, txns_copy_text
from guard.journal.format import ROLE_ARCHIVE, archive_ratchet_commitment, entry_body, entry_hash
from guard.journal.keys import load_k0, public_key_chain
from guard.journal.schema import _connect, schema_problem

_COLS = "seq, ts, kind, txn, payload, prev_hash, entry_hash, mac"
COPY_ENTRIES = "COPY entries (terminal, day, seq, ts, kind, txn, payload, prev_hash, entry_hash, mac) FROM STDIN"
JOURNAL_SUFFIXES = (".db", ".sqlite", ".journal")
_VERIFY_CHUNK = 4096  # rows verified, then queued for COPY while the next ones are verified


class FleetError(PosguardError):
    """A fleet command cannot run (bad arguments, database not initialised)."""

    code = "FLEET_ERROR"


@dataclass
class IngestResult:
    file: str
    terminal: str
    status: str  # added | unchanged | rejected
    first_seq: int = 0
    last_seq: int = 0
    added: int = 0
    code: str = ""
    seq: int | None = None
    reason: str = ""
    seconds: dict[str, float] = field(default_factory=dict)  # verify, copy, states (what the time went on)

    def line(self) -> str:
        if self.status == "rejected":
            return f"REJECTED {self.file}: terminal {self.terminal or '?'} seq {self.seq}: {self.code}: {self.reason}"
        return f"{self.status} {self.file}: terminal {self.terminal} seq {self.first_seq}..{self.last_seq} +{self.added}"


class _Reject(Exception):
    def __init__(self, code: str, seq: int | None, reason: str) -> None:
        super().__init__(reason)
        self.code, self.seq, self.reason = code, seq, reason


def enroll(dsn: str, terminal: str, keys_dir: Path) -> None:
    """Register a terminal's escrowed k0 and public key chain (``posguard keys export-verifier`` output
    or the provisioning key directory). Re-enrolling with the same keys changes nothing."""
    k0 = load_k0(Path(keys_dir) / "k0.escrow")
    pubs = public_key_chain(Path(keys_dir))
    state = ChainState.genesis(terminal, k0, pubs[0])
    with connect(dsn) as conn, conn.transaction():
        row = conn.execute("SELECT k0, pubs FROM terminals WHERE terminal = %s FOR UPDATE", (terminal,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO terminals (terminal, k0, pubs, state, audit) VALUES (%s, %s, %s, %s, %s)",
                         (terminal, k0, pubs, json.dumps(state.to_json()), json.dumps(state.to_json())))
        elif bytes(row[0]) != k0:
            raise FleetError(f"terminal {terminal} is enrolled with another k0", code="FLEET_UNKNOWN_TERMINAL")
        else:
            conn.execute("UPDATE terminals SET pubs = %s WHERE terminal = %s", (pubs, terminal))


def journal_files(paths: Iterable[Path]) -> list[Path]:
    """The files named, and the journal files under the directories named."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in JOURNAL_SUFFIXES)
        else:
            out.append(p)
    return out


class _File:
    """A journal file opened read-only: meta, ratchet row, seq range, rows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.conn = _connect(path, mode="ro")
            self.conn.execute("PRAGMA query_only = ON")
            self.conn.execute("PRAGMA trusted_schema = OFF")
            self.conn.execute("BEGIN")
            odd = schema_problem(self.conn)
            if odd is not None:
                raise _Reject("FLEET_FILE_INVALID", None, odd[1])
            self.meta = dict(self.conn.execute("SELECT k, v FROM meta").fetchall())
            self.lo, self.hi = self.conn.execute("SELECT min(seq), max(seq) FROM entries").fetchone()
            rat = self.conn.execute("SELECT next_seq, key FROM ratchet WHERE id = 1").fetchone()
        except sqlite3.DatabaseError as e:
            raise _Reject("FLEET_FILE_INVALID", None, f"SQLite cannot read it: {e}") from None
        self.terminal = self.meta.get("terminal_id", "")
        self.archive = self.meta.get("segment_role") == ROLE_ARCHIVE
        self.rat_next: int | None = rat[0] if rat else None
        self.rat_key: bytes | None = rat[1] if rat else None
        if not self.terminal or self.lo is None:
            raise _Reject("FLEET_FILE_INVALID", None, "no terminal id or no entries")

    def rows(self, lo: int, hi: int) -> Iterator[tuple[Any, ...]]:
        yield from self.conn.execute(f"SELECT {_COLS} FROM entries WHERE seq BETWEEN ? AND ? ORDER BY seq", (lo, hi))

    def close(self) -> None:
        self.conn.close()


def ingest(dsn: str, paths: Iterable[Path], *, progress: Callable[[int, int], None] | None = None,
           jobs: int = 1) -> list[IngestResult]:
    """Ingest every journal file (each in its own transaction); files of one terminal in seq order.

    ``jobs`` > 1: that many worker processes, each owning a disjoint set of terminals (files of
    different terminals are independent; a terminal's files stay in order in one worker).
    """
    files = journal_files(paths)
    opened: list[tuple[int, str, Path]] = []
    results: list[IngestResult] = []
    for p in files:
        try:
            f = _File(p)
            opened.append((f.lo, f.terminal, p))
            f.close()
        except _Reject as r:
            results.append(IngestResult(str(p), "", "rejected", code=r.code, seq=r.seq, reason=r.reason))
    opened.sort(key=lambda x: (x[1], x[0]))
    with connect(dsn) as conn:
        for res in results:
            _record_rejection(conn, res)
    if jobs > 1 and len(opened) > 1:
        groups: list[list[Path]] = [[] for _ in range(jobs)]
        owner: dict[str, int] = {}
        for _, term, p in opened:
            groups[owner.setdefault(term, len(owner) % jobs)].append(p)
        done = 0
        with ProcessPoolExecutor(jobs) as pool:
            for fut in as_completed([pool.submit(_ingest_ordered, dsn, g) for g in groups if g]):
                part = fut.result()
                results += part
                done += len(part)
                if progress is not None:
                    progress(done, len(opened))
        return results
    results += _ingest_ordered(dsn, [p for _, _, p in opened], progress)
    return results


def _ingest_ordered(dsn: str, paths: list[Path], progress: Callable[[int, int], None] | None = None
                    ) -> list[IngestResult]:
    known: set[dt.date] = set()
    out: list[IngestResult] = []
    with connect(dsn) as conn:
        for i, p in enumerate(paths):
            out.append(ingest_file(conn, p, known))
            if progress is not None:
                progress(i + 1, len(paths))
    return out


def ingest_file(conn: psycopg.Connection[Any], path: Path, known: set[dt.date] | None = None, *,
                expect_terminal: str | None = None) -> IngestResult:
    """One file, one transaction. ``expect_terminal``: the uploader's authenticated terminal id
    (``fleet serve``'s client certificate); a file of another terminal is refused."""
    try:
        f = _File(path)
        if expect_terminal is not None and f.terminal != expect_terminal:
            f.close()
            raise _Reject("FLEET_CERT_MISMATCH", None, f"the file is terminal {f.terminal!r}'s journal; the client "
                          f"certificate names {expect_terminal!r}")
    except _Reject as r:
        res = IngestResult(str(path), expect_terminal or "", "rejected", code=r.code, seq=r.seq, reason=r.reason)
        _record_rejection(conn, res)
        return res
    try:
        days = {day_of(ts) for (ts,) in f.conn.execute("SELECT DISTINCT CAST(ts / 86400 AS INTEGER) * 86400 FROM entries")}
        ensure_days(conn, days, known)
        try:
            with conn.transaction():
                return _ingest_locked(conn, f)
        except _Reject as r:
            res = IngestResult(str(path), f.terminal, "rejected", f.lo, f.hi, code=r.code, seq=r.seq, reason=r.reason)
            _record_rejection(conn, res)
            return res
    finally:
        f.close()


def _record_rejection(conn: psycopg.Connection[Any], res: IngestResult) -> None:
    conn.execute("INSERT INTO rejections (terminal, seq, code, reason, file) VALUES (%s, %s, %s, %s, %s)",
                 (res.terminal, res.seq, res.code, res.reason, res.file))


def _ingest_locked(conn: psycopg.Connection[Any], f: _File) -> IngestResult:
    row = conn.execute("SELECT state, witness_seq FROM terminals WHERE terminal = %s FOR UPDATE",
                       (f.terminal,)).fetchone()
    if row is None:
        raise _Reject("FLEET_UNKNOWN_TERMINAL", None, f"terminal {f.terminal!r} is not enrolled (posguard fleet enroll)")
    st = ChainState.from_json(row[0])
    witness = int(row[1])
    lo, hi, n = int(f.lo), int(f.hi), st.next_seq
    if f.rat_next != hi + 1:
        raise _Reject("FLEET_ENTRY_INVALID", hi + 1, f"TRUNCATED: the file's ratchet state says {f.rat_next!r} follows "
                      f"entry {hi}")
    if lo > n:
        raise _Reject("FLEET_GAP", n, f"the file starts at {lo}; the fleet holds entries up to {n - 1}: entries "
                      f"{n}..{lo - 1} are missing (upload the archive that holds them)")
    if not f.archive and hi < n - 1:
        raise _Reject("FLEET_ROLLBACK", hi + 1, f"the live journal ends at {hi} but the fleet accepted entries up to "
                      f"{n - 1} (witnessed checkpoint at {witness}): the terminal rolled back its journal")
    if lo <= n - 1:
        _check_overlap(conn, f, lo, min(hi, n - 1))
    if hi < n:
        return IngestResult(str(f.path), f.terminal, "unchanged", lo, hi, 0)
    clock = time.perf_counter
    new = list(f.rows(n, hi))
    t0 = clock()
    verify_s = 0.0
    with conn.cursor() as cur, cur.copy(COPY_ENTRIES, writer=QueuedLibpqWriter(cur)) as cp:
        for i in range(0, len(new), _VERIFY_CHUNK):
            part = new[i:i + _VERIFY_CHUNK]
            tv = clock()
            try:
                st.feed(part, file_first_seq=lo)
            except ChainReject as e:
                raise _Reject("FLEET_ENTRY_INVALID", e.seq, f"{e.reason}: {e.detail}") from None
            verify_s += clock() - tv
            for text in copy_text(f.terminal, part):
                cp.write(text)
        want = archive_ratchet_commitment(st.key) if f.archive else st.key
        if f.rat_key != want:
            raise _Reject("FLEET_ENTRY_INVALID", hi + 1, f"RATCHET_MISMATCH: the file's ratchet key is not k_{hi + 1}")
        t1 = clock()
        states = _txn_text(f, n, new)  # the server still ingests the queued entries meanwhile
        t2 = clock()
    t3 = clock()
    _upsert_txns(conn, states, first=n == 1)
    t4 = clock()
    conn.execute("UPDATE terminals SET state = %s, witness_seq = %s, witness_cp = %s, last_seen = now(), "
                 "first_seq = CASE WHEN state->>'next_seq' = '1' THEN %s ELSE first_seq END WHERE terminal = %s",
                 (json.dumps(st.to_json()), st.last_cp_seq, st.last_cp or None, lo, f.terminal))
    conn.execute("INSERT INTO ingests (terminal, file, first_seq, last_seq, added) VALUES (%s, %s, %s, %s, %s)",
                 (f.terminal, str(f.path), n, hi, len(new)))
    return IngestResult(str(f.path), f.terminal, "added", lo, hi, len(new),
                        seconds={"verify": verify_s, "copy": t1 - t0 - verify_s + t3 - t2, "states": t2 - t1 + t4 - t3})


def _check_overlap(conn: psycopg.Connection[Any], f: _File, lo: int, hi: int) -> None:
    """Entries the fleet already holds must be the file's, byte for byte (else a fork)."""
    held = dict(conn.execute("SELECT seq, entry_hash FROM entries WHERE terminal = %s AND seq BETWEEN %s AND %s",
                             (f.terminal, lo, hi)).fetchall())
    for seq, ts, kind, txn, payload, prev, h, _ in f.rows(lo, hi):
        try:
            calc = entry_hash(seq, prev, entry_body(ts, kind, txn, payload))
        except (TypeError, ValueError, OverflowError):
            calc = None
        if calc != h:
            raise _Reject("FLEET_ENTRY_INVALID", seq, f"ENTRY_MODIFIED: stored hash of entry {seq} does not match its "
                          "contents")
        mine = held.get(seq)
        if mine is None:
            continue  # before the fleet's first entry (an archive uploaded after its live file)
        if bytes(mine) != h:
            raise _Reject("FLEET_FORK", seq, f"entry {seq} differs from the entry the fleet accepted for that seq")


def copy_text(terminal: str, rows: Iterable[tuple[Any, ...]]) -> Iterator[str]:
    """``entries`` rows in COPY text format, about 1 MB per chunk (formatting here is several times
    cheaper than psycopg's per-row ``write_row``)."""
    term = copy_field(terminal)
    days: dict[int, str] = {}
    buf: list[str] = []
    size = 0
    for seq, ts, kind, txn, payload, prev, h, mac in rows:
        d = int(ts // 86400)
        day = days.get(d)
        if day is None:
            day = days[d] = day_of(ts).isoformat()
        line = (f"{term}\t{day}\t{seq}\t{ts!r}\t{copy_field(kind)}\t{copy_field(txn)}\t{copy_field(payload)}\t\\\\x{prev.hex()}\t"
                f"\\\\x{h.hex()}\t\\\\x{mac.hex()}\n")
        buf.append(line)
        size += len(line)
        if size > 1 << 20:
            yield "".join(buf)
            buf, size = [], 0
    if buf:
        yield "".join(buf)


def _state_rows(f: _File, first_new: int, new: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The records the touched transactions' states are folded from: the new entries and, when the
    file holds older ones too (a live journal uploaded again as it grows), those transactions'
    older records (seq, ts, kind, txn, payload; rows without a transaction id play no part)."""
    rows = [r[:5] for r in new if r[3] is not None]
    if first_new > int(f.lo):
        keys = sorted({r[3] for r in rows})
        rows[:0] = f.conn.execute("SELECT seq, ts, kind, txn, payload FROM entries WHERE seq < ? AND txn IN "
                                  "(SELECT value FROM json_each(?)) ORDER BY seq", (first_new, json.dumps(keys))).fetchall()
    return rows


def _txn_text(f: _File, first_new: int, new: list[tuple[Any, ...]]) -> str:
    """``txns`` rows (COPY text) for the transactions the new entries touch (``guard.fleet.states``)."""
    try:
        return txns_copy_text(f.terminal, _state_rows(f, first_new, new), first_new)
    except StateError as e:
        raise _Reject("FLEET_ENTRY_INVALID", e.seq, f"the engine cannot restore the verified entries: {e}") from None


def _upsert_txns(conn: psycopg.Connection[Any], text: str, *, first: bool) -> None:
    """``first``: the terminal's first entries, so it has no ``txns`` rows yet (COPY them straight in)."""
    if not text:
        return
    if first:
        with conn.cursor() as cur, cur.copy("COPY txns FROM STDIN") as cp:
            cp.write(text)
        return
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS txns_in (LIKE txns) ON COMMIT DELETE ROWS")
    with conn.cursor() as cur, cur.copy("COPY txns_in FROM STDIN") as cp:
        cp.write(text)
    conn.execute("INSERT INTO txns SELECT * FROM txns_in ON CONFLICT (terminal, txn) DO UPDATE SET "
                 "kind = EXCLUDED.kind, state = EXCLUDED.state, stan = EXCLUDED.stan, date = EXCLUDED.date, "
                 "amount = EXCLUDED.amount, tid = EXCLUDED.tid, mid = EXCLUDED.mid, masked_pan = EXCLUDED.masked_pan, "
                 "rrn = EXCLUDED.rrn, last_seq = EXCLUDED.last_seq, updated = EXCLUDED.updated "
                 "WHERE EXCLUDED.last_seq > txns.last_seq")


__all__ = ["FleetError", "IngestResult", "enroll", "ingest", "ingest_file", "journal_files"]
