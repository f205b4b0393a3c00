"""The fleet on a real PostgreSQL: many simulated terminals (seeded deterministic simulation with host
faults, crashes and operator VOIDs/REFUNDs) ingested, verified and reconciled against their host
simulators' settlement rows with planted discrepancies; re-ingest is a no-op; an ingest killed
midway loses and duplicates nothing; the witness rejects tampered uploads with terminal, seq, reason.

POSGUARD_FLEET_TERMINALS sets the number of terminals (default 200; the acceptance run uses 1000).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.fleet_sim import SimTerminal, clone, edit, reseal, run_terminal, truncate, write_settlement

psycopg = pytest.importorskip("psycopg")

from guard.fleet.ingest import enroll, ingest  # noqa: E402
from guard.fleet.reconcile import reconcile  # noqa: E402
from guard.fleet.report import receipt, receipt_ok, report  # noqa: E402
from guard.fleet.schema import init  # noqa: E402
from guard.fleet.verify import verify  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
N = int(os.environ.get("POSGUARD_FLEET_TERMINALS", "200"))
pytestmark = pytest.mark.slow


@dataclass
class Fleet:
    root: Path
    terminals: list[SimTerminal]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    root = tmp_path_factory.mktemp("fleet")
    return Fleet(root, [run_terminal(seed, root / "journals") for seed in range(N)])


def _db(pg_server: Any, name: str, terminals: list[SimTerminal]) -> str:
    dsn: str = pg_server.fresh_dsn(name)
    init(dsn, hash_parts=2)
    for t in terminals:
        enroll(dsn, t.tid, t.keys)
    return dsn


def _fingerprint(dsn: str) -> tuple[Any, ...]:
    with psycopg.connect(dsn) as c:
        e = c.execute("SELECT count(*), md5(string_agg(terminal || seq || encode(entry_hash, 'hex') || encode(mac, 'hex'),"
                      " ',' ORDER BY terminal, seq)) FROM entries").fetchone()
        t = c.execute("SELECT count(*), md5(string_agg(terminal || txn || state || amount, ',' ORDER BY terminal, txn))"
                      " FROM txns").fetchone()
        s = c.execute("SELECT md5(string_agg(terminal || state::text || witness_seq, ',' ORDER BY terminal)) "
                      "FROM terminals").fetchone()
        dup = c.execute("SELECT count(*) FROM (SELECT terminal, seq FROM entries GROUP BY 1, 2 HAVING count(*) > 1) d"
                        ).fetchone()
    return (*e, *t, *s, *dup)


# --- planting discrepancies into the hosts' settlement rows ----------------------------------

def _plant(fleet: Fleet) -> tuple[list[dict[str, str]], set[tuple[str, str, str]]]:
    """The hosts' rows with one planted discrepancy in every 7th terminal or so (cycling through the
    categories); returns the rows and {(terminal, category, stan)} planted."""
    from guard.ops.export import load_view

    rows = [dict(r) for t in fleet.terminals for r in t.settlement]
    planted: set[tuple[str, str, str]] = set()
    kinds = ["missing", "double", "amount", "declined_debited", "reversed_settled", "unknown_sale"]
    step = max(1, min(7, len(fleet.terminals) // 6))
    for i, t in enumerate(fleet.terminals[::step]):
        view = load_view(t.journal)
        want = kinds[i % len(kinds)]
        by_state: dict[str, list[Any]] = {}
        for x in view.txns.values():
            if x.kind == "SALE":
                by_state.setdefault(x.state, []).append(x)

        def key_rows(x: Any) -> list[dict[str, str]]:
            return [r for r in rows if (r["tid"], r["mid"], r["stan"], r["date"]) == (t.tid, x.mid, f"{x.stan:06d}", x.date)]

        def extra(x: Any, amount: int) -> dict[str, str]:
            return {"date": x.date, "tid": t.tid, "mid": x.mid, "stan": f"{x.stan:06d}", "rrn": "PLANTED00001",
                    "amount": str(amount), "type": "SALE", "response": "00"}

        approved = [x for x in by_state.get("APPROVED", []) if not any(r["type"] == "REVERSAL" for r in key_rows(x))]
        if want in ("missing", "double", "amount") and approved:
            x = approved[0]
            mine = [r for r in key_rows(x) if r["type"] == "SALE" and r["response"] == "00"]
            if want == "missing":
                for r in mine:
                    rows.remove(r)
                planted.add((t.tid, "APPROVED_MISSING_AT_HOST", f"{x.stan:06d}"))
            elif want == "double":
                rows.append(extra(x, x.amount))
                planted.add((t.tid, "DOUBLE_DEBIT", f"{x.stan:06d}"))
            else:
                mine[-1]["amount"] = str(int(mine[-1]["amount"]) + 100)
                planted.add((t.tid, "AMOUNT_MISMATCH", f"{x.stan:06d}"))
        elif want == "declined_debited" and by_state.get("DECLINED"):
            x = by_state["DECLINED"][0]
            rows.append(extra(x, x.amount))
            planted.add((t.tid, "FAILED_BUT_DEBITED", f"{x.stan:06d}"))
        elif want == "reversed_settled" and by_state.get("REVERSED"):
            x = by_state["REVERSED"][0]
            rows.append(extra(x, x.amount))
            planted.add((t.tid, "REVERSED_BUT_SETTLED", f"{x.stan:06d}"))
        elif want == "unknown_sale" and view.txns:
            x = next(iter(view.txns.values()))
            rows.append({**extra(x, 777), "stan": "999999"})
            planted.add((t.tid, "FAILED_BUT_DEBITED", "999999"))
    return rows, planted


def _oracle(fleet: Fleet, settlement: Path) -> set[tuple[Any, ...]]:
    """What `posguard reconcile` finds, terminal by terminal, on the same files."""
    from guard.ops.export import load_view
    from guard.ops.reconcile import read_settlement
    from guard.ops.reconcile import reconcile as reconcile_one

    srows = read_settlement(settlement)
    out: set[tuple[Any, ...]] = set()
    for t in fleet.terminals:
        rep = reconcile_one(load_view(t.journal), srows)
        out |= {(t.tid, d.category, d.action, d.txn, d.stan, d.date, d.terminal_state, d.terminal_amount,
                 d.host_amount, d.host_net_debits, d.rrn) for d in rep.discrepancies}
    return out


def _found(rep: Any) -> set[tuple[Any, ...]]:
    return {(d["terminal"], d["category"], d["action"], d["txn"], d["stan"], d["date"], d["terminal_state"],
             d["terminal_amount"], d["host_amount"], d["host_net_debits"], d["rrn"]) for d in rep.discrepancies}


def test_a_fleet_ingests_verifies_and_reconciles(fleet: Fleet, pg_server: Any, tmp_path: Path) -> None:
    dsn = _db(pg_server, "fleet_main", fleet.terminals)
    res = ingest(dsn, [fleet.root / "journals"])
    assert [r.line() for r in res if r.status != "added"] == []
    assert len(res) == N
    total = sum(r.added for r in res)
    ver = verify(dsn)
    assert all(v.ok for v in ver) and sum(v.checked for v in ver) == total
    assert sum(v.checked for v in verify(dsn)) == 0  # incremental: nothing new, nothing re-read

    clean = tmp_path / "clean.csv"
    write_settlement(clean, [r for t in fleet.terminals for r in t.settlement])
    rep = reconcile(dsn, [clean])
    assert _found(rep) == _oracle(fleet, clean) == set()  # no false alarm on the hosts' own files
    assert rep.sales_compared > N and rep.rows_unknown_terminal == 0

    rows, planted = _plant(fleet)
    assert len({c for _, c, _ in planted}) == 5, planted  # every category planted at least once
    half = len(rows) // 2
    a, b = tmp_path / "settle-a.csv", tmp_path / "settle-b.csv"
    write_settlement(a, rows[:half])
    write_settlement(b, rows[half:])
    both = tmp_path / "settle-ab.csv"
    write_settlement(both, rows)
    rep = reconcile(dsn, [a, b])
    found = _found(rep)
    assert {(d[0], d[1], d[4]) for d in found} == planted  # every planted one, nothing else
    assert found == _oracle(fleet, both)  # and exactly what posguard reconcile says, field by field

    rows_report = report(dsn)
    assert len(rows_report) == N
    assert sum(r["discrepancies"] for r in rows_report) == len(found)
    assert all(r["verified_upto"] == r["accepted_upto"] > 0 and r["rejections"] == 0 for r in rows_report)

    before = _fingerprint(dsn)
    again = ingest(dsn, [fleet.root / "journals"])
    assert {r.status for r in again} == {"unchanged"}
    assert _fingerprint(dsn) == before


def test_killing_ingest_midway_loses_and_duplicates_nothing(fleet: Fleet, pg_server: Any) -> None:
    reference = _db(pg_server, "fleet_ref", fleet.terminals)
    ingest(reference, [fleet.root / "journals"])
    dsn = _db(pg_server, "fleet_kill", fleet.terminals)
    cmd = [sys.executable, "-m", "posguard.cli", "fleet", "ingest", "--dsn", dsn, str(fleet.root / "journals")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0
    try:
        with psycopg.connect(dsn, autocommit=True) as c:
            for _ in range(6000):  # bounded: 60 s
                done = c.execute("SELECT count(*) FROM ingests").fetchone()[0]
                if done >= max(1, N // 10) or proc.poll() is not None:
                    break
                time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "ingest finished before it could be killed"
    assert 0 < done < N
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert _fingerprint(dsn) == _fingerprint(reference)


# --- the witness ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> list[SimTerminal]:
    """Terminals with enough entries for several checkpoints."""
    root = tmp_path_factory.mktemp("busy")
    return [run_terminal(10_000 + s, root, sales=150) for s in range(4)]


def _rejected(dsn: str, path: Path) -> tuple[str, str, int | None, str]:
    (r,) = ingest(dsn, [path])
    assert r.status == "rejected", r.line()
    with psycopg.connect(dsn) as c:
        row = c.execute("SELECT terminal, code, seq FROM rejections ORDER BY id DESC LIMIT 1").fetchone()
    assert row == (r.terminal, r.code, r.seq)  # recorded for the report, with terminal and seq
    return r.terminal, r.code, r.seq, r.reason


def _last_seq(path: Path) -> int:
    import sqlite3

    c = sqlite3.connect(path)
    try:
        return int(c.execute("SELECT max(seq) FROM entries").fetchone()[0])
    finally:
        c.close()


def _payload_edit(seq: int) -> tuple[str, tuple[object, ...]]:
    """Change what entry ``seq`` says (its time) without touching its stored hash."""
    return ("UPDATE entries SET ts = ts + 1 WHERE seq = ?", (seq,))


def test_tampered_uploads_are_rejected_with_terminal_seq_and_reason(busy: list[SimTerminal], pg_server: Any,
                                                                     tmp_path: Path) -> None:
    t, fresh = busy[0], busy[1]
    dsn = _db(pg_server, "fleet_witness", busy[:2])
    good = clone(t.journal, tmp_path / "good.db")
    last = _last_seq(good)
    older = clone(good, tmp_path / "older.db")
    truncate(older, t.keys, last - 20)
    assert ingest(dsn, [good])[0].status == "added"
    before = _fingerprint(dsn)

    # rollback: a genuine older copy of the same journal (valid chain, MACs, ratchet state)
    assert _rejected(dsn, older)[:3] == (t.tid, "FLEET_ROLLBACK", last - 19)
    # fork: a device holding every key rewrote entry 30 and re-sealed everything after it
    fork = clone(good, tmp_path / "fork.db")
    edit(fork, _payload_edit(30))
    reseal(fork, t.keys, 30)
    assert _rejected(dsn, fork)[:3] == (t.tid, "FLEET_FORK", 30)
    # a modified entry among those the fleet holds
    mod = clone(good, tmp_path / "mod.db")
    edit(mod, _payload_edit(12))
    term, code, seq, reason = _rejected(dsn, mod)
    assert (term, code, seq) == (t.tid, "FLEET_ENTRY_INVALID", 12) and reason.startswith("ENTRY_MODIFIED")

    # new entries are verified before anything is stored: a terminal seen for the first time
    fl = _last_seq(fresh.journal)
    cases = {
        "modified": ([_payload_edit(fl - 5)], "ENTRY_MODIFIED", fl - 5),
        "forged_mac": ([("UPDATE entries SET mac = zeroblob(32) WHERE seq = ?", (fl - 7,))], "MAC_INVALID", fl - 7),
    }
    for name, (sql, why, at) in cases.items():
        p = clone(fresh.journal, tmp_path / f"{name}.db")
        edit(p, *sql)
        term, code, seq, reason = _rejected(dsn, p)
        assert (term, code, seq) == (fresh.tid, "FLEET_ENTRY_INVALID", at) and reason.startswith(why), (name, reason)
    # rehashed without the MAC key: hashes and links recomputed, the MAC gives it away
    p = clone(fresh.journal, tmp_path / "rehash.db")
    _rehash_without_key(p, fl - 9)
    term, code, seq, reason = _rejected(dsn, p)
    assert (code, seq) == ("FLEET_ENTRY_INVALID", fl - 9) and reason.startswith("MAC_INVALID"), reason
    # a terminal nobody enrolled
    term, code, seq, _ = _rejected(dsn, busy[2].journal)
    assert (term, code) == (busy[2].tid, "FLEET_UNKNOWN_TERMINAL")
    assert _fingerprint(dsn) == before  # none of it changed what the fleet holds
    assert ingest(dsn, [fresh.journal])[0].status == "added"  # the genuine file still goes in
    rows = {r["terminal"]: r for r in report(dsn)}
    assert rows[t.tid]["rejections"] == 3 and rows[fresh.tid]["rejections"] == 3


def _rehash_without_key(path: Path, start: int) -> None:
    """Change entry ``start`` and recompute every hash and link after it, keeping the old MACs."""
    import sqlite3

    from guard.journal.format import entry_body, entry_hash

    c = sqlite3.connect(path)
    rows = c.execute("SELECT seq, ts, kind, txn, payload, prev_hash FROM entries WHERE seq >= ? ORDER BY seq",
                     (start,)).fetchall()
    c.close()
    prev = rows[0][5]
    ups: list[tuple[str, tuple[object, ...]]] = []
    for seq, ts, kind, txn, payload, _ in rows:
        ts = ts + 1 if seq == start else ts
        h = entry_hash(seq, prev, entry_body(ts, kind, txn, payload))
        ups.append(("UPDATE entries SET ts = ?, prev_hash = ?, entry_hash = ? WHERE seq = ?", (ts, prev, h, seq)))
        prev = h
    edit(path, *ups)


def test_compacted_journals_continue_and_a_forged_segment_is_rejected(busy: list[SimTerminal], pg_server: Any,
                                                                       tmp_path: Path) -> None:
    from guard.journal.keys import load_keys
    from guard.ops.compact import compact

    t, u = busy[2], busy[3]
    dsn = _db(pg_server, "fleet_segments", [t, u])
    (tmp_path / "t").mkdir()
    live = clone(t.journal, tmp_path / "t" / "journal.db")
    assert ingest(dsn, [live])[0].status == "added"
    pre = clone(live, tmp_path / "pre-compaction.db")
    res = compact(live, load_keys(t.keys), tmp_path / "t-arch", older_than_days=0, now=2_000_000_000.0)
    assert res.archive is not None
    out = ingest(dsn, [res.archive, live])  # the archive adds its seal, the live file the rest
    assert [r.status for r in out] == ["added", "added"], [r.line() for r in out]
    assert ingest(dsn, [res.archive, live])[0].status == "unchanged"
    # the copy from before compaction is now a rollback
    assert _rejected(dsn, pre)[1] == "FLEET_ROLLBACK"
    assert all(v.ok for v in verify(dsn, [t.tid]))

    # terminal u: its archive is in the fleet, then a live file whose segment record claims to
    # continue another history (covers_mac of an entry the fleet never saw), fully re-signed and re-MACed
    (tmp_path / "u").mkdir()
    ulive = clone(u.journal, tmp_path / "u" / "journal.db")
    ures = compact(ulive, load_keys(u.keys), tmp_path / "u-arch", older_than_days=0, now=2_000_000_000.0)
    assert ures.archive is not None
    gap = _rejected(dsn, ulive)  # the live segment without its archive: a gap
    assert gap[1] == "FLEET_GAP" and gap[0] == u.tid
    assert ingest(dsn, [ures.archive])[0].status == "added"
    forged = clone(ulive, tmp_path / "forged-segment.db")
    import json
    import sqlite3

    c = sqlite3.connect(forged)
    s, payload = c.execute("SELECT seq, payload FROM entries WHERE kind = 'segment'").fetchone()
    c.close()
    rec = json.loads(payload)
    rec["covers_mac"] = "00" * 32
    edit(forged, ("UPDATE entries SET payload = ? WHERE seq = ?", (json.dumps(rec), s)))
    reseal(forged, u.keys, s)
    term, code, seq, reason = _rejected(dsn, forged)
    assert (term, code, seq) == (u.tid, "FLEET_ENTRY_INVALID", s) and "forged segment" in reason, reason
    assert ingest(dsn, [ulive])[0].status == "added"


def test_receipt_countersigns_the_newest_accepted_checkpoint(busy: list[SimTerminal], pg_server: Any) -> None:
    import json

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    t = busy[0]
    dsn = _db(pg_server, "fleet_receipt", [t])
    ingest(dsn, [t.journal])
    key = Ed25519PrivateKey.generate()
    rec = receipt(dsn, t.tid, key, now=1.0)
    with psycopg.connect(dsn) as c:
        seq, cp = c.execute("SELECT witness_seq, witness_cp FROM terminals").fetchone()
    assert rec["checkpoint"] == json.loads(cp) and rec["checkpoint"]["covers_seq"] == seq - 1 > 0
    assert receipt_ok(rec, key.public_key())
    assert not receipt_ok({**rec, "accepted_seq": rec["accepted_seq"] + 1}, key.public_key())
    assert not receipt_ok(rec, Ed25519PrivateKey.generate().public_key())


def test_verify_finds_rows_changed_in_the_database(busy: list[SimTerminal], pg_server: Any) -> None:
    t, u = busy[0], busy[1]
    dsn = _db(pg_server, "fleet_verify", [t, u])
    ingest(dsn, [t.journal, u.journal])
    with psycopg.connect(dsn) as c:
        c.execute("UPDATE entries SET payload = payload || ' ' WHERE terminal = %s AND seq = 17", (t.tid,))
    res = {r.terminal: r for r in verify(dsn)}
    assert res[u.tid].ok and not res[t.tid].ok
    assert res[t.tid].seq == 17 and "ENTRY_MODIFIED" in res[t.tid].reason and res[t.tid].verified_upto == 16
    assert {r["terminal"]: r["verify_problem"] for r in report(dsn)}[t.tid].startswith("FLEET_VERIFY_FAILED")


def test_cli_twins(busy: list[SimTerminal], pg_server: Any, tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from posguard.cli import main

    t = busy[1]
    dsn = pg_server.fresh_dsn("fleet_cli")
    run = CliRunner().invoke
    assert run(main, ["fleet", "init", "--dsn", dsn]).exit_code == 0
    assert run(main, ["fleet", "init", "--dsn", dsn]).output.strip().endswith("(found 1)")
    assert run(main, ["fleet", "enroll", "--dsn", dsn, t.tid, str(t.keys)]).exit_code == 0
    r = run(main, ["fleet", "ingest", "--dsn", dsn, str(t.journal)])
    assert r.exit_code == 0 and "1 added" in r.output, r.output
    assert run(main, ["fleet", "verify", "--dsn", dsn]).exit_code == 0
    s = tmp_path / "s.csv"
    write_settlement(s, t.settlement)
    assert run(main, ["fleet", "reconcile", "--dsn", dsn, str(s)]).exit_code == 0
    rows = json.loads(run(main, ["fleet", "report", "--dsn", dsn, "--json"]).output)
    assert rows[0]["terminal"] == t.tid and rows[0]["verified_upto"] > 0
    key = tmp_path / "fleet.key"
    assert run(main, ["fleet", "keygen", str(key)]).exit_code == 0
    rec = json.loads(run(main, ["fleet", "receipt", "--dsn", dsn, "--key", str(key), t.tid]).output)
    assert rec["terminal"] == t.tid
    bad = run(main, ["fleet", "ingest", "--dsn", "host=/nonexistent dbname=x", str(t.journal)])
    assert bad.exit_code == 2


def test_a_growing_live_journal_adds_only_its_new_entries_with_the_same_states(busy: list[SimTerminal],
                                                                                pg_server: Any, tmp_path: Path) -> None:
    """Uploaded again and again as it grows, a journal ends with the same rows and transaction
    states as one upload of the final file (only the touched transactions are restored)."""
    t = busy[3]
    good = clone(t.journal, tmp_path / "good.db")
    last = _last_seq(good)
    steps = []
    for cut in (last // 3, last // 2, last - 7):
        p = clone(good, tmp_path / f"upto{cut}.db")
        truncate(p, t.keys, cut)
        steps.append(p)
    grown = _db(pg_server, "fleet_grown", [t])
    for p in steps:
        assert ingest(grown, [p])[0].status == "added"
    (r,) = ingest(grown, [good])
    assert (r.status, r.added) == ("added", 7)
    once = _db(pg_server, "fleet_once", [t])
    ingest(once, [good])
    assert _fingerprint(grown) == _fingerprint(once)
    with psycopg.connect(grown) as a, psycopg.connect(once) as b:
        q = "SELECT txn, kind, state, stan, date, amount, tid, mid, masked_pan, rrn, last_seq FROM txns ORDER BY txn"
        assert a.execute(q).fetchall() == b.execute(q).fetchall()
