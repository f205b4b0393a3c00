"""Forward security of the journal files: one epoch per signed checkpoint.

Every test scans the RAW BYTES of journal.db, journal.db-wal and journal.db-shm (not a .dump):
after a checkpoint no ratchet key of a closed epoch and no shredded vault ciphertext (nor a clear
PAN) may be in any of them. Before the epoch closes, superseded keys of the current epoch may sit in
the WAL: that is the documented window (docs/OPERATIONS.md, "Forward security: the epoch").
"""

from __future__ import annotations

import hmac
import sqlite3
import threading
import time
from pathlib import Path

from guard.core.constants import JOURNAL_RATCHET_LABEL
from guard.journal.format import VaultBlob
from guard.journal.keys import DeviceKeys
from guard.journal.store import Journal
from guard.journal.verify import verify_journal

TID = "TERM0001"
T0 = 1_700_000_000.0
PAN = "4111111111111111"
SUFFIXES = ("", "-wal", "-shm")


def _files(jpath: Path) -> dict[str, bytes]:
    """Every file SQLite keeps beside the journal, raw."""
    return {s: Path(f"{jpath}{s}").read_bytes() for s in SUFFIXES if Path(f"{jpath}{s}").exists()}


def _found(needle: bytes, files: dict[str, bytes]) -> list[str]:
    forms = (needle, needle.hex().encode(), needle.hex().upper().encode())
    return [f"journal.db{s}" for s, data in files.items() if any(f in data for f in forms)]


def _ratchet(j: Journal) -> tuple[int, bytes]:
    assert j._conn is not None
    row = j._conn.execute("SELECT next_seq, key FROM ratchet WHERE id = 1").fetchone()
    return int(row[0]), bytes(row[1])


def _derive(k0: bytes, n: int) -> list[bytes]:
    ks = [k0]
    while len(ks) < n:
        ks.append(hmac.digest(ks[-1], JOURNAL_RATCHET_LABEL, "sha256"))
    return ks


def _sale(j: Journal, i: int, now: float, *, size: int = 0) -> tuple[VaultBlob, bytes]:
    """Two durable commits like the engine's: intent + vault blob, then the final outcome + shred."""
    txn = f"R1:{i:032x}"
    clear = f"{PAN}|2512|{i:06d}".encode() + bytes(size)
    blob = j.seal_vault(txn, clear)
    j.append([("intent", txn, {"vault_ref": blob.ref, "amount": 100 + i, "masked_pan": "411111******1111"})],
             now=now, vault_put=[blob])
    j.append([("outcome", txn, {"state": "APPROVED"})], now=now + 0.5, vault_shred=[blob.ref])
    return blob, clear


def test_closed_epoch_keys_leave_every_file_at_the_checkpoint(tmp_path: Path, keys: DeviceKeys) -> None:
    jpath = tmp_path / "journal.db"
    j = Journal.create(jpath, keys, terminal_id=TID, now=T0, checkpoint_every=16, checkpoint_interval_s=1e9)
    seen: dict[int, bytes] = {_ratchet(j)[0]: _ratchet(j)[1]}
    for i in range(30):
        _sale(j, i, T0 + i)
        nxt, key = _ratchet(j)
        seen[nxt] = key
    cp = j.latest_checkpoint()["covers_seq"] + 1  # the checkpoint entry's own seq
    closed = {s: k for s, k in seen.items() if s <= cp}
    assert keys.k0 is not None and all(k == _derive(keys.k0, s)[-1] for s, k in seen.items())
    # keep j open: close() seals again and would hide a checkpoint that did not
    files = _files(jpath)
    leaked = {s: _found(k, files) for s, k in closed.items() if _found(k, files)}
    assert leaked == {}, f"keys of closed epochs (<= checkpoint {cp}) still on disk: {leaked}"
    assert _found(keys.k0, files) == []
    j.close()
    assert verify_journal(jpath, k0=keys.k0).ok


