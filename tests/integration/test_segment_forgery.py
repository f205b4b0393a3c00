"""Root at time T holds the signing key and k_T: it can start a live file from a forged ``segment``
record followed by re-MACed "carried" copies of edited history. Such a file must not verify on its
own, and a segment cannot claim an archived history the holder of k_T made up (covers_mac)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from guard.journal.format import entry_body, entry_hash
from guard.journal.keys import DeviceKeys
from guard.journal.mac import mac_and_next
from guard.journal.store import Journal
from guard.journal.verify import verify_journal
from guard.ops.compact import verify_chain
from guard.simulation.hostsim import HostCore
from tests.support import cli
from tests.support.ops_support import TID, Gen

NOW = 1_800_000_000.0


def _journal(tmp_path: Path, sales: int = 18) -> tuple[Path, DeviceKeys]:
    g = Gen(tmp_path, HostCore(seed=4, dup_detection=True))
    g.host_up()
    g.sales(sales)
    g.close()
    assert g.keys is not None
    return g.path, g.keys


def _edit(c: sqlite3.Connection, sql: str, args: tuple[object, ...]) -> None:
    triggers = c.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
    names = c.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
    for (n,) in names:
        c.execute(f"DROP TRIGGER {n}")
    c.execute(sql, args)
    for (t,) in triggers:
        c.execute(t)


def forge(path: Path, keys: DeviceKeys, archive: Path | None = None, *, fake_last: bool = False) -> tuple[int, str]:
    """The attack, with only what is on the device at T: drop one sale, flip another to DECLINED,
    then restart the file as a segment carrying the edited history (signed, MACed from k_T on).
    ``fake_last``: also rewrite the last entry, so the segment claims a history that never existed.
    Returns (segment seq, the dropped txn)."""
    with Journal.open(path, keys, terminal_id=TID) as j:
        raw = sqlite3.connect(path, isolation_level=None)
        txns = [t for (t,) in raw.execute("SELECT DISTINCT txn FROM entries WHERE kind = 'outcome' ORDER BY seq")]
        dropped, flipped = txns[1], txns[0]
        _edit(raw, "DELETE FROM entries WHERE txn = ?", (dropped,))
        _edit(raw, "UPDATE entries SET payload = replace(replace(payload, '\"APPROVED\"', '\"DECLINED\"'), "
                   "'\"rc\":\"00\"', '\"rc\":\"05\"') WHERE txn = ? AND kind = 'outcome'", (flipped,))
        if fake_last:
            seq, ts, kind, txn, payload, prev = raw.execute(
                "SELECT seq, ts, kind, txn, payload, prev_hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
            payload = payload.replace('"rc":"00"', '"rc":"51"')
            h = entry_hash(seq, prev, entry_body(ts, kind, txn, payload))
            mac = mac_and_next(j._key, h)[0]  # the best the holder of k_T can do: k_{T-1} is gone
            _edit(raw, "UPDATE entries SET payload = ?, entry_hash = ?, mac = ? WHERE seq = ?", (payload, h, mac, seq))
            j._last_hash = h
        raw.close()
        if archive is not None:
            j.write_archive(archive, now=NOW)
        keep = [t for t in txns if t != dropped]
        seg, _ = j.restart_segment(keep, now=NOW, archive=str(archive) if archive else None)
    return seg, dropped


def _verify(path: Path, *extra: object) -> tuple[int, str]:
    kdir = path.parent / "keys"
    code, out, _ = cli("journal", "verify", path, "--k0", kdir / "k0.escrow", "--pubkey", kdir / "verify.pub", *extra)
    return code, out


def test_forged_segment_alone_does_not_verify(tmp_path: Path) -> None:
    path, keys = _journal(tmp_path)
    seg, dropped = forge(path, keys)
    rows = [json.loads(line) for line in cli("journal", "export", path, "--format", "jsonl")[1].splitlines()]
    assert len(rows) == 17 and dropped not in json.dumps(rows)  # what the attacker wants shown
    code, out = _verify(path)
    assert code == 1, out
    assert "ARCHIVE_REQUIRED" in out and f"starts at seq {seg}" in out and f"1..{seg - 1}" in out
    assert "archive" in out
    code, out = _verify(path, "--json")
    rep = json.loads(out)
    assert (rep["ok"], rep["reason"], rep["first_seq"]) == (False, "ARCHIVE_REQUIRED", seg)


def test_forged_segment_with_its_archive_of_edited_history_fails(tmp_path: Path) -> None:
    path, keys = _journal(tmp_path)
    archive = tmp_path / "forged.archive.db"
    forge(path, keys, archive)
    code, out = _verify(path, "--archive", archive)
    assert code == 1, out
    assert "CHAIN_INVALID" in out and archive.name in out, out
    assert not verify_chain([archive, path], k0=keys.k0, public_keys=[keys.public_key]).ok


def test_segment_cannot_claim_a_history_the_key_holder_made_up(tmp_path: Path) -> None:
    """The segment records the covered entry's MAC under k_{T-1}: the holder of k_T cannot make it."""
    path, keys = _journal(tmp_path)
    seg, _ = forge(path, keys, fake_last=True)
    rep = verify_journal(path, k0=keys.k0, public_key=keys.public_key)
    assert (rep.ok, rep.reason, rep.first_bad_seq) == (False, "CHECKPOINT_INVALID", seg)
    assert "covers_mac" in rep.detail and f"k_{seg - 1}" in rep.detail


def test_genuine_segment_verifies_with_its_archive(tmp_path: Path) -> None:
    path, keys = _journal(tmp_path)
    archive = tmp_path / "a.archive.db"
    with Journal.open(path, keys, terminal_id=TID) as j:
        j.write_archive(archive, now=NOW)
        txns = [t for (t,) in j._db().execute("SELECT DISTINCT txn FROM entries WHERE txn IS NOT NULL")]
        seg, _ = j.restart_segment(txns, now=NOW, archive=str(archive))
    assert verify_journal(path, k0=keys.k0, public_key=keys.public_key).ok
    code, out = _verify(path, "--archive", archive)
    assert code == 0, out
    assert _verify(path)[0] == 1
    # verify-chain checks the segment's covers_mac against the archive's actual last entry
    c = sqlite3.connect(archive)
    last = c.execute("SELECT max(seq) FROM entries").fetchone()[0]
    c.close()
    archive.chmod(0o600)
    c = sqlite3.connect(archive, isolation_level=None)
    _edit(c, "UPDATE entries SET mac = zeroblob(32) WHERE seq = ?", (last,))
    c.close()
    rep = verify_chain([archive, path], public_keys=[keys.public_key])
    assert any("MAC" in p for p in rep.problems), rep.problems
