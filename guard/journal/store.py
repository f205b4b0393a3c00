"""The journal: a durable, append-only, tamper-evident SQLite log (design and guarantees: docs/ARCHITECTURE.md and docs/OPERATIONS.md).

Every entry is hash-chained and MACed with a forward-secure ratchet key that is overwritten in
the same transaction (an attacker who steals today's key cannot re-seal yesterday's entries).
Signed checkpoints (every N entries and every T seconds, even when idle) give the host an anchor
that catches truncation and rollback. Card data needed before authorization completes sits
AES-GCM encrypted in ``vault`` and is shredded once the transaction is final; entries only hold
its ``ref`` so verification survives shredding.

The entry format (what ``guard.journal.verify`` recomputes) is in guard.journal.format, the MAC
ratchet in guard.journal.mac, the SQLite schema and pragmas in guard.journal.schema, record checks
in guard.journal.records, segments, archives and key rotation in guard.journal.segments.

Entry 1 is a genesis checkpoint MACed with k0, written in the creating transaction, so k0 never
reaches the journal file. Error codes (``JournalError.code``): JOURNAL_EXISTS, JOURNAL_MISSING,
JOURNAL_CORRUPT, JOURNAL_NOT_INITIALISED, JOURNAL_SCHEMA_TOO_NEW, JOURNAL_NO_K0,
JOURNAL_TERMINAL_MISMATCH, JOURNAL_KEY_MISMATCH, JOURNAL_RATCHET_MISMATCH, JOURNAL_BAD_RECORD, JOURNAL_CLOSED,
JOURNAL_FAILED, VAULT_CORRUPT, JOURNAL_BUSY (exclusive open refused), JOURNAL_IS_ARCHIVE,
JOURNAL_SCHEMA_UNEXPECTED (start-up verification: guard.journal.startup);
``JournalDurabilityError`` (JOURNAL_NOT_DURABLE).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from guard.core.constants import (
    CHECKPOINT_EVERY_ENTRIES,
    CHECKPOINT_EVERY_S,
    GENESIS_HASH,
    JOURNAL_HASH_DOMAIN,
    JOURNAL_SCHEMA_VERSION,
)
from guard.core.errors import JournalError, PosguardError
from guard.core.model import txn_key_hash
from guard.journal.format import (
    CHECKPOINT_KIND,
    ROLE_ARCHIVE,
    VAULT_NONCE_LEN,
    AppendResult,
    Entry,
    VaultBlob,
    canonical_json,
    checkpoint_message,
    entry_body,
    entry_hash,
    vault_ref,
)
from guard.journal.fsync import fsync_path
from guard.journal.keys import DeviceKeys
from guard.journal.lock import WriterLock
from guard.journal.mac import mac_and_next
from guard.journal.records import MAX_PAYLOAD_CHARS, _check_blob, _check_now, _check_terminal, _payload, _prepare
from guard.journal.schema import (
    INSERT_ENTRY,
    MARKED_KINDS_SQL,
    MARKS_INDEX,
    _connect,
    _migrate_in_txn,
    apply_pragmas,
    check_schema,
    ensure_marks_index,
    migrate,
    schema_problem,
    schema_version,
)
from guard.journal.segments import SegmentOps
from guard.journal.snapshot import SnapshotOps, snapshot_row, write_snapshot_row
from guard.journal.startup import verify_at_open

log = logging.getLogger("posguard.journal")
_sha256 = hashlib.sha256
# NULL (then JOURNAL_CORRUPT naming the entry) instead of loading a payload longer than append allows.
_PAYLOAD = f"CASE WHEN length(CAST(payload AS BLOB)) <= {MAX_PAYLOAD_CHARS} THEN payload END"


class Journal(SegmentOps, SnapshotOps):
    """Append-only journal on one SQLite file. Not thread-safe: one driver owns it."""

    def __init__(self, conn: sqlite3.Connection, path: Path, keys: DeviceKeys, *, terminal_id: str,
                 checkpoint_every: int, checkpoint_interval_s: float) -> None:
        """Use :meth:`create` or :meth:`open`."""
        if checkpoint_every < 1 or not checkpoint_interval_s > 0:
            raise ValueError("checkpoint_every must be >= 1 and checkpoint_interval_s > 0")
        self._conn: sqlite3.Connection | None = conn
        self.path = path
        self.terminal_id = terminal_id
        self._signing_key = keys.signing_key
        self._aead = AESGCM(keys.vault_key)
        self._every = checkpoint_every
        self._interval = float(checkpoint_interval_s)
        self.commit_count = 0
        self.commit_seconds = 0.0  # wall time in SQLite transactions (BEGIN..COMMIT), for benchmarks
        self.commit_cpu_seconds = 0.0  # CPU time in the same
        self.wal_truncate_on_checkpoint = True
        self.wal_seal_wait_s = 0.5  # how long an epoch close waits for a reader that pins old WAL frames
        self.wal_seal_failures = 0  # epochs whose close could not empty the WAL (a reader held it past the wait)
        self.wal_seal_pending = False  # the last epoch close failed: retried (without waiting) after each commit
        self._failed = False
        self._last_seq = 0
        self._last_hash = GENESIS_HASH
        self._key = b""
        self._cp_seq = 0
        self._cp: dict[str, Any] = {}
        self._sealed: VaultBlob | None = None  # the last blob seal_vault made: its ref needs no re-check
        self._archives: dict[str, sqlite3.Connection] = {}  # read-only archive files opened by entries_for
        self._has_archived: bool | None = None  # whether an archived_txns index exists (checked once)
        self._clean_txns: dict[str, None] = {}  # txn keys already scanned clean: a sale's later records skip the regex
        self.writer_lock: WriterLock | None = None  # held by the daemon and open_exclusive (guard.journal.lock)

    # -- lifecycle --

    @classmethod
    def create(cls, path: Path, keys: DeviceKeys, *, terminal_id: str,
               checkpoint_every: int = CHECKPOINT_EVERY_ENTRIES, checkpoint_interval_s: float = CHECKPOINT_EVERY_S,
               now: float) -> Journal:
        """Create a new journal with its schema and genesis checkpoint in one durable commit."""
        path = Path(path)
        if keys.k0 is None:
            raise JournalError("creating a journal needs k0 (provisioning only)", code="JOURNAL_NO_K0")
        _check_terminal(terminal_id)
        ts = _check_now(now)
        if os.path.lexists(path):
            raise JournalError(f"journal {path} already exists", code="JOURNAL_EXISTS")
        # Built under a temporary name and linked into place only once complete and durable: a power
        # cut during creation leaves no journal or a whole one, never an empty file open() refuses.
        tmp = path.with_name(path.name + ".creating")
        conn: sqlite3.Connection | None = None
        try:
            for suffix in ("", "-wal", "-shm", "-journal"):  # leftovers of a creation cut short
                Path(f"{tmp}{suffix}").unlink(missing_ok=True)  # EROFS on read-only media: JOURNAL_CREATE_FAILED
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            conn = _connect(tmp, mode="rw")
            apply_pragmas(conn)
            j = cls(conn, tmp, keys, terminal_id=terminal_id, checkpoint_every=checkpoint_every,
                    checkpoint_interval_s=checkpoint_interval_s)
            row, cp, k_next = j._checkpoint_row(1, GENESIS_HASH, keys.k0, ts, 1)
            conn.execute("BEGIN IMMEDIATE")
            _migrate_in_txn(conn)
            conn.execute(MARKS_INDEX)
            conn.executemany("INSERT INTO meta (k, v) VALUES (?, ?)", [
                ("terminal_id", terminal_id), ("created_at", repr(ts)), ("checkpoint_counter", "1")])
            conn.execute(INSERT_ENTRY, row)
            conn.execute("INSERT INTO ratchet (id, next_seq, key) VALUES (1, 2, ?)", (k_next,))
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            conn.close()  # the last connection: the WAL is folded into the file (synced) and removed
            conn = None
            fsync_path(tmp)
            os.link(tmp, path)  # atomic, and never replaces a journal that appeared meanwhile
            fsync_path(path.parent)
        except FileExistsError:
            raise JournalError(f"journal {path} already exists", code="JOURNAL_EXISTS") from None
        except OSError as e:  # no such directory, read-only, disk full, no hard links on this file system
            raise JournalError(f"cannot create journal {path}: {e.strerror or e}", code="JOURNAL_CREATE_FAILED") from None
        except sqlite3.Error as e:
            raise JournalError(f"cannot create journal {path}: {e}", code="JOURNAL_CREATE_FAILED") from None
        finally:
            if conn is not None:
                conn.close()
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    Path(f"{tmp}{suffix}").unlink(missing_ok=True)
                except OSError:
                    pass  # read-only media: nothing was created there
        return cls.open(path, keys, terminal_id=terminal_id, checkpoint_every=checkpoint_every,
                        checkpoint_interval_s=checkpoint_interval_s)

    @classmethod
    def open(cls, path: Path, keys: DeviceKeys, *, terminal_id: str,
             checkpoint_every: int = CHECKPOINT_EVERY_ENTRIES,
             checkpoint_interval_s: float = CHECKPOINT_EVERY_S) -> Journal:
        """Open an existing journal: durability pragmas, pending migrations, the schema, state from the
        tail, and the checks of guard.journal.startup (checkpoint signatures, the tail's hash chain)."""
        path = Path(path)
        if not path.is_file():
            if path.exists():
                raise JournalError(f"journal {path} is not a regular file", code="JOURNAL_NOT_A_FILE")
            raise JournalError(f"journal {path} does not exist", code="JOURNAL_MISSING")
        try:
            conn = _connect(path, mode="rw")
        except sqlite3.Error as e:  # e.g. no read permission
            raise JournalError(f"journal {path} cannot be opened: {e}") from None
        try:
            try:
                apply_pragmas(conn)
                version = schema_version(conn)  # reads meta only if it is a table
                if version < 1:
                    if conn.execute("SELECT 1 FROM sqlite_master WHERE name IN ('meta', 'entries')").fetchone():
                        check_schema(conn)  # ours, with meta replaced (a view): say so
                    raise JournalError(f"{path} is not an initialised posguard journal", code="JOURNAL_NOT_INITIALISED")
                if version != JOURNAL_SCHEMA_VERSION:
                    migrate(conn)
                check_schema(conn)  # before reading entries: a view or trigger would run the attacker's SQL
                ensure_marks_index(conn)
                j = cls(conn, path, keys, terminal_id=terminal_id, checkpoint_every=checkpoint_every,
                        checkpoint_interval_s=checkpoint_interval_s)
                j._load_state()
                verify_at_open(conn, keys.signing_key.public_key(), terminal_id)
            except sqlite3.OperationalError as e:
                if "locked" in str(e) or "busy" in str(e):  # another process holds it exclusively
                    raise JournalError(f"journal {path} is in use by another process (the guard daemon, replay, "
                                       "compaction or a key rotation): stop it first", code="JOURNAL_BUSY") from None
                raise JournalError(f"journal {path} cannot be opened: {e}") from None
            except (sqlite3.DatabaseError, UnicodeDecodeError) as e:  # a corrupt schema's message may not be UTF-8
                raise JournalError(f"journal {path} is unreadable ({e.__class__.__name__})", code="JOURNAL_CORRUPT") from None
        except BaseException:
            conn.close()
            raise
        return j

    def _load_state(self) -> None:
        c = self._db()
        meta = dict(c.execute("SELECT k, v FROM meta").fetchall())
        if meta.get("segment_role") == ROLE_ARCHIVE:
            raise JournalError(f"{self.path} is a sealed archive, not a live journal", code="JOURNAL_IS_ARCHIVE")
        if meta.get("terminal_id") != self.terminal_id:
            raise JournalError(f"journal belongs to terminal {meta.get('terminal_id')!r}, not {self.terminal_id!r}",
                               code="JOURNAL_TERMINAL_MISMATCH")
        last = c.execute("SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        rat = c.execute("SELECT next_seq, key FROM ratchet WHERE id = 1").fetchone()
        cp = c.execute(f"SELECT seq, CASE WHEN length(CAST(payload AS BLOB)) <= {MAX_PAYLOAD_CHARS} THEN payload "
                       f"END FROM entries WHERE {MARKED_KINDS_SQL} AND kind = ? ORDER BY seq DESC LIMIT 1",
                       (CHECKPOINT_KIND,)).fetchone()
        if last is None or cp is None:
            raise JournalError("journal has no genesis checkpoint", code="JOURNAL_CORRUPT")
        if rat is None or rat[0] != last[0] + 1 or len(rat[1]) != 32:
            raise JournalError(f"ratchet state does not follow entry {last[0]}; refusing to append",
                               code="JOURNAL_RATCHET_MISMATCH")
        try:
            payload = json.loads(cp[1])
            self._signing_key.public_key().verify(bytes.fromhex(payload["sig"]), checkpoint_message(payload))
            float(payload["time"]), int(payload["counter"])
        except InvalidSignature:
            raise JournalError(f"checkpoint {cp[0]} was not signed by this device's key (keys re-provisioned? "
                               "a new key needs a new journal)", code="JOURNAL_KEY_MISMATCH") from None
        except (ValueError, KeyError, TypeError):
            raise JournalError(f"checkpoint {cp[0]} is malformed", code="JOURNAL_CORRUPT") from None
        self._set_state(last[0], last[1], rat[1], cp[0], payload)

    def _set_state(self, last_seq: int, last_hash: bytes, key: bytes, cp_seq: int, cp: dict[str, Any]) -> None:
        self._last_seq, self._last_hash, self._key = last_seq, last_hash, key
        self._cp_seq, self._cp = cp_seq, cp

    def close(self) -> None:
        """Seal the WAL (best effort) and close; superseded ratchet keys leave the files."""
        if self._conn is not None:
            try:
                if not self._failed:
                    self.seal_wal()
            except sqlite3.Error:
                pass
            self._conn.close()
            self._conn = None
        for c in self._archives.values():
            c.close()
        self._archives.clear()
        self._key = b""
        if self.writer_lock is not None:
            self.writer_lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError("journal is closed", code="JOURNAL_CLOSED")
        return self._conn

    # -- writing --

    def seal_vault(self, txn: str, plaintext: bytes, *, rng: Callable[[int], bytes] = os.urandom) -> VaultBlob:
        """Encrypt card data for ``txn`` before the append that references its ``ref``; the nonce
        comes from ``rng`` (the runtime's randomness port)."""
        nonce = rng(VAULT_NONCE_LEN)
        ct = self._aead.encrypt(nonce, plaintext, txn.encode())
        blob = VaultBlob(vault_ref(nonce, ct), txn, nonce, ct)
        self._sealed = blob
        return blob

    def append(self, records: Sequence[tuple[str, str | None, dict[str, Any]]], *, now: float,
               vault_put: Sequence[VaultBlob] = (), vault_shred: Sequence[str] = (),
               snapshot_bits: bytes | None = None) -> AppendResult:
        """Append records, vault inserts/shreds, the ratchet step and any due checkpoint in ONE durable commit.

        ``snapshot_bits``: the key filter of the ``snapshot`` record that ends ``records``, stored
        beside it in the same commit, which then also ends with a checkpoint that signs it."""
        conn = self._db_for_write()
        ts = now if type(now) is float and math.isfinite(now) else _check_now(now)
        prepared = _prepare(records, self._clean_txns)
        blobs = [(b.ref, b.txn, b.nonce, b.ct) if b is self._sealed else _check_blob(b) for b in vault_put]
        shred = [(r,) for r in vault_shred]
        seq, prev, key = self._last_seq, self._last_hash, self._key
        rows = []
        for kind, txn, text in prepared:
            seq += 1
            h = _sha256(JOURNAL_HASH_DOMAIN + seq.to_bytes(8, "big") + prev + entry_body(ts, kind, txn, text)).digest()
            mac, next_key = mac_and_next(key, h)
            rows.append((seq, ts, kind, txn, text, prev, h, mac))
            key, prev = next_key, h
        seqs = tuple(range(self._last_seq + 1, seq + 1))
        cp_seq, cp = None, None
        snap = snapshot_row(seq, prepared[-1][0], snapshot_bits)  # the checkpoint right after it signs it
        if snap is not None or seq - self._cp_seq >= self._every or ts - self._cp["time"] >= self._interval:
            seq += 1
            cp_seq = seq
            row, cp, key = self._checkpoint_row(seq, prev, key, ts, self._cp["counter"] + 1)
            rows.append(row)
            prev = row[6]
        self._write(conn, rows, blobs, shred, seq, key, cp, snap)
        self._set_state(seq, prev, key, cp_seq or self._cp_seq, cp or self._cp)
        if cp is not None:
            self._after_checkpoint()
        elif self.wal_seal_pending:
            self._timed_seal(0.0)
        return AppendResult(seqs, cp_seq)

    def maybe_checkpoint(self, now: float) -> bool:
        """Seal an epoch if ``checkpoint_interval_s`` passed since the last checkpoint, even when idle."""
        if _check_now(now) - self._cp["time"] < self._interval:
            if self.wal_seal_pending:
                self._timed_seal(0.0)
            return False
        self.checkpoint(now)
        return True

    def checkpoint(self, now: float) -> int:
        """Commit a signed checkpoint now; returns its seq."""
        conn = self._db_for_write()
        seq = self._last_seq + 1
        row, cp, key = self._checkpoint_row(seq, self._last_hash, self._key, _check_now(now), self._cp["counter"] + 1)
        self._write(conn, [row], [], [], seq, key, cp)
        self._set_state(seq, row[6], key, seq, cp)
        self._after_checkpoint()
        return seq

    def _checkpoint_row(self, seq: int, prev: bytes, key: bytes, ts: float,
                        counter: int) -> tuple[tuple[Any, ...], dict[str, Any], bytes]:
        fields: dict[str, Any] = {"terminal": self.terminal_id, "covers_seq": seq - 1,
                                  "covers_hash": prev.hex(), "time": ts, "counter": counter}
        fields["sig"] = self._signing_key.sign(checkpoint_message(fields)).hex()
        text = canonical_json(fields)
        h = entry_hash(seq, prev, entry_body(ts, CHECKPOINT_KIND, None, text))
        mac, next_key = mac_and_next(key, h)
        return (seq, ts, CHECKPOINT_KIND, None, text, prev, h, mac), fields, next_key

    def _write(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]], blobs: list[tuple[str, str, bytes, bytes]],
               shred: list[tuple[str]], last_seq: int, key: bytes, cp: dict[str, Any] | None,
               snap: tuple[int, bytes] | None = None) -> None:
        try:
            self._write_txn(conn, rows, blobs, shred, last_seq, key, cp, snap)
        except sqlite3.IntegrityError:
            raise  # the caller's records broke a constraint (e.g. a vault blob twice): a bug, not the medium
        except sqlite3.DatabaseError as e:
            # Disk full, read-only file or directory, I/O error, corruption, locked by another process:
            # a journal failure with a stable code (the daemon exits 3 and restarts), not an internal error.
            raise JournalError(f"journal {self.path}: commit failed ({e}); nothing that depends on it was sent "
                               "or shown", code="JOURNAL_WRITE_FAILED") from None

    def _write_txn(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]],
                   blobs: list[tuple[str, str, bytes, bytes]], shred: list[tuple[str]], last_seq: int, key: bytes,
                   cp: dict[str, Any] | None, snap: tuple[int, bytes] | None = None) -> None:
        cur = conn.cursor()
        t0, c0 = time.perf_counter(), time.process_time()
        cur.execute("BEGIN IMMEDIATE")
        try:
            if len(rows) == 1:
                cur.execute(INSERT_ENTRY, rows[0])
            else:
                cur.executemany(INSERT_ENTRY, rows)
            if blobs:
                cur.executemany("INSERT INTO vault (ref, txn, nonce, ct) VALUES (?, ?, ?, ?)", blobs)
            if shred:
                cur.executemany("DELETE FROM vault WHERE ref = ?", shred)
            self._set_ratchet(cur, last_seq + 1, key)
            if cp is not None:
                cur.execute("UPDATE meta SET v = ? WHERE k = 'checkpoint_counter'", (str(cp["counter"]),))
            if snap is not None:
                write_snapshot_row(cur, snap)
        except BaseException:
            self._abort(conn, committing=False)
            raise
        self._commit_or_fail(conn, cur)
        self.commit_seconds += time.perf_counter() - t0
        self.commit_cpu_seconds += time.process_time() - c0

    def _db_for_write(self) -> sqlite3.Connection:
        """The connection, unless an earlier commit failed (its durability is unknown: reopen from disk)."""
        conn = self._db()
        if self._failed:
            raise JournalError("an earlier commit failed; reopen the journal", code="JOURNAL_FAILED")
        return conn

    @staticmethod
    def _set_ratchet(cur: sqlite3.Cursor, next_seq: int, key: bytes) -> None:
        """Overwrite the ratchet key in the write transaction (the superseded key leaves with the WAL)."""
        cur.execute("UPDATE ratchet SET next_seq = ?, key = ? WHERE id = 1", (next_seq, key))
        if cur.rowcount != 1:
            raise JournalError("ratchet row missing", code="JOURNAL_RATCHET_MISMATCH")

    def _commit_or_fail(self, conn: sqlite3.Connection, cur: sqlite3.Cursor) -> None:
        """COMMIT the open write transaction; if that fails, roll back and fail-stop."""
        try:
            self._commit(cur)
        except BaseException:
            self._abort(conn, committing=True)
            raise
        self.commit_count += 1

    def _abort(self, conn: sqlite3.Connection, *, committing: bool) -> None:
        """Roll back a failed write transaction. Fail-stop (reopen from disk) when the COMMIT itself
        failed (durable or not is unknown, e.g. an fsync error) or the rollback did."""
        if committing:
            self._failed = True
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._failed = True

    def _commit(self, cur: sqlite3.Cursor) -> None:
        """The durable point: WAL append + fsync (synchronous=FULL)."""
        cur.execute("COMMIT")

    def _after_checkpoint(self) -> None:
        """Close the forward-security epoch the checkpoint just committed: empty the WAL, so no key of
        the closed epoch and no shredded vault blob stays in any file (secure_delete zeroes the main
        file's freed space). A reader that pins the WAL past ``wal_seal_wait_s`` is counted and logged,
        and the seal is retried after every later commit until it succeeds."""
        if not self.wal_truncate_on_checkpoint:
            return
        if not self._timed_seal(self.wal_seal_wait_s):
            self.wal_seal_failures += 1
            log.warning("journal checkpoint %d: a reader kept the WAL busy for %.1f s; superseded ratchet keys "
                        "stay in %s-wal until a later commit seals it", self._cp_seq, self.wal_seal_wait_s, self.path)

    def _timed_seal(self, wait_s: float) -> bool:
        t0, c0 = time.perf_counter(), time.process_time()
        sealed = self.seal_wal(wait_s)  # SQLite I/O like a commit: counted with the commits in benchmarks
        self.commit_seconds += time.perf_counter() - t0
        self.commit_cpu_seconds += time.process_time() - c0
        self.wal_seal_pending = not sealed
        return sealed

    def seal_wal(self, wait_s: float = 0.0) -> bool:
        """Checkpoint and truncate the WAL so superseded ratchet keys and shredded vault pages leave it.

        Waits at most ``wait_s`` for readers (SQLite's busy handler retries within it); returns False
        if a reader kept old frames alive, i.e. the WAL was not emptied (busy != 0).
        """
        conn = self._db()
        old = conn.execute("PRAGMA busy_timeout").fetchone()[0]
        conn.execute(f"PRAGMA busy_timeout = {max(0, int(wait_s * 1000))}")
        try:
            busy = int(conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0])
        except sqlite3.OperationalError:
            busy = 1
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(old)}")
        return busy == 0

    # -- reading --

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def last_hash(self) -> bytes:
        return self._last_hash

    def latest_checkpoint(self) -> dict[str, Any]:
        """The newest signed checkpoint: a JSON-serialisable anchor for the host or an auditor."""
        return dict(self._cp)

    def entries(self, since_seq: int = 0) -> Iterator[Entry]:
        cur = self._db().execute(
            f"SELECT seq, ts, kind, txn, {_PAYLOAD}, entry_hash, mac FROM entries WHERE seq > ? ORDER BY seq", (since_seq,))
        for seq, ts, kind, txn, payload, h, mac in cur:
            yield Entry(seq, ts, kind, txn, _payload(seq, payload), h, mac)

    def entries_for(self, txn: str) -> list[Entry]:
        """One transaction's entries in order (indexed): how the engine reads back a transaction
        it no longer keeps in memory."""
        cur = self._db().execute(
            f"SELECT seq, ts, kind, txn, {_PAYLOAD}, entry_hash, mac FROM entries WHERE txn = ? ORDER BY seq", (txn,))
        rows = [Entry(seq, ts, kind, t, _payload(seq, payload), h, mac) for seq, ts, kind, t, payload, h, mac in cur]
        if (rows and rows[0].kind == "intent") or not self._archived_index():
            return rows
        # Archived, maybe with newer live records (a VOID of an old sale): its history is both.
        hit = self._db().execute("SELECT f.path FROM archived_txns a JOIN archive_files f ON f.id = a.archive "
                                 "WHERE a.h = ?", (txn_key_hash(txn),)).fetchone()
        return (self._archive_entries(hit[0], txn) if hit else []) + rows

    def _archived_index(self) -> bool:
        if self._has_archived is None:
            self._has_archived = self._db().execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'archived_txns'").fetchone() is not None
        return self._has_archived

    def archived_key_hashes(self) -> Iterator[int]:
        """``txn_key_hash`` of every transaction compaction moved to an archive (their ids stay taken)."""
        if self._archived_index():
            for (h,) in self._db().execute("SELECT h FROM archived_txns"):
                yield h

    def _archive_entries(self, archive: str, txn: str) -> list[Entry]:
        """A transaction's entries from the archive file that holds it. An archive that cannot be
        read refuses the request (the id is taken; treating it as new could charge twice)."""
        try:
            conn = self._archives.get(archive)
            if conn is None:
                if not Path(archive).is_file():
                    raise sqlite3.OperationalError("file not found")
                conn = _connect(Path(archive), mode="ro")
                problem = schema_problem(conn)  # an archive is a file like the journal: no foreign SQL runs
                if problem is not None:
                    conn.close()
                    raise sqlite3.DatabaseError(problem[1])
                self._archives[archive] = conn
            cur = conn.execute(f"SELECT seq, ts, kind, txn, {_PAYLOAD}, entry_hash, mac FROM entries WHERE txn = ? "
                               "ORDER BY seq", (txn,))
            return [Entry(seq, ts, kind, t, _payload(seq, payload), h, mac) for seq, ts, kind, t, payload, h, mac in cur]
        except sqlite3.Error as e:
            raise PosguardError(f"transaction {txn} was archived to {archive}, which cannot be read ({e}); put the "
                                "archive back (posguard journal compact moved it there)", code="ARCHIVE_UNAVAILABLE") from None

    def vault_refs(self) -> set[str]:
        return {r for (r,) in self._db().execute("SELECT ref FROM vault")}

    def vault_open(self, ref: str) -> bytes | None:
        """Decrypt a vault blob; None once shredded. A blob that fails authentication raises VAULT_CORRUPT."""
        row = self._db().execute("SELECT txn, nonce, ct FROM vault WHERE ref = ?", (ref,)).fetchone()
        if row is None:
            return None
        txn, nonce, ct = row
        if vault_ref(nonce, ct) != ref:
            raise JournalError(f"vault blob {ref[:16]} does not match its ref", code="VAULT_CORRUPT")
        try:
            return self._aead.decrypt(nonce, ct, txn.encode())
        except InvalidTag:
            raise JournalError(f"vault blob {ref[:16]} failed authentication", code="VAULT_CORRUPT") from None

    def integrity_check(self, *, full: bool = False) -> list[str]:
        """SQLite's page-level check (quick_check, or integrity_check if ``full``); [] when healthy."""
        rows = self._db().execute("PRAGMA integrity_check" if full else "PRAGMA quick_check").fetchall()
        problems = [r[0] for r in rows]
        return [] if problems == ["ok"] else problems

    # -- exclusive access for operator tools (guard.ops.compact, guard.ops.rotation, guard.ops.replay);
    #    rotation and segments: SegmentOps (guard.journal.segments).

    @classmethod
    def open_exclusive(cls, path: Path, keys: DeviceKeys, *, terminal_id: str,
                       checkpoint_every: int = CHECKPOINT_EVERY_ENTRIES,
                       checkpoint_interval_s: float = CHECKPOINT_EVERY_S, busy_timeout_s: float = 1.0) -> Journal:
        """Open like :meth:`open`, then hold SQLite's exclusive lock until :meth:`close`.

        Nobody else (the guard daemon, a reader) can use the file meanwhile; JOURNAL_BUSY if
        another connection has it open. For maintenance: replay, compaction, key rotation.
        """
        lock = WriterLock.acquire(path) if Path(path).is_file() else None
        try:
            j = cls.open(path, keys, terminal_id=terminal_id, checkpoint_every=checkpoint_every,
                         checkpoint_interval_s=checkpoint_interval_s)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        j.writer_lock = lock
        conn = j._db()
        try:
            conn.execute(f"PRAGMA busy_timeout = {max(0, int(busy_timeout_s * 1000))}")
            conn.execute("PRAGMA locking_mode = EXCLUSIVE").fetchall()
            conn.execute("BEGIN EXCLUSIVE")
            conn.execute("COMMIT")
        except sqlite3.OperationalError:
            j._failed = True  # no WAL sealing attempt on a file someone else holds
            j.close()
            raise JournalError(f"journal {path} is in use by another process; stop the guard daemon first",
                               code="JOURNAL_BUSY") from None
        return j
