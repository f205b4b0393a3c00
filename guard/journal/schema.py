"""The journal's SQLite file: schema and migrations, the connection hook, and the durability
pragmas every connection must read back."""

from __future__ import annotations

import sqlite3
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from guard.core.constants import JOURNAL_SCHEMA_VERSION
from guard.core.errors import JournalDurabilityError, JournalError

# (pragma, value set, value read back): WAL + FULL is the only setting that survived power loss.
REQUIRED_PRAGMAS: tuple[tuple[str, str, object], ...] = (
    ("journal_mode", "WAL", "wal"),
    ("synchronous", "FULL", 2),
    ("secure_delete", "ON", 1),
    ("foreign_keys", "ON", 1),
)
INSERT_ENTRY = (
    "INSERT INTO entries (seq, ts, kind, txn, payload, prev_hash, entry_hash, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)

# --- schema ----------------------------------------------------------------------------------


def _schema_v1(conn: sqlite3.Connection) -> None:
    import sqlite_utils  # only when creating or migrating: keeps start-up (and crash recovery) fast

    db = sqlite_utils.Database(conn, execute_plugins=False, recursive_triggers=False)
    db.create_table("meta", {"k": str, "v": str}, pk="k", not_null=["v"], strict=True)
    entries = db.create_table(
        "entries",
        {"seq": int, "ts": float, "kind": str, "txn": str, "payload": str,
         "prev_hash": bytes, "entry_hash": bytes, "mac": bytes},
        pk="seq",
        not_null=["ts", "kind", "payload", "prev_hash", "entry_hash", "mac"],
        strict=True,
    )
    entries.create_index(["txn"], index_name="entries_txn")
    db.create_table("vault", {"ref": str, "txn": str, "nonce": bytes, "ct": bytes}, pk="ref",
                    not_null=["txn", "nonce", "ct"], strict=True)
    for sql in (
        "CREATE TABLE ratchet (id INTEGER PRIMARY KEY CHECK (id = 1), next_seq INTEGER NOT NULL, key BLOB NOT NULL) STRICT",
        "CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries BEGIN SELECT RAISE(ABORT, 'journal entries are append-only'); END",
        "CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries BEGIN SELECT RAISE(ABORT, 'journal entries are append-only'); END",
        "CREATE TRIGGER ratchet_no_delete BEFORE DELETE ON ratchet BEGIN SELECT RAISE(ABORT, 'ratchet state cannot be deleted'); END",
    ):
        conn.execute(sql)


# Step n upgrades schema n-1 to n. All pending steps run in one transaction.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _schema_v1}


def schema_version(conn: sqlite3.Connection) -> int:
    """0 for a database without our meta table."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
        return 0
    row = conn.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()
    try:
        return int(row[0]) if row else 0
    except ValueError:
        raise JournalError("meta.schema_version is not an integer", code="JOURNAL_CORRUPT") from None


def _migrate_in_txn(conn: sqlite3.Connection) -> int:
    found = schema_version(conn)
    if found > JOURNAL_SCHEMA_VERSION:
        raise JournalError(
            f"journal schema {found} is newer than this software ({JOURNAL_SCHEMA_VERSION}); upgrade posguard",
            code="JOURNAL_SCHEMA_TOO_NEW",
        )
    for v in range(found + 1, JOURNAL_SCHEMA_VERSION + 1):
        MIGRATIONS[v](conn)
    if found != JOURNAL_SCHEMA_VERSION:
        conn.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('schema_version', ?)", (str(JOURNAL_SCHEMA_VERSION),))
    return found


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migration steps atomically (one BEGIN IMMEDIATE ... COMMIT); returns the version found."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = _migrate_in_txn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return found


# --- connection ------------------------------------------------------------------------------


def _connect(path: Path, *, mode: str) -> sqlite3.Connection:
    """Open ``path`` (URI mode rw|ro) in autocommit mode; the hook tests replace."""
    uri = f"file:{urllib.parse.quote(str(path))}?mode={mode}"
    return sqlite3.connect(uri, uri=True, isolation_level=None)


def apply_pragmas(conn: sqlite3.Connection) -> None:
    """Set and read back every durability pragma; refuse to run on anything else."""
    for name, value, expected in REQUIRED_PRAGMAS:
        conn.execute(f"PRAGMA {name} = {value}").fetchall()
        row = conn.execute(f"PRAGMA {name}").fetchone()
        got = row[0] if row else None
        if isinstance(got, str):
            got = got.lower()
        if got != expected:
            raise JournalDurabilityError(f"PRAGMA {name} reads back {got!r} after setting {value}; journal refused")
    conn.execute("PRAGMA journal_size_limit = 0").fetchall()


# --- the journal -----------------------------------------------------------------------------

