"""posguard replay: drains a reversal backlog against HostServer on 127.0.0.1, pipelined; reruns and
SIGKILLs at random points never produce a charge; retry caps end in NEEDS_MANUAL with the reason."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from guard.ops.export import load_view
from guard.simulation.hostsim import HostCore
from guard.simulation.hostserver import HostServer
from guard.hostlink.iso import HostCodec
from guard.journal.store import Journal
from guard.journal.keys import load_keys
from guard.ops.replay import ReplayError, ReversalOnlyUplink
from guard.hostlink.uplink import Uplink
from guard.journal.verify import verify_journal
from tests.support import ROOT, free_port
from tests.support.ops_support import TID, Gen, guard_toml, net_invariant

KILLS = int(os.environ.get("POSGUARD_REPLAY_KILLS", "50"))


def host_requests(core: HostCore) -> int:
    return sum(core.stats()["requests_by_mti"].values())


def replay(cfg: Path, *args: str, kill_after: float | None = None, kill_after_requests: tuple[HostCore, int] | None = None,
           timeout: float = 120) -> tuple[int, dict[str, Any]]:
    """Run `posguard replay`; SIGKILL it after ``kill_after`` seconds or once the host named in
    ``kill_after_requests`` has received that many more messages, whichever comes first."""
    cmd = [sys.executable, "-m", "posguard.cli", "replay", "--config", str(cfg), "--json", *args]
    start_n = host_requests(kill_after_requests[0]) if kill_after_requests else 0
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        end = time.monotonic() + kill_after
        while proc.poll() is None and time.monotonic() < end:  # bounded by kill_after
            if kill_after_requests and host_requests(kill_after_requests[0]) - start_n >= kill_after_requests[1]:
                break
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode == -signal.SIGKILL:
        return proc.returncode, {}
    assert out.strip(), f"rc={proc.returncode} stderr={err[-2000:]}"
    return proc.returncode, json.loads(out)


def backlog(d: Path, core: HostCore, *, debited: int, unprocessed: int, approved: int = 100) -> Gen:
    """Sales answered, then an outage: answers lost after the host debited, requests lost before it
    saw them; the disconnect leaves all of them REVERSAL_PENDING (HOST_DISCONNECTED)."""
    g = Gen(d, core)
    g.host_up()
    g.sales(approved)
    g.sales(debited, respond=False)
    g.sales(unprocessed, respond=False, process=False)
    g.host_down()
    g.close()
    return g


def sales_seen(core: HostCore) -> int:
    by = core.stats()["requests_by_mti"]
    return by.get("0200", 0) + by.get("0201", 0)


def test_backlog_of_5000_drains_pipelined_and_reruns_send_nothing(tmp_path: Path) -> None:
    core = HostCore(seed=21, dup_detection=True)
    g = backlog(tmp_path, core, debited=2500, unprocessed=2500)
    sales_before = sales_seen(core)
    assert core.total_net_debits() > 2500  # the outage left 2,500 debits the terminal must reverse
    before = tmp_path / "before-replay.db"
    for suffix in ("", "-wal"):  # the journal as it was: a rollback to this must be detectable
        if Path(f"{g.path}{suffix}").exists():
            shutil.copyfile(f"{g.path}{suffix}", f"{before}{suffix}")
    server = HostServer(core, HostCodec())
    port = server.start()
    try:
        cfg = guard_toml(tmp_path / "guard.toml", journal=g.path, keys=tmp_path / "keys", port=port)
        code, rep = replay(cfg, "--window", "32")
        assert code == 0, rep
        assert rep["started_pending"] == 5000 and rep["reversed"] == 5000 and not rep["pending"]
        assert rep["sent"] == {"0400": 5000, "0800": 1}, "the reversals, then one checkpoint deposit"
        assert rep["items_per_s"] > 300, rep  # posguard.bench.ops measures the rate properly
        anchor = core.checkpoints()[-1]
        assert anchor["covers_seq"] == rep["checkpoint_deposited"] > 5000
        code, again = replay(cfg)
        assert code == 0 and again["started_pending"] == 0 and again["sent"] == {"0800": 1}
    finally:
        server.stop()
    assert sales_seen(core) == sales_before  # nothing was ever sent as a sale
    view = load_view(g.path)
    assert not net_invariant(core, view.txns)
    assert {t.state for t in view.txns.values()} <= {"APPROVED", "DECLINED", "REVERSED"}
    keys = load_keys(tmp_path / "keys")
    assert verify_journal(g.path, k0=keys.k0, public_key=keys.public_key, anchor=anchor).ok
    rolled_back = verify_journal(before, k0=keys.k0, public_key=keys.public_key, anchor=anchor)
    assert not rolled_back.ok and rolled_back.reason == "TRUNCATED", "the host's anchor exposes a rolled-back journal"


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun(tmp_path: Path) -> None:
    """SIGKILL the real `posguard replay` process KILLS times at random moments (while host faults
    force 0401 repeats), then let it finish: APPROVED <=> one net debit, otherwise none."""
    core = HostCore(seed=22, dup_detection=True, faults={"drop_request": 0.05, "debit_drop_response": 0.05})
    core.faults = {}
    g = backlog(tmp_path, core, debited=800, unprocessed=800)
    sales_before = sales_seen(core)
    core.faults = {"drop_request": 0.05, "debit_drop_response": 0.05}
    server = HostServer(core, HostCodec())
    port = server.start()
    rng = random.Random(23)
    try:
        cfg = guard_toml(tmp_path / "guard.toml", journal=g.path, keys=tmp_path / "keys", port=port,
                         reversal_timeout=0.3, max_attempts=1000)
        args = ("--window", "4", "--backoff-base", "0.05", "--backoff-max", "0.2", "--timeout", "60")
        kills = tries = 0
        pending = [1600]
        while kills < KILLS and tries < 3 * KILLS:
            tries += 1
            # A random moment (start-up, recovery, mid-window), or a random number of host messages
            # into the drain: the second keeps the kill count independent of the machine's speed.
            code, _ = replay(cfg, *args, kill_after=rng.uniform(0.05, 3.0),
                             kill_after_requests=(core, rng.randint(1, 40)))
            if code == -signal.SIGKILL:
                kills += 1
                pending.append(sum(t.state == "REVERSAL_PENDING" for t in load_view(g.path).txns.values()))
            else:
                assert code == 0
                break
        core.faults = {}
        code, rep = replay(cfg, *args)
        assert code == 0 and not rep["pending"], rep
    finally:
        server.stop()
    assert kills >= min(KILLS, 50) or pending[-1] == 0, (kills, pending)
    assert len(set(pending)) > 10, pending  # the kills landed at many different points of the drain
    assert sales_seen(core) == sales_before
    view = load_view(g.path)
    assert not net_invariant(core, view.txns)
    assert {t.state for t in view.txns.values()} <= {"APPROVED", "DECLINED", "REVERSED"}
    keys = load_keys(tmp_path / "keys")
    rep2 = verify_journal(g.path, k0=keys.k0, public_key=keys.public_key)
    assert rep2.ok, rep2
    print(f"kills={kills} pending after each kill={pending[:8]}...{pending[-3:]} host={core.stats()['requests_by_mti']}")


def test_retry_cap_ends_in_needs_manual_with_reason(tmp_path: Path) -> None:
    core = HostCore(seed=24, dup_detection=True)
    g = backlog(tmp_path, core, debited=3, unprocessed=2, approved=5)
    core.force("drop_request", 1000)  # the host never answers a reversal
    server = HostServer(core, HostCodec())
    port = server.start()
    try:
        cfg = guard_toml(tmp_path / "guard.toml", journal=g.path, keys=tmp_path / "keys", port=port,
                         reversal_timeout=0.2, max_attempts=2, reversal_max_age=1.5)
        code, rep = replay(cfg, "--backoff-base", "0.05", "--backoff-max", "0.1")
    finally:
        server.stop()
    assert code == 1, rep
    assert len(rep["needs_manual"]) == 5 and not rep["pending"]
    # Silence never counts toward the refusal cap (2): the reversals repeat until their horizon.
    assert {x["reason"] for x in rep["needs_manual"]} == {"REVERSAL_EXPIRED"}
    assert min(x["attempts"] for x in rep["needs_manual"]) > 2
    assert rep["sent"]["0400"] == 5 and rep["sent"]["0401"] >= 10 and rep["sent"]["0800"] == 1


def test_text_summary_lists_needs_manual(tmp_path: Path) -> None:
    core = HostCore(seed=25, dup_detection=True)
    g = backlog(tmp_path, core, debited=2, unprocessed=0, approved=1)
    core.force("drop_request", 100)
    server = HostServer(core, HostCodec())
    port = server.start()
    try:
        cfg = guard_toml(tmp_path / "guard.toml", journal=g.path, keys=tmp_path / "keys", port=port,
                         reversal_timeout=0.2, max_attempts=1, reversal_max_age=1.0)
        proc = subprocess.run([sys.executable, "-m", "posguard.cli", "replay", "--config", str(cfg)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    finally:
        server.stop()
    assert proc.returncode == 1
    assert "needs manual action" in proc.stdout and "REVERSAL_EXPIRED" in proc.stdout
    assert "still pending" in proc.stdout and "reversed" in proc.stdout


def test_host_unreachable_leaves_items_pending_exit_3(tmp_path: Path) -> None:
    core = HostCore(seed=26, dup_detection=True)
    g = backlog(tmp_path, core, debited=4, unprocessed=0, approved=0)
    cfg = guard_toml(tmp_path / "guard.toml", journal=g.path, keys=tmp_path / "keys", port=free_port())
    code, rep = replay(cfg, "--timeout", "1.5")
    assert code == 3 and len(rep["pending"]) == 4 and rep["sent"] == {}


def test_intents_without_outcome_are_reversed(tmp_path: Path) -> None:
    """A crash right after sending: the journal holds intents only; recovery queues their reversal."""
    core = HostCore(seed=27, dup_detection=True)
    g = Gen(tmp_path, core)
    g.host_up()
    g.sales(6, respond=False)  # the host debited, the terminal died before any answer or timeout
    g.close()
    assert {t.state for t in load_view(g.path).txns.values()} == {"JOURNALED"}
    server = HostServer(core, HostCodec())
    port = server.start()
    try:
        cfg = guard_toml(tmp_path / "guard.toml", journal=g.path, keys=tmp_path / "keys", port=port)
        code, rep = replay(cfg)
    finally:
        server.stop()
    assert code == 0 and rep["reversed"] == 6
    assert {t.reason for t in load_view(g.path).txns.values()} == {"RECOVERY"}
    assert core.total_net_debits() == 0


def test_busy_journal_exit_2(tmp_path: Path) -> None:
    core = HostCore(seed=28, dup_detection=True)
    g = backlog(tmp_path, core, debited=1, unprocessed=0, approved=0)
    cfg = guard_toml(tmp_path / "guard.toml", journal=g.path, keys=tmp_path / "keys", port=9)
    with Journal.open(g.path, load_keys(tmp_path / "keys"), terminal_id=TID):  # the daemon is running
        proc = subprocess.run([sys.executable, "-m", "posguard.cli", "replay", "--config", str(cfg)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "JOURNAL_BUSY" in proc.stderr


def test_reversal_only_uplink_refuses_sales() -> None:
    up = ReversalOnlyUplink(Uplink("127.0.0.1", 9, HostCodec()))
    for mti in ("0200", "0201", "0221", "0100"):
        with pytest.raises(ReplayError) as ei:
            up.send({"t": mti})
        assert ei.value.code == "REPLAY_FORBIDDEN_MTI"
    assert not up.sent


def test_window_option_reaches_the_engine(tmp_path: Path) -> None:
    """--window N: at most N reversals in flight (the host sees them before any answer)."""
    core = HostCore(seed=29, dup_detection=True)
    g = backlog(tmp_path, core, debited=0, unprocessed=40, approved=0)
    server = HostServer(core, HostCodec())
    core.force("delay_response", 40)
    core.late_delay = 0.3
    port = server.start()
    try:
        cfg = guard_toml(tmp_path / "guard.toml", journal=g.path, keys=tmp_path / "keys", port=port)
        t0 = time.monotonic()
        code, rep = replay(cfg, "--window", "16")
        took = time.monotonic() - t0
    finally:
        server.stop()
    assert code == 0 and rep["reversed"] == 40
    # every answer is delayed 0.3 s: 40 items in windows of 16 take 3 rounds, not 40
    assert took < 5.0, took


def offline_backlog(d: Path, core: HostCore, n: int) -> Gen:
    """``n`` sales approved offline (DEFERRED) while the host was unreachable."""
    from guard.core.engine import EngineConfig
    from guard.core.policies import OFF, OfflineConfig

    ecfg = EngineConfig(TID, "OPSMERCHANT0001", policy=OFF, reversal_timeout_s=5.0, backoff_base_s=1.0, backoff_max_s=4.0,
                        offline=OfflineConfig(enabled=True, max_sale_amount=10**6, max_total_amount=10**9, max_count=10**5))
    g = Gen(d, core, ecfg=ecfg, t=time.time() - 3600, step=1.0)  # an outage of the last hour
    keys = g.no_host_sales(n)
    assert all(g.engine.txns[k].state.value == "DEFERRED" for k in keys)
    g.close()
    return g


@pytest.mark.parametrize("dup_detection", [True, False])
def test_offline_sales_are_forwarded_as_advices_killed_and_rerun(tmp_path: Path, dup_detection: bool) -> None:
    """400 offline sales; the replay is SIGKILLed 10 times while the host drops requests and
    answers: every offline sale ends with exactly one debit (or none if declined), with and
    without duplicate detection at the host, and no 0200 is ever sent."""
    core = HostCore(seed=31, dup_detection=dup_detection)
    g = offline_backlog(tmp_path, core, 400)
    core.faults = {"drop_request": 0.05, "debit_drop_response": 0.05}
    server = HostServer(core, HostCodec())
    port = server.start()
    rng = random.Random(32)
    try:
        cfg = guard_toml(tmp_path / "guard.toml", journal=g.path, keys=tmp_path / "keys", port=port,
                         reversal_timeout=0.3, max_attempts=1000, host_timeout=0.3)
        args = ("--window", "8", "--backoff-base", "0.05", "--backoff-max", "0.2", "--timeout", "60")
        kills = 0
        for _ in range(30):
            code, _ = replay(cfg, *args, kill_after=rng.uniform(0.2, 0.8))
            if code != -signal.SIGKILL:
                break
            kills += 1
            if kills == 10:
                break
        core.faults = {}
        code, rep = replay(cfg, *args)
    finally:
        server.stop()
    assert code in (0, 1) and not rep["pending"], rep
    by = core.stats()["requests_by_mti"]
    assert by.get("0200", 0) == 0 and by.get("0220", 0) >= 400
    view = load_view(g.path)
    assert not net_invariant(core, view.txns)
    states = {t.state for t in view.txns.values()}
    assert states <= {"APPROVED", "DECLINED"}, states
    declined = [t for t in view.txns.values() if t.state == "DECLINED"]
    assert all(t.reason == "ADVICE_DECLINED" for t in declined)
    assert core.total_net_debits() == sum(t.state == "APPROVED" for t in view.txns.values())
    print(f"dup={dup_detection} kills={kills} host={by} declined={len(declined)}")
