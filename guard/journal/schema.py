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


# --- the expected schema ---------------------------------------------------------------------

# sqlite_master rows (type, name, tbl_name, sql) of schema v1 exactly as _schema_v1 writes them
# (tests/integration/test_journal_schema.py keeps this equal to a fresh migration).
_V1_TABLES = {
    "meta": 'CREATE TABLE "meta" (\n   "k" TEXT PRIMARY KEY,\n   "v" TEXT NOT NULL\n) STRICT',
    "entries": ('CREATE TABLE "entries" (\n   "seq" INTEGER PRIMARY KEY,\n   "ts" REAL NOT NULL,\n'
                '   "kind" TEXT NOT NULL,\n   "txn" TEXT,\n   "payload" TEXT NOT NULL,\n'
                '   "prev_hash" BLOB NOT NULL,\n   "entry_hash" BLOB NOT NULL,\n   "mac" BLOB NOT NULL\n) STRICT'),
    "vault": ('CREATE TABLE "vault" (\n   "ref" TEXT PRIMARY KEY,\n   "txn" TEXT NOT NULL,\n'
              '   "nonce" BLOB NOT NULL,\n   "ct" BLOB NOT NULL\n) STRICT'),
    "ratchet": "CREATE TABLE ratchet (id INTEGER PRIMARY KEY CHECK (id = 1), next_seq INTEGER NOT NULL, "
               "key BLOB NOT NULL) STRICT",
}
SchemaRow = tuple[str, str, str, str | None]
EXPECTED_SCHEMA: frozenset[SchemaRow] = frozenset({
    *(("table", n, n, sql) for n, sql in _V1_TABLES.items()),
    ("index", "sqlite_autoindex_meta_1", "meta", None),
    ("index", "sqlite_autoindex_vault_1", "vault", None),
    ("index", "entries_txn", "entries", 'CREATE INDEX "entries_txn"\n    ON "entries" ("txn")'),
    ("trigger", "entries_no_update", "entries", "CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries BEGIN "
     "SELECT RAISE(ABORT, 'journal entries are append-only'); END"),
    ("trigger", "entries_no_delete", "entries", "CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries BEGIN "
     "SELECT RAISE(ABORT, 'journal entries are append-only'); END"),
    ("trigger", "ratchet_no_delete", "ratchet", "CREATE TRIGGER ratchet_no_delete BEFORE DELETE ON ratchet BEGIN "
     "SELECT RAISE(ABORT, 'ratchet state cannot be deleted'); END"),
})
# Rare record kinds looked up by kind (checkpoints, key rotations, snapshots, the config a start
# ran with; needs_manual, which retention keeps live): a partial index over them, so finding them
# never scans the whole journal. A query uses it by repeating MARKED_KINDS_SQL in its WHERE
# (SQLite's rule for partial indexes).
MARKED_KINDS_SQL = "kind IN ('checkpoint', 'segment', 'key_rotation', 'snapshot', 'config_loaded', 'needs_manual')"
MARKS_INDEX = f"CREATE INDEX entries_marks ON entries (kind, seq) WHERE {MARKED_KINDS_SQL}"
# The newest snapshot's key filter (guard.runtime.snapshot): written with its snapshot record.
SNAPSHOT_TABLE = ("CREATE TABLE snapshot_filter (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, "
                  "bits BLOB NOT NULL) STRICT")
# What compaction adds to a live file (guard.journal.segments.restart_segment): the archived-txn index.
OPTIONAL_SCHEMA: frozenset[SchemaRow] = frozenset({
    ("table", "archive_files", "archive_files",
     "CREATE TABLE archive_files (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL)"),
    ("index", "sqlite_autoindex_archive_files_1", "archive_files", None),
    ("table", "archived_txns", "archived_txns",
     "CREATE TABLE archived_txns (h INTEGER PRIMARY KEY, archive INTEGER NOT NULL) WITHOUT ROWID"),
    ("index", "entries_marks", "entries", MARKS_INDEX),
    ("table", "snapshot_filter", "snapshot_filter", SNAPSHOT_TABLE),
})


def ensure_marks_index(conn: sqlite3.Connection) -> None:
    """Add the rare-kinds index to a journal written before it existed (one scan, once). A
    read-only file is left as it is: its start-up lookups scan instead."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'entries_marks'").fetchone() is None:
        try:
            conn.execute(MARKS_INDEX)
        except sqlite3.OperationalError:
            pass


def schema_problem(conn: sqlite3.Connection) -> tuple[str, str] | None:
    """Compare the file's schema with the one this software writes, reading nothing but sqlite_master.

    Returns None, ("missing", detail) when a journal table is absent, or ("unexpected", detail)
    for an object this software does not write: a view, an unknown table/index/trigger, or a
    known name whose definition changed. A missing append-only trigger or index is tolerated: it
    guards against the writer's own bugs, changes no entry, and whoever can edit the file can drop
    it anyway (the chain catches what they change next). Run before reading anything else: a
    view or generated column in place of a table runs the attacker's SQL (an endless recursive
    CTE, gigabytes of zeroblob) on every read, an extra trigger on every write (copying vault rows).
    """
    found: set[SchemaRow] = set()
    for row in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"):
        if not all(v is None or type(v) is str for v in row):
            return "unexpected", "sqlite_master holds a non-text value"
        found.add((row[0], row[1], row[2], row[3]))
    extra = found - EXPECTED_SCHEMA - OPTIONAL_SCHEMA
    if extra:
        names = ", ".join(f"{t} {n[:40]!r}" for t, n, _, _ in sorted(extra, key=lambda r: (r[0] != "view", r[:2]))[:5])
        return "unexpected", f"the journal schema has unexpected or altered objects: {names}"
    tables = sorted(n for t, n, _, _ in EXPECTED_SCHEMA - found if t == "table")
    if tables:
        return "missing", f"journal table(s) missing: {', '.join(tables)}"
    return None


def check_schema(conn: sqlite3.Connection) -> None:
    """:func:`schema_problem` as an error: JOURNAL_SCHEMA_UNEXPECTED (or JOURNAL_CORRUPT for a missing table)."""
    problem = schema_problem(conn)
    if problem is not None:
        code = "JOURNAL_CORRUPT" if problem[0] == "missing" else "JOURNAL_SCHEMA_UNEXPECTED"
        raise JournalError(f"{problem[1]}; refusing to read it (posguard journal verify names what changed)",
                           code=code)


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

