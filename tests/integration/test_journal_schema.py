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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guard.core.errors import JournalError, PosguardError
from guard.journal.keys import DeviceKeys, init_keys
from guard.journal.records import MAX_PAYLOAD_CHARS
from guard.journal.startup import ChainBroken
from guard.journal.schema import EXPECTED_SCHEMA, MARKS_INDEX, OPTIONAL_SCHEMA, SNAPSHOT_TABLE, _migrate_in_txn
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
from guard.core.errors import JournalError, PosguardError
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
    c.execute(MARKS_INDEX)
    c.execute(SNAPSHOT_TABLE)
    assert set(c.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")) == EXPECTED_SCHEMA | OPTIONAL_SCHEMA
    path, keys = jf
    marks = {r for r in OPTIONAL_SCHEMA if r[1] == "entries_marks"}
    assert set(attacker(path).execute("SELECT type, name, tbl_name, sql FROM sqlite_master")) == EXPECTED_SCHEMA | marks
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


# --- finding 6: Journal.open verifies checkpoints and the tail -----------------------------------


def _tamper(path: Path, sql: str, *args: Any) -> None:
    """The attacker edits rows (triggers dropped and put back: the schema stays ours)."""
    c = attacker(path)
    saved = c.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
    for (t,) in c.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        c.execute(f"DROP TRIGGER {t}")
    c.execute(sql, args)
    for (s,) in saved:
        c.execute(s)
    c.close()


def _broken_at(path: Path, keys: DeviceKeys) -> int:
    with pytest.raises(JournalError) as e:
        Journal.open(path, keys, terminal_id=TID)
    assert e.value.code == "JOURNAL_CORRUPT" and isinstance(e.value, ChainBroken), e.value
    seq = e.value.seq
    assert f"entry {seq}" in str(e.value)
    return seq


def _cps(path: Path) -> list[int]:
    return [s for (s,) in attacker(path).execute("SELECT seq FROM entries WHERE kind = 'checkpoint' ORDER BY seq")]


def test_tail_entry_rewritten_is_refused_at_open(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    last = _cps(path)[-1] + 1
    _tamper(path, "UPDATE entries SET payload = '{\"amount\":1}' WHERE seq = ?", last)
    assert _broken_at(path, keys) == last


def test_tail_entry_rehashed_breaks_the_link(jf: tuple[Path, DeviceKeys]) -> None:
    """Rewritten with its hash recomputed (no key needed): the next entry no longer links to it."""
    from guard.journal.format import entry_body, entry_hash
    path, keys = jf
    seq = _cps(path)[-1] + 1
    c = attacker(path)
    ts, kind, txn, prev = c.execute("SELECT ts, kind, txn, prev_hash FROM entries WHERE seq = ?", (seq,)).fetchone()
    c.close()
    text = '{"amount":1}'
    _tamper(path, "UPDATE entries SET payload = ?, entry_hash = ? WHERE seq = ?",
            text, entry_hash(seq, prev, entry_body(ts, kind, txn, text)), seq)
    assert _broken_at(path, keys) == seq + 1


def test_checkpoint_signature_forged_is_refused(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    cp = _cps(path)[1]
    c = attacker(path)
    (payload,) = c.execute("SELECT payload FROM entries WHERE seq = ?", (cp,)).fetchone()
    c.close()
    rec = json.loads(payload)
    rec["sig"] = "00" * 64
    _tamper(path, "UPDATE entries SET payload = ? WHERE seq = ?", json.dumps(rec, sort_keys=True,
                                                                        separators=(",", ":")), cp)
    assert _broken_at(path, keys) == cp


def test_old_entry_deleted_is_refused(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    _tamper(path, "DELETE FROM entries WHERE seq = 3")
    assert _broken_at(path, keys) == 1  # the count no longer matches the span: verify names the entry


def test_entry_before_a_checkpoint_rewritten_is_refused(jf: tuple[Path, DeviceKeys]) -> None:
    """The checkpoint covers the stored hash of the entry before it: rehashing that entry shows."""
    path, keys = jf
    cp = _cps(path)[1]
    _tamper(path, "UPDATE entries SET entry_hash = zeroblob(32) WHERE seq = ?", cp - 1)
    assert _broken_at(path, keys) == cp


def test_middle_entry_rewritten_is_left_to_verify(jf: tuple[Path, DeviceKeys]) -> None:
    """Documented limit: an entry between two old checkpoints is the auditor's (verify's) job."""
    path, keys = jf
    cps = _cps(path)
    _tamper(path, "UPDATE entries SET payload = '{\"amount\":1}' WHERE seq = ?", cps[1] + 2)
    assert open_code(path, keys) is None
    assert full(path, keys).reason == "ENTRY_MODIFIED"


def test_open_of_compacted_and_rotated_journals(tmp_path: Path) -> None:
    """A live file that starts at a segment record, across a key rotation, opens (also exclusively);
    a forged checkpoint after the segment record is still refused."""
    keys = init_keys(tmp_path / "keys")
    new = DeviceKeys(Ed25519PrivateKey.generate(), keys.token_key, keys.vault_key, keys.k0)
    path = tmp_path / "live.db"
    with Journal.create(path, keys, terminal_id=TID, now=T0, checkpoint_every=4) as j:
        for i in range(10):
            j.append([("intent", f"R1:{i:032x}", {"amount": i + 1})], now=T0 + i)
        j.rotate_signing_key(new.signing_key, now=T0 + 20)
        j.append([("intent", f"R1:{99:032x}", {"amount": 5})], now=T0 + 21)
        j.checkpoint(T0 + 22)
        j.write_archive(tmp_path / "archive.db", now=T0 + 23)
        first, _ = j.restart_segment({f"R1:{3:032x}"}, now=T0 + 23, archive=str(tmp_path / "archive.db"))
        for i in range(6):
            j.append([("intent", f"R2:{i:032x}", {"amount": i + 1})], now=T0 + 30 + i)
    assert first > 1
    with Journal.open(path, new, terminal_id=TID) as j:
        assert j.entries_for(f"R1:{5:032x}")  # from the archive
    with Journal.open_exclusive(path, new, terminal_id=TID):
        pass
    assert verify_journal(path, k0=keys.k0, public_keys=[keys.public_key]).ok
    with pytest.raises(JournalError) as e:
        Journal.open(path, keys, terminal_id=TID)  # the old key no longer signs
    assert e.value.code == "JOURNAL_KEY_MISMATCH"
    cp = _cps(path)[0]
    _tamper(path, "UPDATE entries SET entry_hash = zeroblob(32) WHERE seq = ?", cp - 1)
    assert _broken_at(path, new) == cp


@pytest.mark.parametrize("what", ["open", "open_exclusive"])
def test_replay_and_daemon_refuse_a_tampered_journal(jf: tuple[Path, DeviceKeys], what: str) -> None:
    path, keys = jf
    last = _cps(path)[-1] + 1
    _tamper(path, "UPDATE entries SET ts = ts + 1 WHERE seq = ?", last)
    with pytest.raises(JournalError) as e:
        getattr(Journal, what)(path, keys, terminal_id=TID)
    assert e.value.code == "JOURNAL_CORRUPT" and isinstance(e.value, ChainBroken)


@pytest.mark.parametrize("window", [1, 2, 3, 5, 1024])
def test_start_up_checks_the_newest_checkpoints_across_a_rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  window: int) -> None:
    """Only the newest STARTUP_CHECKPOINTS checkpoints are checked (bounded start-up); a rotation
    before that window still moves the key chain on, one inside it is followed."""
    from guard.journal import startup
    monkeypatch.setattr(startup, "STARTUP_CHECKPOINTS", window)
    keys = init_keys(tmp_path / "keys")
    new = DeviceKeys(Ed25519PrivateKey.generate(), keys.token_key, keys.vault_key, keys.k0)
    path = tmp_path / "j.db"
    with Journal.create(path, keys, terminal_id=TID, now=T0, checkpoint_every=4) as j:
        for i in range(12):
            j.append([("intent", f"R1:{i:032x}", {"amount": i + 1})], now=T0 + i)
        j.rotate_signing_key(new.signing_key, now=T0 + 20)
        j.append([("intent", f"R1:{99:032x}", {"amount": 5})], now=T0 + 21)
        j.checkpoint(T0 + 22)
    with Journal.open(path, new, terminal_id=TID):
        pass
    cps = _cps(path)
    oldest = max(cps[-min(window, len(cps))], cps[1])  # the genesis checkpoint covers no entry
    (kind,) = attacker(path).execute("SELECT kind FROM entries WHERE seq = ?", (oldest - 1,)).fetchone()
    _tamper(path, "UPDATE entries SET entry_hash = zeroblob(32) WHERE seq = ?", oldest - 1)
    # a rotation record is always checked itself; any other entry shows through the checkpoint after it
    assert _broken_at(path, new) == (oldest - 1 if kind == "key_rotation" else oldest)


def test_daemon_reads_of_old_entries_and_archives_are_bounded(tmp_path: Path) -> None:
    """Beyond what start-up checks: an oversized old payload is JOURNAL_CORRUPT when read (not
    loaded), and an archive with a foreign schema is refused before its SQL runs."""
    keys = init_keys(tmp_path / "keys")
    path, archive = tmp_path / "live.db", tmp_path / "archive.db"
    with Journal.create(path, keys, terminal_id=TID, now=T0, checkpoint_every=4) as j:
        for i in range(8):
            j.append([("intent", f"R1:{i:032x}", {"amount": i + 1})], now=T0 + i)
        j.checkpoint(T0 + 9)
        j.write_archive(archive, now=T0 + 10)
        j.restart_segment(set(), now=T0 + 10, archive=str(archive))
        for i in range(8):
            j.append([("intent", f"R2:{i:032x}", {"amount": i + 1})], now=T0 + 20 + i)
    archive.chmod(0o600)
    c = attacker(archive)
    c.execute("ALTER TABLE entries RENAME TO e2")
    c.execute(RECURSIVE_VIEW)
    c.close()
    with Journal.open(path, keys, terminal_id=TID) as j:
        with pytest.raises(PosguardError) as e:
            j.entries_for(f"R1:{2:032x}")
        assert e.value.code == "ARCHIVE_UNAVAILABLE" and "unexpected" in str(e.value)
    seq = _cps(path)[0] + 2  # an entry before the newest checkpoints (start-up checks the link, not this payload)
    _tamper(path, "UPDATE entries SET payload = '{\"p\":\"' || CAST(zeroblob(?) AS TEXT) || '\"}' WHERE seq = ?",
            50_000_000, seq)
    with Journal.open(path, keys, terminal_id=TID) as j:
        with pytest.raises(JournalError) as e:
            list(j.entries())
        assert e.value.code == "JOURNAL_CORRUPT" and f"entry {seq}" in str(e.value)
