"""What :meth:`guard.journal.store.Journal.open` verifies before anyone appends: the part of
``posguard journal verify`` that needs no k0 and stays cheap however long the file is.

- the newest ``STARTUP_CHECKPOINTS`` checkpoints (and every segment record and key rotation):
  fields, counter, terminal, that each covers the stored hash of the entry before it, its own
  hash, and its signature along the device's signing-key chain (Ed25519 verification is ~0.1 ms a
  checkpoint: the bound keeps start-up well under a second however long the file grew);
- the first entry is the genesis checkpoint or a segment record, and the entry count from the
  oldest checked checkpoint on matches its seq span (nothing deleted or inserted in between);
- the full hash chain of the tail from the newest checkpoint on (at most ``checkpoint_every``
  entries or ``checkpoint_interval_s`` of traffic), which no signature covers yet.

Left to ``journal verify`` (the auditor, with k0): the hash of every entry between checkpoints,
older checkpoints, the MACs, the ratchet state against k0, anchors. The schema (guard.journal.schema.check_schema)
is checked before this runs. Failure: JOURNAL_CORRUPT naming the first bad seq (``ChainBroken.seq``).

Nothing here reads the whole file: checkpoints, segment records and key rotations are found
through the partial index of rare kinds (guard.journal.schema.MARKS_INDEX), so the cost is the
same at 10,000 entries and at 10 million.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from guard.core.constants import GENESIS_HASH
from guard.core.errors import JournalError
from guard.journal.format import (
    CHECKPOINT_KIND,
    ROTATION_KIND,
    SEGMENT_FIELDS,
    SEGMENT_KIND,
    entry_body,
    entry_hash,
    segment_message,
)
from guard.journal.keychain import CP_KEYS, KeyChain, pub_key, rotation_ok, sig_ok
from guard.journal.records import MAX_PAYLOAD_CHARS
from guard.journal.schema import MARKED_KINDS_SQL

_PAYLOAD = f"CASE WHEN length(CAST(payload AS BLOB)) <= {MAX_PAYLOAD_CHARS} THEN payload END"
_TEXT_OK = (f"length(CAST(kind AS BLOB)) <= {MAX_PAYLOAD_CHARS} "
            f"AND coalesce(length(CAST(txn AS BLOB)), 0) <= {MAX_PAYLOAD_CHARS}")
_SEG_KEYS = frozenset((*SEGMENT_FIELDS, "sig"))
STARTUP_CHECKPOINTS = 1024  # newest checkpoints whose signatures start-up checks (~0.1 s)


class ChainBroken(JournalError):
    """Start-up verification failed at ``seq``: JOURNAL_CORRUPT (the code every reader of a bad
    entry raises), naming the seq in the message and in ``seq``."""

    code = "JOURNAL_CORRUPT"

    def __init__(self, seq: int, what: str) -> None:
        super().__init__(f"journal entry {seq}: {what}; refusing to run on it. `posguard journal verify --k0 ... "
                         "--pubkey ...` classifies it (docs/OPERATIONS.md, start-up checks)")
        self.seq = seq


def verify_at_open(conn: sqlite3.Connection, signing_pub: Ed25519PublicKey, terminal_id: str) -> None:
    """Raise :class:`ChainBroken` unless the checkpoints and the tail chain verify (module docstring)."""
    # Two queries: SQLite answers min() or max() alone from the b-tree's ends, both at once by a full scan.
    (lo,) = conn.execute("SELECT min(seq) FROM entries").fetchone()
    (hi,) = conn.execute("SELECT max(seq) FROM entries").fetchone()
    if lo is None:
        raise ChainBroken(1, "the journal has no entries")
    kind, prev = conn.execute("SELECT kind, prev_hash FROM entries WHERE seq = ?", (lo,)).fetchone()
    if (kind, prev == GENESIS_HASH) != ((CHECKPOINT_KIND, True) if lo == 1 else (SEGMENT_KIND, False)):
        raise ChainBroken(lo, "the file starts with neither the genesis checkpoint nor a segment record")
    chain = KeyChain.load(conn, [signing_pub])
    if chain.problem:
        raise JournalError(f"journal checkpoints were not signed by this device's key chain: {chain.problem}",
                           code="JOURNAL_KEY_MISMATCH")
    oldest = conn.execute(f"SELECT seq FROM entries WHERE {MARKED_KINDS_SQL} AND kind = ? ORDER BY seq DESC "
                          "LIMIT 1 OFFSET ?", (CHECKPOINT_KIND, STARTUP_CHECKPOINTS - 1)).fetchone()
    since = oldest[0] if oldest else lo
    (n,) = conn.execute("SELECT count(*) FROM entries WHERE seq >= ?", (since,)).fetchone()
    if n != hi - since + 1:
        raise ChainBroken(since, f"{hi - since + 1 - n} entries are missing between {since} and {hi}")
    newest = _records(conn, chain, terminal_id, lo, since)
    _tail(conn, newest)


def _records(conn: sqlite3.Connection, chain: KeyChain, terminal_id: str, lo: int, since: int) -> int:
    """Check segment record, key rotations and the checkpoints from ``since`` on, in order; returns
    the newest checkpoint's seq. Rotations before ``since`` still move the key chain on."""
    counter: int | None = 0 if since == lo else None  # unknown until the first checked checkpoint
    newest, rotated_at = 0, 0
    rows = conn.execute(f"SELECT seq, ts, kind, txn, {_PAYLOAD}, prev_hash, entry_hash FROM entries "
                        f"WHERE {MARKED_KINDS_SQL} AND (kind IN (?, ?) OR (kind = ? AND seq >= ?)) ORDER BY seq",
                        (SEGMENT_KIND, ROTATION_KIND, CHECKPOINT_KIND, since))
    for seq, ts, kind, txn, payload, prev, h in rows:
        if chain.pending is not None and seq > rotated_at + 1:
            chain.current, chain.pending = chain.pending, None  # its old-key checkpoint lies before ``since``
        if payload is None:
            raise ChainBroken(seq, f"{kind} record is longer than the journal writes")
        try:
            rec: Any = json.loads(payload)
            ok_hash = entry_hash(seq, prev, entry_body(ts, kind, txn, payload)) == h
        except (TypeError, ValueError, OverflowError):
            raise ChainBroken(seq, f"{kind} record is malformed") from None
        if not ok_hash:
            raise ChainBroken(seq, f"stored hash of the {kind} record does not match its contents")
        before = GENESIS_HASH if seq == 1 else _hash_of(conn, seq - 1)
        if seq != lo and prev != before:
            raise ChainBroken(seq, f"{kind} record does not link to entry {seq - 1}")
        if kind == ROTATION_KIND:
            if not rotation_ok(rec) or rec["seq"] != seq or rec["terminal"] != terminal_id \
                    or rec["old_pub"] != chain.current_hex():
                raise ChainBroken(seq, "key rotation is malformed or does not start from the key in force")
            chain.pending, rotated_at = pub_key(rec["new_pub"]), seq
        elif kind == SEGMENT_KIND:
            start = _segment(seq, rec, lo, prev, chain)
            counter = start if since == lo else None
        else:
            if not isinstance(rec, dict) or set(rec) != CP_KEYS or rec["covers_seq"] != seq - 1 \
                    or rec["covers_hash"] != prev.hex() or rec["terminal"] != terminal_id:
                raise ChainBroken(seq, "checkpoint does not cover the entry before it for this terminal")
            if counter is not None and rec["counter"] != counter + 1:
                raise ChainBroken(seq, f"checkpoint counter {rec['counter']!r} does not follow {counter}")
            if type(rec["counter"]) is not int:
                raise ChainBroken(seq, "checkpoint counter is not an integer")
            try:
                signed = chain.check_checkpoint(rec)
            except (TypeError, ValueError):
                signed = False
            if not signed:
                raise ChainBroken(seq, "checkpoint signature does not verify")
            counter, newest = rec["counter"], seq
    if newest == 0:
        raise ChainBroken(lo, "the journal has no checkpoint")
    return newest


