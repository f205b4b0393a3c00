"""The simulation against real-world acquirer answers catches an engine that misreads them:
mutants are patched in here (no switch in product code) and must be found within 100 seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from guard.core.host_events import HostEvents
from guard.simulation.deterministic import SimConfig, run_seed


def first_violation(tmp_path: Path, seeds: int = 100) -> int | None:
    for seed in range(1, seeds + 1):
        rep = run_seed(SimConfig(seed=seed, sales=20, acquirer=True), workdir=tmp_path / f"s{seed}", keep_trace=False)
        if not rep.ok:
            return seed
    return None


@pytest.mark.parametrize("code", ["08", "11"])
def test_an_engine_that_takes_an_approval_code_for_a_decline_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        code: str) -> None:
    original = HostEvents._on_fin_response

    def mutant(self: HostEvents, t: Any, f: dict[str, str], now: float) -> Any:
        if f.get("39") == code:  # the blind spot the old host simulator shared: only 00 approves
            f = {**f, "39": "05"}
        return original(self, t, f, now)

    monkeypatch.setattr(HostEvents, "_on_fin_response", mutant)
    seed = first_violation(tmp_path)
    assert seed is not None, f"an engine treating {code} as a decline passed 100 seeds"


def test_an_engine_that_trusts_an_unknown_code_as_a_decline_is_caught(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail-safe: a code no class covers may have been booked; declining it leaves a silent debit."""
    original = HostEvents._on_fin_response

    def mutant(self: HostEvents, t: Any, f: dict[str, str], now: float) -> Any:
        if f.get("39") in ("Q7", "X1", "09", "91", "96"):
            f = {**f, "39": "05"}
        return original(self, t, f, now)

    monkeypatch.setattr(HostEvents, "_on_fin_response", mutant)
    assert first_violation(tmp_path) is not None


def test_the_unpatched_engine_passes_the_same_seeds(tmp_path: Path) -> None:
    assert first_violation(tmp_path, seeds=25) is None
