"""Many simulated terminals for the fleet tests: each a seeded deterministic simulation (faults,
crashes) with its own terminal id, keys, journal and host simulator; plus the hosts' settlement rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from guard.simulation.deterministic import SimConfig, _World


@dataclass
class SimTerminal:
    tid: str
    dir: Path
    journal: Path
    keys: Path
    settlement: list[dict[str, str]]


def run_terminal(seed: int, root: Path, sales: int = 12) -> SimTerminal:
    tid = f"T{seed:07d}"
    wd = root / tid
    wd.mkdir(parents=True)
    w = _World(SimConfig(seed=seed, tid=tid, sales=sales, operator_rate=0.2), wd)
    w.run()
    problems = w.check()
    assert not problems, (seed, problems[:3])
    if w.journal is not None:
        w.journal.close()
    return SimTerminal(tid, wd, wd / "journal.db", wd / "keys", w.host.settlement_rows())


def write_settlement(path: Path, rows: list[dict[str, str]]) -> None:
    from guard.simulation.hostledger import settlement_csv

    path.write_bytes(settlement_csv(rows))