def test_shredded_vault_blobs_leave_every_file_at_the_checkpoint(tmp_path: Path, keys: DeviceKeys) -> None:
    """Blobs shredded in the epoch they were written (only ever in the WAL) and blobs written in an
    earlier epoch (already copied into journal.db, freed there by the shred: secure_delete's case)."""
    jpath = tmp_path / "journal.db"
    j = Journal.create(jpath, keys, terminal_id=TID, now=T0, checkpoint_every=1000, checkpoint_interval_s=1e9)
    held = []
    for i in range(20):  # intents whose outcome comes after the checkpoint; some need overflow pages
        blob = j.seal_vault(f"R1:{i:032x}", f"{PAN}|2512|{i:06d}".encode() + bytes(3000 if i % 4 == 0 else 0))
        j.append([("intent", blob.txn, {"vault_ref": blob.ref})], now=T0 + i, vault_put=[blob])
        held.append(blob)
    j.checkpoint(T0 + 30)
    assert all(_found(b.ct, _files(jpath)) == ["journal.db"] for b in held)  # live, in the main file
    for i, blob in enumerate(held):
        j.append([("outcome", blob.txn, {"state": "APPROVED"})], now=T0 + 40 + i, vault_shred=[blob.ref])
    sold = [_sale(j, 100 + i, T0 + 70 + i, size=(3000 if i % 4 == 0 else 0))[0] for i in range(20)]
    live = j.seal_vault("R1:live", f"{PAN}|2612|live".encode())
    j.append([("intent", "R1:live", {"vault_ref": live.ref})], now=T0 + 100, vault_put=[live])
    before = _files(jpath)
    assert any(_found(b.ct, before) for b in sold), "the window: shredded blobs sit in the WAL until the epoch closes"
    j.checkpoint(T0 + 110)
    files = _files(jpath)
    assert _found(live.ct, files) == ["journal.db"]  # the scan does see a live blob
    leaked = {b.txn: _found(b.ct, files) for b in (*held, *sold) if _found(b.ct, files)}
    assert leaked == {}, f"shredded vault ciphertexts survived the checkpoint: {leaked}"
    assert not any(PAN.encode() in data for data in files.values())
    j.close()


def test_window_current_epoch_keys_may_sit_in_the_wal_until_the_epoch_closes(tmp_path: Path,
                                                                                 keys: DeviceKeys) -> None:
    """The documented window: at most checkpoint_every entries / checkpoint_interval_s seconds."""
    jpath = tmp_path / "journal.db"
    j = Journal.create(jpath, keys, terminal_id=TID, now=T0, checkpoint_every=64, checkpoint_interval_s=300.0)
    keys_seen = []
    for i in range(10):
        _sale(j, i, T0 + i)
        keys_seen.append(_ratchet(j)[1])
    files = _files(jpath)
    assert sum(bool(_found(k, files)) for k in keys_seen[:-1]) >= 5  # superseded but in the open epoch: in the WAL
    assert all(set(_found(k, files)) <= {"journal.db-wal"} for k in keys_seen[:-1])
    assert not j.maybe_checkpoint(T0 + 299.0)
    assert j.maybe_checkpoint(T0 + 301.0)  # the interval closes the epoch even when idle
    files = _files(jpath)
    assert [k for k in keys_seen if _found(k, files)] == []
    assert len(files.get("-wal", b"")) == 0
    j.close()


def test_a_reader_that_blocks_the_seal_briefly_is_waited_for(tmp_path: Path, keys: DeviceKeys) -> None:
    """A concurrent reader (an operator's verify) pins the WAL; the checkpoint retries, bounded."""
    jpath = tmp_path / "journal.db"
    j = Journal.create(jpath, keys, terminal_id=TID, now=T0, checkpoint_every=1000, checkpoint_interval_s=1e9)
    olds = []
    for i in range(5):
        _sale(j, i, T0 + i)
        olds.append(_ratchet(j)[1])
    reader = sqlite3.connect(jpath, isolation_level=None, check_same_thread=False)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM entries").fetchone()
    timer = threading.Timer(0.2, reader.execute, ("COMMIT",))
    timer.start()
    try:
        j.checkpoint(T0 + 10)
    finally:
        timer.join()
        reader.close()
    assert j.wal_seal_failures == 0
    assert [k for k in olds if _found(k, _files(jpath))] == []
    j.close()


def test_a_reader_that_never_lets_go_is_reported_and_the_seal_is_retried(tmp_path: Path, keys: DeviceKeys) -> None:
    jpath = tmp_path / "journal.db"
    j = Journal.create(jpath, keys, terminal_id=TID, now=T0, checkpoint_every=1000, checkpoint_interval_s=1e9)
    _sale(j, 0, T0)
    old = _ratchet(j)[1]
    reader = sqlite3.connect(jpath, isolation_level=None, check_same_thread=False)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM entries").fetchone()
    t0 = time.monotonic()
    j.checkpoint(T0 + 10)
    assert time.monotonic() - t0 < 5.0  # bounded: the sale path never hangs on a reader
    assert j.wal_seal_failures == 1 and j.wal_seal_pending
    assert _found(old, _files(jpath)) != []  # honest: the reader kept the old frames alive
    reader.execute("COMMIT")
    reader.close()
    _sale(j, 1, T0 + 11)  # the next commit retries the pending seal
    assert not j.wal_seal_pending
    assert _found(old, _files(jpath)) == []
    j.close()
