"""A journal file whose schema is not ours (views, extra triggers, altered tables) or whose entries
are oversized is refused by `journal verify` and `Journal.open` before the attacker's SQL runs or a
huge row is loaded; start-up verifies the checkpoint signatures and the tail of the chain."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from guard.core.errors import JournalError
from guard.journal.keys import DeviceKeys, init_keys
from guard.journal.records import MAX_PAYLOAD_CHARS
from guard.journal.schema import EXPECTED_SCHEMA, OPTIONAL_SCHEMA, _migrate_in_txn
from guard.journal.store import Journal
from guard.journal.verify import VerifyReport, verify_journal
from tests.support import subprocess_env

TID = "TERM0001"
T0 = 1_700_000_000.0
CHILD_TIMEOUT_S = 60.0  # a hang is the bug; a loaded machine gets generous slack


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DeviceKeys]:
    d = tmp_path_factory.mktemp("schema")
    keys = init_keys(d / "keys")
    with Journal.create(d / "template.db", keys, terminal_id=TID, now=T0, checkpoint_every=8) as j:
        for i in range(30):
            blob = j.seal_vault(f"R1:{i:032x}", b"track data")
            j.append([("intent", f"R1:{i:032x}", {"amount": 100 + i, "vault_ref": blob.ref})], now=T0 + i,
                     vault_put=[blob])
    return d / "template.db", keys


@pytest.fixture
def jf(template: tuple[Path, DeviceKeys], tmp_path: Path) -> tuple[Path, DeviceKeys]:
    path = tmp_path / "journal.db"
    shutil.copy(template[0], path)
    return path, template[1]


def attacker(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def full(path: Path, keys: DeviceKeys) -> VerifyReport:
    return verify_journal(path, k0=keys.k0, public_key=keys.public_key)


def open_code(path: Path, keys: DeviceKeys) -> str | None:
    try:
        Journal.open(path, keys, terminal_id=TID).close()
    except JournalError as e:
        return e.code
    return None


_CHILD = """
import json, sys
from pathlib import Path
from guard.core.errors import JournalError
from guard.journal.keys import load_keys
from guard.journal.store import Journal
from guard.journal.verify import verify_journal
path, keydir, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
keys = load_keys(keydir)
if what == "verify":
    rep = verify_journal(path, k0=keys.k0, public_key=keys.public_key)
    print(json.dumps([rep.ok, rep.reason]))
else:
    try:
        Journal.open(path, keys, terminal_id="TERM0001").close()
        print(json.dumps([True, None]))
    except JournalError as e:
        print(json.dumps([False, e.code]))
