"""Offline verification of a journal file: one streaming, read-only pass.

Checks seq continuity, each stored hash against the stored bytes, the prev_hash chain, MACs via
the ratchet from k0 (if given), checkpoint links/counters/signatures (signatures if a public key
is given), an external anchor (a checkpoint the host kept), and the stored ratchet state. The
first anomaly stops the pass and is classified into a specific reason code:

ENTRY_MODIFIED   an entry's stored hash does not match its contents
ENTRY_MISSING    a seq gap, or later entries renumbered down over deleted ones
ENTRY_INSERTED   an entry that does not belong: dropping it heals the chain, it duplicates another
                 entry, or it lies beyond the device's ratchet state
ENTRY_REORDERED  a genuine entry stored at another seq while the entry for this seq sits later
CHAIN_BROKEN     a self-consistent entry that does not link to its predecessor (fallback)
MAC_INVALID      the MAC does not match k_seq (forged, or hashes recomputed without the key)
CHECKPOINT_INVALID  bad checkpoint payload, link, counter, terminal or signature
TRUNCATED        the journal ends before the anchor (or before what the ratchet state says was written)
FORKED           the entry at the anchor's covers_seq differs from the anchored hash
ANCHOR_INVALID   the anchor is malformed, has a bad signature or names another terminal
RATCHET_MISMATCH the stored ratchet state is not k_{last+1} / next_seq = last+1
UNREADABLE       SQLite cannot read the file or the journal tables
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .constants import GENESIS_HASH, JOURNAL_HASH_DOMAIN, JOURNAL_RATCHET_LABEL
from .errors import JournalError
from .journal import (
    _PAD5C,
    _PAD36,
    _XOR5C,
    _XOR36,
    CHECKPOINT_FIELDS,
    CHECKPOINT_KIND,
    _connect,
    checkpoint_message,
    entry_body,
    entry_hash,
    mac_and_next,
)

PROGRESS_EVERY = 16_384
_SELECT = "SELECT seq, ts, kind, txn, payload, prev_hash, entry_hash, mac FROM entries"
_CP_KEYS = frozenset((*CHECKPOINT_FIELDS, "sig"))
_NO_LIMIT = 1 << 62

Row = tuple[Any, ...]


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    entries: int
    checkpoints: int
    first_bad_seq: int | None
    reason: str | None
    detail: str


class _Failure(Exception):
    """First anomaly: its kind, the seq, and the chain state (hash of seq-1, k_seq) where it hit."""

    def __init__(self, kind: str, seq: int, detail: str = "", state: tuple[bytes, bytes | None] = (b"", None)) -> None:
        super().__init__(kind)
        self.kind, self.seq, self.detail, self.state = kind, seq, detail, state


def verify_journal(path: Path, *, k0: bytes | None = None, public_key: Ed25519PublicKey | None = None,
                   anchor: dict[str, Any] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Verify ``path`` without writing to it; the report's ``reason`` is a stable code (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise JournalError(f"journal {path} does not exist", code="JOURNAL_MISSING")
    if k0 is not None and (not isinstance(k0, bytes) or len(k0) != 32):
        raise ValueError("k0 must be 32 bytes")
    anchor_at: tuple[int, bytes, str] | None = None
    if anchor is not None:
        problem = _anchor_problem(anchor, public_key)
        if problem:
            return VerifyReport(False, 0, 0, None, "ANCHOR_INVALID", problem)
        anchor_at = (anchor["covers_seq"], bytes.fromhex(anchor["covers_hash"]), anchor["terminal"])
    conn: sqlite3.Connection | None = None
    try:
        conn = _connect(path, mode="ro")
        conn.execute("PRAGMA query_only = ON")
        conn.execute("PRAGMA trusted_schema = OFF")
        conn.execute("BEGIN")  # one snapshot for the ratchet row and every entry
        return _Verifier(conn, k0, public_key, anchor_at, progress).run()
    except sqlite3.DatabaseError as e:
        return VerifyReport(False, 0, 0, None, "UNREADABLE", f"SQLite cannot read the journal: {e}")
    finally:
        if conn is not None:
            conn.close()


def _anchor_problem(a: Any, pub: Ed25519PublicKey | None) -> str:
    if not isinstance(a, dict) or set(a) != _CP_KEYS:
        return "anchor must be a checkpoint dict with fields " + ", ".join(sorted(_CP_KEYS))
    seq, h = a["covers_seq"], a["covers_hash"]
    if not (type(seq) is int and seq >= 0 and isinstance(h, str) and len(h) == 64 and isinstance(a["terminal"], str)):
        return "anchor covers_seq/covers_hash/terminal malformed"
    try:
        bytes.fromhex(h)
        sig = bytes.fromhex(a["sig"])
    except (TypeError, ValueError):
        return "anchor covers_hash/sig is not hex"
    if pub is not None:
        try:
            pub.verify(sig, checkpoint_message(a))
        except (InvalidSignature, TypeError, ValueError):
            return "anchor signature does not verify with the given public key"
    return ""


class _Verifier:
    def __init__(self, conn: sqlite3.Connection, k0: bytes | None, pub: Ed25519PublicKey | None,
                 anchor: tuple[int, bytes, str] | None, progress: Callable[[int, int], None] | None) -> None:
        self.conn, self.k0, self.pub, self.anchor, self.progress = conn, k0, pub, anchor, progress
        self.checkpoints = 0
        self.cp_counter = 0
        self.terminal: str | None = None

    def run(self) -> VerifyReport:
        c = self.conn
        total = c.execute("SELECT max(seq) FROM entries").fetchone()[0] or 0
        rat = c.execute("SELECT next_seq, key FROM ratchet WHERE id = 1").fetchone()
        limit = rat[0] if rat is not None and type(rat[0]) is int else _NO_LIMIT
        try:
            last, key = self._scan(limit, total)
        except _Failure as f:
            reason, seq, detail = self._classify(f, limit)
            return VerifyReport(False, seq - 1 if seq else 0, self.checkpoints, seq, reason, detail)
        if self.progress:
            self.progress(last, total)
        fail = self._tail_problem(last, rat, key)
        if fail:
            return VerifyReport(False, last, self.checkpoints, fail[1], fail[0], fail[2])
        checked = ["hashes", "chain", "checkpoint links"]
        checked += ["MACs", "ratchet state"] if self.k0 is not None else []
        checked += ["signatures"] if self.pub is not None else []
        checked += ["anchor"] if self.anchor is not None else []
        return VerifyReport(True, last, self.checkpoints, None, None, f"{last} entries ok: {', '.join(checked)}")

    def _scan(self, limit: int, total: int) -> tuple[int, bytes | None]:
        """The hot loop: locals only, one-shot hashlib/hmac, stored payload bytes hashed as-is."""
        sha, enc = hashlib.sha256, json.encoder.encode_basestring_ascii
        dom, label, x36, x5c, p36, p5c = JOURNAL_HASH_DOMAIN, JOURNAL_RATCHET_LABEL, _XOR36, _XOR5C, _PAD36, _PAD5C
        key = self.k0
        a_seq, a_hash = (self.anchor[0], self.anchor[1]) if self.anchor else (-1, b"")
        progress = self.progress
        expect, prev_ok = 1, GENESIS_HASH
        try:
            for seq, ts, kind, txn, payload, prev, h, mac in self.conn.execute(_SELECT + " ORDER BY seq"):
                if seq != expect:
                    raise _Failure("gap", expect, str(seq))
                try:
                    calc = sha(dom + seq.to_bytes(8, "big") + prev + (
                        f'{{"kind":{enc(kind)},"payload":{payload},"ts":{ts!r},'
                        f'"txn":{"null" if txn is None else enc(txn)}}}').encode()).digest()
                except (TypeError, ValueError, OverflowError):
                    calc = None
                if calc != h:
                    raise _Failure("hash", seq)
                if prev != prev_ok:
                    raise _Failure("link", seq)
                if key is not None:  # mac_and_next() inlined
                    ki = key.translate(x36) + p36
                    ko = key.translate(x5c) + p5c
                    if sha(ko + sha(ki + h).digest()).digest() != mac:
                        raise _Failure("mac", seq)
                    key = sha(ko + sha(ki + label).digest()).digest()
                elif seq >= limit:
                    raise _Failure("beyond", seq)
                if kind == CHECKPOINT_KIND:
                    self._checkpoint(seq, payload, prev_ok)
                if seq == a_seq and h != a_hash:
                    raise _Failure("anchor", seq)
                prev_ok = h
                expect += 1
                if progress is not None and not expect % PROGRESS_EVERY:
                    progress(seq, total)
        except _Failure as f:
            f.state = (prev_ok, key)
            raise
        if a_seq == 0 and a_hash != GENESIS_HASH:
            raise _Failure("anchor", 0, state=(prev_ok, key))
        return expect - 1, key

    def _checkpoint(self, seq: int, payload: str, prev_ok: bytes) -> None:
        try:
            cp = json.loads(payload)
        except ValueError:
            raise _Failure("checkpoint", seq, "payload is not JSON") from None
        if not isinstance(cp, dict) or set(cp) != _CP_KEYS:
            raise _Failure("checkpoint", seq, "payload fields are not the checkpoint fields")
        if cp["covers_seq"] != seq - 1 or cp["covers_hash"] != prev_ok.hex():
            raise _Failure("checkpoint", seq, f"does not cover entry {seq - 1} with its hash")
        if cp["counter"] != self.cp_counter + 1:
            raise _Failure("checkpoint", seq, f"counter {cp['counter']!r} does not follow {self.cp_counter}")
        if self.terminal is None:
            self.terminal = cp["terminal"]
            if self.anchor and self.anchor[2] != self.terminal:
                raise _Failure("anchor_terminal", seq, f"anchor is for terminal {self.anchor[2]!r}")
        elif cp["terminal"] != self.terminal:
            raise _Failure("checkpoint", seq, "terminal id changed")
        if self.pub is not None:
            try:
                self.pub.verify(bytes.fromhex(cp["sig"]), checkpoint_message(cp))
            except (InvalidSignature, TypeError, ValueError):
                raise _Failure("checkpoint", seq, "signature does not verify") from None
        self.cp_counter += 1
        self.checkpoints += 1

    def _tail_problem(self, last: int, rat: Row | None, key: bytes | None) -> tuple[str, int, str] | None:
        if self.anchor and self.anchor[0] > last:
            return "TRUNCATED", last + 1, f"journal ends at {last}; the anchor covers entry {self.anchor[0]}"
        if rat is None:
            return "RATCHET_MISMATCH", last + 1, "ratchet state is missing"
        if type(rat[0]) is int and rat[0] > last + 1:
            return "TRUNCATED", last + 1, f"journal ends at {last}; the ratchet state says {rat[0] - 1} were written"
        if rat[0] != last + 1:
            return "RATCHET_MISMATCH", last + 1, f"ratchet next_seq {rat[0]!r} does not follow entry {last}"
        if key is not None and rat[1] != key:
            return "RATCHET_MISMATCH", last + 1, f"stored ratchet key is not k_{last + 1} derived from k0"
        return None

    # -- slow path: what kind of tampering explains the first anomaly --

    def _classify(self, f: _Failure, limit: int) -> tuple[str, int, str]:
        s = f.seq
        if f.kind == "gap":
            return "ENTRY_MISSING", s, f"entries {s}..{int(f.detail) - 1} are missing"
        if f.kind == "anchor":
            return "FORKED", s, f"entry {s} differs from the anchored hash: history was rewritten or rolled back"
        if f.kind == "anchor_terminal":
            return "ANCHOR_INVALID", s, f.detail
        if s >= limit:
            return "ENTRY_INSERTED", s, f"entry {s} lies beyond the device's ratchet state (next_seq {limit})"
        if f.kind == "checkpoint":
            return "CHECKPOINT_INVALID", s, f"checkpoint {s}: {f.detail}"
        e, key = f.state
        row = self._row(s)
        assert row is not None
        nxt = self._row(s + 1)
        if f.kind == "hash":
            return self._classify_moved(s, row, e)
        if f.kind == "link":
            if nxt is not None and nxt[5] == e:
                return "ENTRY_INSERTED", s, f"entry {s} links to nothing known; dropping it heals the chain"
            return "CHAIN_BROKEN", s, (f"entry {s} does not link to entry {s - 1}: one of them was rewritten "
                                       "with a recomputed hash")
        if nxt is not None and nxt[5] == e and key is not None and mac_and_next(key, nxt[6])[0] == nxt[7]:
            return "ENTRY_INSERTED", s, f"entry {s} has no valid MAC and dropping it heals the chain"
        return "MAC_INVALID", s, f"MAC of entry {s} does not match k_{s}: forged, or rehashed without the key"

    def _classify_moved(self, s: int, row: Row, e: bytes) -> tuple[str, int, str]:
        t = self._native_seq(row, s)
        if t is None:
            return "ENTRY_MODIFIED", s, f"stored hash of entry {s} does not match its contents"
        if t > s:
            q = self.conn.execute("SELECT seq FROM entries WHERE prev_hash = ? AND seq > ? LIMIT 1", (e, s)).fetchone()
            if q is not None:
                return "ENTRY_REORDERED", s, f"entry written as {t} is stored at {s}; entry {s} is stored at {q[0]}"
            return "ENTRY_MISSING", s, f"entries {s}..{t - 1} were deleted and later entries renumbered"
        orig = self._row(t)
        if orig is not None and orig[6] == row[6]:
            return "ENTRY_INSERTED", s, f"entry {s} is a replayed copy of entry {t}"
        return "ENTRY_INSERTED", t, f"entries from {t} were inserted; entry written as {t} is now stored at {s}"

    def _native_seq(self, row: Row, s: int) -> int | None:
        """The seq an entry's stored hash was computed for, searched near ``s`` and after its predecessor."""
        _, ts, kind, txn, payload, prev, h, _ = row
        try:
            body = entry_body(ts, kind, txn, payload)
        except (TypeError, ValueError):
            return None
        cands = [1] if prev == GENESIS_HASH else []
        p = self.conn.execute("SELECT seq FROM entries WHERE entry_hash = ? LIMIT 1", (prev,)).fetchone()
        if p is not None:
            cands.append(p[0] + 1)
        cands += [s + d for d in (-1, 1, -2, 2, -3, 3)]
        for t in cands:
            try:
                if t >= 1 and t != s and entry_hash(t, prev, body) == h:
                    return t
            except TypeError:
                return None
        return None

    def _row(self, seq: int) -> Row | None:
        row: Row | None = self.conn.execute(_SELECT + " WHERE seq = ?", (seq,)).fetchone()
        return row
