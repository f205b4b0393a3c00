"""posguard reconcile: every planted discrepancy found, no false alarms, bad CSVs named by line and
column, and --apply queues exactly the safe reversals, which the next replay sends."""

from __future__ import annotations

import csv
import json
import random
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from guard.core.engine import EngineConfig
from guard.ops.export import load_view
from guard.core.constants import SETTLEMENT_COLUMNS
from guard.simulation.hostsim import HostCore
from guard.simulation.hostserver import HostServer
from guard.hostlink.iso import HostCodec
from guard.journal.keys import DeviceKeys
from guard.core.policies import OFF
from guard.ops.reconcile import read_settlement, reconcile
from guard.ops.replay import open_replay, run_replay
from guard.hostlink.uplink import Uplink
from tests.support import cli
from tests.support.ops_support import MID, TID, cached_bulk, guard_toml, mixed_journal, net_invariant, write_settlement


def drain(path: Path, keys: DeviceKeys, core: HostCore) -> None:
    server = HostServer(core, HostCodec())
    port = server.start()
    try:
        svc = open_replay(path, keys, EngineConfig(TID, MID, policy=OFF), Uplink("127.0.0.1", port, HostCodec()),
                          rng=random.Random(1))
        rep = run_replay(svc, timeout=30)
        svc.close()
        assert rep.exit_code in (0, 1), rep.to_json()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def settled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, HostCore]:
    """Approved, host-declined, reversed (debited and not), no-host and never-settled sales;
    the queue drained; the host's settlement file."""
    d = tmp_path_factory.mktemp("settled")
    core = HostCore(seed=8, dup_detection=True)
    g = mixed_journal(d, core, approved=400, lost_debited=40, lost_unprocessed=30, no_host=10)
    assert g.keys is not None
    drain(g.path, g.keys, core)
    core.write_settlement_csv(d / "settlement.csv")
    assert not net_invariant(core, load_view(g.path).txns)
    return g.path, d / "settlement.csv", core


def rows_of(p: Path) -> list[dict[str, str]]:
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


def test_consistent_files_have_no_discrepancy(settled: tuple[Path, Path, HostCore]) -> None:
    path, csv_path, _ = settled
    code, out, _ = cli("reconcile", path, csv_path, "--json")
    assert code == 0, out
    rep = json.loads(out)
    assert rep["discrepancies"] == [] and rep["sales_compared"] == 480
    states = {t.state for t in load_view(path).txns.values()}
    assert {"APPROVED", "DECLINED", "REVERSED"} <= states


def plant(path: Path, src: Path, dst: Path) -> set[tuple[str, str, str]]:
    """Plant one discrepancy of every kind; returns the expected (category, action, stan)."""
    view = load_view(path)
    rows = rows_of(src)
    sale = {r["stan"]: r for r in rows if r["type"] == "SALE"}
    rev = {r["stan"]: r for r in rows if r["type"] == "REVERSAL"}
    by_state: dict[str, list[str]] = {}
    for t in view.txns.values():
        by_state.setdefault(t.state + ("/" + t.rc if t.state == "DECLINED" else ""), []).append(f"{t.stan:06d}")
    approved = [s for s in by_state["APPROVED"] if s in sale]
    reversed_debited = [s for s in by_state["REVERSED"] if s in rev and rev[s]["response"] == "00"]
    declined = [s for k, v in by_state.items() if k.startswith("DECLINED/") and k != "DECLINED/" for s in v]
    exp = set()
    s = approved[0]; sale[s]["response"] = "05"; exp.add(("APPROVED_MISSING_AT_HOST", "NONE", s))  # noqa: E702
    s = approved[1]; sale[s]["amount"] = str(int(sale[s]["amount"]) + 100); exp.add(("AMOUNT_MISMATCH", "FLAG_REFUND", s))  # noqa: E702,E501
    s = approved[2]; sale[s]["amount"] = str(int(sale[s]["amount"]) - 1); exp.add(("AMOUNT_MISMATCH", "NONE", s))  # noqa: E702,E501
    s = approved[3]; rows.append(dict(sale[s])); exp.add(("DOUBLE_DEBIT", "FLAG_REFUND", s))  # noqa: E702
    s = reversed_debited[0]; rows.remove(rev[s]); exp.add(("REVERSED_BUT_SETTLED", "FLAG_REFUND", s))  # noqa: E702
    s = declined[0]; sale[s]["response"] = "00"; exp.add(("FAILED_BUT_DEBITED", "QUEUE_REVERSAL", s))  # noqa: E702
    ghost = dict(sale[approved[4]], stan="999990", rrn="999999999999")
    rows.append(ghost)
    exp.add(("FAILED_BUT_DEBITED", "FLAG_REFUND", "999990"))
    rows.append(dict(sale[approved[5]], tid="OTHER001"))  # another terminal's row: ignored
    write_settlement(dst, rows)
    return exp