def _segment(seq: int, rec: Any, lo: int, prev: bytes, chain: KeyChain) -> int:
    """A segment record: only first, at seq > 1, signed by the key in force. Returns its counter."""
    if seq != lo or seq == 1 or not isinstance(rec, dict) or set(rec) != _SEG_KEYS \
            or rec["covers_seq"] != seq - 1 or rec["covers_hash"] != prev.hex() or type(rec["counter"]) is not int:
        raise ChainBroken(seq, "segment record is misplaced or malformed")
    key = pub_key(rec["signing_pub"]) if isinstance(rec["signing_pub"], str) else None
    try:
        msg = segment_message(rec)
    except (TypeError, ValueError):
        msg = b""
    if key is None or rec["signing_pub"] != chain.current_hex() or not sig_ok(key, rec["sig"], msg):
        raise ChainBroken(seq, "segment record signature does not verify")
    counter: int = rec["counter"]
    return counter


def _hash_of(conn: sqlite3.Connection, seq: int) -> bytes | None:
    row = conn.execute("SELECT entry_hash FROM entries WHERE seq = ?", (seq,)).fetchone()
    return row[0] if row is not None else None


def _tail(conn: sqlite3.Connection, start: int) -> None:
    """The hash chain from the newest checkpoint (its link checked above) to the last entry."""
    prev_ok: bytes | None = None
    expect = start
    rows = conn.execute(f"SELECT seq, ts, kind, txn, CASE WHEN {_TEXT_OK} THEN {_PAYLOAD} END, prev_hash, "
                        "entry_hash FROM entries WHERE seq >= ? ORDER BY seq", (start,))
    for seq, ts, kind, txn, payload, prev, h in rows:
        if seq != expect:
            raise ChainBroken(expect, f"entries {expect}..{seq - 1} are missing")
        if payload is None:
            raise ChainBroken(seq, "entry is longer than the journal writes")
        try:
            ok = entry_hash(seq, prev, entry_body(ts, kind, txn, payload)) == h
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise ChainBroken(seq, "stored hash does not match the entry's contents")
        if prev_ok is not None and prev != prev_ok:
            raise ChainBroken(seq, f"entry does not link to entry {seq - 1}")
        prev_ok, expect = h, seq + 1
