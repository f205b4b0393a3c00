"""posguard journal anchor / show / export: read-only views of engine-made journals."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from guard.core.engine import Engine, EngineConfig
from guard.ops.export import build_view, load_view, parse_since
from guard.simulation.hostsim import HostCore
from guard.journal.records import looks_like_pan
from guard.journal.store import Journal
from guard.journal.keys import load_keys
from guard.runtime.service import JournalCrypto
from tests.support import cli
from tests.support.ops_support import MID, PANS, TID, cached_bulk, mixed_journal


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mixed")
    g = mixed_journal(d, HostCore(seed=2, dup_detection=True), needs_manual=5)
    return g.path


def test_view_states_are_the_engines(mixed: Path) -> None:
    keys = load_keys(mixed.parent / "keys")
    j = Journal.open(mixed, keys, terminal_id=TID)
    try:
        cfg = dataclasses.replace(EngineConfig(TID, MID), keep_final=10**9)
        eng = Engine.restore(cfg, JournalCrypto(j, keys.token_key), j.entries())
        view = build_view({"terminal_id": TID}, j.entries())
    finally:
        j.close()
    assert set(view.txns) == set(eng.txns)
    for k, t in eng.txns.items():
        v = view.txns[k]
        assert (v.state, v.stan, v.amount, v.rc, v.rrn, v.reason) == (t.state.value, t.stan, t.amount, t.rc, t.rrn, t.reason)
        assert [s for s, _, _ in v.history] == sorted(s for s, _, _ in v.history)
    assert {v.state for v in view.txns.values()} == {"APPROVED", "DECLINED", "REVERSAL_PENDING", "NEEDS_MANUAL"}


def test_export_jsonl_per_txn_masked_pans_only(mixed: Path) -> None:
    code, out, _ = cli("journal", "export", mixed, "--format", "jsonl")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    view = load_view(mixed)
    assert len(rows) == len(view.txns)
    r = rows[0]
    assert set(r) >= {"txn", "state", "stan", "amount", "rc", "approval", "rrn", "reason", "history", "masked_pan"}
    assert r["history"][0][1] == "intent" and all(len(h) == 3 for h in r["history"])
    assert "******" in r["masked_pan"]
    for line in out.splitlines():
        assert not looks_like_pan(line)
        assert not any(p in line for p in PANS)


def test_export_filters_and_csv(mixed: Path, tmp_path: Path) -> None:
    code, out, _ = cli("journal", "export", mixed, "--format", "jsonl", "--state", "reversal_pending,NEEDS_MANUAL")
    assert code == 0
    states = {json.loads(x)["state"] for x in out.splitlines()}
    assert states == {"REVERSAL_PENDING", "NEEDS_MANUAL"}
    dest = tmp_path / "entries.csv"
    code, _, err = cli("journal", "export", mixed, "--format", "csv", "--per", "entry", "--since", "100", "--out", dest)
    assert code == 0 and "rows written" in err
    rows = list(csv.DictReader(io.StringIO(dest.read_text())))
    assert rows[0]["seq"] == "100" and all(int(r["seq"]) >= 100 for r in rows)
    assert list(rows[0]) == ["seq", "time", "ts", "kind", "txn", "state", "payload"]
    json.loads(rows[0]["payload"])
    assert dest.stat().st_mode & 0o077 == 0
    code, out, _ = cli("journal", "export", mixed, "--format", "csv")
    txn_rows = list(csv.DictReader(io.StringIO(out)))
    first = txn_rows[0]["history"].split(";")[0].split("/")
    assert first[1] == "intent" and first[2].endswith("Z")


def test_since_iso_date(mixed: Path) -> None:
    view = load_view(mixed)
    times = sorted({t.updated for t in view.txns.values()})
    mid = times[-1]  # entries are committed in batches: several transactions share a time
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(mid))
    code, out, _ = cli("journal", "export", mixed, "--format", "jsonl", "--since", since)
    assert code == 0
    n = len(out.splitlines())
    assert 0 < n < len(view.txns)
    assert parse_since("2024-03-09").ts == 1709942400.0


@pytest.mark.parametrize("args, needle", [
    (["--since", "yesterday"], "EXPORT_BAD_SINCE"),
    (["--state", "PAID"], "EXPORT_BAD_STATE"),
])
def test_bad_filters_exit_2(mixed: Path, args: list[str], needle: str) -> None:
    code, _, err = cli("journal", "export", mixed, "--format", "jsonl", *args)
    assert code == 2 and needle in err


def test_not_a_journal_exit_2(tmp_path: Path) -> None:
    p = tmp_path / "x.db"
    sqlite3.connect(p).execute("CREATE TABLE t (x)").connection.close()
    for cmd in (["journal", "export", p, "--format", "csv"], ["journal", "show", p], ["journal", "anchor", p]):
        code, _, err = cli(*cmd)
        assert code == 2 and "JOURNAL_NOT_INITIALISED" in err


def test_show_prints_a_table(mixed: Path) -> None:
    code, out, _ = cli("journal", "show", mixed, "--limit", "5")
    assert code == 0
    assert "5 of 385 transactions" in out and ("DECLINED" in out or "APPROVED" in out)
    code, out, _ = cli("journal", "show", mixed, "--per", "entry", "--state", "NEEDS_MANUAL", "--limit", "0")
    assert code == 0 and "needs_manual" in out


def test_anchor_roundtrip_detects_rollback(mixed: Path, tmp_path: Path) -> None:
    j = tmp_path / "j.db"
    shutil.copy(mixed, j)
    keys = mixed.parent / "keys"
    code, out, _ = cli("journal", "anchor", j)
    assert code == 0
    anchor = tmp_path / "anchor.json"
    anchor.write_text(out)
    assert set(json.loads(out)) == {"counter", "covers_hash", "covers_seq", "terminal", "time", "sig"}
    ok = ["journal", "verify", j, "--k0", keys / "k0.escrow", "--pubkey", keys / "verify.pub", "--anchor", anchor]
    assert cli(*ok)[0] == 0
    # Roll the journal back before the anchor (what an attacker with the file could do).
    cp = json.loads(out)["covers_seq"]
    c = sqlite3.connect(j)
    c.execute("DROP TRIGGER entries_no_delete")
    c.execute("DELETE FROM entries WHERE seq > ?", (cp - 5,))
    c.execute("UPDATE ratchet SET next_seq = ?", (cp - 4,))
    c.commit()
    c.close()
    code, out, _ = cli("journal", "verify", j, "--pubkey", keys / "verify.pub", "--anchor", anchor, "--json")
    assert code == 1 and json.loads(out)["reason"] == "TRUNCATED"


def test_help_documents_exit_codes() -> None:
    for cmd in (["journal", "anchor"], ["journal", "show"], ["journal", "export"], ["journal", "compact"],
                ["journal", "verify-chain"], ["keys", "rotate"], ["keys", "export-verifier"], ["replay"],
                ["reconcile"]):
        code, out, _ = cli(*cmd, "--help")
        assert code == 0 and "Exit status" in out, cmd


@pytest.mark.slow
def test_export_100k_sales(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    journal, _, _ = cached_bulk(tmp_path_factory.getbasetemp())
    t0 = time.perf_counter()
    out = tmp_path / "txns.jsonl"
    assert cli("journal", "export", journal, "--format", "jsonl", "--out", out)[0] == 0
    with open(out) as f:
        n = sum(1 for _ in f)
    assert n == 100_000
    out2 = tmp_path / "entries.csv"
    assert cli("journal", "export", journal, "--format", "csv", "--per", "entry", "--since", "150000",
               "--out", out2)[0] == 0
    with open(out2) as f:
        assert sum(1 for _ in f) - 1 == journal_last_seq(journal) - 150000 + 1
    assert time.perf_counter() - t0 < 60


def journal_last_seq(path: Path) -> int:
    c = sqlite3.connect(path)
    try:
        return int(c.execute("SELECT max(seq) FROM entries").fetchone()[0])
    finally:
        c.close()


def test_journal_locked_by_maintenance_exit_3(mixed: Path, tmp_path: Path) -> None:
    """A journal in use is "could not complete" (3), as the documented exit-code rule says."""
    j = tmp_path / "j.db"
    shutil.copy(mixed, j)
    with Journal.open_exclusive(j, load_keys(mixed.parent / "keys"), terminal_id=TID):
        code, _, err = cli("journal", "export", j, "--format", "jsonl")
    assert code == 3 and "JOURNAL_BUSY" in err
