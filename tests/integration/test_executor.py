"""The one executor: its semantics over small ports, that every driver (daemon loop, replay,
simulator) runs that same class, that the simulation catches a broken executor, and that a
simulated seed leaves a byte-identical journal."""

from __future__ import annotations

import os
import random
import re
import selectors
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from guard.core.engine import Action, Append, EngineConfig, Reply, SendHost
from guard.core.model import CardData, Result, TxnState
from guard.core.policies import OFF
from guard.hostlink.uplink import SendOutcome
from guard.journal.keys import init_keys
from guard.runtime import executor as X
from guard.runtime.executor import BATCH, Executor
from guard.runtime.facade import REPLIES_KEPT, GuardFacade
from guard.runtime.service import CONNECTING_WAIT_S, GuardService, open_guard
from guard.simulation import deterministic as D
from guard.simulation.deterministic import SimConfig, run_seed

from tests.support import ROOT
NOW = 1_760_000_000.0


class StubEngine:
    """Records which entry points the executor called and hands back scripted actions."""

    def __init__(self, **scripted: list[Action]) -> None:
        self.scripted = scripted
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        def entry(*args: Any) -> list[Action]:
            self.calls.append((name, args))
            return list(self.scripted.get(name, []))
        return entry


class Ports:
    """Store, host and reader ports that log every effect in one ordered list."""

    def __init__(self, outcome: SendOutcome = SendOutcome.SENT, connected: bool = True, fail_on: str = "") -> None:
        self.log: list[Any] = []
        self.outcome = outcome
        self.up = connected
        self.fail_on = fail_on
        self.vault: dict[str, bytes] = {}

    # StorePort
    def append(self, records: Any, *, now: float, vault_put: Any = (), vault_shred: Any = ()) -> None:
        kinds = [k for k, _, _ in records]
        if self.fail_on in kinds:
            raise OSError("disk gone")
        self.log.append(("commit", kinds))

    def vault_open(self, ref: str) -> bytes | None:
        return self.vault.get(ref)

    def maybe_checkpoint(self, now: float) -> bool:
        return False

    # HostPort
    @property
    def connected(self) -> bool:
        return self.up

    def send(self, fields: dict[str, str]) -> SendOutcome:
        self.log.append(("send", dict(fields)))
        return self.outcome

    def drop(self, now: float) -> None:
        self.up = False
        self.log.append(("drop",))

    def cork(self, on: bool) -> None:
        self.log.append(("cork", on))

    # ReaderPort
    def deliver(self, result: Result) -> None:
        self.log.append(("reply", result.key))


def make(ports: Ports, engine: StubEngine | None = None, **kw: Any) -> tuple[Executor, StubEngine]:
    eng = engine or StubEngine()
    return Executor(eng, ports, ports, ports, lambda: NOW, **kw), eng  # type: ignore[arg-type]


def app(kind: str, key: str = "k") -> Append:
    return Append([(kind, key, {})])


def test_fields_2_and_14_from_the_card_or_the_vault_after_a_restart() -> None:
    p = Ports()
    p.vault["ref1"] = b"4761739001010119|2912"
    ex, _ = make(p)
    ex.run([SendHost("a", {"t": "0200"}, card=CardData("5413330089020011", "2701")),
            SendHost("b", {"t": "0400"}, card_ref="ref1"), SendHost("c", {"t": "0800"})])
    sent = [e[1] for e in p.log]
    assert sent[0] == {"t": "0200", "2": "5413330089020011", "14": "2701"}
    assert sent[1] == {"t": "0400", "2": "4761739001010119", "14": "2912"}
    assert sent[2] == {"t": "0800"}


def test_not_connected_fails_the_send_and_its_actions_run_before_the_rest() -> None:
    p = Ports(connected=False)
    ex, eng = make(p, StubEngine(send_failed=[app("outcome"), Reply(Result("k", TxnState.DECLINED))]))
    ex.run([SendHost("k", {"t": "0200"}), Reply(Result("later", TxnState.APPROVED))])
    assert eng.calls == [("send_failed", ("k", NOW))]
    assert p.log == [("commit", ["outcome"]), ("reply", "k"), ("reply", "later")]