def test_every_planted_discrepancy_is_found(settled: tuple[Path, Path, HostCore], tmp_path: Path) -> None:
    path, src, _ = settled
    exp = plant(path, src, tmp_path / "planted.csv")
    code, out, _ = cli("reconcile", path, tmp_path / "planted.csv", "--json")
    assert code == 1
    rep = json.loads(out)
    got = {(d["category"], d["action"], d["stan"]) for d in rep["discrepancies"]}
    assert got == exp
    assert rep["rows_other_terminals"] == 1
    code, out, _ = cli("reconcile", path, tmp_path / "planted.csv")
    assert code == 1 and "7 discrepancies" in out and "QUEUE_REVERSAL" in out


BAD = [
    ("missing column", lambda h, r: (h[:4] + h[5:], [x[:4] + x[5:] for x in r]), 1, "rrn"),
    ("bad amount", lambda h, r: (h, r[:3] + [r[3][:5] + ["12.50"] + r[3][6:]] + r[4:]), 5, "amount"),
    ("bad stan", lambda h, r: (h, r[:1] + [r[1][:3] + ["12a456"] + r[1][4:]] + r[2:]), 3, "stan"),
    ("bad type", lambda h, r: (h, r[:2] + [r[2][:6] + ["CHARGEBACK"] + r[2][7:]] + r[3:]), 4, "type"),
    ("bad date", lambda h, r: (h, r[:6] + [["1399"] + r[6][1:]] + r[7:]), 8, "date"),
    ("short row", lambda h, r: (h, r[:1] + [r[1][:5]] + r[2:]), 3, ""),
]


@pytest.mark.parametrize("name, mutate, line, column", BAD, ids=[b[0] for b in BAD])
def test_bad_csv_exit_2_names_line_and_column(settled: tuple[Path, Path, HostCore], tmp_path: Path, name: str,
                                              mutate: Any, line: int, column: str) -> None:
    path, src, _ = settled
    with open(src, newline="") as f:
        data = list(csv.reader(f))
    header, body = mutate(data[0], data[1:])
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *body])
    j = tmp_path / "j.db"
    shutil.copy(path, j)
    cfg = guard_toml(tmp_path / "guard.toml", journal=j, keys=path.parent / "keys", port=9)
    before = j.read_bytes()
    code, _, err = cli("reconcile", j, bad, "--apply", "--config", cfg)
    assert code == 2, err
    assert f"line {line}" in err and (f"column '{column}'" in err if column else True) and "SETTLEMENT_INVALID" in err
    assert j.read_bytes() == before  # nothing applied


