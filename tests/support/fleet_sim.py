"""Many simulated terminals for the fleet tests: each a seeded deterministic simulation (faults,
crashes) with its own terminal id, keys, journal and host simulator; plus the hosts' settlement rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from guard.simulation.deterministic import SimConfig, _World


@dataclass
class SimTerminal:
    tid: str
    dir: Path
    journal: Path
    keys: Path
    settlement: list[dict[str, str]]


def run_terminal(seed: int, root: Path, sales: int = 12) -> SimTerminal:
    tid = f"T{seed:07d}"
    wd = root / tid
    wd.mkdir(parents=True)
    w = _World(SimConfig(seed=seed, tid=tid, sales=sales, operator_rate=0.2), wd)
    w.run()
    problems = w.check()
    assert not problems, (seed, problems[:3])
    if w.journal is not None:
        w.journal.close()
    return SimTerminal(tid, wd, wd / "journal.db", wd / "keys", w.host.settlement_rows())


def write_settlement(path: Path, rows: list[dict[str, str]]) -> None:
    from guard.simulation.hostledger import settlement_csv

    path.write_bytes(settlement_csv(rows))


# --- tampering: what a thief or a compromised device could upload ----------------------------

def clone(src: Path, dst: Path) -> Path:
    """A consistent single-file copy of a journal (WAL folded in)."""
    import sqlite3

    s, d = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        s.backup(d)
    finally:
        s.close()
        d.close()
    return dst


def edit(path: Path, *sql: tuple[str, tuple[object, ...]]) -> None:
    """Run SQL on a journal file with the append-only triggers dropped (any file owner can)."""
    import sqlite3

    c = sqlite3.connect(path)
    try:
        for t in ("entries_no_update", "entries_no_delete", "ratchet_no_delete"):
            c.execute(f"DROP TRIGGER IF EXISTS {t}")
        for q, args in sql:
            c.execute(q, args)
        c.commit()
    finally:
        c.close()


def truncate(path: Path, keys_dir: Path, last: int) -> None:
    """An older copy of the journal: entries 1..last and the ratchet state the device had then."""
    from guard.journal.keys import load_k0
    from guard.journal.mac import ratchet_forward

    k = ratchet_forward(load_k0(keys_dir / "k0.escrow"), last)
    edit(path, ("DELETE FROM entries WHERE seq > ?", (last,)),
         ("UPDATE ratchet SET next_seq = ?, key = ? WHERE id = 1", (last + 1, k)))


def reseal(path: Path, keys_dir: Path, start: int) -> None:
    """Rewrite the chain from ``start`` as a device holding every key would: hashes, MACs, checkpoint
    and segment signatures all valid (only a witness that saw the earlier history can tell)."""
    import json
    import sqlite3

    from guard.journal.format import canonical_json, checkpoint_message, entry_body, entry_hash, segment_message
    from guard.journal.keys import load_keys
    from guard.journal.mac import mac_and_next, ratchet_forward

    keys = load_keys(keys_dir)
    assert keys.k0 is not None
    c = sqlite3.connect(path)
    rows = c.execute("SELECT seq, ts, kind, txn, payload, prev_hash, entry_hash, mac FROM entries WHERE seq >= ? "
                     "ORDER BY seq", (start,)).fetchall()
    c.close()
    key = ratchet_forward(keys.k0, start - 1)
    prev = rows[0][5]
    updates: list[tuple[str, tuple[object, ...]]] = []
    for seq, ts, kind, txn, payload, _, _, _ in rows:
        if kind == "checkpoint":
            cp = json.loads(payload)
            cp.update(covers_seq=seq - 1, covers_hash=prev.hex())
            cp.pop("sig")
            cp["sig"] = keys.signing_key.sign(checkpoint_message(cp)).hex()
            payload = canonical_json(cp)
        elif kind == "segment":
            rec = json.loads(payload)
            rec.pop("sig")
            rec["sig"] = keys.signing_key.sign(segment_message(rec)).hex()
            payload = canonical_json(rec)
        h = entry_hash(seq, prev, entry_body(ts, kind, txn, payload))
        mac, key = mac_and_next(key, h)
        updates.append(("UPDATE entries SET payload = ?, prev_hash = ?, entry_hash = ?, mac = ? WHERE seq = ?",
                        (payload, prev, h, mac, seq)))
        prev = h
    updates.append(("UPDATE ratchet SET key = ? WHERE id = 1", (key,)))
    edit(path, *updates)