def test_not_sent_fails_the_send_and_drops_the_link_without_host_down() -> None:
    p = Ports(outcome=SendOutcome.NOT_SENT)
    ex, eng = make(p, StubEngine(send_failed=[app("outcome")]))
    ex.run([SendHost("k", {"t": "0200"}), app("after")])
    assert [c[0] for c in eng.calls] == ["send_failed"]
    assert [e[0] for e in p.log] == ["send", "drop", "commit", "commit"]


def test_maybe_sent_drops_the_link_and_tells_the_engine_host_down() -> None:
    p = Ports(outcome=SendOutcome.MAYBE_SENT)
    ex, eng = make(p, StubEngine(on_host_down=[app("reversal_pending")]))
    ex.run([SendHost("k", {"t": "0200"}), SendHost("k2", {"t": "0200"})])
    assert [c[0] for c in eng.calls] == ["on_host_down", "send_failed"], "the second send finds the link down"
    assert [e[0] for e in p.log] == ["send", "drop", "commit"]


def test_a_failed_commit_stops_everything_after_it() -> None:
    p = Ports(fail_on="outcome")
    ex, _ = make(p)
    with pytest.raises(OSError):
        ex.run([app("intent"), app("outcome"), SendHost("k", {"t": "0200"}), Reply(Result("k", TxnState.APPROVED))])
    assert p.log == [("commit", ["intent"])]


def test_batch_policy_coalesces_commits_before_sends_and_corks_bursts() -> None:
    p = Ports()
    ex, _ = make(p, policy=BATCH)
    ex.run([app("a"), app("b"), SendHost("1", {"t": "0400"}), SendHost("2", {"t": "0400"}), app("c"),
            Reply(Result("r", TxnState.REVERSED)), app("d"), app("e")])
    assert [e if e[0] != "send" else ("send",) for e in p.log] == [
        ("commit", ["a", "b"]), ("cork", True), ("send",), ("send",), ("cork", False),
        ("commit", ["c"]), ("reply", "r"), ("commit", ["d", "e"])]


def test_collected_answers_run_with_the_next_call_in_one_commit() -> None:
    p = Ports()
    eng = StubEngine(host_message=[app("outcome")], tick=[app("reversal_attempt")])
    ex, _ = make(p, eng, policy=BATCH)
    ex.defer(eng.host_message, {"t": "0410"})
    ex.defer(eng.host_message, {"t": "0410"})
    assert p.log == []
    ex.call(eng.tick)
    assert p.log == [("commit", ["outcome", "outcome", "reversal_attempt"])]
    daemon, _ = make(Ports(), eng)
    daemon.defer(eng.host_message, {"t": "0210"})
    assert daemon.store.log == [("commit", ["outcome"])], "the daemon policy runs answers at once"  # type: ignore[attr-defined]


def test_facade_delivers_results_per_reader_prefix_and_keeps_the_latest() -> None:
    f = GuardFacade(StubEngine())  # type: ignore[arg-type]
    got: dict[str, list[str]] = {"R1": [], "R2": []}
    f.subscribe("R1:", lambda r: got["R1"].append(r.key))
    stop = f.subscribe("R2:", lambda r: got["R2"].append(r.key))
    f.deliver(Result("R1:aa", TxnState.APPROVED))
    f.deliver(Result("R2:bb", TxnState.APPROVED))
    stop()
    f.deliver(Result("R2:cc", TxnState.APPROVED))
    assert got == {"R1": ["R1:aa"], "R2": ["R2:bb"]}
    for i in range(REPLIES_KEPT + 5):
        f.deliver(Result(f"R3:{i}", TxnState.APPROVED))
    assert len(f.replies) == REPLIES_KEPT and "R3:5" in f.replies and "R1:aa" not in f.replies


