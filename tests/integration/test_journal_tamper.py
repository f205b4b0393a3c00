"""Tampering with a journal file: each attack yields its own reason code and the first bad seq.

The attacker can drop the append-only triggers and knows the entry format (it is public); they
lack k0 (escrowed) and, unless a test says otherwise, the signing key.

Template layout (checkpoint every 8 entries): seq 1 genesis checkpoint, 2-9 records, 10 checkpoint,
11-18, 19 cp, 20-27, 28 cp, 29-36, 37 cp, 38-45, 46 cp (last).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guard.journal.format import (
    canonical_json,
    checkpoint_message,
    entry_body,
    entry_hash,
)
from guard.journal.store import Journal
from guard.journal.keys import DeviceKeys, init_keys
from guard.journal.verify import VerifyReport, verify_journal

TID = "TERM0001"
T0 = 1_700_000_000.0
LAST = 46
CPS = (1, 10, 19, 28, 37, 46)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DeviceKeys]:
    d = tmp_path_factory.mktemp("tamper")
    keys = init_keys(d / "keys")
    with Journal.create(d / "template.db", keys, terminal_id=TID, now=T0, checkpoint_every=8) as j:
        for i in range(40):
            j.append([_rec(i)], now=T0 + i)
        assert j.last_seq == LAST
        assert [e.seq for e in j.entries() if e.kind == "checkpoint"] == list(CPS)
    return d / "template.db", keys


@pytest.fixture
def jf(template: tuple[Path, DeviceKeys], tmp_path: Path) -> tuple[Path, DeviceKeys]:
    path = tmp_path / "journal.db"
    shutil.copy(template[0], path)
    return path, template[1]


def _rec(i: int) -> tuple[str, str, dict[str, Any]]:
    return ("intent", f"R1:{i:032x}", {"amount": 100 + i, "stan": i + 1, "masked_pan": "411111******1111"})


def full(path: Path, keys: DeviceKeys, **kw: Any) -> VerifyReport:
    return verify_journal(path, k0=keys.k0, public_key=keys.public_key, **kw)


def bare(path: Path, **kw: Any) -> VerifyReport:
    return verify_journal(path, **kw)


def expect(rep: VerifyReport, reason: str, seq: int | None) -> None:
    assert (rep.ok, rep.reason, rep.first_bad_seq) == (False, reason, seq), rep


def anchor_at(path: Path, cp_seq: int) -> dict[str, Any]:
    c = sqlite3.connect(path)
    try:
        payload: dict[str, Any] = json.loads(c.execute("SELECT payload FROM entries WHERE seq = ?", (cp_seq,)).fetchone()[0])
        return payload
    finally:
        c.close()


# --- the attacker's toolbox ---------------------------------------------------------------------


def attacker(path: Path) -> sqlite3.Connection:
    c = sqlite3.connect(path, isolation_level=None)
    for t in ("entries_no_update", "entries_no_delete", "ratchet_no_delete"):
        c.execute(f"DROP TRIGGER {t}")
    return c


def row(c: sqlite3.Connection, seq: int) -> dict[str, Any]:
    cur = c.execute("SELECT * FROM entries WHERE seq = ?", (seq,))
    return dict(zip([d[0] for d in cur.description], cur.fetchone()))


def recompute(r: dict[str, Any], seq: int | None = None) -> bytes:
    return entry_hash(r["seq"] if seq is None else seq, r["prev_hash"],
                      entry_body(r["ts"], r["kind"], r["txn"], r["payload"]))


def set_payload(c: sqlite3.Connection, seq: int, **changes: Any) -> None:
    p = json.loads(row(c, seq)["payload"]) | changes
    c.execute("UPDATE entries SET payload = ? WHERE seq = ?", (canonical_json(p), seq))


def rehash(c: sqlite3.Connection, seq: int) -> bytes:
    h = recompute(row(c, seq))
    c.execute("UPDATE entries SET entry_hash = ? WHERE seq = ?", (h, seq))
    return h


def rehash_from(c: sqlite3.Connection, start: int, signing_key: Ed25519PrivateKey | None = None) -> None:
    """Recompute the chain from ``start`` (no MAC key); fix checkpoints, re-signing only with a stolen key."""
    last = c.execute("SELECT max(seq) FROM entries").fetchone()[0]
    prev = row(c, start)["prev_hash"]
    for seq in range(start, last + 1):
        r = row(c, seq)
        r["prev_hash"] = prev
        if r["kind"] == "checkpoint":
            cp = json.loads(r["payload"]) | {"covers_hash": prev.hex()}
            if signing_key is not None:
                cp["sig"] = signing_key.sign(checkpoint_message(cp)).hex()
            r["payload"] = canonical_json(cp)
        h = recompute(r)
        c.execute("UPDATE entries SET prev_hash = ?, payload = ?, entry_hash = ? WHERE seq = ?",
                  (prev, r["payload"], h, seq))
        prev = h


def shift_up(c: sqlite3.Connection, from_seq: int) -> None:
    c.execute("UPDATE entries SET seq = -seq WHERE seq >= ?", (from_seq,))
    c.execute("UPDATE entries SET seq = 1 - seq WHERE seq < 0")
    c.execute("UPDATE ratchet SET next_seq = next_seq + 1")


def insert(c: sqlite3.Connection, seq: int, prev: bytes, payload: dict[str, Any] | None = None) -> None:
    r = {"seq": seq, "ts": T0 + 0.5, "kind": "outcome", "txn": "R1:evil", "prev_hash": prev,
         "payload": canonical_json(payload or {"state": "APPROVED"})}
    c.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
              (seq, r["ts"], r["kind"], r["txn"], r["payload"], prev, recompute(r), os.urandom(32)))


# --- modification -------------------------------------------------------------------------------


@pytest.mark.parametrize("change", [
    "UPDATE entries SET payload = '{\"amount\":1,\"masked_pan\":\"411111******1111\",\"stan\":4}' WHERE seq = 5",
    "UPDATE entries SET ts = ts + 1 WHERE seq = 5",
    "UPDATE entries SET kind = 'outcome' WHERE seq = 5",
    "UPDATE entries SET txn = 'R1:other' WHERE seq = 5",
    "UPDATE entries SET txn = NULL WHERE seq = 5",
    "UPDATE entries SET prev_hash = zeroblob(32) WHERE seq = 5",
    "UPDATE entries SET entry_hash = zeroblob(32) WHERE seq = 5",
])
def test_modified_entry(jf: tuple[Path, DeviceKeys], change: str) -> None:
    path, keys = jf
    attacker(path).execute(change)
    expect(full(path, keys), "ENTRY_MODIFIED", 5)
    expect(bare(path), "ENTRY_MODIFIED", 5)


def test_modified_checkpoint_payload(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    set_payload(attacker(path), 19, time=T0)
    expect(full(path, keys), "ENTRY_MODIFIED", 19)


def test_modified_and_rehashed_entry(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    c = attacker(path)
    set_payload(c, 5, amount=1)
    rehash(c, 5)
    expect(full(path, keys), "MAC_INVALID", 5)  # with k0 the rewritten entry itself is caught
    expect(bare(path), "CHAIN_BROKEN", 6)  # without it, only the dangling link to the old hash shows


# --- deletion -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [2, 5, 10, 45])
def test_deleted_entry(jf: tuple[Path, DeviceKeys], seq: int) -> None:
    path, keys = jf
    attacker(path).execute("DELETE FROM entries WHERE seq = ?", (seq,))
    expect(full(path, keys), "ENTRY_MISSING", seq)
    expect(bare(path), "ENTRY_MISSING", seq)


def test_deleted_first_entry(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    attacker(path).execute("DELETE FROM entries WHERE seq = 1")
    expect(full(path, keys), "ENTRY_MISSING", 1)


def test_deleted_entries_with_renumbering(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    c = attacker(path)
    c.execute("DELETE FROM entries WHERE seq IN (5, 6)")
    c.execute("UPDATE entries SET seq = seq - 2 WHERE seq > 6")
    c.execute("UPDATE ratchet SET next_seq = next_seq - 2")
    expect(full(path, keys), "ENTRY_MISSING", 5)
    rep = bare(path)
    expect(rep, "ENTRY_MISSING", 5)
    assert "5..6" in rep.detail


# --- insertion ----------------------------------------------------------------------------------


def test_inserted_entry_linked_into_the_chain(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    c = attacker(path)
    shift_up(c, 5)
    insert(c, 5, row(c, 4)["entry_hash"])
    expect(full(path, keys), "ENTRY_INSERTED", 5)  # caught by its MAC
    expect(bare(path), "ENTRY_INSERTED", 5)  # caught one later: the old entry 5 now sits at 6


def test_inserted_entry_linking_to_nothing(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    c = attacker(path)
    shift_up(c, 5)
    insert(c, 5, os.urandom(32))
    expect(full(path, keys), "ENTRY_INSERTED", 5)
    expect(bare(path), "ENTRY_INSERTED", 5)


def test_inserted_entry_at_the_tail(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    c = attacker(path)
    insert(c, LAST + 1, row(c, LAST)["entry_hash"])
    expect(full(path, keys), "ENTRY_INSERTED", LAST + 1)
    expect(bare(path), "ENTRY_INSERTED", LAST + 1)  # beyond the ratchet state, even without k0


def test_replayed_copy_of_an_earlier_entry(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    c = attacker(path)
    shift_up(c, 20)
    r = row(c, 3)
    c.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
              (20, r["ts"], r["kind"], r["txn"], r["payload"], r["prev_hash"], r["entry_hash"], r["mac"]))
    rep = full(path, keys)
    expect(rep, "ENTRY_INSERTED", 20)
    assert "copy of entry 3" in rep.detail
    expect(bare(path), "ENTRY_INSERTED", 20)


# --- reordering ---------------------------------------------------------------------------------


def _swap(c: sqlite3.Connection, a: int, b: int) -> None:
    c.execute("UPDATE entries SET seq = -1 WHERE seq = ?", (a,))
    c.execute("UPDATE entries SET seq = ? WHERE seq = ?", (a, b))
    c.execute("UPDATE entries SET seq = ? WHERE seq = -1", (b,))


@pytest.mark.parametrize(("a", "b"), [(5, 6), (5, 30), (2, 45), (10, 11)])
def test_reordered_entries(jf: tuple[Path, DeviceKeys], a: int, b: int) -> None:
    path, keys = jf
    _swap(attacker(path), a, b)
    expect(full(path, keys), "ENTRY_REORDERED", a)
    expect(bare(path), "ENTRY_REORDERED", a)


# --- MACs ---------------------------------------------------------------------------------------


def test_forged_mac(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    attacker(path).execute("UPDATE entries SET mac = ? WHERE seq = 7", (os.urandom(32),))
    expect(full(path, keys), "MAC_INVALID", 7)
    assert bare(path).ok  # MACs are only checkable with k0


def test_whole_chain_recomputed_without_the_key(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    c = attacker(path)
    set_payload(c, 5, amount=1)
    rehash_from(c, 5)
    expect(full(path, keys), "MAC_INVALID", 5)
    expect(verify_journal(path, public_key=keys.public_key), "CHECKPOINT_INVALID", 10)
    assert bare(path).ok  # a consistent rewrite: only keys or an anchor can tell


def test_whole_chain_rewritten_with_a_stolen_signing_key(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    anchor = anchor_at(path, 46)  # the host holds the newest checkpoint (covers 45)
    c = attacker(path)
    set_payload(c, 40, amount=1)
    rehash_from(c, 40, keys.signing_key)
    assert verify_journal(path, public_key=keys.public_key).ok
    expect(verify_journal(path, public_key=keys.public_key, anchor=anchor), "FORKED", 45)
    expect(full(path, keys, anchor=anchor), "MAC_INVALID", 40)


# --- checkpoints --------------------------------------------------------------------------------


def test_bad_checkpoint_signature(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    c = attacker(path)
    sig = json.loads(row(c, 19)["payload"])["sig"]
    set_payload(c, 19, sig=("0" if sig[0] != "0" else "1") + sig[1:])
    rehash_from(c, 19)
    expect(verify_journal(path, public_key=keys.public_key), "CHECKPOINT_INVALID", 19)


def test_checkpoint_counter_rewound_with_a_stolen_signing_key(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    c = attacker(path)
    set_payload(c, 28, counter=2)
    rehash_from(c, 28, keys.signing_key)
    rep = verify_journal(path, public_key=keys.public_key)
    expect(rep, "CHECKPOINT_INVALID", 28)
    assert "counter" in rep.detail


def test_checkpoint_signed_with_another_key(jf: tuple[Path, DeviceKeys], tmp_path: Path) -> None:
    path, keys = jf
    with Journal.open(path, keys, terminal_id=TID) as j:
        j._signing_key = Ed25519PrivateKey.generate()  # the signing key was swapped under a running guard
        j.append([_rec(100)], now=T0 + 100)
        cp = j.checkpoint(T0 + 101)
    expect(full(path, keys), "CHECKPOINT_INVALID", cp)  # MACs are fine: the ratchet was on the device


# --- truncation, rollback and anchors --------------------------------------------------------------


def test_truncated_tail_against_an_anchor(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    anchor = anchor_at(path, 46)
    c = attacker(path)
    c.execute("DELETE FROM entries WHERE seq > 30")
    expect(full(path, keys, anchor=anchor), "TRUNCATED", 31)
    c.execute("UPDATE ratchet SET next_seq = 31")  # hide it from the ratchet state too
    expect(verify_journal(path, anchor=anchor), "TRUNCATED", 31)
    expect(full(path, keys), "RATCHET_MISMATCH", 31)  # no anchor: k0 shows the ratchet is not k_31
    assert bare(path).ok  # no keys, no anchor: undetectable (why anchors exist)


def test_truncated_tail_without_anchor_shows_in_ratchet_state(jf: tuple[Path, DeviceKeys]) -> None:
    path, _ = jf
    attacker(path).execute("DELETE FROM entries WHERE seq > 30")
    expect(bare(path), "TRUNCATED", 31)


def test_rolled_back_and_continued(jf: tuple[Path, DeviceKeys], tmp_path: Path) -> None:
    path, keys = jf
    backup = tmp_path / "backup.db"
    shutil.copy(path, backup)  # the attacker keeps a copy of the journal (and the device keys)
    with Journal.open(path, keys, terminal_id=TID, checkpoint_every=8) as j:
        for i in range(20):
            j.append([_rec(200 + i)], now=T0 + 200 + i)
        anchor = j.latest_checkpoint()  # sent to the host
    shutil.copy(backup, path)  # roll back: undo the last 20 sales
    with Journal.open(path, keys, terminal_id=TID, checkpoint_every=8) as j:
        for i in range(30):
            j.append([("intent", f"R9:{i:032x}", {"amount": 1})], now=T0 + 300 + i)
    assert full(path, keys).ok  # self-consistent: every key was on the device
    expect(full(path, keys, anchor=anchor), "FORKED", anchor["covers_seq"])


def test_rolled_back_without_continuing(jf: tuple[Path, DeviceKeys], tmp_path: Path) -> None:
    path, keys = jf
    backup = tmp_path / "backup.db"
    shutil.copy(path, backup)
    with Journal.open(path, keys, terminal_id=TID) as j:
        j.checkpoint(T0 + 500)
        j.checkpoint(T0 + 501)
        anchor = j.latest_checkpoint()  # covers LAST + 1
    shutil.copy(backup, path)
    expect(full(path, keys, anchor=anchor), "TRUNCATED", LAST + 1)


@pytest.mark.parametrize("mutate", [
    lambda a: a | {"sig": "00" * 64},
    lambda a: a | {"covers_hash": "11" * 32},
    lambda a: a | {"covers_seq": a["covers_seq"] - 1},
    lambda a: {k: v for k, v in a.items() if k != "sig"},
    lambda a: a | {"covers_seq": "45"},
])
def test_invalid_anchor(jf: tuple[Path, DeviceKeys], mutate: Any) -> None:
    path, keys = jf
    expect(full(path, keys, anchor=mutate(anchor_at(path, 46))), "ANCHOR_INVALID", None)


def test_anchor_from_another_terminal(jf: tuple[Path, DeviceKeys], tmp_path: Path) -> None:
    path, keys = jf
    other = tmp_path / "other.db"
    with Journal.create(other, keys, terminal_id="TERM0002", now=T0) as j:
        anchor = j.latest_checkpoint()
    expect(full(path, keys, anchor=anchor), "ANCHOR_INVALID", 1)


def test_valid_anchors_pass(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    for cp in CPS:
        assert full(path, keys, anchor=anchor_at(path, cp)).ok


# --- ratchet state -------------------------------------------------------------------------------


def test_ratchet_key_replaced(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    attacker(path).execute("UPDATE ratchet SET key = ?", (os.urandom(32),))
    expect(full(path, keys), "RATCHET_MISMATCH", LAST + 1)
    assert bare(path).ok


def test_ratchet_row_deleted(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    attacker(path).execute("DELETE FROM ratchet")
    expect(full(path, keys), "RATCHET_MISMATCH", LAST + 1)
    expect(bare(path), "RATCHET_MISMATCH", LAST + 1)


def test_ratchet_row_claims_fewer_entries(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    attacker(path).execute("UPDATE ratchet SET next_seq = 40")
    expect(full(path, keys), "RATCHET_MISMATCH", LAST + 1)  # k0 shows entries 40.. are genuine
    expect(bare(path), "ENTRY_INSERTED", 40)  # without k0 they look appended without the device


# --- unreadable files -----------------------------------------------------------------------------


def test_not_a_database(tmp_path: Path) -> None:
    p = tmp_path / "junk.db"
    p.write_bytes(os.urandom(4096))
    expect(bare(p), "UNREADABLE", None)


def test_entries_table_dropped(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    attacker(path).execute("DROP TABLE entries")
    expect(full(path, keys), "UNREADABLE", None)


def test_untouched_copy_verifies(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    rep = full(path, keys, anchor=anchor_at(path, 46))
    assert rep.ok and rep.entries == LAST and rep.checkpoints == len(CPS), rep
