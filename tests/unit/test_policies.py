"""Counter rules through the engine and the host simulator: what the reader is told, the journal's
decision entry, and the host ledger."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from guard.core.engine import Engine, EngineConfig
from guard.core.errors import PosguardError
from guard.simulation.hostsim import HostCore
from guard.journal.store import Journal
from guard.journal.keys import init_keys
from guard.core.model import CardData, Request, TxnKind, TxnState
from guard.core.policies import OFF, PolicyConfig, VelocityLimit
from guard.runtime.service import JournalCrypto

from tests.support.executor_support import CoreHost, Shown, executor

TID, MID = "POLICY01", "POLICYMERCHANT1"
NOW = 1_760_000_000.0
PAN_A, PAN_B = "4761739001010119", "5413330089020011"


class World:
    """Engine + real journal + HostCore in-process (no socket), driven with explicit time."""

    def __init__(self, tmp: Path, policy: PolicyConfig) -> None:
        keys = init_keys(tmp / "keys")
        self.journal = Journal.create(tmp / "j.db", keys, terminal_id=TID, now=NOW)
        self.engine = Engine(EngineConfig(TID, MID, host_timeout_s=5, policy=policy), JournalCrypto(self.journal, keys.token_key),
                             random.Random(1))
        self.host = HostCore(seed=1, dup_detection=True)
        self.now = NOW
        self.reader = Shown()
        self.shown = self.reader.results
        self.ex = executor(self.engine, self.journal, CoreHost(self.host, lambda: self.now), self.reader, lambda: self.now)
        self.ex.call(self.engine.on_host_up)

    def run(self, acts: list[Any]) -> None:
        self.ex.run(acts)

    def sale(self, i: int, amount: int = 1000, pan: str = PAN_A, dt: float = 1.0) -> Any:
        self.now += dt
        req = Request("R1", i.to_bytes(16, "big"), TxnKind.SALE, amount, "978", CardData(pan, "2912"))
        self.ex.call(self.engine.submit, req)
        return self.shown.get(req.key, req)

    def records(self, kind: str) -> list[Any]:
        return [e for e in self.journal.entries() if e.kind == kind]


def test_double_swipe_is_held_confirm_releases_new_id_does_not(tmp_path: Path) -> None:
    w = World(tmp_path, PolicyConfig(card_limits=(), terminal_limits=()))
    assert w.sale(1).state is TxnState.APPROVED
    held = w.sale(2, dt=10)
    assert held.state is TxnState.HELD and held.reason == "HOLD_DOUBLE_SWIPE"
    assert "DOUBLE SWIPE" in held.display_text
    assert w.records("held")[0].payload["code"] == "HOLD_DOUBLE_SWIPE"
    assert w.host.total_net_debits() == 1, "a held sale is never sent"
    assert w.sale(3, dt=5).state is TxnState.HELD, "a new txn id for the same swipe is held too"
    w.now += 1
    w.run(w.engine.confirm(Request("R1", (2).to_bytes(16, "big"), TxnKind.SALE, 1000, "978", CardData(PAN_A)).key, w.now))
    assert w.shown[Request("R1", (2).to_bytes(16, "big"), TxnKind.SALE, 1000, "978", CardData(PAN_A)).key].state is TxnState.APPROVED
    assert w.host.total_net_debits() == 2 and len(w.records("released")) == 1
    assert w.sale(4, amount=1001, dt=1).state is TxnState.APPROVED, "another amount is not a double swipe"
    assert w.sale(5, dt=200).state is TxnState.APPROVED, "outside the window"
    with pytest.raises(PosguardError) as ei:
        w.engine.confirm(Request("R1", (5).to_bytes(16, "big"), TxnKind.SALE, 1000, "978", CardData(PAN_A)).key, w.now)
    assert ei.value.code == "NOTHING_HELD"


def test_unconfirmed_hold_expires_to_declined_and_survives_restart(tmp_path: Path) -> None:
    w = World(tmp_path, PolicyConfig(card_limits=(), terminal_limits=(), hold_expiry_s=60))
    w.sale(1)
    held = w.sale(2)
    r = Engine.restore(w.engine.cfg, w.engine.crypto, w.journal.entries())
    assert r.txns[held.key].state is TxnState.HELD and r.recover(w.now) == [], "a held sale is not reversed at restart"
    w.now += 61
    w.run(w.engine.tick(w.now))
    assert w.shown[held.key].state is TxnState.DECLINED and w.shown[held.key].reason == "HOLD_EXPIRED"
    assert w.host.total_net_debits() == 1


def test_pending_reversal_on_card_holds_new_sales(tmp_path: Path) -> None:
    w = World(tmp_path, PolicyConfig(double_swipe_window_s=0, card_limits=(), terminal_limits=()))
    w.host.force("drop_request")
    first = w.sale(1)  # no answer: the request comes back
    w.now += 6
    w.host.force("drop_request")  # the reversal is lost too: it stays pending
    w.run(w.engine.tick(w.now))
    assert w.engine.txns[first.key].state is TxnState.REVERSAL_PENDING
    held = w.sale(2, amount=555)
    assert held.state is TxnState.HELD and held.reason == "HOLD_PENDING_REVERSAL"
    assert w.sale(3, pan=PAN_B).state is TxnState.APPROVED, "other cards are not affected"


def test_velocity_is_a_local_decline_with_its_own_code(tmp_path: Path) -> None:
    w = World(tmp_path, PolicyConfig(double_swipe_window_s=0, card_limits=(VelocityLimit(600, max_count=2),), terminal_limits=()))
    assert w.sale(1, amount=100).state is TxnState.APPROVED
    assert w.sale(2, amount=200).state is TxnState.APPROVED
    r = w.sale(3, amount=300)
    assert r.state is TxnState.DECLINED and r.reason == "VELOCITY_CARD_COUNT" and r.response_code == ""
    assert r.display_text == "CARD USED TOO FREQUENTLY"
    out = [e for e in w.records("outcome") if e.txn == r.key][0]
    assert out.payload["reason"] == "VELOCITY_CARD_COUNT" and out.payload["policy"]
    assert w.host.total_net_debits() == 2
    assert w.sale(4, amount=300, pan=PAN_B).state is TxnState.APPROVED
    assert w.sale(5, amount=300, dt=700).state is TxnState.APPROVED, "the window slides"


def test_terminal_amount_limit_from_config_declines_across_cards(tmp_path: Path) -> None:
    """[policy] terminal_max_amount: the terminal's total in the window, whatever the card."""
    from posguard.config import parse, policy_config

    cfg = parse({"terminal": {"terminal_id": "TERM0001", "merchant_id": "MERCHANT0000001"}, "reader": {"url": "loop://"},
                 "host": {"address": "127.0.0.1", "port": 9}, "journal": {"path": "j.db", "keys": "k"},
                 "policy": {"double_swipe_window": 0, "card_max_count": 0, "card_max_amount": 0, "terminal_max_count": 0,
                            "terminal_max_amount": 1000, "terminal_amount_window": 60}}, tmp_path / "g.toml")
    w = World(tmp_path, policy_config(cfg))
    assert w.sale(1, amount=600).state is TxnState.APPROVED
    r = w.sale(2, amount=500, pan=PAN_B)
    assert r.state is TxnState.DECLINED and r.reason == "VELOCITY_TERMINAL_AMOUNT"
    assert w.host.total_net_debits() == 1
    assert w.sale(3, amount=400, pan=PAN_B).state is TxnState.APPROVED, "up to the limit is allowed"
    assert w.sale(4, amount=600, pan=PAN_B, dt=61).state is TxnState.APPROVED, "the window slides"