def test_header_may_name_columns_by_iso_field_number(settled: tuple[Path, Path, HostCore], tmp_path: Path) -> None:
    """A host report headed date,41,42,11,37,AMOUNT,type,39 (issue wording) reads the same."""
    path, src, _ = settled
    with open(src, newline="") as f:
        data = list(csv.reader(f))
    iso = {"tid": "41", "mid": "42", "stan": "11", "rrn": "37", "response": "39", "amount": "AMOUNT"}
    renamed = tmp_path / "iso.csv"
    with open(renamed, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([[iso.get(h, h) for h in data[0]], *data[1:]])
    code, out, _ = cli("reconcile", path, renamed, "--json")
    assert code == 0 and json.loads(out)["sales_compared"] == 480, out
    both = tmp_path / "both.csv"
    with open(both, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([[*data[0], "41"], *[[*r, "X"] for r in data[1:]]])
    code, _, err = cli("reconcile", path, both, "--json")
    assert code == 2 and "column 'tid'" in err and "more than once" in err


def test_settlement_as_a_spreadsheet_saves_it_reads_the_same(settled: tuple[Path, Path, HostCore], tmp_path: Path) -> None:
    """Issue 15 item 18: opened and saved in a spreadsheet, the host's CSV gains a UTF-8 BOM, ';'
    delimiters, loses the STANs' (and responses') leading zeros; types may be lower case. Same rows."""
    path, src, _ = settled
    with open(src, newline="") as f:
        data = list(csv.reader(f))
    h = data[0]
    col = {name: h.index(name) for name in ("stan", "type", "response", "date")}
    saved = []
    for r in data[1:]:
        r = list(r)
        r[col["stan"]] = str(int(r[col["stan"]]))
        r[col["response"]] = str(int(r[col["response"]])) if r[col["response"]].isdigit() else r[col["response"]]
        r[col["date"]] = str(int(r[col["date"]]))
        r[col["type"]] = r[col["type"]].lower()
        saved.append(r)
    assert any(len(r[col["stan"]]) < 6 for r in saved) and any(r[col["response"]] == "0" for r in saved)
    sheet = tmp_path / "sheet.csv"
    with open(sheet, "w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f, delimiter=";", lineterminator="\r\n").writerows([h, *saved])
    assert sheet.read_bytes().startswith(b"\xef\xbb\xbf")
    assert [r.__dict__ if hasattr(r, "__dict__") else r for r in read_settlement(sheet)] == read_settlement(src)
    assert cli("reconcile", path, sheet)[0] == 0
    one = tmp_path / "pipes.csv"
    one.write_text("|".join(h) + "\n")
    code, _, err = cli("reconcile", path, one)
    assert code == 2 and "delimiter must be ',', ';' or a tab" in err


def test_settlement_columns_are_the_host_simulators() -> None:
    from guard.ops import reconcile as R

    assert R.SETTLEMENT_COLUMNS == SETTLEMENT_COLUMNS == ("date", "tid", "mid", "stan", "rrn", "amount", "type", "response")


def test_apply_queues_reversals_that_replay_sends(tmp_path: Path) -> None:
    """NEEDS_MANUAL sales still debited at the host: reconcile finds them, --apply queues their
    reversal (and nothing else), replay sends it, the host's debit goes, a new settlement is clean."""
    core = HostCore(seed=9, dup_detection=True)
    g = mixed_journal(tmp_path, core, approved=100, lost_debited=5, lost_unprocessed=5, needs_manual=3)
    assert g.keys is not None
    drain(g.path, g.keys, core)
    server = HostServer(core, HostCodec())
    port = server.start()
    try:
        cfg = guard_toml(tmp_path / "guard.toml", journal=g.path, keys=tmp_path / "keys", port=port)
        core.write_settlement_csv(tmp_path / "s1.csv")
        manual = {f"{t.stan:06d}" for t in load_view(g.path).txns.values() if t.state == "NEEDS_MANUAL"}
        assert len(manual) == 3
        last_seq = load_view(g.path).last_seq
        code, out, _ = cli("reconcile", g.path, tmp_path / "s1.csv", "--apply", "--config", cfg, "--json")
        rep = json.loads(out)
        assert code == 1 and rep["applied"] == 3
        assert {(d["stan"], d["action"]) for d in rep["discrepancies"]} == {(s, "QUEUE_REVERSAL") for s in manual}
        view = load_view(g.path)
        added = _entries_after(g.path, last_seq)
        assert [(k, json.loads(p)["reason"]) for k, p in added] == [("reversal_pending", "RECONCILE")] * 3
        assert {f"{t.stan:06d}" for t in view.txns.values() if t.state == "REVERSAL_PENDING"} == manual
        code, out, _ = cli("reconcile", g.path, tmp_path / "s1.csv", "--apply", "--config", cfg, "--json")
        assert code == 1 and json.loads(out)["applied"] == 0  # already queued: action NONE now
        assert {d["action"] for d in json.loads(out)["discrepancies"]} == {"NONE"}
        code, out, _ = cli("replay", "--config", cfg, "--json", "--timeout", "30")
        assert code == 0 and json.loads(out)["sent"] == {"0401": 3, "0800": 1}, out
    finally:
        server.stop()
    core.write_settlement_csv(tmp_path / "s2.csv")
    assert cli("reconcile", g.path, tmp_path / "s2.csv")[0] == 0
    assert not net_invariant(core, load_view(g.path).txns)


def _entries_after(path: Path, seq: int) -> list[tuple[str, str]]:
    c = sqlite3.connect(path)
    try:
        return list(c.execute("SELECT kind, payload FROM entries WHERE seq > ? AND kind != 'checkpoint' ORDER BY seq",
                              (seq,)))
    finally:
        c.close()


def test_apply_needs_config_and_a_free_journal(settled: tuple[Path, Path, HostCore], tmp_path: Path) -> None:
    path, src, _ = settled
    exp = plant(path, src, tmp_path / "p.csv")
    assert exp
    code, _, err = cli("reconcile", path, tmp_path / "p.csv", "--apply")
    assert code == 2 and "--config" in err
    j = tmp_path / "j.db"
    shutil.copy(path, j)
    cfg = guard_toml(tmp_path / "guard.toml", journal=j, keys=path.parent / "keys", port=9)
    from guard.journal.store import Journal
    from guard.journal.keys import load_keys

    before = j.read_bytes()
    with Journal.open(j, load_keys(path.parent / "keys"), terminal_id=TID):
        code, _, err = cli("reconcile", j, tmp_path / "p.csv", "--apply", "--config", cfg)
    assert code == 3 and "JOURNAL_BUSY" in err
    assert load_view(j).last_seq == load_view(path).last_seq and before


@pytest.mark.slow
def test_reconcile_100k_sales(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    journal, _, settlement = cached_bulk(tmp_path_factory.getbasetemp())
    t0 = time.perf_counter()
    code, out, _ = cli("reconcile", journal, settlement, "--json")
    assert code == 0, out[:500]
    assert json.loads(out)["sales_compared"] == 100_000
    rows = read_settlement(settlement)
    assert len(rows) == 100_000
    # plant: a missing approval, a changed amount, a settled decline
    raw = rows_of(settlement)
    approved = [i for i, r in enumerate(raw) if r["response"] == "00"]
    declined = [i for i, r in enumerate(raw) if r["response"] != "00"]
    raw[approved[10]]["response"] = "91"
    raw[approved[50_000]]["amount"] = "1"
    raw[declined[7]]["response"] = "00"
    write_settlement(tmp_path / "p.csv", raw)
    view = load_view(journal)
    rep = reconcile(view, read_settlement(tmp_path / "p.csv"))
    got = {(d.category, d.stan) for d in rep.discrepancies}
    assert got == {("APPROVED_MISSING_AT_HOST", raw[approved[10]]["stan"]),
                   ("AMOUNT_MISMATCH", raw[approved[50_000]]["stan"]),
                   ("FAILED_BUT_DEBITED", raw[declined[7]]["stan"])}
    assert time.perf_counter() - t0 < 60


def test_reconcile_after_compaction_reads_the_archives_and_never_flags_archived_sales(
        settled: tuple[Path, Path, HostCore], tmp_path: Path) -> None:
    """Compaction moved every sale to an archive: reconcile still finds them there (no false
    alarm); with the archive gone it asks for it instead of recommending refunds; a planted
    debit of an archived declined sale is a refund, not a reversal (too old to reverse)."""
    path, src, _ = settled
    j = tmp_path / "journal.db"
    shutil.copy(path, j)
    code, out, err = cli("journal", "compact", j, "--older-than", "0", "--archive", tmp_path / "arch",
                         "--keys", path.parent / "keys", "--json")
    assert code == 0, err
    archive = next((tmp_path / "arch").glob("*.archive.db"))
    assert load_view(j).txns == {} or all(t.state == "REVERSAL_PENDING" for t in load_view(j).txns.values())
    code, out, _ = cli("reconcile", j, src, "--json")
    rep = json.loads(out)
    assert code == 0 and rep["discrepancies"] == [] and rep["sales_compared"] == 480, out
    assert rep["archives"] == [str(archive.resolve())] and rep["missing_archives"] == []

    moved = tmp_path / "offsite" / archive.name
    moved.parent.mkdir()
    archive.rename(moved)
    code, out, _ = cli("reconcile", j, src, "--json")
    rep = json.loads(out)
    assert code == 1 and rep["missing_archives"] == [str(archive.resolve())]
    assert rep["discrepancies"] and {d["action"] for d in rep["discrepancies"]} == {"NONE"}, "no refund on a guess"
    code, out, _ = cli("reconcile", j, src, "--archive", moved, "--json")
    assert code == 0 and json.loads(out)["discrepancies"] == []

    rows = rows_of(src)
    declined = next(t for t in load_view(moved).txns.values() if t.state == "DECLINED" and t.rc == "05")
    sale = next(r for r in rows if r["type"] == "SALE" and r["stan"] == f"{declined.stan:06d}")
    sale["response"] = "00"
    write_settlement(tmp_path / "planted.csv", rows)
    code, out, _ = cli("reconcile", j, tmp_path / "planted.csv", "--archive", moved, "--json")
    [d] = json.loads(out)["discrepancies"]
    assert code == 1 and d["category"] == "FAILED_BUT_DEBITED" and d["action"] == "FLAG_REFUND" and "archived" in d["note"]


def test_settlement_rows_with_any_approval_code_are_debits(settled: tuple[Path, Path, HostCore],
                                                           tmp_path: Path) -> None:
    """An acquirer books 08, 11, 16 like 00, and a 10 for its partial amount: a settlement row with
    one of them is a debit. Before, only 00 was, so a sale the terminal declined while the host
    booked it with 08 went unreported (found by the acquirer-profile simulation)."""
    path, src, _ = settled
    view = load_view(path)
    rows = rows_of(src)
    sale = {r["stan"]: r for r in rows if r["type"] == "SALE"}
    declined = [f"{t.stan:06d}" for t in view.txns.values() if t.state == "DECLINED" and t.rc and f"{t.stan:06d}" in sale]
    planted = {}
    for code, s in zip(("08", "11", "16", "10"), declined):
        sale[s]["response"] = code
        planted[s] = code
    assert len(planted) == 4
    dst = tmp_path / "settlement.csv"
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    code, out, _ = cli("reconcile", path, dst, "--json")
    found = {(d["stan"], d["category"], d["action"]) for d in json.loads(out)["discrepancies"]}
    assert found == {(s, "FAILED_BUT_DEBITED", "QUEUE_REVERSAL") for s in planted}, found
