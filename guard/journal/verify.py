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
SCHEMA_UNEXPECTED  the file's schema is not the one posguard writes (a view, an unknown table,
                 index or trigger, an altered definition): refused before any entry is read
ENTRY_TOO_LARGE  an entry's payload (or kind, txn) is longer than the journal ever writes
                 (MAX_PAYLOAD_CHARS): refused without loading it
ANCHOR_ELSEWHERE the anchor covers an entry before this file's segment start (it lies in an archive)

Segments (guard.journal.segments, guard.ops.compact): a file whose first entry is a ``segment`` record at
seq S > 1 is verified from there: its prev_hash must be the record's ``covers_hash``, its MAC
uses k_S (ratcheted forward from k0), the checkpoint counter continues from the record's, and
(with k0) its ``covers_mac`` must be the MAC of entry S-1 under k_{S-1}. Such a file proves nothing
about seq 1..S-1 on its own: ``first_seq`` says so; the CLI requires the archives.
An archive (meta ``segment_role`` = archive) stores a commitment to k_{last+1} in its ratchet row.
Signing keys: checkpoints are checked with the key in force, which follows ``key_rotation``
entries (and the rotations carried in a segment record); the given public keys must include
at least one key of that chain (any one: each key vouches for its successor and predecessor).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from guard.core.constants import GENESIS_HASH, JOURNAL_HASH_DOMAIN
from guard.core.errors import JournalError
from guard.journal.format import (
    CHECKPOINT_KIND,
    ROLE_ARCHIVE,
    ROTATION_KIND,
    SEGMENT_FIELDS,
    SEGMENT_KIND,
    archive_ratchet_commitment,
    entry_body,
    entry_hash,
    segment_message,
)
from guard.journal.keychain import CP_KEYS, KeyChain, anchor_problem, pub_key, rotation_ok, sig_ok
from guard.journal.keys import public_key_hex
from guard.journal.mac import mac_and_next, ratchet_forward
from guard.journal.mac_worker import _MacWorker, _WorkerLost
from guard.journal.records import MAX_PAYLOAD_CHARS
from guard.journal.readonly import connect_readonly
from guard.journal.schema import schema_problem

PROGRESS_EVERY = 16_384
# Oversized text never reaches Python: kind/txn/payload come back NULL, a NULL payload is ENTRY_TOO_LARGE.
_LIM = MAX_PAYLOAD_CHARS
_BYTES = "length(CAST({} AS BLOB))"  # all bytes (length() of TEXT stops at a NUL); ours are ASCII
_SMALL = f"{_BYTES.format('kind')} <= {_LIM} AND coalesce({_BYTES.format('txn')}, 0) <= {_LIM}"
_SELECT = (f"SELECT seq, ts, CASE WHEN {_BYTES.format('kind')} <= {_LIM} THEN kind END, "
           f"CASE WHEN {_BYTES.format('txn')} <= {_LIM} THEN txn END, "
           f"CASE WHEN {_BYTES.format('payload')} <= {_LIM} AND {_SMALL} THEN payload END, "
           "prev_hash, entry_hash, mac FROM entries")
_SEG_KEYS = frozenset((*SEGMENT_FIELDS, "sig"))
_SPECIAL_KINDS = frozenset({SEGMENT_KIND, ROTATION_KIND})
_NO_LIMIT = 1 << 62
_RECORD_KINDS = frozenset({CHECKPOINT_KIND, SEGMENT_KIND, ROTATION_KIND})  # kinds whose payload is checked
_MAX_HEADS = 256  # distinct kinds the hot loop caches (an attacker's thousand kinds just take the slow path)
MAC_WORKER_MIN_ENTRIES = 20_000  # from this many entries (with k0) the MACs are checked in a second process
_SHIP_EVERY = 4096  # entries per (entry_hash, mac) batch sent to the MAC worker

Row = tuple[Any, ...]


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    entries: int
    checkpoints: int
    first_bad_seq: int | None
    reason: str | None
    detail: str
    first_seq: int = 1  # > 1 for a segment that continues an archive


class _Failure(Exception):
    """First anomaly: its kind, the seq, and the chain state (hash of seq-1, k_seq) where it hit."""

    def __init__(self, kind: str, seq: int, detail: str = "", state: tuple[bytes, bytes | None] = (b"", None)) -> None:
        super().__init__(kind)
        self.kind, self.seq, self.detail, self.state = kind, seq, detail, state


