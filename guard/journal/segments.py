"""The journal's operator extensions (guard.ops.compact, guard.ops.rotation): signing-key rotation,
verbatim archives and restarting the live file as a new segment. Formats: guard.journal.format."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guard.core.errors import JournalError
from guard.core.model import txn_key_hash
from guard.journal.format import (
    CHECKPOINT_KIND,
    ROLE_ARCHIVE,
    ROTATION_KIND,
    SEGMENT_KIND,
    archive_ratchet_commitment,
    canonical_json,
    entry_body,
    entry_hash,
    rotation_message,
    segment_message,
)
from guard.journal.fsync import fsync_path
from guard.journal.keys import public_key_hex
from guard.journal.mac import mac_and_next
from guard.journal.records import _check_now, _prepare
from guard.journal.schema import INSERT_ENTRY, MARKED_KINDS_SQL, _connect, _migrate_in_txn
from guard.journal.snapshot import snapshot_row, write_snapshot_row


class SegmentOps:
    """Mixed into :class:`guard.journal.store.Journal`; uses its state and commit machinery."""

    if TYPE_CHECKING:
        terminal_id: str
        _last_seq: int
        _last_hash: bytes
        _key: bytes
        _cp: dict[str, Any]
        _signing_key: Ed25519PrivateKey
        _has_archived: bool | None
        _clean_txns: dict[str, None]

        def _db(self) -> sqlite3.Connection: ...
        def _db_for_write(self) -> sqlite3.Connection: ...
        @staticmethod
        def _set_ratchet(cur: sqlite3.Cursor, next_seq: int, key: bytes) -> None: ...
        def _abort(self, conn: sqlite3.Connection, *, committing: bool) -> None: ...
        def _commit_or_fail(self, conn: sqlite3.Connection, cur: sqlite3.Cursor) -> None: ...
        def seal_wal(self, wait_s: float = 0.0) -> bool: ...
        def _after_checkpoint(self) -> None: ...
        def _set_state(self, last_seq: int, last_hash: bytes, key: bytes, cp_seq: int, cp: dict[str, Any]) -> None: ...
        def _checkpoint_row(self, seq: int, prev: bytes, key: bytes, ts: float,
                            counter: int) -> tuple[tuple[Any, ...], dict[str, Any], bytes]: ...
        def _write(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]],
                   blobs: list[tuple[str, str, bytes, bytes]], shred: list[tuple[str]], last_seq: int, key: bytes,
                   cp: dict[str, Any] | None) -> None: ...

    def vacuum(self) -> None:
        """Rewrite the file without free pages (after compaction): gives the space back to the disk."""
        conn = self._db()
        conn.execute("VACUUM")
        self.seal_wal()

    def key_history(self) -> list[dict[str, Any]]:
        """Every signing-key rotation statement so far, oldest first: those carried in this file's
        segment record (earlier segments) followed by this file's ``key_rotation`` entries."""
        c = self._db()
        first = c.execute("SELECT kind, payload FROM entries ORDER BY seq LIMIT 1").fetchone()
        out: list[dict[str, Any]] = []
        if first is not None and first[0] == SEGMENT_KIND:
            out += json.loads(first[1])["keys"]
        out += [json.loads(p) for (p,) in c.execute(
            f"SELECT payload FROM entries WHERE {MARKED_KINDS_SQL} AND kind = ? ORDER BY seq", (ROTATION_KIND,))]
        return out

    def rotate_signing_key(self, new_key: Ed25519PrivateKey, *, now: float) -> int:
        """Hand checkpoint signing over to ``new_key`` in ONE durable commit; returns the rotation's seq.

        Appends a ``key_rotation`` entry (statement signed by the old key, with the new key's proof
        of possession ``pop``), a checkpoint signed by the OLD key that covers it, and a checkpoint
        signed by the NEW key. Verifiers follow the chain: each key vouches for its successor.
        """
        conn = self._db_for_write()
        ts = _check_now(now)
        old = self._signing_key
        old_pub, new_pub = public_key_hex(old.public_key()), public_key_hex(new_key.public_key())
        if old_pub == new_pub:
            raise JournalError("the new signing key is the current one", code="JOURNAL_BAD_RECORD")
        seq, prev = self._last_seq + 1, self._last_hash
        fields: dict[str, Any] = {"terminal": self.terminal_id, "old_pub": old_pub, "new_pub": new_pub,
                                  "seq": seq, "time": ts}
        msg = rotation_message(fields)
        text = canonical_json({**fields, "sig": old.sign(msg).hex(), "pop": new_key.sign(msg).hex()})
        h = entry_hash(seq, prev, entry_body(ts, ROTATION_KIND, None, text))
        mac, key = mac_and_next(self._key, h)
        rows: list[tuple[Any, ...]] = [(seq, ts, ROTATION_KIND, None, text, prev, h, mac)]
        row_old, cp_old, key = self._checkpoint_row(seq + 1, h, key, ts, self._cp["counter"] + 1)
        self._signing_key = new_key
        try:
            row_new, cp_new, key = self._checkpoint_row(seq + 2, row_old[6], key, ts, cp_old["counter"] + 1)
            self._write(conn, [*rows, row_old, row_new], [], [], seq + 2, key, cp_new)
        except BaseException:
            self._signing_key = old
            raise
        self._set_state(seq + 2, row_new[6], key, seq + 2, cp_new)
        self._after_checkpoint()
        return seq

    def write_archive(self, dest: Path, *, now: float) -> tuple[int, int]:
        """Copy every entry VERBATIM into a new single-file archive ``dest``; returns (first, last) seq.

        Same schema; meta ``segment_role`` = archive; empty vault; the ratchet row holds
        ``archive_ratchet_commitment(k_{last+1})`` instead of the key, so a verifier with k0 can
        tell the archive ends exactly here without the archive revealing a live MAC key. Durable
        (fsync, atomic rename) before returning. The caller seals the journal with a checkpoint first.
        """
        conn = self._db()
        ts = _check_now(now)
        dest = Path(dest)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        a = _connect(tmp, mode="rw")
        try:
            a.execute("PRAGMA journal_mode = DELETE").fetchall()
            a.execute("PRAGMA synchronous = FULL")
            a.execute("BEGIN IMMEDIATE")
            _migrate_in_txn(a)
            meta = {k: v for k, v in conn.execute("SELECT k, v FROM meta") if k != "schema_version"}
            meta.update(segment_role=ROLE_ARCHIVE, archived_at=repr(ts))
            a.executemany("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", sorted(meta.items()))
            a.executemany(INSERT_ENTRY, conn.execute(
                "SELECT seq, ts, kind, txn, payload, prev_hash, entry_hash, mac FROM entries ORDER BY seq"))
            a.execute("INSERT INTO ratchet (id, next_seq, key) VALUES (1, ?, ?)",
                      (self._last_seq + 1, archive_ratchet_commitment(self._key)))
            first = a.execute("SELECT min(seq) FROM entries").fetchone()[0]
            a.execute("COMMIT")
        except BaseException:
            a.close()
            tmp.unlink(missing_ok=True)
            raise
        a.close()
        fsync_path(tmp)
        os.chmod(tmp, 0o400)
        os.replace(tmp, dest)
        fsync_path(dest.parent)
        return int(first), self._last_seq

    def restart_segment(self, carry_txns: Collection[str], *, records: Sequence[tuple[str, str | None, dict[str, Any]]] = (),
                        note: dict[str, Any] | None = None, now: float, archive: str | None = None,
                        snapshot_bits: bytes | None = None) -> tuple[int, int]:
        """Start a new segment IN PLACE, in ONE durable commit; returns (segment seq, carried entries).

        Precondition: every current entry is archived verbatim (:meth:`write_archive`). Deletes all
        entries and the vault blobs of transactions not in ``carry_txns``, then appends: a signed
        ``segment`` record continuing the chain and the MAC ratchet (it covers the last archived
        entry), verbatim copies (same ts, kind, txn, payload; new seq, chain link and MAC) of every
        entry of the carried transactions in journal order, ``records``, and a checkpoint.
        ``archive`` (the archive file's path) is recorded for every transaction not carried in the
        ``archived_txns`` index, so their ids stay taken: ``entries_for`` reads them from there.
        ``snapshot_bits``: the key filter of a ``snapshot`` record ending ``records`` (the daemon's
        retention: the restarted file restores from it, guard.runtime.snapshot).
        """
        conn = self._db_for_write()
        ts = _check_now(now)
        prepared = _prepare(records, self._clean_txns) if records else []
        history = self.key_history()
        prev_first = conn.execute("SELECT min(seq) FROM entries").fetchone()[0]
        last_mac = conn.execute("SELECT mac FROM entries WHERE seq = ?", (self._last_seq,)).fetchone()
        cur = conn.cursor()
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS carry_txn (txn TEXT PRIMARY KEY)")
        cur.execute("DELETE FROM carry_txn")
        cur.executemany("INSERT OR IGNORE INTO carry_txn (txn) VALUES (?)", [(t,) for t in carry_txns])
        carried = cur.execute("SELECT ts, kind, txn, payload FROM entries WHERE txn IN (SELECT txn FROM carry_txn) "
                              "AND kind NOT IN (?, ?, ?) ORDER BY seq",
                              (CHECKPOINT_KIND, SEGMENT_KIND, ROTATION_KIND)).fetchall()
        seq, prev, key = self._last_seq + 1, self._last_hash, self._key
        fields: dict[str, Any] = {
            "terminal": self.terminal_id, "covers_seq": seq - 1, "covers_hash": prev.hex(),
            "covers_mac": bytes(last_mac[0]).hex() if last_mac is not None else "", "time": ts,
            "counter": self._cp["counter"], "prev_first_seq": int(prev_first), "carried": len(carried),
            "signing_pub": public_key_hex(self._signing_key.public_key()), "keys": history, "note": note or {},
        }
        fields["sig"] = self._signing_key.sign(segment_message(fields)).hex()
        text = canonical_json(fields)
        h = entry_hash(seq, prev, entry_body(ts, SEGMENT_KIND, None, text))
        mac, key = mac_and_next(key, h)
        rows: list[tuple[Any, ...]] = [(seq, ts, SEGMENT_KIND, None, text, prev, h, mac)]
        prev = h
        for ets, kind, txn, payload in [*carried, *((ts, k, x, p) for k, x, p in prepared)]:
            seq += 1
            h = entry_hash(seq, prev, entry_body(ets, kind, txn, payload))
            mac, key = mac_and_next(key, h)
            rows.append((seq, ets, kind, txn, payload, prev, h, mac))
            prev = h
        snap = snapshot_row(seq, prepared[-1][0] if prepared else "", snapshot_bits)
        seq += 1
        row, cp, key = self._checkpoint_row(seq, prev, key, ts, self._cp["counter"] + 1)
        rows.append(row)
        trigger = cur.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = 'entries_no_delete'"
                              ).fetchone()
        cur.execute("BEGIN IMMEDIATE")
        try:
            if trigger is not None:
                cur.execute("DROP TRIGGER entries_no_delete")
            if archive is not None:
                cur.execute("CREATE TABLE IF NOT EXISTS archive_files (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL)")
                cur.execute("CREATE TABLE IF NOT EXISTS archived_txns (h INTEGER PRIMARY KEY, archive INTEGER NOT NULL) "
                            "WITHOUT ROWID")
                cur.execute("INSERT OR IGNORE INTO archive_files (path) VALUES (?)", (archive,))
                (file_id,) = cur.execute("SELECT id FROM archive_files WHERE path = ?", (archive,)).fetchone()
                gone = cur.execute("SELECT DISTINCT txn FROM entries WHERE txn IS NOT NULL "
                                   "AND txn NOT IN (SELECT txn FROM carry_txn)").fetchall()
                cur.executemany("INSERT OR REPLACE INTO archived_txns (h, archive) VALUES (?, ?)",
                                [(txn_key_hash(t), file_id) for (t,) in gone])
            cur.execute("DELETE FROM entries")
            if trigger is not None:
                cur.execute(trigger[0])
            cur.execute("DELETE FROM vault WHERE txn NOT IN (SELECT txn FROM carry_txn)")
            cur.executemany(INSERT_ENTRY, rows)
            self._set_ratchet(cur, seq + 1, key)
            cur.execute("UPDATE meta SET v = ? WHERE k = 'checkpoint_counter'", (str(cp["counter"]),))
            cur.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('segment_first_seq', ?)", (str(rows[0][0]),))
            if snap is not None:
                write_snapshot_row(cur, snap)
        except BaseException:
            self._abort(conn, committing=False)
            raise
        self._commit_or_fail(conn, cur)
        self._has_archived = None
        self._set_state(seq, row[6], key, seq, cp)
        self._after_checkpoint()
        return rows[0][0], len(carried)