# ---------------------------------------------------------------------- one executor everywhere


class FakeUplink:
    """Uplink stand-in: connect() needs ``rounds`` calls (non-blocking connect in progress)."""

    def __init__(self, rounds: int, with_connecting: bool = True) -> None:
        self.rounds = rounds
        self.calls = 0
        self.connected = False
        self._connecting = False
        self.with_connecting = with_connecting
        self.pair = socket.socketpair()

    def __getattr__(self, name: str) -> Any:
        if name == "connecting" and self.__dict__.get("with_connecting"):
            return self._connecting
        raise AttributeError(name)

    def connect(self) -> bool:
        self.calls += 1
        if self.calls < self.rounds:
            self._connecting = True
            return False
        self._connecting = False
        self.connected = True
        return True

    def fileno(self) -> int:
        return self.pair[0].fileno()

    def poll(self) -> list[Any]:
        return []

    def send(self, fields: dict[str, str]) -> SendOutcome:
        return SendOutcome.SENT

    def close(self) -> None:
        self.connected = False

    def shutdown(self) -> None:
        for s in self.pair:
            s.close()


def _guard(tmp_path: Path, uplink: Any, **kw: Any) -> GuardService:
    return open_guard(tmp_path / "j.db", init_keys(tmp_path / "keys"), EngineConfig("EXECTST1", "EXECMERCHANT001", policy=OFF),
                      uplink, rng=random.Random(1), **kw)