def verify_journal(path: Path, *, k0: bytes | None = None, public_key: Ed25519PublicKey | None = None,
                   anchor: dict[str, Any] | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   public_keys: Sequence[Ed25519PublicKey] = (), mac_worker: bool | None = None) -> VerifyReport:
    """Verify ``path`` without writing to it; the report's ``reason`` is a stable code (module docstring).

    ``public_keys`` adds trusted keys to ``public_key`` (e.g. every key in ``verify.pubs``).
    ``mac_worker``: check the MACs in a second process (``_MacWorker``) while this one reads and
    hashes; None = from ``MAC_WORKER_MIN_ENTRIES`` entries on. Same checks and reports either way.
    """
    trusted = ([public_key] if public_key is not None else []) + list(public_keys)
    path = Path(path)
    if not path.is_file():
        raise JournalError(f"journal {path} does not exist", code="JOURNAL_MISSING")
    if k0 is not None and (not isinstance(k0, bytes) or len(k0) != 32):
        raise ValueError("k0 must be 32 bytes")
    anchor_at: tuple[int, bytes, str] | None = None
    if anchor is not None:
        problem = anchor_problem(anchor, None)  # the signature is checked against the key chain below
        if problem:
            return VerifyReport(False, 0, 0, None, "ANCHOR_INVALID", problem)
        anchor_at = (anchor["covers_seq"], bytes.fromhex(anchor["covers_hash"]), anchor["terminal"])
    conn: sqlite3.Connection | None = None
    try:
        conn = connect_readonly(path)
        conn.execute("PRAGMA query_only = ON")
        conn.execute("PRAGMA trusted_schema = OFF")
        conn.execute("BEGIN")  # one snapshot for the ratchet row and every entry
        odd = schema_problem(conn)  # before any read: a view or trigger would run the attacker's SQL
        if odd is not None:
            return VerifyReport(False, 0, 0, None, "UNREADABLE" if odd[0] == "missing" else "SCHEMA_UNEXPECTED", odd[1])
        chain = KeyChain.load(conn, trusted)
        if chain.problem:
            return VerifyReport(False, 0, 0, None, "CHECKPOINT_INVALID", chain.problem)
        if anchor is not None and trusted and not chain.signed_by_chain(anchor):
            return VerifyReport(False, 0, 0, None, "ANCHOR_INVALID",
                                "anchor signature does not verify with the given public key")
        return _Verifier(conn, k0, chain, anchor_at, progress, mac_worker).run()
    except (sqlite3.DatabaseError, UnicodeDecodeError) as e:  # a corrupt schema's message may not be UTF-8
        return VerifyReport(False, 0, 0, None, "UNREADABLE", f"SQLite cannot read the journal: {e!r}"[:300])
    finally:
        if conn is not None:
            conn.close()