"""


def in_child(path: Path, keys_dir: Path, what: str) -> tuple[bool, str | None, float]:
    """Run verify/open in a child bounded by CHILD_TIMEOUT_S: a hang fails the test instead of hanging it."""
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(keys_dir), what], env=subprocess_env(),
                           capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} hung for {CHILD_TIMEOUT_S} s on a hostile schema")
    assert r.returncode == 0, r.stderr
    ok, reason = json.loads(r.stdout)
    return ok, reason, time.monotonic() - t0


# --- the expected schema -----------------------------------------------------------------------


def test_expected_schema_is_what_this_software_writes(jf: tuple[Path, DeviceKeys]) -> None:
    c = sqlite3.connect(":memory:", isolation_level=None)
    c.execute("BEGIN")
    _migrate_in_txn(c)
    c.execute("COMMIT")
    assert set(c.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")) == EXPECTED_SCHEMA
    c.execute("CREATE TABLE IF NOT EXISTS archive_files (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL)")
    c.execute("CREATE TABLE IF NOT EXISTS archived_txns (h INTEGER PRIMARY KEY, archive INTEGER NOT NULL) WITHOUT ROWID")
    assert set(c.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")) == EXPECTED_SCHEMA | OPTIONAL_SCHEMA
    path, keys = jf
    assert set(attacker(path).execute("SELECT type, name, tbl_name, sql FROM sqlite_master")) == EXPECTED_SCHEMA
    assert full(path, keys).ok and open_code(path, keys) is None


# --- finding 4: hostile schemas ------------------------------------------------------------------

RECURSIVE_VIEW = """CREATE VIEW entries AS WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n)
SELECT x AS seq, 0.0 AS ts, 'intent' AS kind, NULL AS txn, '{}' AS payload, zeroblob(32) AS prev_hash,
zeroblob(32) AS entry_hash, zeroblob(32) AS mac FROM n"""


@pytest.mark.parametrize("what", ["verify", "open"])
def test_recursive_view_in_place_of_entries_fails_fast(template: tuple[Path, DeviceKeys],
                                                       jf: tuple[Path, DeviceKeys], what: str) -> None:
    path, _ = jf
    c = attacker(path)
    c.execute("DROP TABLE entries")
    c.execute(RECURSIVE_VIEW)
    c.close()
    ok, reason, took = in_child(path, template[0].parent / "keys", what)
    assert (ok, reason) == (False, "SCHEMA_UNEXPECTED" if what == "verify" else "JOURNAL_SCHEMA_UNEXPECTED")
    assert took < CHILD_TIMEOUT_S


def test_plain_view_over_a_copy_is_refused(jf: tuple[Path, DeviceKeys]) -> None:
    """A view returning the genuine rows verified clean before; the file is not what we write."""
    path, keys = jf
    c = attacker(path)
    c.execute("ALTER TABLE entries RENAME TO real_entries")
    c.execute("CREATE VIEW entries AS SELECT * FROM real_entries")
    c.close()
    rep = full(path, keys)
    assert (rep.ok, rep.reason) == (False, "SCHEMA_UNEXPECTED"), rep
    assert "view" in rep.detail
    assert open_code(path, keys) == "JOURNAL_SCHEMA_UNEXPECTED"


def test_extra_trigger_copying_vault_rows_is_refused(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    c = attacker(path)
    c.execute("CREATE TABLE loot (txn TEXT, nonce BLOB, ct BLOB)")
    c.execute("CREATE TRIGGER steal AFTER INSERT ON vault BEGIN INSERT INTO loot VALUES (new.txn, new.nonce, new.ct); END")
    c.close()
    rep = full(path, keys)
    assert (rep.ok, rep.reason) == (False, "SCHEMA_UNEXPECTED"), rep
    assert "steal" in rep.detail
    assert open_code(path, keys) == "JOURNAL_SCHEMA_UNEXPECTED"


def test_trigger_into_an_existing_table_is_refused(jf: tuple[Path, DeviceKeys]) -> None:
    """No new table needed: the copy can go to meta, which verify never checks row by row."""
    path, keys = jf
    c = attacker(path)
    c.execute("CREATE TRIGGER steal AFTER INSERT ON vault BEGIN "
              "INSERT INTO meta (k, v) VALUES ('x' || new.ref, hex(new.ct)); END")
    c.close()
    assert full(path, keys).reason == "SCHEMA_UNEXPECTED"
    assert open_code(path, keys) == "JOURNAL_SCHEMA_UNEXPECTED"


def test_altered_trigger_of_a_known_name_is_refused(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    c = attacker(path)
    c.execute("DROP TRIGGER entries_no_update")
    c.execute("CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries BEGIN SELECT 1; END")
    c.close()
    assert full(path, keys).reason == "SCHEMA_UNEXPECTED"
    assert open_code(path, keys) == "JOURNAL_SCHEMA_UNEXPECTED"


def test_generated_column_table_is_refused(jf: tuple[Path, DeviceKeys]) -> None:
    """An altered table definition (here a generated column that makes a gigabyte on every read)."""
    path, keys = jf
    c = attacker(path)
    c.execute("ALTER TABLE meta ADD COLUMN big BLOB GENERATED ALWAYS AS (zeroblob(1000000000)) VIRTUAL")
    c.close()
    assert full(path, keys).reason == "SCHEMA_UNEXPECTED"
    assert open_code(path, keys) == "JOURNAL_SCHEMA_UNEXPECTED"


def test_dropped_append_only_triggers_are_tolerated(jf: tuple[Path, DeviceKeys]) -> None:
    """They guard the writer against its own bugs; dropping them changes no entry."""
    path, keys = jf
    c = attacker(path)
    for t in ("entries_no_update", "entries_no_delete", "ratchet_no_delete"):
        c.execute(f"DROP TRIGGER {t}")
    c.close()
    assert full(path, keys).ok
    assert open_code(path, keys) is None


# --- finding 4: oversized entries ---------------------------------------------------------------


def _set_payload(path: Path, seq: int, expr: str, *args: Any) -> None:
    c = attacker(path)
    (trigger,) = c.execute("SELECT sql FROM sqlite_master WHERE name = 'entries_no_update'").fetchone()
    c.execute("DROP TRIGGER entries_no_update")
    c.execute(f"UPDATE entries SET payload = {expr} WHERE seq = ?", (*args, seq))
    c.execute(trigger)  # the attacker tidies up: the schema is ours again
    c.close()


def test_payload_over_the_write_limit_is_refused(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    _set_payload(path, 5, "?", json.dumps({"pad": "x" * MAX_PAYLOAD_CHARS}))
    rep = full(path, keys)
    assert (rep.ok, rep.reason, rep.first_bad_seq) == (False, "ENTRY_TOO_LARGE", 5), rep
    rep = verify_journal(path)
    assert (rep.ok, rep.reason, rep.first_bad_seq) == (False, "ENTRY_TOO_LARGE", 5), rep


def test_huge_payload_is_not_loaded(jf: tuple[Path, DeviceKeys]) -> None:
    """200 MB in one payload cost 10 s and 800 MB; now SQLite measures it and Python never sees it."""
    path, keys = jf
    _set_payload(path, 7, "'{\"p\":\"' || CAST(zeroblob(?) AS TEXT) || '\"}'", 200_000_000)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        rep = full(path, keys)
        took = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (rep.ok, rep.reason, rep.first_bad_seq) == (False, "ENTRY_TOO_LARGE", 7), rep
    assert peak < 20_000_000, f"verify allocated {peak} bytes in Python"
    print(f"verify of a 200 MB payload: {took:.2f} s, Python peak {peak / 1e6:.1f} MB")
