"""The journal: durability pragmas, append-only triggers, one commit per append, forward-secure
ratchet, checkpoints, the vault, schema versions and the entry format."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import guard.journal.schema as schema_mod
import guard.journal.store as journal_mod
from guard.core.constants import (
    CHECKPOINT_DOMAIN,
    GENESIS_HASH,
    JOURNAL_HASH_DOMAIN,
    JOURNAL_RATCHET_LABEL,
)
from guard.core.errors import JournalDurabilityError, JournalError
from guard.journal.format import AppendResult, VaultBlob, canonical_json, entry_body, seal_vault
from guard.journal.mac import HmacSha256, hmac_sha256, mac_and_next
from guard.journal.store import Journal
from guard.journal.keys import DeviceKeys, init_keys, load_keys
from guard.journal.verify import verify_journal
from tests.support import subprocess_env

TID = "TERM0001"
T0 = 1_700_000_000.0
PAN = "4111111111111111"


@pytest.fixture
def jpath(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


def _new(jpath: Path, keys: DeviceKeys, **kw: Any) -> Journal:
    return Journal.create(jpath, keys, terminal_id=TID, now=T0, **kw)


def _rec(i: int, kind: str = "intent") -> tuple[str, str, dict[str, Any]]:
    return (kind, f"R1:{i:032x}", {"amount": 100 + i, "currency": "978", "masked_pan": "411111******1111"})


def ref_keys(k0: bytes, n: int) -> list[bytes]:
    """k_1..k_n by the textbook definition (hmac.digest), independent of the journal's code."""
    ks = [k0]
    while len(ks) < n:
        ks.append(hmac.digest(ks[-1], JOURNAL_RATCHET_LABEL, "sha256"))
    return ks


def _files_bytes(jpath: Path) -> bytes:
    return b"".join(Path(f"{jpath}{s}").read_bytes() for s in ("", "-wal") if Path(f"{jpath}{s}").exists())


# --- durability pragmas ------------------------------------------------------------------------


def test_pragmas_read_back(jpath: Path, keys: DeviceKeys) -> None:
    with _new(jpath, keys) as j:
        c = j._conn
        assert c is not None
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert c.execute("PRAGMA secure_delete").fetchone()[0] == 1
        assert c.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert c.isolation_level is None


class _LyingConn:
    """A connection whose chosen pragma reads back a different value than SQLite holds."""

    def __init__(self, real: sqlite3.Connection, pragma: str, value: object) -> None:
        self._real, self._pragma, self._value = real, pragma, value

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.strip().lower() == f"pragma {self._pragma}":
            return self._real.execute("SELECT ?", (self._value,))
        return self._real.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.mark.parametrize(("pragma", "value"), [("synchronous", 1), ("synchronous", 0),
                                               ("journal_mode", "delete"), ("secure_delete", 0),
                                               ("foreign_keys", 0)])
def test_open_refuses_when_pragma_does_not_read_back(jpath: Path, keys: DeviceKeys, monkeypatch: pytest.MonkeyPatch,
                                                     pragma: str, value: object) -> None:
    _new(jpath, keys).close()
    real = journal_mod._connect
    monkeypatch.setattr(journal_mod, "_connect", lambda p, *, mode: _LyingConn(real(p, mode=mode), pragma, value))
    with pytest.raises(JournalDurabilityError) as e:
        Journal.open(jpath, keys, terminal_id=TID)
    assert e.value.code == "JOURNAL_NOT_DURABLE" and pragma in str(e.value)