class _Verifier:
    def __init__(self, conn: sqlite3.Connection, k0: bytes | None, chain: KeyChain,
                 anchor: tuple[int, bytes, str] | None, progress: Callable[[int, int], None] | None,
                 mac_worker: bool | None = None) -> None:
        self.conn, self.k0, self.chain, self.anchor, self.progress = conn, k0, chain, anchor, progress
        self.mac_worker = mac_worker
        self.checkpoints = 0
        self.cp_seqs: list[int] = []  # seqs of the checkpoints verified, to recount at a worker's MAC failure
        self.cp_counter = 0
        self.terminal: str | None = None
        self.first_seq = 1
        self.covered_key: bytes | None = None  # k_{S-1} for a segment starting at S (with k0)

    def run(self) -> VerifyReport:
        c = self.conn
        total = c.execute("SELECT max(seq) FROM entries").fetchone()[0] or 0
        rat = c.execute("SELECT next_seq, CASE WHEN length(key) <= 64 THEN key END FROM ratchet WHERE id = 1"
                        ).fetchone()
        limit = rat[0] if rat is not None and type(rat[0]) is int else _NO_LIMIT
        try:
            last, key = self._scan(limit, total)
        except _Failure as f:
            reason, seq, detail = self._classify(f, limit)
            done = max(0, seq - self.first_seq) if seq else 0
            return VerifyReport(False, done, self.checkpoints, seq, reason, detail, self.first_seq)
        if self.progress:
            self.progress(last, total)
        n = last - self.first_seq + 1 if last else 0
        if key is not None and self._role() == ROLE_ARCHIVE:
            key = archive_ratchet_commitment(key)  # archives keep a commitment, never a live MAC key
        fail = self._tail_problem(last, rat, key)
        if fail:
            return VerifyReport(False, n, self.checkpoints, fail[1], fail[0], fail[2], self.first_seq)
        checked = ["hashes", "chain", "checkpoint links"]
        checked += ["MACs", "ratchet state"] if self.k0 is not None else []
        checked += ["signatures"] if self.chain.active else []
        checked += ["anchor"] if self.anchor is not None else []
        span = f" (seq {self.first_seq}..{last})" if self.first_seq > 1 else ""
        return VerifyReport(True, n, self.checkpoints, None, None, f"{n} entries{span} ok: {', '.join(checked)}",
                            self.first_seq)

    def _role(self) -> str | None:
        try:
            row = self.conn.execute("SELECT v FROM meta WHERE k = 'segment_role'").fetchone()
        except sqlite3.DatabaseError:
            return None
        return row[0] if row else None

    def _scan(self, limit: int, total: int) -> tuple[int, bytes | None]:
        """Check every entry in seq order; returns (last seq, k_{last+1}) or raises the first ``_Failure``.

        If the MAC worker dies, the scan is redone in this process from the saved state.
        """
        saved = (dict(vars(self)), dict(vars(self.chain)))
        try:
            return self._scan_once(limit, total, self.mac_worker)
        except _WorkerLost:
            vars(self).update(saved[0])
            vars(self.chain).update(saved[1])
            self.cp_seqs = []
            return self._scan_once(limit, total, False)

    def _scan_once(self, limit: int, total: int, use_worker: bool | None) -> tuple[int, bytes | None]:
        """The hot loop accepts an entry only when everything ``_entry`` checks would pass (same bytes
        hashed, same MAC); any other row (a mismatch, a checkpoint or rotation, a progress, anchor or
        batch boundary, a kind not seen yet) goes through ``_entry``, which raises the exact failure.
        With a MAC worker, (entry_hash, mac) pairs are shipped where the MAC would be checked, and a
        bad MAC it reports is the first failure (every shipped entry precedes any failure found here,
        or is the failing entry and reached its MAC check).
        """
        sha, enc = hashlib.sha256, json.encoder.encode_basestring_ascii
        dom, mac_next = JOURNAL_HASH_DOMAIN, mac_and_next
        key = self.k0
        a_seq, a_hash = (self.anchor[0], self.anchor[1]) if self.anchor else (-1, b"")
        expect, prev_ok = 1, GENESIS_HASH
        first = self.conn.execute(_SELECT + " ORDER BY seq LIMIT 1").fetchone()
        if (first is not None and first[2] == SEGMENT_KIND and type(first[0]) is int and first[0] > 1
                and isinstance(first[5], bytes)):
            expect, prev_ok = first[0], first[5]  # a segment continues an archive: its record is checked below
            self.first_seq = expect
            if key is not None:
                self.covered_key = ratchet_forward(key, expect - 2)
                key = ratchet_forward(self.covered_key, 1)
            if 0 <= a_seq < expect - 1:
                raise _Failure("anchor_elsewhere", expect, f"the anchor covers entry {a_seq}, which lies before this "
                               f"segment (it starts at {expect}): verify the archive that holds it",
                               state=(prev_ok, key))
            if a_seq == expect - 1 and a_hash != prev_ok:
                raise _Failure("anchor", a_seq, state=(prev_ok, key))
        start = expect
        if key is not None and (use_worker if use_worker is not None else
                                total - start + 1 >= MAC_WORKER_MIN_ENTRIES):
            worker = _MacWorker.start(key)
        else:
            worker = None
        ship = worker.batch.append if worker is not None else None
        if worker is not None:
            key = None  # the worker holds the ratchet; ``limit`` still does not apply (k0 was given)
        limit = limit if self.k0 is None else _NO_LIMIT
        # kind -> the body's constant head '{"kind":<json>,"payload":' for kinds with no record checks
        heads: dict[Any, str] = {}
        mark = self._next_mark(expect - 1, a_seq, limit, worker is not None)
        try:
            for row in self.conn.execute(_SELECT + " ORDER BY seq"):
                seq, ts, kind, txn, payload, prev, h, mac = row
                head = heads.get(kind)
                if head is not None and seq == expect and seq < mark and prev == prev_ok:
                    try:
                        ok = sha(dom + seq.to_bytes(8, "big") + prev + (
                            f'{head}{payload},"ts":{ts!r},"txn":{"null" if txn is None else enc(txn)}}}').encode()
                                 ).digest() == h
                    except (TypeError, ValueError, OverflowError):
                        ok = False
                    if ok:
                        if key is not None:
                            expected, next_key = mac_next(key, h)
                            if expected == mac:
                                key = next_key
                            else:
                                ok = False
                        elif ship is not None:
                            if type(mac) is bytes and len(mac) == 32:
                                ship(h)
                                ship(mac)
                            else:
                                ok = False
                    if ok:
                        prev_ok, expect = h, seq + 1
                        continue
                key = self._entry(row, expect, prev_ok, key, limit, a_seq, a_hash, ship)
                prev_ok, expect = h, seq + 1
                if head is None and type(kind) is str and kind not in _RECORD_KINDS and len(heads) < _MAX_HEADS:
                    heads[kind] = f'{{"kind":{enc(kind)},"payload":'
                if seq >= mark:
                    if self.progress is not None and not expect % PROGRESS_EVERY:
                        self.progress(seq, total)
                    if worker is not None:
                        worker.flush()
                    mark = self._next_mark(seq, a_seq, limit, worker is not None)
            if worker is not None:
                bad, key = worker.finish()
                if bad is not None:
                    raise self._worker_failure(start + bad, key)
        except (_Failure, sqlite3.DatabaseError, UnicodeDecodeError) as e:
            if worker is not None and worker.running:
                bad, wkey = worker.finish()
                if bad is not None:
                    raise self._worker_failure(start + bad, wkey) from None
                if isinstance(e, _Failure) and e.kind == "mac":
                    e.state = (e.state[0], wkey)  # k_seq: the worker ratcheted through every entry before it
            raise
        finally:
            if worker is not None:
                worker.close()
        if a_seq == 0 and a_hash != GENESIS_HASH and self.first_seq == 1:
            raise _Failure("anchor", 0, state=(prev_ok, key))
        return expect - 1, key

    def _worker_failure(self, seq: int, key: bytes) -> _Failure:
        """The worker's bad MAC at ``seq``, with the state the in-process scan would have stopped in."""
        row = self._row(seq)
        self.checkpoints = sum(1 for c in self.cp_seqs if c < seq)
        return _Failure("mac", seq, state=(row[5] if row is not None else b"", key))

    def _next_mark(self, seq: int, a_seq: int, limit: int, shipping: bool) -> int:
        """The next seq after ``seq`` the hot loop leaves to ``_entry``: progress, anchor, ratchet limit, batch."""
        mark = limit
        if self.progress is not None:
            mark = min(mark, (seq + 1) // PROGRESS_EVERY * PROGRESS_EVERY + PROGRESS_EVERY - 1)
        if a_seq > seq:
            mark = min(mark, a_seq)
        if shipping:
            mark = min(mark, seq + _SHIP_EVERY)
        return max(mark, seq + 1)

    def _entry(self, row: Row, expect: int, prev_ok: bytes, key: bytes | None, limit: int,
               a_seq: int, a_hash: bytes, ship: Callable[[bytes], None] | None) -> bytes | None:
        """Every check of one entry, in the order that decides its failure; returns k_{seq+1} (or None).

        With ``ship`` (a MAC worker), the entry's hash and MAC are shipped where the MAC is checked.
        """
        seq, ts, kind, txn, payload, prev, h, mac = row
        try:
            if seq != expect:
                raise _Failure("gap", expect, str(seq))
            if payload is None:
                raise _Failure("too_large", seq)
            try:
                calc = entry_hash(seq, prev, entry_body(ts, kind, txn, payload))
            except (TypeError, ValueError, OverflowError):
                calc = None
            if calc != h:
                raise _Failure("hash", seq)
            if prev != prev_ok:
                raise _Failure("link", seq)
            if ship is not None:
                if type(mac) is not bytes or len(mac) != 32:  # never equal to an HMAC: the key comes from the worker
                    raise _Failure("mac", seq)
                ship(h)
                ship(mac)
            elif key is not None:
                m, nxt = mac_and_next(key, h)
                if m != mac:
                    raise _Failure("mac", seq)
                key = nxt
            elif seq >= limit:
                raise _Failure("beyond", seq)
            if kind == CHECKPOINT_KIND:
                self._checkpoint(seq, payload, prev_ok)
                self.cp_seqs.append(seq)
            elif kind in _SPECIAL_KINDS:
                self._special(seq, kind, payload, prev_ok)
            if seq == a_seq and h != a_hash:
                raise _Failure("anchor", seq)
        except _Failure as f:
            f.state = (prev_ok, key)
            raise
        return key

    def _checkpoint(self, seq: int, payload: str, prev_ok: bytes) -> None:
        try:
            cp = json.loads(payload)
        except ValueError:
            raise _Failure("checkpoint", seq, "payload is not JSON") from None
        if not isinstance(cp, dict) or set(cp) != CP_KEYS:
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
        if self.chain.active:
            try:
                ok = self.chain.check_checkpoint(cp)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise _Failure("checkpoint", seq, "signature does not verify")
        self.cp_counter += 1
        self.checkpoints += 1

    def _special(self, seq: int, kind: str, payload: str, prev_ok: bytes) -> None:
        """A ``segment`` record (only as a file's first entry) or a ``key_rotation`` statement."""
        try:
            rec = json.loads(payload)
        except ValueError:
            raise _Failure("checkpoint", seq, f"{kind} payload is not JSON") from None
        if kind == ROTATION_KIND:
            if not rotation_ok(rec) or rec["seq"] != seq:
                raise _Failure("checkpoint", seq, "key rotation is malformed or its signatures do not verify")
            if self.terminal is not None and rec["terminal"] != self.terminal:
                raise _Failure("checkpoint", seq, "key rotation names another terminal")
            if self.chain.active:
                if rec["old_pub"] != self.chain.current_hex():
                    raise _Failure("checkpoint", seq, "key rotation does not start from the key in force")
                self.chain.pending = pub_key(rec["new_pub"])
            return
        if seq != self.first_seq or seq == 1:
            raise _Failure("checkpoint", seq, "a segment record may only start a file")
        if not isinstance(rec, dict) or set(rec) != _SEG_KEYS:
            raise _Failure("checkpoint", seq, "segment record fields are not the segment fields")
        if rec["covers_seq"] != seq - 1 or rec["covers_hash"] != prev_ok.hex():
            raise _Failure("checkpoint", seq, f"segment record does not cover entry {seq - 1} with its hash")
        if not isinstance(rec["covers_mac"], str) or len(rec["covers_mac"]) != 64:
            raise _Failure("checkpoint", seq, "segment record's covers_mac is malformed")
        if self.covered_key is not None and rec["covers_mac"] != mac_and_next(self.covered_key, prev_ok)[0].hex():
            raise _Failure("checkpoint", seq, f"segment record's covers_mac is not the MAC of entry {seq - 1} under "
                           f"k_{seq - 1}: the archived history it claims to continue was not written by this device")
        if type(rec["counter"]) is not int or rec["counter"] < 1 or not isinstance(rec["keys"], list):
            raise _Failure("checkpoint", seq, "segment record counter/keys malformed")
        prev_new = None
        for st in rec["keys"]:
            if not rotation_ok(st) or (prev_new is not None and st["old_pub"] != prev_new):
                raise _Failure("checkpoint", seq, "segment record carries a malformed key rotation")
            prev_new = st["new_pub"]
        if prev_new is not None and rec["signing_pub"] != prev_new:
            raise _Failure("checkpoint", seq, "segment record's signing key is not the last rotated-to key")
        self.terminal = rec["terminal"]
        if self.anchor and self.anchor[2] != self.terminal:
            raise _Failure("anchor_terminal", seq, f"anchor is for terminal {self.anchor[2]!r}")
        if self.chain.active:
            pub = self.chain.current_hex()
            if pub is not None and rec["signing_pub"] != pub:
                raise _Failure("checkpoint", seq, "segment record names another signing key than the key chain")
            key = pub_key(rec["signing_pub"]) if isinstance(rec["signing_pub"], str) else None
            try:
                msg = segment_message(rec)
            except (TypeError, ValueError):
                msg = b""
            if key is None or not sig_ok(key, rec["sig"], msg) or not (
                    self.chain.current is not None or any(public_key_hex(k) == rec["signing_pub"]
                                                          for k in self.chain.trusted)):
                raise _Failure("checkpoint", seq, "segment record signature does not verify")
            self.chain.current = key
        self.cp_counter = rec["counter"]

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
        if f.kind == "anchor_elsewhere":
            return "ANCHOR_ELSEWHERE", s, f.detail
        if f.kind == "too_large":
            return "ENTRY_TOO_LARGE", s, f"entry {s} is longer than the journal writes ({MAX_PAYLOAD_CHARS} characters)"
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
