"""Reading back the newest snapshot: the record the daemon writes so that a restart replays only
what is still in flight (guard.runtime.snapshot says what it holds and how restore uses it).

A snapshot is trusted only as far as the chain vouches for it: its record's stored hash must
match its contents, the entry right after it must be a checkpoint covering that hash and signed
by this device's key (the same commit writes both), and the key filter stored beside it must
have the SHA-256 the record names. Anything else (no snapshot, an edited filter, a snapshot
compaction left behind, a checkpoint signed by a key since rotated) returns None: restore then
reads every entry, which is slower but never wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from guard.journal.format import CHECKPOINT_KIND, Entry, checkpoint_message, entry_body, entry_hash
from guard.journal.keychain import CP_KEYS, sig_ok
from guard.journal.records import MAX_PAYLOAD_CHARS, _payload
from guard.core.errors import JournalError
from guard.journal.schema import MARKED_KINDS_SQL, SNAPSHOT_TABLE

log = logging.getLogger("posguard.journal")
SNAPSHOT_KIND = "snapshot"
_ROW = (f"SELECT seq, ts, kind, txn, CASE WHEN length(CAST(payload AS BLOB)) <= {MAX_PAYLOAD_CHARS} THEN payload END, "
        "prev_hash, entry_hash, mac FROM entries WHERE seq = ?")


@dataclass(frozen=True)
class StoredSnapshot:
    entry: Entry  # the snapshot record (payload parsed)
    bits: bytes  # the key filter stored with it


def snapshot_row(seq: int, last_kind: str, bits: bytes | None) -> tuple[int, bytes] | None:
    """The ``snapshot_filter`` row for a commit whose last record (``seq``) is a snapshot, or None."""
    if bits is None:
        return None
    if last_kind != SNAPSHOT_KIND:
        raise JournalError("snapshot_bits needs a snapshot record last", code="JOURNAL_BAD_RECORD")
    return seq, bytes(bits)


def write_snapshot_row(cur: sqlite3.Cursor, row: tuple[int, bytes]) -> None:
    """Store the newest snapshot's key filter, inside the commit that writes its record."""
    cur.execute(SNAPSHOT_TABLE.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
    cur.execute("INSERT OR REPLACE INTO snapshot_filter (id, seq, bits) VALUES (1, ?, ?)", row)


class SnapshotOps:
    """Mixed into :class:`guard.journal.store.Journal`: the lookups start-up makes by kind."""

    if TYPE_CHECKING:
        _signing_key: Ed25519PrivateKey

        def _db(self) -> sqlite3.Connection: ...

    def snapshot(self) -> StoredSnapshot | None:
        """The newest snapshot whose record, checkpoint signature and key filter all check out
        (module docstring); None if there is none (restore then reads every entry)."""
        return read_snapshot(self._db(), self._signing_key.public_key())

    def checkpoint_marks(self, since_seq: int) -> list[tuple[float, int]]:
        """(time, seq before it) of each checkpoint from ``since_seq`` on: every later entry is
        at least that old (guard.runtime.snapshot finds where the rules' window starts)."""
        return checkpoint_marks(self._db(), since_seq)

    def last_of_kind(self, kind: str) -> Entry | None:
        """The newest entry of a rare kind (checkpoint, snapshot, config_loaded, ...), by the index."""
        row = self._db().execute(_ROW.replace("WHERE seq = ?", f"WHERE {MARKED_KINDS_SQL} AND kind = ? "
                                              "ORDER BY seq DESC LIMIT 1"), (kind,)).fetchone()
        if row is None:
            return None
        seq, ts, k, txn, payload, _, h, mac = row
        return Entry(seq, ts, k, txn, _payload(seq, payload), h, mac)


def read_snapshot(conn: sqlite3.Connection, pub: Ed25519PublicKey) -> StoredSnapshot | None:
    """The newest snapshot if it checks out (module docstring), else None."""
    try:
        row = conn.execute("SELECT seq, bits FROM snapshot_filter WHERE id = 1").fetchone()
    except sqlite3.OperationalError:  # no snapshot was ever written
        return None
    if row is None or type(row[0]) is not int or not isinstance(row[1], bytes):
        return None
    seq, bits = row
    why = _problem(conn, seq, bits, pub)
    if isinstance(why, str):
        if why:
            log.warning("journal snapshot at entry %d not used (%s): restoring from every entry", seq, why)
        return None
    return StoredSnapshot(why, bits)


def checkpoint_marks(conn: sqlite3.Connection, since_seq: int) -> list[tuple[float, int]]:
    """(time, seq) of every checkpoint from ``since_seq`` on, oldest first (the rare-kinds index)."""
    return [(float(ts), int(seq) - 1) for seq, ts in conn.execute(
        f"SELECT seq, ts FROM entries WHERE {MARKED_KINDS_SQL} AND kind = ? AND seq >= ? ORDER BY seq",
        (CHECKPOINT_KIND, since_seq))]


def _problem(conn: sqlite3.Connection, seq: int, bits: bytes, pub: Ed25519PublicKey) -> Entry | str:
    """The snapshot entry, or why it cannot be used ("" when it is simply gone, e.g. compacted)."""
    snap, cp = conn.execute(_ROW, (seq,)).fetchone(), conn.execute(_ROW, (seq + 1,)).fetchone()
    if snap is None or snap[2] != SNAPSHOT_KIND:
        return ""
    try:
        ok = snap[4] is not None and entry_hash(seq, snap[5], entry_body(snap[1], snap[2], snap[3], snap[4])) == snap[6]
        payload: Any = json.loads(snap[4]) if ok else None
        cp_rec: Any = json.loads(cp[4]) if cp is not None and cp[2] == CHECKPOINT_KIND and cp[4] is not None else None
    except (TypeError, ValueError, OverflowError):
        return "malformed"
    if not ok or not isinstance(payload, dict):
        return "its stored hash does not match its contents"
    if not isinstance(cp_rec, dict) or set(cp_rec) != CP_KEYS or cp_rec["covers_seq"] != seq \
            or cp_rec["covers_hash"] != bytes(snap[6]).hex() or cp[5] != snap[6]:
        return "no checkpoint right after it covers it"
    try:
        signed = sig_ok(pub, cp_rec["sig"], checkpoint_message(cp_rec))
    except (TypeError, ValueError):
        signed = False
    if not signed:
        return "its checkpoint is not signed by this device's current key"
    if payload.get("digest") != hashlib.sha256(bits).hexdigest():
        return "its key filter does not match the digest it names"
    return Entry(seq, snap[1], snap[2], snap[3], payload, snap[6], snap[7])
