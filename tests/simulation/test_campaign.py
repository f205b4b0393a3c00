"""Issue acceptance: a seeded campaign of >= 2,000 sales per host mode, every host fault kind
mixed in, the host answering like real acquirers (``AcquirerProfile.for_seed``: approvals with
08/11/16 and partial ones with 10, wait and unknown codes it sometimes booked, wrong MTIs, silent,
refusing and 0411 reversal answers), terminal crashes at any action boundary; the ledger invariant
(APPROVED iff exactly one net debit of the settled amount) holds for every sale."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from guard.simulation.deterministic import HOST_FAULTS, SimConfig, run_seed

SALES_PER_SEED = 20
TARGET_SALES = int(os.environ.get("POSGUARD_CAMPAIGN_SALES", "2000"))
MAX_SEEDS = TARGET_SALES // 10


@pytest.mark.slow
@pytest.mark.parametrize("dup_detection", [True, False], ids=["host-dedup", "host-no-dedup"])
def test_seeded_campaign_no_double_debit_no_silent_debit(tmp_path: Path, dup_detection: bool) -> None:
    sales = crashes = 0
    faults: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    answers: Counter[str] = Counter()
    partials: Counter[str] = Counter()
    failures = []
    seed = 0
    while sales < TARGET_SALES and seed < MAX_SEEDS:
        seed += 1
        rep = run_seed(SimConfig(seed=seed, sales=SALES_PER_SEED, dup_detection=dup_detection, acquirer=True),
                       workdir=tmp_path / f"seed{seed}", keep_trace=False)
        answers.update(label.split(":")[0] for label in rep.host_answers for _ in range(rep.host_answers[label]))
        partials.update(rep.partials)
        sales += rep.sales
        crashes += rep.crashes
        faults.update(rep.host_faults)
        outcomes.update(approved=rep.approved, reversed=rep.reversed, declined=rep.declined)
        if not rep.ok:
            failures.append(f"seed {seed}: {rep.violations[:3]} (reproduce: posguard sim --seed {seed} --sales {SALES_PER_SEED}"
                            f"{'' if dup_detection else ' --no-dup-detection'} --acquirer --trace)")
    print(f"sales={sales} crashes={crashes} outcomes={dict(outcomes)} faults={dict(faults)} answers={dict(answers)} "
          f"partials={dict(partials)}")
    assert not failures, "\n".join(failures[:10])
    assert sales >= TARGET_SALES, f"only {sales} sales journaled in {seed} seeds"
    missing = [k for k in HOST_FAULTS if faults[k] == 0]
    assert not missing, f"fault kinds never applied: {missing}"
    assert crashes > seed // 2 and outcomes["approved"] and outcomes["reversed"] and outcomes["declined"]
    kinds = {"approval", "partial", "system", "unknown", "wrong_mti", "silence", "refuse", "0411"}
    assert kinds <= set(answers), f"answer kinds never given: {kinds - set(answers)}"
    assert partials["accept"] and partials["cancel"], partials
