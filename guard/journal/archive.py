"""Writing a sealed archive in slices while the daemon keeps appending (guard.runtime.retention).

The same file ``SegmentOps.write_archive`` writes (entries copied VERBATIM, meta ``segment_role``
= archive, empty vault, the ratchet row holding ``archive_ratchet_commitment(k_{last+1})``), but
built a slice of entries at a time into a ``.tmp`` file, each slice its own commit on the archive
alone without fsync (the kernel writes it back meanwhile; the file counts only once ``finish``
made it durable): the live journal is only read between two of its commits, so no sale waits
for the copy. ``finish`` copies the last few entries, commits, fsyncs and renames the archive into
place (``<stem>.<first>-<last>.archive.db``) at the moment the caller then restarts the live
segment (nothing appended in between). A crash leaves at most ``<stem>.<first>.archive.tmp``,
replaced by the next ``start``.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from guard.journal.format import ROLE_ARCHIVE, archive_ratchet_commitment
from guard.journal.fsync import fsync_path
from guard.journal.schema import INSERT_ENTRY, _connect, _migrate_in_txn


class ArchiveWriter:
    """One archive of the live ``journal`` (a ``guard.journal.store.Journal``) from its first entry."""

    def __init__(self, journal: Any, directory: Path) -> None:
        self.journal = journal
        self.dir = Path(directory)
        self.stem = Path(journal.path).stem
        self.first = int(journal._db().execute("SELECT min(seq) FROM entries").fetchone()[0])
        self.tmp = self.dir / f"{self.stem}.{self.first:012d}.archive.tmp"
        self.dest: Path | None = None
        self.copied = self.first - 1  # the last seq copied so far
        self._conn: sqlite3.Connection | None = None

    def start(self, now: float) -> None:
        self.tmp.unlink(missing_ok=True)
        os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        a = _connect(self.tmp, mode="rw")
        self._conn = a
        a.execute("PRAGMA journal_mode = DELETE").fetchall()
        a.execute("PRAGMA synchronous = OFF")  # a .tmp until finish(): durable only then
        a.execute("BEGIN IMMEDIATE")
        _migrate_in_txn(a)
        live = self.journal._db()
        meta = {k: v for k, v in live.execute("SELECT k, v FROM meta") if k != "schema_version"}
        meta.update(segment_role=ROLE_ARCHIVE, archived_at=repr(float(now)))
        a.executemany("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", sorted(meta.items()))
        a.execute("COMMIT")

    def copy(self, max_entries: int) -> int:
        """Copy up to ``max_entries`` more entries (those appended meanwhile included); returns how many."""
        a = self._db()
        rows = self.journal._db().execute(
            "SELECT seq, ts, kind, txn, payload, prev_hash, entry_hash, mac FROM entries WHERE seq > ? ORDER BY seq "
            "LIMIT ?", (self.copied, max_entries)).fetchall()
        if rows:
            a.execute("BEGIN IMMEDIATE")
            a.executemany(INSERT_ENTRY, rows)
            a.execute("COMMIT")
            self.copied = rows[-1][0]
        return len(rows)

    def finish(self) -> tuple[int, int]:
        """Copy what is left, seal with the ratchet commitment of the live key, make the archive
        durable and put it in place; returns (first, last) seq. Call with nothing appended after."""
        while self.copy(10_000):
            pass
        a = self._db()
        j = self.journal
        assert self.copied == j.last_seq, "entries were appended after the archive's last copy"
        a.execute("PRAGMA synchronous = FULL")
        a.execute("BEGIN IMMEDIATE")
        a.execute("INSERT INTO ratchet (id, next_seq, key) VALUES (1, ?, ?)",
                  (j.last_seq + 1, archive_ratchet_commitment(j._key)))
        a.execute("COMMIT")
        a.close()
        self._conn = None
        fsync_path(self.tmp)
        os.chmod(self.tmp, 0o400)
        self.dest = self.dir / f"{self.stem}.{self.first:012d}-{self.copied:012d}.archive.db"
        os.replace(self.tmp, self.dest)
        fsync_path(self.dir)
        return self.first, self.copied

    def abort(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.tmp.unlink(missing_ok=True)

    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None, "start() first"
        return self._conn
