"""Journals produced by the real engine, fast (test and benchmark data).

``Gen`` drives ``guard.core.engine.Engine`` with a fake clock against an in-process ``HostCore``
(fields handed over as dicts, no codec), and commits the engine's ``Append`` actions in batches:
records, vault puts and shreds are the engine's own, only the number of commits differs. The
same ``HostCore`` can then be served by ``HostServer`` so a replay talks to the host that holds
the debits.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from guard.journal.keys import init_keys
from guard.simulation.hostsim import HostCore
from posguard.bench.data import MID, PANS, T0, TID, Gen, bulk_journal  # noqa: F401  (moved: benchmarks ship)
from tests.support import guard_config, write_guard_toml


def net_invariant(core: HostCore, txns: dict[str, Any]) -> list[str]:
    """APPROVED <=> exactly one net debit at the host; anything else: none. Returns violations."""
    bad = []
    for key, t in txns.items():
        if getattr(t.kind, "value", t.kind) != "SALE":
            continue
        state = t.state if isinstance(t.state, str) else t.state.value
        date = t.date if hasattr(t, "date") else t.f7[:4]
        net = core.net_debits(TID, MID, f"{t.stan:06d}", date)
        want = 1 if state == "APPROVED" else 0
        if net != want:
            bad.append(f"{key} {state} stan {t.stan}: host holds {net} net debits")
    return bad


def write_settlement(path: Path, rows: list[dict[str, str]]) -> None:
    import csv

    from guard.core.constants import SETTLEMENT_COLUMNS

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SETTLEMENT_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def guard_toml(path: Path, *, journal: Path, keys: Path, port: int, reversal_timeout: float = 30.0,
               max_attempts: int = 6, host_timeout: float = 30.0, reversal_max_age: float = 86_400.0) -> Path:
    """A guard.toml for the operator commands (the reader port is never opened by them)."""
    return write_guard_toml(path, guard_config(tid=TID, mid=MID, port=port, journal=journal, keys=keys,
                                              timeout=host_timeout, reversal_timeout=reversal_timeout,
                                              reversal_max_attempts=max_attempts, reversal_max_age=reversal_max_age,
                                              connect_timeout=1.0))


def cached_bulk(base: Path, n: int = 100_000) -> tuple[Path, Path, Path]:
    """(journal, keys dir, settlement.csv) of ``bulk_journal`` generated once per test session
    under ``base`` (pytest's basetemp). Copy the journal before changing it."""
    d = base / f"bulk{n}"
    done = d / "done"
    if not done.exists():
        d.mkdir(parents=True, exist_ok=True)
        keys = init_keys(d / "keys")
        rows = bulk_journal(d / "journal.db", keys, n)
        write_settlement(d / "settlement.csv", rows)
        done.write_text("ok")
    return d / "journal.db", d / "keys", d / "settlement.csv"


def mixed_journal(dir: Path, core: HostCore, *, approved: int = 300, lost_debited: int = 40,
                  lost_unprocessed: int = 30, needs_manual: int = 0, no_host: int = 10) -> Gen:
    """An engine-made journal with every state: APPROVED/DECLINED sales, sales whose answer was
    lost (host debited, or never saw them) left REVERSAL_PENDING by a disconnect, NEEDS_MANUAL
    ones (reversals all lost) and DECLINED NO_HOST ones. Returns the closed generator."""
    g = Gen(dir, core)
    g.host_up()
    g.sales(approved)
    if needs_manual:
        g.sales(needs_manual, respond=False)
        g.host_down()
        g.exhaust_reversals()
        g.host_up()
    g.sales(lost_debited, respond=False)
    g.sales(lost_unprocessed, respond=False, process=False)
    g.host_down()
    g.no_host_sales(no_host)
    g.close()
    return g