def test_create_refuses_when_not_durable_and_leaves_no_file(jpath: Path, keys: DeviceKeys,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real = journal_mod._connect
    monkeypatch.setattr(journal_mod, "_connect", lambda p, *, mode: _LyingConn(real(p, mode=mode), "synchronous", 1))
    with pytest.raises(JournalDurabilityError):
        _new(jpath, keys)
    assert not jpath.exists()


# --- lifecycle and schema ----------------------------------------------------------------------


def test_create_refuses_existing_and_open_refuses_missing(jpath: Path, keys: DeviceKeys) -> None:
    with pytest.raises(JournalError) as e:
        Journal.open(jpath, keys, terminal_id=TID)
    assert e.value.code == "JOURNAL_MISSING"
    assert not jpath.exists()
    _new(jpath, keys).close()
    with pytest.raises(JournalError) as e:
        _new(jpath, keys)
    assert e.value.code == "JOURNAL_EXISTS"


def test_create_needs_k0(jpath: Path, keys: DeviceKeys) -> None:
    with pytest.raises(JournalError) as e:
        Journal.create(jpath, DeviceKeys(keys.signing_key, keys.token_key, keys.vault_key, None),
                       terminal_id=TID, now=T0)
    assert e.value.code == "JOURNAL_NO_K0"


def test_open_checks_terminal(jpath: Path, keys: DeviceKeys) -> None:
    _new(jpath, keys).close()
    with pytest.raises(JournalError) as e:
        Journal.open(jpath, keys, terminal_id="OTHER")
    assert e.value.code == "JOURNAL_TERMINAL_MISMATCH"


def test_open_refuses_another_devices_keys(jpath: Path, keys: DeviceKeys, tmp_path: Path) -> None:
    _new(jpath, keys).close()
    with pytest.raises(JournalError) as e:
        Journal.open(jpath, init_keys(tmp_path / "other"), terminal_id=TID)
    assert e.value.code == "JOURNAL_KEY_MISMATCH"


def test_schema_version_and_too_new(jpath: Path, keys: DeviceKeys) -> None:
    _new(jpath, keys).close()
    c = sqlite3.connect(jpath)
    assert c.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()[0] == "1"
    with c:
        c.execute("UPDATE meta SET v = '99' WHERE k = 'schema_version'")
    c.close()
    with pytest.raises(JournalError) as e:
        Journal.open(jpath, keys, terminal_id=TID)
    assert e.value.code == "JOURNAL_SCHEMA_TOO_NEW"


def test_migrate_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = sqlite3.connect(tmp_path / "m.db", isolation_level=None)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half (x)")
        raise RuntimeError("step failed")

    monkeypatch.setitem(schema_mod.MIGRATIONS, 1, broken)
    with pytest.raises(RuntimeError):
        schema_mod.migrate(c)
    assert c.execute("SELECT name FROM sqlite_master").fetchall() == []
    monkeypatch.undo()
    assert schema_mod.migrate(c) == 0
    assert schema_mod.schema_version(c) == 1
    assert schema_mod.migrate(c) == 1


def test_open_refuses_non_journal(tmp_path: Path, keys: DeviceKeys) -> None:
    p = tmp_path / "junk.db"
    p.write_bytes(os.urandom(8192))
    with pytest.raises(JournalError) as e:
        Journal.open(p, keys, terminal_id=TID)
    assert e.value.code == "JOURNAL_CORRUPT"
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    empty.touch()
    with pytest.raises(JournalError) as e:
        Journal.open(empty, keys, terminal_id=TID)
    assert e.value.code == "JOURNAL_NOT_INITIALISED"


def test_reopen_continues_the_chain(jpath: Path, keys: DeviceKeys) -> None:
    with _new(jpath, keys, checkpoint_every=4) as j:
        j.append([_rec(1), _rec(2)], now=T0 + 1)
        last = j.last_seq
    with Journal.open(jpath, keys, terminal_id=TID, checkpoint_every=4) as j:
        assert j.last_seq == last
        j.append([_rec(3)], now=T0 + 2)
        j.append([_rec(4)], now=T0 + 3)
        assert [e.payload.get("amount") for e in j.entries(last)][:2] == [103, 104]
        assert j.integrity_check() == [] and j.integrity_check(full=True) == []
    rep = verify_journal(jpath, k0=keys.k0, public_key=keys.public_key)
    assert rep.ok, rep


def test_closed_journal_refuses(jpath: Path, keys: DeviceKeys) -> None:
    j = _new(jpath, keys)
    j.close()
    with pytest.raises(JournalError) as e:
        j.append([_rec(1)], now=T0)
    assert e.value.code == "JOURNAL_CLOSED"


# --- append-only --------------------------------------------------------------------------------


def test_triggers_refuse_update_and_delete(jpath: Path, keys: DeviceKeys) -> None:
    with _new(jpath, keys) as j:
        j.append([_rec(1)], now=T0)
    c = sqlite3.connect(jpath)
    for sql in ("UPDATE entries SET payload = '{}' WHERE seq = 2", "DELETE FROM entries WHERE seq = 2",
                "DELETE FROM entries", "DELETE FROM ratchet"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only|cannot be deleted"):
            c.execute(sql)
    with pytest.raises(sqlite3.IntegrityError):
        c.execute("INSERT INTO ratchet (id, next_seq, key) VALUES (2, 1, x'00')")
    assert c.execute("SELECT count(*) FROM entries").fetchone()[0] == 2
    c.close()


# --- one commit per append ------------------------------------------------------------------------


def test_append_is_one_commit_with_records_vault_and_ratchet(jpath: Path, keys: DeviceKeys) -> None:
    with _new(jpath, keys) as j:
        assert j.commit_count == 0 and j.last_seq == 1
        blob = j.seal_vault("R1:a", PAN.encode())
        res = j.append([("intent", "R1:a", {"vault_ref": blob.ref}), ("stan_use", None, {"stan": 7})],
                       now=T0 + 1, vault_put=[blob])
        assert res == AppendResult((2, 3), None)
        assert j.commit_count == 1
        res = j.append([("outcome", "R1:a", {"state": "APPROVED"})], now=T0 + 2, vault_shred=[blob.ref])
        assert res.seqs == (4,) and j.commit_count == 2
        assert [(e.seq, e.kind, e.txn) for e in j.entries(1)] == [
            (2, "intent", "R1:a"), (3, "stan_use", None), (4, "outcome", "R1:a")]
        assert j._conn is not None
        assert j._conn.execute("SELECT next_seq FROM ratchet").fetchone()[0] == 5


def _state(jpath: Path) -> tuple[Any, ...]:
    c = sqlite3.connect(jpath)
    try:
        return (c.execute("SELECT count(*), max(seq) FROM entries").fetchone(),
                c.execute("SELECT next_seq, key FROM ratchet").fetchone(),
                sorted(c.execute("SELECT ref FROM vault").fetchall()))
    finally:
        c.close()


def test_failure_mid_transaction_leaves_nothing(jpath: Path, keys: DeviceKeys) -> None:
    with _new(jpath, keys) as j:
        blob = j.seal_vault("R1:a", b"card")
        j.append([_rec(1)], now=T0, vault_put=[blob])
        before, mem = _state(jpath), (j.last_seq, j.last_hash, j.commit_count)
        with pytest.raises(sqlite3.IntegrityError):  # the vault insert fails after the entries went in
            j.append([_rec(2), _rec(3)], now=T0 + 1, vault_put=[j.seal_vault("R1:b", b"x"), blob])
        assert _state(jpath) == before and (j.last_seq, j.last_hash, j.commit_count) == mem

        def boom(cur: sqlite3.Cursor) -> None:
            raise RuntimeError("power cut just before COMMIT")

        j._commit = boom  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            j.append([_rec(4)], now=T0 + 2, vault_shred=[blob.ref])
        assert _state(jpath) == before and (j.last_seq, j.last_hash, j.commit_count) == mem
        del j._commit
        with pytest.raises(JournalError) as e:  # a failed COMMIT is fail-stop: state on disk is unknown
            j.append([_rec(5)], now=T0 + 3)
        assert e.value.code == "JOURNAL_FAILED"
    with Journal.open(jpath, keys, terminal_id=TID) as j:
        assert j.vault_refs() == {blob.ref}
        j.append([_rec(5)], now=T0 + 3)
    assert verify_journal(jpath, k0=keys.k0, public_key=keys.public_key).ok


def test_sigkill_before_commit_loses_the_whole_append(jpath: Path, keys: DeviceKeys, tmp_path: Path) -> None:
    with _new(jpath, keys) as j:
        j.append([_rec(1)], now=T0)
    before = _state(jpath)
    child = f"""
import os, signal
from pathlib import Path
from guard.journal.store import Journal
from guard.journal.keys import load_keys
j = Journal.open(Path({str(jpath)!r}), load_keys(Path({str(tmp_path / "keys")!r})), terminal_id={TID!r})
j._commit = lambda cur: os.kill(os.getpid(), signal.SIGKILL)
b = j.seal_vault("R1:z", b"card")
j.append([("intent", "R1:z", {{"vault_ref": b.ref}}), ("stan_use", None, {{"stan": 9}})], now={T0 + 5}, vault_put=[b])
"""
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60, check=False, env=subprocess_env())
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    assert _state(jpath) == before
    with Journal.open(jpath, keys, terminal_id=TID) as j:
        j.append([_rec(2)], now=T0 + 6)
    assert verify_journal(jpath, k0=keys.k0, public_key=keys.public_key).ok


# --- records are validated before anything is written ----------------------------------------


@pytest.mark.parametrize("records", [
    [("intent", "R1:a", {"pan": PAN})],
    [("intent", "R1:a", {"track2": f";{PAN}=2512101?"})],
    [("intent", "R1:a", {"spaced": "4111 1111 1111 1111"})],
    [("intent", "R1:a", {"as_number": int(PAN)})],
    [("intent", "R1:a", {"nested": {"list": ["x", PAN]}})],
    [("intent", f"R1:{PAN}", {})],
    [("intent", "R1:a", {"card_token": PAN})],  # the bug this check exists for
    [("intent", "R1:a", {"vault_ref": PAN, "fp": "ab" * 16})],
    [("intent", "R1:a", {"ok": 1}), ("outcome", "R1:a", {"pan": "5500005555555559"})],
])
def test_payload_with_card_number_is_refused_without_echoing_it(jpath: Path, keys: DeviceKeys,
                                                                records: list[Any]) -> None:
    with _new(jpath, keys) as j:
        with pytest.raises(JournalError) as e:
            j.append(records, now=T0)
        assert e.value.code == "JOURNAL_BAD_RECORD"
        assert re.search(r"\d{4}", str(e.value)) is None, "the message must not carry card digits"
        assert j.last_seq == 1 and j.commit_count == 0


def test_clean_txn_cache_is_per_journal(tmp_path: Path, keys: DeviceKeys) -> None:
    """A txn key scanned clean by one journal is not trusted by another (no process-global state)."""
    with _new(tmp_path / "a.db", keys) as a, _new(tmp_path / "b.db", keys) as b:
        a.append([("intent", "R1:shared", {"ok": 1})], now=T0)
        assert "R1:shared" in a._clean_txns and not b._clean_txns
        with pytest.raises(JournalError) as e:
            b.append([("intent", f"R1:{PAN}", {})], now=T0)
        assert e.value.code == "JOURNAL_BAD_RECORD" and PAN not in b._clean_txns


@pytest.mark.parametrize("payload", [
    {"masked_pan": "411111******1111", "card_token": "0123456789abcdef0123456789abcdef"},
    {"rrn": "123456789012", "stan": 999999, "f7": "1122120000", "amount": 999999999999},
    {"not_luhn": "4111111111111112"},
    {"ts": 0.4111111111111111},
    {"42": "411111111111116"},  # a 15-digit merchant id is allowed under its field
    {"code": "HOST_BAD_LENGTH", "digest": "4111111111111111"},  # an all-decimal 16-hex digest
    {"long_id": "41111111111111111111111"},
])
def test_payloads_without_card_numbers_pass(jpath: Path, keys: DeviceKeys, payload: dict[str, Any]) -> None:
    with _new(jpath, keys) as j:
        j.append([("intent", "R1:a", payload)], now=T0)


@pytest.mark.parametrize(("records", "now"), [
    ([], T0),
    ([("intent", "R1:a", {"b": b"bytes"})], T0),
    ([("intent", "R1:a", {"nan": math.nan})], T0),
    ([("intent", "R1:a", ["not", "a", "dict"])], T0),
    ([("checkpoint", None, {})], T0),
    ([("Bad Kind", None, {})], T0),
    ([("intent", 42, {})], T0),
    ([("intent", "R1:a")], T0),
    ([("intent", "R1:a", {})], math.inf),
])
def test_bad_records_rejected(jpath: Path, keys: DeviceKeys, records: list[Any], now: float) -> None:
    with _new(jpath, keys) as j:
        with pytest.raises(JournalError) as e:
            j.append(records, now=now)
        assert e.value.code == "JOURNAL_BAD_RECORD"


# --- hash chain and forward-secure MACs -----------------------------------------------------------


def test_entries_hash_and_mac_by_the_documented_formula(jpath: Path, keys: DeviceKeys) -> None:
    with _new(jpath, keys, checkpoint_every=3) as j:
        for i in range(7):
            j.append([_rec(i)], now=T0 + i)
        entries = list(j.entries())
    assert keys.k0 is not None
    ks = ref_keys(keys.k0, len(entries))
    prev = GENESIS_HASH
    for e, k in zip(entries, ks):
        body = {"ts": e.ts, "kind": e.kind, "txn": e.txn, "payload": e.payload}
        h = hashlib.sha256(JOURNAL_HASH_DOMAIN + e.seq.to_bytes(8, "big") + prev + canonical_json(body).encode()).digest()
        assert e.entry_hash == h
        assert e.mac == hmac.digest(k, h, "sha256")
        prev = h


def _on_disk(key: bytes, data: bytes) -> bool:
    return key in data or key.hex().encode() in data or key.hex().upper().encode() in data


def test_forward_security_ratchet_holds_only_the_next_key(jpath: Path, keys: DeviceKeys) -> None:
    assert keys.k0 is not None
    with _new(jpath, keys, checkpoint_every=10) as j:
        for i in range(18):  # genesis 1, entries 2-11, checkpoint 12 (WAL sealed), entries 13-20
            j.append([_rec(i)], now=T0 + i)
        n = j.last_seq
        assert n == 20
        assert j._conn is not None
        rows = j._conn.execute("SELECT id, next_seq, key FROM ratchet").fetchall()
        ks = ref_keys(keys.k0, n + 1)
        assert rows == [(1, n + 1, ks[n])]  # k_{n+1}: the key for the next entry, nothing older
        data = _files_bytes(jpath)
        assert not _on_disk(keys.k0, data), "k0 must never reach the journal file"
        sealed = [i + 1 for i, k in enumerate(ks[:12]) if _on_disk(k, data)]
        assert sealed == [], f"keys k_{sealed} survived the checkpoint's WAL seal"
    data = _files_bytes(jpath)  # close() seals again: only the current key remains
    lingering = [i + 1 for i, k in enumerate(ks[:n]) if _on_disk(k, data)]
    assert lingering == [], f"superseded ratchet keys k_{lingering} still on disk"
    assert _on_disk(ks[n], data)
    assert verify_journal(jpath, k0=keys.k0).ok


def test_old_ratchet_keys_linger_in_wal_until_sealed(jpath: Path, keys: DeviceKeys) -> None:
    """Why seal_wal exists: each commit appends a page image holding that moment's ratchet key."""
    assert keys.k0 is not None
    j = _new(jpath, keys)
    j.wal_truncate_on_checkpoint = False
    for i in range(10):
        j.append([_rec(i)], now=T0 + i)
    ks = ref_keys(keys.k0, j.last_seq)
    assert sum(k in _files_bytes(jpath) for k in ks[1:]) >= 5
    assert j.seal_wal()
    assert not any(k in _files_bytes(jpath) for k in ks)
    j.close()


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_mac_and_next_is_hmac_sha256(key: bytes, h: bytes) -> None:
    assert mac_and_next(key, h) == (hmac.digest(key, h, "sha256"), hmac.digest(key, JOURNAL_RATCHET_LABEL, "sha256"))


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=150), st.binary(max_size=100))
def test_hmac_sha256_and_prepared_key_equal_hmac_digest(key: bytes, msg: bytes) -> None:
    """Any key length (empty, < block, = block, > block: hashed first) gives ``hmac.digest``'s value."""
    ref = hmac.digest(key, msg, "sha256")
    assert hmac_sha256(key, msg) == ref
    assert HmacSha256(key).digest(msg) == ref


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False), st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True),
       st.none() | st.text(max_size=40), st.dictionaries(st.text(max_size=8), _json, max_size=5))
