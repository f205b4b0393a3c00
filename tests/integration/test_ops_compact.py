"""posguard journal compact / verify-chain: archives verify on their own, the live journal restarts
from a signed segment record, the engine state of what stays live is unchanged, disk stays bounded."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from guard.runtime import restore
from guard.ops.compact import archives_in, compact, verify_chain
from guard.core.engine import Engine, EngineConfig
from guard.core.errors import JournalError
from guard.ops.export import load_view
from guard.simulation.hostsim import HostCore
from guard.simulation.hostserver import HostServer
from guard.hostlink.iso import HostCodec
from guard.journal.store import Journal
from guard.journal.keys import DeviceKeys, load_keys
from guard.core.policies import OFF
from guard.ops.replay import open_replay, run_replay
from guard.runtime.service import JournalCrypto
from guard.hostlink.uplink import Uplink
from guard.journal.verify import verify_journal
from tests.support import cli
from tests.support.ops_support import MID, TID, Gen, cached_bulk, mixed_journal

NOW = 1_800_000_000.0  # long after the generated sales


def engine_state(path: Path, keys: DeviceKeys) -> tuple[dict[str, tuple[Any, ...]], int]:
    with Journal.open(path, keys, terminal_id=TID) as j:
        cfg = dataclasses.replace(EngineConfig(TID, MID), keep_final=10**9)
        e = Engine.restore(cfg, JournalCrypto(j, keys.token_key), j.entries())
    return {k: (t.state, t.stan, t.f7, t.amount, t.rc, t.rrn, t.reason, t.rev_attempts, t.rev_failures, t.vault_ref,
                t.created) for k, t in e.txns.items()}, e.last_stan


def full(path: Path, keys: DeviceKeys, **kw: Any) -> Any:
    return verify_journal(path, k0=keys.k0, public_key=keys.public_key, **kw)


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, DeviceKeys, HostCore]:
    core = HostCore(seed=4, dup_detection=True)
    g = mixed_journal(tmp_path, core, approved=400, needs_manual=4)
    assert g.keys is not None
    return g.path, g.keys, core


def test_compact_cli_archive_and_live_both_verify(mixed: tuple[Path, DeviceKeys, HostCore], tmp_path: Path) -> None:
    path, keys, _ = mixed
    before, last_stan = engine_state(path, keys)
    vault_before = _vault(path)
    kdir = tmp_path / "keys"
    code, out, _ = cli("journal", "compact", path, "--older-than", "1", "--archive", tmp_path / "arch", "--keys", kdir,
                       "--json")
    assert code == 0, out
    res = json.loads(out)
    archive = Path(res["archive"])
    after, last_stan2 = engine_state(path, keys)
    live = {k for k, v in before.items() if not v[0].final or v[0].value == "NEEDS_MANUAL"}
    assert set(after) == live and res["kept_txns"] == len(live)
    assert all(after[k] == before[k] for k in after)  # same records, same timestamps: same engine state
    assert last_stan2 == last_stan
    assert _vault(path) == {r for r in vault_before if r[1] in live} and _vault(path)
    assert res["bytes_after"] < res["bytes_before"] / 3
    assert oct(archive.stat().st_mode & 0o777) == oct(0o400)
    # the archive on its own, the live journal on its own, and the chain
    for f, extra in ((archive, ()), (path, ("--archive", archive))):
        code, out, _ = cli("journal", "verify", f, *extra, "--k0", kdir / "k0.escrow", "--pubkey", kdir / "verify.pub",
                           "--json")
        assert code == 0, out
    assert json.loads(out)["first_seq"] == res["segment_seq"]
    code, out, _ = cli("journal", "verify-chain", path, archive, "--k0", kdir / "k0.escrow", "--pubkey", kdir / "verify.pub")
    assert code == 0, out
    with pytest.raises(JournalError) as ei:
        Journal.open(archive, keys, terminal_id=TID)
    assert ei.value.code == "JOURNAL_IS_ARCHIVE"
    # Export still works on both files.
    assert cli("journal", "export", archive, "--format", "jsonl")[0] == 0
    assert len(cli("journal", "export", path, "--format", "jsonl")[1].splitlines()) == len(live)


def _vault(path: Path) -> set[tuple[str, str]]:
    c = sqlite3.connect(path)
    try:
        return set(c.execute("SELECT ref, txn FROM vault"))
    finally:
        c.close()


def test_guard_carries_on_after_compaction(mixed: tuple[Path, DeviceKeys, HostCore], tmp_path: Path) -> None:
    """The carried pending reversals drain against the host that holds the debits; new sales get
    STANs after the last one; the journal (and the chain) still verify."""
    path, keys, core = mixed
    _, last_stan = engine_state(path, keys)
    res = compact(path, keys, tmp_path / "arch", older_than_days=0, now=NOW)
    assert res.archive is not None
    server = HostServer(core, HostCodec())
    port = server.start()
    try:
        ecfg = EngineConfig(TID, MID, policy=OFF, reversal_timeout_s=2.0)
        svc = open_replay(path, keys, ecfg, Uplink("127.0.0.1", port, HostCodec()), rng=random.Random(1))
        rep = run_replay(svc, timeout=30)
        assert rep.exit_code == 0 and len(rep.reversed) == 70, rep.to_json()
        svc.close()
        from tests.support.ops_support import PANS

        from guard.core.model import CardData, Request, TxnKind
        from guard.runtime.service import open_guard

        svc = open_guard(path, keys, ecfg, Uplink("127.0.0.1", port, HostCodec()), rng=random.Random(2))
        svc.run_until(lambda: svc.uplink.connected, 5)
        req = Request("R9", b"\x01" * 16, TxnKind.SALE, 1234, "978", CardData(PANS[0], "2912"))
        svc.submit(req)
        svc.run_until(lambda: not svc.engine.busy(), 10)
        assert svc.engine.txns[req.key].stan == last_stan + 2, "after the replay's checkpoint deposit (0800) STAN"
        assert svc.engine.txns[req.key].state.value == "APPROVED"
        svc.close()
    finally:
        server.stop()
    assert full(path, keys).ok
    assert verify_chain([res.archive, path], k0=keys.k0, public_keys=[keys.public_key]).ok


def test_second_compaction_and_bounded_disk(tmp_path: Path) -> None:
    core = HostCore(seed=5, dup_detection=True)
    g = Gen(tmp_path, core)
    g.host_up()
    assert g.keys is not None
    sizes = []
    for cycle in range(4):
        g.sales(1500)
        g.sales(10, respond=False)
        g.host_down()
        g.host_up()
        g.flush()
        g.journal.close()
        res = compact(g.path, g.keys, tmp_path / "arch", older_than_days=0, now=NOW + cycle)
        assert res.archive is not None
        sizes.append(res.bytes_after)
        g.journal = Journal.open(g.path, g.keys, terminal_id=TID)
        g.engine.crypto = JournalCrypto(g.journal, g.keys.token_key)
    g.close()
    archives = archives_in(tmp_path / "arch", "journal")
    assert len(archives) == 4
    rep = verify_chain([*archives, g.path], k0=g.keys.k0, public_keys=[g.keys.public_key])
    assert rep.ok, rep.problems
    # pending reversals pile up (10 per cycle) but the live file stays far below the archived volume
    assert max(sizes) < 200_000, sizes
    assert sum(a.stat().st_size for a in archives) > 4 * max(sizes)
    assert load_view(g.path).txns and all(t.state == "REVERSAL_PENDING" for t in load_view(g.path).txns.values())


def test_partial_age_keeps_young_final_transactions(mixed: tuple[Path, DeviceKeys, HostCore], tmp_path: Path) -> None:
    path, keys, _ = mixed
    view = load_view(path)
    times = sorted({t.updated for t in view.txns.values()})
    cut = times[len(times) // 2]
    young = {k for k, t in view.txns.items() if t.updated >= cut or not t.final or t.state == "NEEDS_MANUAL"}
    res = compact(path, keys, tmp_path / "arch", older_than_days=(NOW - cut) / 86400, now=NOW)
    assert res.archive is not None
    assert set(load_view(path).txns) == young
    assert 0 < res.archived_txns < len(view.txns)


def test_nothing_old_enough_changes_nothing(mixed: tuple[Path, DeviceKeys, HostCore], tmp_path: Path) -> None:
    path, _, _ = mixed
    data = path.read_bytes()
    code, out, _ = cli("journal", "compact", path, "--older-than", "100000", "--archive", tmp_path / "arch",
                       "--keys", tmp_path / "keys")
    assert code == 0 and "nothing to compact" in out
    assert path.read_bytes() == data and not (tmp_path / "arch").exists()


def test_compaction_refuses_a_journal_in_use(mixed: tuple[Path, DeviceKeys, HostCore], tmp_path: Path) -> None:
    path, keys, _ = mixed
    with Journal.open(path, keys, terminal_id=TID):  # the daemon
        code, _, err = cli("journal", "compact", path, "--older-than", "0", "--archive", tmp_path / "arch",
                           "--keys", tmp_path / "keys")
    assert code == 3 and "JOURNAL_BUSY" in err
    assert not archives_in(tmp_path / "arch") and full(path, keys).ok and full(path, keys).first_seq == 1


def test_crash_between_archive_and_restart_then_rerun(mixed: tuple[Path, DeviceKeys, HostCore], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path, keys, _ = mixed
    before, _ = engine_state(path, keys)

    def boom(self: Journal, *a: Any, **k: Any) -> Any:
        raise OSError("power cut")

    monkeypatch.setattr(Journal, "restart_segment", boom)
    with pytest.raises(OSError):
        compact(path, keys, tmp_path / "arch", older_than_days=0, now=NOW)
    monkeypatch.undo()
    assert len(archives_in(tmp_path / "arch")) == 1
    assert engine_state(path, keys)[0] == before and full(path, keys).ok  # untouched, plus a checkpoint
    res = compact(path, keys, tmp_path / "arch", older_than_days=0, now=NOW + 1)
    archives = archives_in(tmp_path / "arch")
    assert archives == [res.archive]  # the shorter archive of the interrupted run is gone
    assert verify_chain([res.archive, path], k0=keys.k0, public_keys=[keys.public_key]).ok


def test_restart_segment_is_atomic(mixed: tuple[Path, DeviceKeys, HostCore], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path, keys, _ = mixed
    before, _ = engine_state(path, keys)
    real = Journal._commit

    def fail_commit(self: Journal, cur: sqlite3.Cursor) -> None:
        if self.last_seq and cur.connection.in_transaction and cur.execute(
                "SELECT count(*) FROM entries WHERE kind = 'segment'").fetchone()[0]:
            cur.execute("ROLLBACK")
            raise sqlite3.OperationalError("disk I/O error")
        real(self, cur)

    monkeypatch.setattr(Journal, "_commit", fail_commit)
    with pytest.raises(sqlite3.OperationalError):
        compact(path, keys, tmp_path / "arch", older_than_days=0, now=NOW)
    monkeypatch.undo()
    assert engine_state(path, keys)[0] == before and full(path, keys).ok and full(path, keys).first_seq == 1


# --- tampering the compacted files is detected ---------------------------------------------------


@pytest.fixture
def compacted(mixed: tuple[Path, DeviceKeys, HostCore], tmp_path: Path) -> tuple[Path, Path, DeviceKeys, dict[str, Any]]:
    path, keys, _ = mixed
    with Journal.open(path, keys, terminal_id=TID) as j:
        old_anchor = j.latest_checkpoint()
    res = compact(path, keys, tmp_path / "arch", older_than_days=0, now=NOW)
    assert res.archive is not None
    return path, res.archive, keys, old_anchor


def _raw(path: Path) -> sqlite3.Connection:
    path.chmod(0o600)
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("DROP TRIGGER IF EXISTS entries_no_delete")
    c.execute("DROP TRIGGER IF EXISTS entries_no_update")
    return c


def test_deleting_the_live_prefix_is_detected(compacted: tuple[Path, Path, DeviceKeys, dict[str, Any]]) -> None:
    live, _, keys, _ = compacted
    c = _raw(live)
    first = c.execute("SELECT min(seq) FROM entries").fetchone()[0]
    c.execute("DELETE FROM entries WHERE seq < ?", (first + 3,))  # the segment record and two carried entries
    c.close()
    rep = full(live, keys)
    assert (rep.ok, rep.reason, rep.first_bad_seq) == (False, "ENTRY_MISSING", 1)


def test_changed_carried_entry_is_detected(compacted: tuple[Path, Path, DeviceKeys, dict[str, Any]]) -> None:
    live, archive, keys, _ = compacted
    c = _raw(live)
    seq, payload = c.execute("SELECT seq, payload FROM entries WHERE kind = 'intent' ORDER BY seq LIMIT 1").fetchone()
    c.execute("UPDATE entries SET payload = ? WHERE seq = ?", (payload.replace('"amount":', '"amount":1'), seq))
    c.close()
    rep = full(live, keys)
    assert (rep.ok, rep.reason, rep.first_bad_seq) == (False, "ENTRY_MODIFIED", seq)
    assert not verify_chain([archive, live], k0=keys.k0, public_keys=[keys.public_key]).ok


def test_truncated_archive_is_detected_with_k0(compacted: tuple[Path, Path, DeviceKeys, dict[str, Any]]) -> None:
    _, archive, keys, _ = compacted
    c = _raw(archive)
    last = c.execute("SELECT max(seq) FROM entries").fetchone()[0]
    c.execute("DELETE FROM entries WHERE seq > ?", (last - 10,))
    c.execute("UPDATE ratchet SET next_seq = ?", (last - 9,))
    c.close()
    rep = full(archive, keys)
    assert (rep.ok, rep.reason) == (False, "RATCHET_MISMATCH")


def test_dropped_pending_transaction_is_caught_by_verify_chain(mixed: tuple[Path, DeviceKeys, HostCore],
                                                               tmp_path: Path) -> None:
    """A (buggy or malicious) compaction that forgets a pending reversal: each file verifies alone,
    the chain check does not."""
    path, keys, _ = mixed
    view = load_view(path)
    pending = sorted(k for k, t in view.txns.items() if t.state == "REVERSAL_PENDING")
    with Journal.open_exclusive(path, keys, terminal_id=TID) as j:
        j.checkpoint(NOW)
        archive = tmp_path / "a.archive.db"
        j.write_archive(archive, now=NOW)
        j.restart_segment(set(pending[1:]), now=NOW)
    assert full(path, keys).ok and full(archive, keys).ok
    rep = verify_chain([archive, path], k0=keys.k0, public_keys=[keys.public_key])
    assert not rep.ok and "not carried over" in rep.problems[0] and pending[0] in rep.problems[0]


def test_anchors_before_and_after_the_cut(compacted: tuple[Path, Path, DeviceKeys, dict[str, Any]]) -> None:
    live, archive, keys, old_anchor = compacted
    rep = full(live, keys, anchor=old_anchor)
    assert (rep.ok, rep.reason) == (False, "ANCHOR_ELSEWHERE")
    assert full(archive, keys, anchor=old_anchor).ok
    with Journal.open(live, keys, terminal_id=TID) as j:
        new_anchor = j.latest_checkpoint()
    assert full(live, keys, anchor=new_anchor).ok
    rep = full(archive, keys, anchor=new_anchor)
    assert (rep.ok, rep.reason) == (False, "TRUNCATED")


def test_verify_chain_needs_every_archive(tmp_path: Path) -> None:
    core = HostCore(seed=6, dup_detection=True)
    g = Gen(tmp_path, core)
    g.host_up()
    assert g.keys is not None
    for cycle in range(2):
        g.sales(200)
        g.flush()
        g.journal.close()
        compact(g.path, g.keys, tmp_path / "arch", older_than_days=0, now=NOW + cycle)
        g.journal = Journal.open(g.path, g.keys, terminal_id=TID)
    g.close()
    a1, a2 = archives_in(tmp_path / "arch", "journal")
    kdir = tmp_path / "keys"
    assert cli("journal", "verify-chain", a1, a2, g.path, "--k0", kdir / "k0.escrow", "--pubkey", kdir / "verify.pub")[0] == 0
    code, out, _ = cli("journal", "verify-chain", a1, g.path, "--k0", kdir / "k0.escrow", "--json")
    assert code == 1 and "missing or overlapping" in " ".join(json.loads(out)["problems"])
    code, out, _ = cli("journal", "verify-chain", a2, g.path, "--json")
    assert code == 1 and "missing" in " ".join(json.loads(out)["problems"])
    # the second archive starts with a segment record: it verifies on its own too
    assert full(a2, g.keys).ok and full(a2, g.keys).first_seq > 1


def test_compaction_after_key_rotation(mixed: tuple[Path, DeviceKeys, HostCore], tmp_path: Path) -> None:
    from guard.ops.rotation import rotate_keys

    path, keys, _ = mixed
    original = keys.public_key
    rotate_keys(tmp_path / "keys", path, now=NOW)
    keys = load_keys(tmp_path / "keys")
    res = compact(path, keys, tmp_path / "arch", older_than_days=0, now=NOW + 1)
    assert res.archive is not None
    for trusted in ([original], [keys.public_key]):
        assert verify_journal(path, k0=keys.k0, public_keys=trusted).ok  # the segment carries the rotation
        assert verify_journal(res.archive, k0=keys.k0, public_keys=trusted).ok
    rotate_keys(tmp_path / "keys", path, now=NOW + 2)
    assert verify_journal(path, k0=keys.k0, public_key=original).ok


@pytest.mark.slow
def test_compact_100k_sales(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    src, kdir, _ = cached_bulk(tmp_path_factory.getbasetemp())
    path = tmp_path / "journal.db"
    shutil.copy(src, path)
    keys = load_keys(kdir)
    res = compact(path, keys, tmp_path / "arch", older_than_days=1, now=NOW)
    assert res.archive is not None and res.archived_txns == 100_000 and res.kept_txns == 0
    # what stays: a fixed part plus the archived-id index (~15 bytes per archived transaction)
    assert res.bytes_after < 100_000 + 16 * res.archived_txns < res.bytes_before / 30
    assert verify_chain([res.archive, path], k0=keys.k0, public_keys=[keys.public_key]).ok


def test_archived_ids_stay_taken_after_compaction(tmp_path: Path) -> None:
    """A reader re-sending the id of a sale compaction archived gets the stored result (no new
    0200); the same id with another amount is IDEMPOTENCY_MISMATCH; STATUS still answers; with the
    archive file gone the request is refused (ARCHIVE_UNAVAILABLE), never taken as a new sale."""
    from guard.core.errors import IdempotencyConflict, PosguardError
    from guard.core.model import Request
    from guard.runtime.service import open_guard

    core = HostCore(seed=41, dup_detection=False)
    g = Gen(tmp_path / "g", core, t=time.time() - 3 * 86400)
    g.host_up()
    reqs = [g.request(amount=1000 + i) for i in range(3)]
    for r in reqs:
        g.tick_clock()
        g.run(g.engine.submit(r, g.t))
    g.flush()
    g._drain_sends(respond=True)
    g.close()
    res = compact(g.path, g.keys, tmp_path / "arch", older_than_days=1, now=time.time())
    assert res.archived_txns == 3 and res.archive is not None
    sales_before = core.stats()["requests_by_mti"]["0200"]

    def guard() -> Any:
        return open_guard(g.path, g.keys, g.ecfg, Uplink("127.0.0.1", 9, HostCodec(), connect_timeout=0.2))

    svc = guard()
    try:
        assert not svc.engine.txns, "archived transactions are not in memory"
        svc.submit(reqs[0])
        again = svc.replies[reqs[0].key]
        assert again.state.value == "APPROVED" and again.stan == 1, "the archived result, not a new sale"
        with pytest.raises(IdempotencyConflict):
            svc.submit(Request(reqs[1].reader_id, reqs[1].txn_id, reqs[1].kind, 9999, "978", reqs[1].card))
        st = restore.status(svc.engine, svc.journal, reqs[2].key)
        assert st is not None and st.state.value == "APPROVED"
    finally:
        svc.close()
    assert core.stats()["requests_by_mti"]["0200"] == sales_before
    shutil.move(str(res.archive), str(tmp_path / "elsewhere.db"))
    svc = guard()
    try:
        with pytest.raises(PosguardError) as ei:
            svc.submit(reqs[2])
        assert ei.value.code == "ARCHIVE_UNAVAILABLE"
        assert reqs[2].key not in svc.engine.txns
    finally:
        svc.close()
    keys = load_keys(g.dir / "keys")
    assert verify_journal(g.path, k0=keys.k0, public_key=keys.public_key).ok, "the index is beside the chain, not in it"


def test_void_of_an_archived_sale_survives_a_restart_before_its_reversal_is_answered(tmp_path: Path) -> None:
    """A VOID of a sale compaction archived writes reversal_pending under the sale's key in the
    live file. Before: at the next start restore skipped that record (archived ids were noted only
    after restore, and the sale's entries were read from the live file alone), so the reversal was
    never sent and the VOID never settled; the customer kept the debit of a voided sale."""
    from guard.core.model import Request, TxnKind
    from guard.runtime.service import open_guard

    core = HostCore(seed=43, dup_detection=False)
    g = Gen(tmp_path / "g", core, t=time.time() - 3 * 86400)
    g.host_up()
    sale = g.request(amount=4200)
    g.tick_clock()
    g.run(g.engine.submit(sale, g.t))
    g.flush()
    g._drain_sends(respond=True)
    g.close()
    assert core.total_net_debits() == 1
    res = compact(g.path, g.keys, tmp_path / "arch", older_than_days=1, now=time.time())
    assert res.archived_txns == 1

    def guard() -> Any:  # no host listening: the reversal cannot be sent
        return open_guard(g.path, g.keys, g.ecfg, Uplink("127.0.0.1", 9, HostCodec(), connect_timeout=0.2))

    void = Request(sale.reader_id, bytes(range(16)), TxnKind.VOID, 4200, "978", None, sale.txn_id)
    svc = guard()
    try:
        svc.submit(void)
        assert svc.replies[void.key].in_progress
        assert svc.engine.txns[sale.key].state.value == "REVERSAL_PENDING"
    finally:
        svc.close()  # the terminal goes down before the reversal was sent
    svc = guard()
    try:
        assert sale.key in svc.engine.txns, "the archived sale's queued reversal is restored"
        assert svc.engine.txns[sale.key].state.value == "REVERSAL_PENDING"
        assert svc.engine.pending_reversals() == 1
        assert svc.engine.txns[sale.key].voided_by == void.key
    finally:
        svc.close()
