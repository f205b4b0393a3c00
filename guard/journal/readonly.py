"""Reading a journal from read-only media (an auditor's DVD, a write-protected card, a ro mount).

SQLite opens a WAL-mode file read-only (``mode=ro``) only if it can open or create the ``-shm``
index next to it; on read-only media it cannot, and every read fails ("unable to open database
file"). There the file is opened ``immutable=1``: no locks, no ``-shm``, the file taken as it is.
That is exact only when everything is in the main file: a journal closed cleanly has an empty
(or no) ``-wal``. A non-empty ``-wal`` holds commits ``immutable`` would silently skip, so it is
refused (JOURNAL_WAL_READ_ONLY) rather than verified short: copy both files to writable storage.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from pathlib import Path

from guard.core.errors import JournalError
from guard.journal.schema import _connect


def read_only_media(path: Path) -> bool:
    """True if nothing can be created beside ``path`` (read-only file system or directory)."""
    parent = Path(path).parent
    try:
        if os.statvfs(parent).f_flag & os.ST_RDONLY:
            return True
    except OSError:
        pass
    return not os.access(parent, os.W_OK)


def connect_readonly(path: Path, busy_timeout_s: float = 2.0) -> sqlite3.Connection:
    """A read-only connection to ``path``: ``mode=ro`` normally, ``immutable=1`` on read-only media.
    Waits up to ``busy_timeout_s`` for a maintenance command's exclusive lock."""
    path = Path(path)
    conn = _connect(path, mode="ro")
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        conn.execute("PRAGMA schema_version").fetchone()  # the first read opens the WAL index
        return conn
    except sqlite3.OperationalError:
        conn.close()
        if not read_only_media(path):
            raise
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise JournalError(f"journal {path} is on read-only media with a non-empty {wal.name} (commits not yet in the "
                           "main file): copy both files to writable storage and read the copy",
                           code="JOURNAL_WAL_READ_ONLY")
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro&immutable=1"
    return sqlite3.connect(uri, uri=True, isolation_level=None)