def test_the_loop_keeps_calling_connect_while_connecting_and_waits_briefly(tmp_path: Path) -> None:
    up = FakeUplink(rounds=4)
    svc = _guard(tmp_path, up, reconnect_s=30.0)
    waits: list[float] = []
    real = svc.selector.select

    def select(timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        waits.append(timeout if timeout is not None else -1.0)
        return real(0)

    svc.selector.select = select  # type: ignore[method-assign]
    try:
        for _ in range(4):
            svc.step(0.05)
        assert up.calls == 4 and up.connected, "connect() was called every round, not after reconnect_s"
        assert all(0 < w <= CONNECTING_WAIT_S for w in waits[:3]), waits  # brief waits, not a busy loop
    finally:
        svc.close()
        up.shutdown()
    plain = FakeUplink(rounds=4, with_connecting=False)
    svc = _guard(tmp_path / "b", plain, reconnect_s=30.0)
    try:
        for _ in range(3):
            svc.step(0.0)
        assert plain.calls == 1, "a refused connect is retried only after reconnect_s"
    finally:
        svc.close()
        plain.shutdown()


def test_daemon_replay_and_simulator_run_the_same_executor_class(tmp_path: Path) -> None:
    from guard.ops.replay import ReplayService

    up = FakeUplink(rounds=1)
    svc = _guard(tmp_path, up)
    try:
        assert type(svc.executor) is Executor and svc.guard.executor is svc.executor
    finally:
        svc.close()
        up.shutdown()
    assert issubclass(ReplayService, GuardService)
    assert "execute" not in vars(ReplayService) and "step" not in vars(ReplayService)
    seen: list[type] = []
    orig = Executor.run

    def spy(self: Executor, actions: Any) -> None:
        seen.append(type(self))
        orig(self, actions)

    mp = pytest.MonkeyPatch()
    mp.setattr(Executor, "run", spy)
    try:
        assert run_seed(SimConfig(seed=1, sales=2)).ok
    finally:
        mp.undo()
    assert seen and set(seen) == {Executor}


def test_no_product_module_but_the_executor_dispatches_actions() -> None:
    pattern = re.compile(r"isinstance\([^)]*,\s*\(?\s*(Append|SendHost|Reply)\b")
    offenders = []
    for pkg in ("guard", "posguard", "firmware_bridge"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            # The executor runs actions; the engine (guard/core) only builds them and asserts
            # write-ahead on its own output, which is not executing them.
            if path == ROOT / "guard" / "runtime" / "executor.py" or path.parent == ROOT / "guard" / "core":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    assert pattern.search((ROOT / "guard" / "runtime" / "executor.py").read_text())


# ---------------------------------------------------------------------- broken executors are caught


def _send_before_its_append(actions: list[Action]) -> list[Action]:
    out = list(actions)
    for i in range(len(out) - 1):
        if isinstance(out[i], Append) and isinstance(out[i + 1], SendHost):
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _skip_outcome_commits(actions: list[Action]) -> list[Action]:
    return [a for a in actions if not (isinstance(a, Append) and a.records and a.records[0][0] == "outcome")]


@pytest.mark.parametrize("breakage", [_send_before_its_append, _skip_outcome_commits],
                         ids=["send-before-append", "skip-outcome-append"])
def test_a_broken_executor_is_caught_by_the_simulation(monkeypatch: pytest.MonkeyPatch, breakage: Any) -> None:
    orig = X.Executor.run

    def broken(self: Executor, actions: Any) -> None:
        orig(self, breakage(list(actions)))

    monkeypatch.setattr(X.Executor, "run", broken)
    found = None
    for seed in range(100):
        rep = run_seed(SimConfig(seed=seed, sales=8), keep_trace=False)
        if not rep.ok:
            found = (seed, rep.violations[0])
            break
    assert found is not None, "100 seeds ran a broken executor without a violation"


def test_simulator_sends_exercise_not_sent_and_maybe_sent() -> None:
    text = "\n".join(line for s in range(1, 41) for line in run_seed(SimConfig(seed=s)).trace)
    assert "NOT_SENT" in text and "MAYBE_SENT (arrives)" in text and "MAYBE_SENT (lost)" in text
    assert D._World.__dict__.get("execute") is None


# ---------------------------------------------------------------------- determinism


def test_sim_seed_leaves_a_byte_identical_journal(tmp_path: Path) -> None:
    """Two processes (each with its own hash seed), the same seed: the same journal.db bytes."""
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d, hash_seed in zip(dirs, ("1", "2")):  # set / dict-of-str order differs between the two
        out = subprocess.run([sys.executable, "-m", "posguard.cli", "sim", "--seed", "11", "--operator-rate", "0.5",
                              "--keep-dir", str(d)], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert out.returncode == 0, out.stdout + out.stderr
    for d in dirs:
        wal = d / "journal.db-wal"
        assert not wal.exists() or wal.stat().st_size == 0, "the journal was closed cleanly"
    a, b = ((d / "journal.db").read_bytes() for d in dirs)
    assert len(a) > 4096 and a == b
    again = subprocess.run([sys.executable, "-m", "posguard.cli", "sim", "--seed", "11", "--keep-dir", str(dirs[0])],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "already holds a journal" in again.stderr


def test_reader_bridge_subscribes_to_the_facade_and_shares_the_service_clock(tmp_path: Path) -> None:
    from firmware_bridge.daemon import ReaderBridge

    class Link:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        def send_message(self, payload: bytes) -> None:
            self.sent.append(payload)

    up = FakeUplink(rounds=1)
    ticks = iter(range(10**6))
    svc = _guard(tmp_path, up, clock=lambda: NOW + next(ticks))
    try:
        before = svc.on_reply
        link = Link()
        bridge = ReaderBridge(svc, link, "R1")  # type: ignore[arg-type]
        assert svc.on_reply is before and bridge.clock is svc.clock is svc.executor.clock
        svc.guard.deliver(Result("R1:" + "11" * 16, TxnState.APPROVED, stan=1))
        svc.guard.deliver(Result("R2:" + "22" * 16, TxnState.APPROVED, stan=2))
        assert len(link.sent) == 1 and bridge.stats["results"] == 1
    finally:
        svc.close()
        up.shutdown()
