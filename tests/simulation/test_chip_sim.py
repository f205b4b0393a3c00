"""Chip cards in the seeded simulation: card declines after the host approved, cards pulled,
readers that reboot before COMPLETE (or re-send a saved decision) mixed into every seed; the
invariant (APPROVED iff exactly one net debit; a card that did not accept never ends APPROVED)
holds, and an engine that skips the reversal on a card decline is caught within 100 seeds."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest

from guard.core.emv import CardDecision
from guard.core.engine import Engine
from guard.core.model import TxnState
from guard.simulation.deterministic import SimConfig, run_seed


def first_violation(tmp_path: Path, seeds: int = 100) -> int | None:
    for seed in range(1, seeds + 1):
        rep = run_seed(SimConfig(seed=seed, sales=12), workdir=tmp_path / f"s{seed}", keep_trace=False)
        if not rep.ok:
            return seed
    return None


def test_chip_seeds_hold_the_invariants_and_exercise_every_card_behaviour(tmp_path: Path) -> None:
    seen: collections.Counter[str] = collections.Counter()
    for seed in range(1, 31):
        rep = run_seed(SimConfig(seed=seed, sales=12), workdir=tmp_path / f"s{seed}")
        assert rep.ok, (seed, rep.violations[:5])
        for line in rep.trace:
            for what in ("ACCEPTED", "CARD_DECLINED", "CARD_REMOVED", "TERMINAL_ERROR"):
                if "reader COMPLETE" in line and f" {what} attempt" in line:
                    seen[what] += 1
            for what in ("reboots before the card decides", "AWAITING_COMPLETION"):
                if what in line:
                    seen[what] += 1
    print(dict(seen))
    assert all(seen[w] for w in ("ACCEPTED", "CARD_DECLINED", "CARD_REMOVED", "reboots before the card decides"))


def test_an_engine_that_skips_the_reversal_on_a_card_decline_is_caught(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    original = Engine.complete

    def mutant(self: Engine, key: str, decision: CardDecision, icc: bytes, now: float) -> Any:
        t = self.txns.get(key)
        if decision is CardDecision.CARD_DECLINED and t is not None and t.state is TxnState.AWAITING_COMPLETION:
            return self._finish(t, TxnState.DECLINED, reason="CARD_DECLINED")  # "declined" shown, debit left standing
        return original(self, key, decision, icc, now)

    monkeypatch.setattr(Engine, "complete", mutant)
    seed = first_violation(tmp_path)
    print("mutant caught at seed", seed)
    assert seed is not None, "an engine that does not reverse a card decline passed 100 seeds"


def test_an_engine_that_takes_a_card_decline_for_an_acceptance_is_caught(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    original = Engine.complete

    def mutant(self: Engine, key: str, decision: CardDecision, icc: bytes, now: float) -> Any:
        return original(self, key, CardDecision.ACCEPTED, icc, now)

    monkeypatch.setattr(Engine, "complete", mutant)
    assert first_violation(tmp_path) is not None
