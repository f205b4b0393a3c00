"""SIGKILL the real guard (child process, journal on disk, TCP to the host simulator) at every
named point of the write path and at random times; after restart and drain the invariant holds
and the journal verifies."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from guard.core.engine import Engine, EngineConfig
from guard.simulation.hostsim import HostCore
from guard.simulation.hostserver import HostServer
from guard.hostlink.iso import HostCodec
from guard.journal.store import Journal
from guard.journal.keys import DeviceKeys, load_keys
from guard.core.model import TxnState
from guard.runtime.service import JournalCrypto
from guard.journal.verify import verify_journal
from tests.support import subprocess_env

CHILD = Path(__file__).with_name("crash_child.py")
TID, MID = "CRASHT01", "CRASHMERCHANT01"
POINTS = [
    "before_intent_commit",
    "after_intent_commit",
    "after_send",
    "after_response_before_commit",
    "after_outcome_commit",
    "mid_reversal_commit",
    "mid_reversal_send",
]
# Snapshots and automatic retention (the child turns both on, with a cut about every second).
RETENTION_POINTS = [
    "snapshot_before_commit",
    "snapshot_after_commit",
    "retention_mid_copy",
    "retention_before_archive",
    "retention_before_restart",
    "retention_after_restart",
]
KILLS_PER_POINT = int(os.environ.get("POSGUARD_KILLS_PER_POINT", "36"))
RANDOM_KILLS = int(os.environ.get("POSGUARD_RANDOM_KILLS", "64"))


def run_child(d: Path, port: int, start: int, count: int, point: str, nth: int, kill_after: float | None = None) -> int:
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(d), str(port), str(start), str(count), point, str(nth)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=subprocess_env(),
    )
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"child failed rc={proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    return proc.returncode


def check_invariant(d: Path, core: HostCore) -> dict[str, int]:
    keys = load_keys(d / "keys")
    j = Journal.open(d / "journal.db", keys, terminal_id=TID)
    eng = Engine.restore(EngineConfig(TID, MID), JournalCrypto(j, keys.token_key), j.entries())
    j.close()
    known = set()
    counts: dict[str, int] = {}
    for key, t in eng.txns.items():
        known.add((f"{t.stan:06d}", t.f7[:4]))
        net = core.net_debits(TID, MID, f"{t.stan:06d}", t.f7[:4])
        counts[t.state.value] = counts.get(t.state.value, 0) + 1
        assert t.state.final, f"{key} still {t.state.value} after the final drain"
        if t.state is TxnState.APPROVED:
            assert net == 1, f"{key} APPROVED but host holds {net} net debits"
        else:
            assert net == 0, f"{key} {t.state.value} but host holds {net} net debits"
    for (tid, mid, stan, mmdd), net in core.net_by_key().items():
        assert not net or (stan, mmdd) in known, f"host debit for stan {stan} unknown to the journal"
    rep = verify_journal(d / "journal.db", k0=keys.k0, public_key=keys.signing_key.public_key())
    assert rep.ok, f"journal does not verify: {rep.reason} at {rep.first_bad_seq}: {rep.detail}"
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("dup_detection", [True, False], ids=["host-dedup", "host-no-dedup"])
def test_sigkill_at_every_named_point_and_at_random(tmp_path: Path, keys: DeviceKeys, dup_detection: bool) -> None:
    faults = {"drop_request": 0.05, "delay_response": 0.05, "debit_drop_response": 0.05}
    core = HostCore(seed=11, dup_detection=dup_detection, faults=faults, late_delay=0.8)
    server = HostServer(core, HostCodec())
    port = server.start()
    rng = random.Random(5 if dup_detection else 6)
    kills = 0
    start = 0
    half = 2  # the two host modes share the CI budget of kills
    per_point = max(1, KILLS_PER_POINT // half)
    random_kills = max(1, RANDOM_KILLS // half)

    def progress() -> int:
        p = tmp_path / "progress"
        return int(p.read_text()) if p.exists() else start

    try:
        for point in POINTS:
            # Mid-reversal points need reversals: make most sales lose their answer there.
            core.faults = {"drop_request": 0.6, "debit_drop_response": 0.3} if point.startswith("mid_reversal") else faults
            hit = tries = 0
            while hit < per_point and tries < 4 * per_point:
                tries += 1
                rc = run_child(tmp_path, port, start, 3, point, rng.randint(1, 2))
                hit += rc == -signal.SIGKILL
                start = progress()
            assert hit == per_point, f"{point}: only {hit} kills in {tries} runs"
            kills += hit
        core.faults = faults
        hit = tries = 0
        while hit < random_kills and tries < 4 * random_kills:
            tries += 1
            # 40 sales: still busy when the kill comes at 0.3-1.2 s, on a fast machine too (with 4
            # sales, a clean clone on a faster VM finished most runs before the kill: 25 of 32).
            rc = run_child(tmp_path, port, start, 40, "none", 0, kill_after=rng.uniform(0.3, 1.2))
            hit += rc == -signal.SIGKILL
            start = progress()
        kills += hit
        core.faults = {}
        assert run_child(tmp_path, port, start, 0, "none", 0) == 0, "final drain did not finish"
        counts = check_invariant(tmp_path, core)
    finally:
        server.stop()
    print(f"kills={kills} sales={start} outcomes={counts} host={core.stats()}")
    assert kills >= len(POINTS) * per_point + random_kills * 0.8, f"only {kills} kills happened"


def check_invariant_with_archives(d: Path, core: HostCore) -> dict[str, int]:
    """``check_invariant`` over archives + live file: each transaction's latest complete history
    (a carried transaction's copy in a later file supersedes the archived one); verify-chain passes."""
    from guard.core.txn import rebuild
    from guard.ops.compact import archives_in, verify_chain

    keys = load_keys(d / "keys")
    files = [*archives_in(d / "archive", "journal"), d / "journal.db"]
    rep = verify_chain(files, k0=keys.k0, public_keys=[keys.signing_key.public_key()])
    assert rep.ok, f"verify-chain: {rep.problems} {[(f.path.name, f.report.reason) for f in rep.files]}"
    txns = {}
    for f in files:
        c = sqlite3.connect(f"file:{f}?mode=ro", uri=True)
        by: dict[str, list[Any]] = {}
        for seq, ts, kind, txn, payload in c.execute("SELECT seq, ts, kind, txn, payload FROM entries "
                                                     "WHERE txn IS NOT NULL ORDER BY seq"):
            by.setdefault(txn, []).append(SimpleNamespace(seq=seq, ts=ts, kind=kind, payload=json.loads(payload)))
        c.close()
        for key, es in by.items():
            t = rebuild(key, es)
            if t is not None:
                txns[key] = t
    counts: dict[str, int] = {}
    known = set()
    for key, t in txns.items():
        known.add((f"{t.stan:06d}", t.f7[:4]))
        counts[t.state.value] = counts.get(t.state.value, 0) + 1
        net = core.net_debits(TID, MID, f"{t.stan:06d}", t.f7[:4])
        assert t.state.final, f"{key} still {t.state.value} after the final drain"
        assert net == (1 if t.state is TxnState.APPROVED else 0), f"{key} {t.state.value}: host holds {net} net debits"
    for (tid, mid, stan, mmdd), net in core.net_by_key().items():
        assert not net or (stan, mmdd) in known, f"host debit for stan {stan} unknown to the journal"
    return counts


@pytest.mark.slow
def test_sigkill_at_every_step_of_snapshots_and_retention(tmp_path: Path, keys: DeviceKeys) -> None:
    """Snapshots every 16 entries and a retention cut about every second; SIGKILL at each step of
    both. After restart and drain: the invariant over archives + live, and verify-chain passes."""
    faults = {"drop_request": 0.05, "delay_response": 0.05, "debit_drop_response": 0.05}
    core = HostCore(seed=12, dup_detection=True, faults=faults, late_delay=0.8)
    server = HostServer(core, HostCodec())
    port = server.start()
    rng = random.Random(7)
    per_point = max(1, KILLS_PER_POINT // 6)
    start, kills = 0, 0

    def progress() -> int:
        p = tmp_path / "progress"
        return int(p.read_text()) if p.exists() else start

    try:
        for point in RETENTION_POINTS:
            hit = tries = 0
            while hit < per_point and tries < 6 * per_point:
                tries += 1
                rc = run_child(tmp_path, port, start, 12, point, rng.randint(1, 2))
                hit += rc == -signal.SIGKILL
                start = progress()
            assert hit == per_point, f"{point}: only {hit} kills in {tries} runs"
            kills += hit
        core.faults = {}
        assert run_child(tmp_path, port, start, 4, "retention_none", 0) == 0, "final drain did not finish"
        counts = check_invariant_with_archives(tmp_path, core)
    finally:
        server.stop()
    print(f"kills={kills} sales={start} outcomes={counts} archives={len(list((tmp_path / 'archive').glob('*')))}")
    assert counts.get("APPROVED", 0) > 0