def test_entry_body_is_canonical_json_of_the_entry(ts: float, kind: str, txn: str | None,
                                                   payload: dict[str, Any]) -> None:
    text = canonical_json(payload)
    whole = json.dumps({"ts": ts, "kind": kind, "txn": txn, "payload": payload},
                       sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert entry_body(ts, kind, txn, text) == whole.encode()


# --- checkpoints --------------------------------------------------------------------------------------


def _check_sig(keys: DeviceKeys, cp: dict[str, Any]) -> None:
    signed = {k: cp[k] for k in ("terminal", "covers_seq", "covers_hash", "time", "counter")}
    keys.public_key.verify(bytes.fromhex(cp["sig"]), CHECKPOINT_DOMAIN + canonical_json(signed).encode())


def test_genesis_checkpoint(jpath: Path, keys: DeviceKeys) -> None:
    with _new(jpath, keys) as j:
        (e,) = list(j.entries())
        assert (e.seq, e.kind, e.txn) == (1, "checkpoint", None)
        assert e.payload["covers_seq"] == 0 and e.payload["covers_hash"] == GENESIS_HASH.hex()
        assert e.payload["counter"] == 1 and e.payload["terminal"] == TID and e.payload["time"] == T0
        assert j.latest_checkpoint() == e.payload
        _check_sig(keys, e.payload)


def test_checkpoint_every_n_entries_rides_in_the_same_commit(jpath: Path, keys: DeviceKeys) -> None:
    with _new(jpath, keys, checkpoint_every=5) as j:
        results = [j.append([_rec(i)], now=T0 + i) for i in range(12)]
        assert j.commit_count == 12
        cps = [r.checkpoint_seq for r in results if r.checkpoint_seq is not None]
        assert cps == [7, 13]  # genesis at 1; entries 2..6 -> checkpoint 7; 8..12 -> 13
        assert results[4] == AppendResult((6,), 7)
        entries = {e.seq: e for e in j.entries()}
        for c in cps:
            cp = entries[c].payload
            assert cp["covers_seq"] == c - 1 and cp["covers_hash"] == entries[c - 1].entry_hash.hex()
            _check_sig(keys, cp)
        assert [entries[c].payload["counter"] for c in cps] == [2, 3]
        anchor = j.latest_checkpoint()
        assert anchor == entries[13].payload and json.loads(json.dumps(anchor)) == anchor
        big = j.append([_rec(100 + i) for i in range(11)], now=T0 + 50)
        assert big.seqs == tuple(range(16, 27)) and big.checkpoint_seq == 27 and j.commit_count == 13
    assert verify_journal(jpath, k0=keys.k0, public_key=keys.public_key, anchor=anchor).ok


def test_idle_checkpoints_by_time(jpath: Path, keys: DeviceKeys) -> None:
    with _new(jpath, keys, checkpoint_interval_s=60) as j:
        assert not j.maybe_checkpoint(T0 + 59)
        assert j.commit_count == 0
        assert j.maybe_checkpoint(T0 + 60)
        assert j.commit_count == 1 and j.last_seq == 2
        assert not j.maybe_checkpoint(T0 + 100)
        assert j.maybe_checkpoint(T0 + 125)  # idle: still sealed, covering the previous checkpoint
        cp = j.latest_checkpoint()
        assert (cp["covers_seq"], cp["counter"], cp["time"]) == (2, 3, T0 + 125)
        r = j.append([_rec(1)], now=T0 + 200)  # a due checkpoint also rides along with an append
        assert r.checkpoint_seq == 5 and j.commit_count == 3
        assert j.checkpoint(T0 + 201) == 6
    rep = verify_journal(jpath, k0=keys.k0, public_key=keys.public_key)
    assert rep.ok and rep.checkpoints == 5


# --- the vault ------------------------------------------------------------------------------------------


def test_vault_round_trip_shred_and_verify(jpath: Path, keys: DeviceKeys) -> None:
    plaintext = f"{PAN}|2512".encode()
    with _new(jpath, keys) as j:
        blob = j.seal_vault("R1:a", plaintext)
        assert blob.ref == hashlib.sha256(blob.nonce + blob.ct).hexdigest() and len(blob.nonce) == 12
        assert PAN not in repr(blob)
        others = [j.seal_vault(f"R1:{c}", os.urandom(24)) for c in "bc"]
        j.append([("intent", b.txn, {"vault_ref": b.ref}) for b in (blob, *others)], now=T0,
                 vault_put=[blob, *others])
        assert j.vault_open(blob.ref) == plaintext and j.vault_refs() == {b.ref for b in (blob, *others)}
        assert PAN.encode() not in _files_bytes(jpath)
        j.append([("outcome", "R1:a", {"state": "APPROVED"})], now=T0 + 1, vault_shred=[blob.ref])
        assert j.vault_open(blob.ref) is None and j.vault_refs() == {b.ref for b in others}
        assert j.seal_wal()
        data = _files_bytes(jpath)
        assert all(b.ct in data for b in others)  # the scan does see live blobs...
        assert blob.ct not in data, "...and the shredded one is gone (secure_delete + sealed WAL)"
        assert PAN.encode() not in data
    c = sqlite3.connect(jpath)
    dump = "\n".join(c.iterdump())
    c.close()
    assert PAN not in dump and blob.ref in dump  # the signed intent still references the blob
    rep = verify_journal(jpath, k0=keys.k0, public_key=keys.public_key)
    assert rep.ok, rep


def test_vault_blob_is_bound_to_its_transaction(jpath: Path, keys: DeviceKeys) -> None:
    with _new(jpath, keys) as j:
        blob = j.seal_vault("R1:a", b"card")
        j.append([("intent", "R1:a", {"vault_ref": blob.ref})], now=T0, vault_put=[blob])
        assert j._conn is not None
        j._conn.execute("UPDATE vault SET txn = 'R1:b'")
        with pytest.raises(JournalError) as e:
            j.vault_open(blob.ref)
        assert e.value.code == "VAULT_CORRUPT"


def test_vault_put_requires_a_sealed_blob(jpath: Path, keys: DeviceKeys) -> None:
    other = seal_vault(os.urandom(32), "R1:a", b"card")
    forged = VaultBlob("00" * 32, other.txn, other.nonce, other.ct)
    with _new(jpath, keys) as j:
        with pytest.raises(JournalError) as e:
            j.append([_rec(1)], now=T0, vault_put=[forged])
        assert e.value.code == "JOURNAL_BAD_RECORD"


# --- verification is read-only ----------------------------------------------------------------------


def test_verify_never_writes(jpath: Path, keys: DeviceKeys) -> None:
    with _new(jpath, keys) as j:
        j.append([_rec(1)], now=T0)
    before = jpath.read_bytes()
    seen: list[tuple[int, int]] = []
    rep = verify_journal(jpath, k0=keys.k0, public_key=keys.public_key, progress=lambda a, b: seen.append((a, b)))
    assert rep.ok and rep.entries == 2 and seen[-1] == (2, 2)
    assert jpath.read_bytes() == before
    assert not Path(f"{jpath}-wal").exists() or Path(f"{jpath}-wal").stat().st_size == 0


def test_verify_while_the_journal_is_open_and_growing(jpath: Path, keys: DeviceKeys) -> None:
    with _new(jpath, keys, checkpoint_every=4) as j:
        for i in range(9):
            j.append([_rec(i)], now=T0 + i)
        assert verify_journal(jpath, k0=keys.k0, public_key=keys.public_key).ok
        j.append([_rec(99)], now=T0 + 99)
        rep = verify_journal(jpath, k0=keys.k0, public_key=keys.public_key, anchor=j.latest_checkpoint())
        assert rep.ok and rep.entries == j.last_seq


def test_keys_reloaded_from_disk_work(jpath: Path, keys: DeviceKeys, tmp_path: Path) -> None:
    _new(jpath, keys).close()
    with Journal.open(jpath, load_keys(tmp_path / "keys"), terminal_id=TID) as j:
        j.checkpoint(T0 + 1)
    assert verify_journal(jpath, k0=keys.k0, public_key=keys.public_key).ok