def test_host_65_shows_the_same_text_as_local_velocity(tmp_path: Path) -> None:
    w = World(tmp_path, OFF)
    w.host.approve_rule = lambda f: "65"
    r = w.sale(1)
    assert r.state is TxnState.DECLINED and r.response_code == "65" and r.display_text == "CARD USED TOO FREQUENTLY"


@pytest.mark.parametrize("rc", ["03", "58"])
def test_host_config_codes_are_reported_as_configuration_problems(tmp_path: Path, rc: str) -> None:
    w = World(tmp_path, OFF)
    w.host.approve_rule = lambda f: rc
    assert "CONFIG" in w.sale(1).display_text


def test_void_reverses_the_original_and_is_idempotent(tmp_path: Path) -> None:
    w = World(tmp_path, OFF)
    sale = w.sale(1)
    void = Request("R1", (9).to_bytes(16, "big"), TxnKind.VOID, 1000, "978", None, (1).to_bytes(16, "big"))  # type: ignore[arg-type]
    w.run(w.engine.submit(void, w.now))
    assert w.shown[void.key].state is TxnState.APPROVED
    assert w.engine.txns[sale.key].state is TxnState.REVERSED and w.host.total_net_debits() == 0
    w.run(w.engine.submit(void, w.now))
    assert w.shown[void.key].state is TxnState.APPROVED and w.host.total_net_debits() == 0
    with pytest.raises(PosguardError) as ei:
        w.engine.submit(Request("R1", (10).to_bytes(16, "big"), TxnKind.VOID, 1000, "978", None,  # type: ignore[arg-type]
                                (1).to_bytes(16, "big")), w.now)
    assert ei.value.code == "VOID_NOT_ALLOWED"
    r = Engine.restore(w.engine.cfg, w.engine.crypto, w.journal.entries())
    assert r.txns[void.key].state is TxnState.APPROVED and r.txns[sale.key].state is TxnState.REVERSED
